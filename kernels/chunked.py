"""The fused algorithm in plain torch, for CPUs (and as a readable twin of the Triton kernels).

Same math as fused.py / the Triton kernels: the forward streams over column chunks of
``S = s X Y^T`` (all local rows at once, so each chunk's column statistics are complete for
this rank and the row statistics merge online); the backward recomputes column panels of the
gradient matrix G and hands them to the shared GEMM loop. Chunk and panel widths come from the
workspace budget, counting every ``[b, width]`` fp32 temporary alive at once, so the memory
above the inputs is O(b + N) plus at most ``spec.workspace_bytes`` (default 64 MiB).

    from kernels.chunked import clip_loss_chunked
    loss = clip_loss_chunked(image_emb, text_emb, logit_scale, group=None)
"""
from __future__ import annotations

import torch

from .fused import fused_loss
from .spec import CPU_WORKSPACE_BYTES, LossSpec
from .stats import merge_two

_NEG_INF = float("-inf")


def _line_stats(w: torch.Tensor, v: torch.Tensor | None, dim: int):
    """Max, sum exp and exp-weighted sum of ``v`` of weight logits ``w`` along ``dim``."""
    mx = w.amax(dim=dim, keepdim=True)
    e = torch.exp(w - mx)
    l = e.sum(dim=dim)
    a = (e.mul_(v)).sum(dim=dim) if v is not None else torch.zeros_like(l)
    return mx.squeeze(dim), torch.stack([l, a])


def _psd_logits(z, t, tp, spec: LossSpec) -> torch.Tensor:
    """The self-distillation teacher's weight logits ``W / tau`` on one tile (spec.psd_source):
    W = z (student), tp (teacher embeddings, s XP YP^T) or t (the momentum teacher's T)."""
    w = {"self": z, "teacher": tp, "ecl": t}[spec.psd_source]
    return w * spec.inv_tau if spec.inv_tau != 1.0 else w


def _family_tiles(z: torch.Tensor, t: torch.Tensor | None, spec: LossSpec, tp=None):
    """``(weight logits, value)`` of each family on one tile of student logits ``z``."""
    fams = [(z, None)]
    if spec.psd:
        fams.append((_psd_logits(z, t, tp, spec), z))
    if spec.ecl:
        fams.append((t, t - z))
    return fams


def _width(b: int, n: int, temporaries: int, budget: int, what: str) -> int:
    width = budget // (4 * b * temporaries)
    if width < 1:
        raise ValueError(f"workspace_bytes={budget} is too small for the chunked {what}: one "
                         f"column needs {4 * b * temporaries} bytes. Got: b={b}")
    return min(n, width)


class ChunkedBackend:
    """Pure-torch passes for ``fused.FusedGatheredLoss`` (fp32 statistics and panels)."""

    name = "chunked"

    def stats(self, X, Y, XT, s32, spec: LossSpec, XP=None, YP=None, group=None):
        b, N = X.shape[0], Y.shape[0]
        # alive per column: z, t, (t - z), w, exp(w - m) for each of two directions (+ tp)
        width = _width(b, N, 4 + 3 * int(spec.ecl) + int(spec.psd) + int(spec.psd_teacher),
                       spec.budget(CPU_WORKSPACE_BYTES), "forward")
        x32 = X.float()
        xt32 = XT.float() if spec.ecl else None
        xp32 = XP.float() if spec.psd_teacher else None
        F = spec.families
        col_mx = x32.new_empty((F, N))
        col_sm = x32.new_empty((F, 2, N))
        row = None
        for c0 in range(0, N, width):
            yc = Y[c0:c0 + width].float()
            z = (x32 @ yc.t()).mul_(s32)
            t = (xt32 @ yc.t()).mul_(s32) if spec.ecl else None
            tp = None
            if spec.psd_teacher:   # the shared text tower (YP None): the student's texts
                tp = (xp32 @ (yc if YP is None else YP[c0:c0 + width].float()).t()).mul_(s32)
            fams = _family_tiles(z, t, spec, tp)
            rmx, rsm, cmx, csm = [], [], [], []
            for w, v in fams:
                m, sm = _line_stats(w, v, 1)
                rmx.append(m)
                rsm.append(sm)
                m, sm = _line_stats(w, v, 0)
                cmx.append(m)
                csm.append(sm)
            del z, t, tp, fams
            part = (torch.stack(rmx), torch.stack(rsm))
            row = part if row is None else merge_two(row, part)
            col_mx[:, c0:c0 + width] = torch.stack(cmx)
            col_sm[:, :, c0:c0 + width] = torch.stack(csm)
        return row, (col_mx, col_sm)

    def panels(self, b, N, dtype, device, spec: LossSpec):
        # alive per column: z, P, Q, G (+ P~ / Q~ temporaries, + t, Pbar/Qbar and G_y, + tp)
        temps = 4 + int(spec.psd) + 3 * int(spec.ecl) + int(spec.psd_teacher)
        return _width(b, N, temps, spec.budget(CPU_WORKSPACE_BYTES), "backward panel"), None

    def grad_panel(self, X, Y, XT, s32, lse_row, lse_col, a_row, a_col, offset, p0, p1, spec,
                   _bufs, XP=None, YP=None):
        x32 = X.float()
        yp = Y[p0:p1].float()
        z = (x32 @ yp.t()).mul_(s32)
        r, c = lse_row[:, :, None], lse_col[:, None, p0:p1]
        p = torch.exp(z - r[0])
        q = torch.exp(z - c[0])
        g = p + q
        t = (XT.float() @ yp.t()).mul_(s32) if spec.ecl else None
        if spec.psd:
            tp = None
            if spec.psd_teacher:
                tp = (XP.float() @ (yp if YP is None else YP[p0:p1].float()).t()).mul_(s32)
            zt = _psd_logits(z, t, tp, spec) if spec.psd_source != "self" else z * spec.inv_tau
            del tp
            g -= a_row[:, None] * torch.exp(zt - r[spec.f_psd])
            g -= a_col[None, p0:p1] * torch.exp(zt - c[spec.f_psd])
        self._diagonal(g, a_row, a_col, offset, p0, p1)
        if not spec.ecl:
            return g, g
        kd = p + q - torch.exp(t - r[spec.f_ecl]) - torch.exp(t - c[spec.f_ecl])
        gx = g + spec.teacher_weight * kd
        return gx, (g if spec.split_gy else gx)

    @staticmethod
    def _diagonal(g, a_row, a_col, offset, p0, p1):
        """Subtract the one-hot targets ``(2 - a_i - a_j)`` where column ``j = offset + i``."""
        b = g.shape[0]
        lo, hi = max(p0, offset), min(p1, offset + b)
        if lo >= hi:
            return
        rows = torch.arange(lo - offset, hi - offset, device=g.device)
        cols = torch.arange(lo - p0, hi - p0, device=g.device)
        target = torch.full((hi - lo,), 2.0, device=g.device)
        if a_row is not None:
            target = target - a_row[rows] - a_col[lo:hi]
        g[rows, cols] -= target


def clip_loss_chunked(image_emb, text_emb, logit_scale, *, group=None,
                      workspace_bytes: int | None = None) -> torch.Tensor:
    """``gathered_clip_loss(..., impl="chunked")``: same value and gradients as the reference."""
    loss, _ = fused_loss(image_emb, text_emb, logit_scale, backend=ChunkedBackend(),
                         spec=LossSpec(workspace_bytes=workspace_bytes),
                         group=group)
    return loss
