"""The fused gathered loss as one autograd Function, shared by the chunked-torch and Triton
backends (they differ only in how the two streaming passes run).

Math (kernels/README.md; rank r holds rows o..o+b of N, k = world / (2N), s the logit scale):

    forward   one pass over S = s X Y^T (Y = all texts, gathered with gradients) keeps, per row
              and per column, the online-softmax statistics of every family (stats.py);
              column statistics are combined across ranks (all-reduce MAX, rescaled SUM).
    loss      k * sum_{i in r} [(1 - a_i) hard_i + a_i soft_i]   (rows and own columns)
              + w_kd * k * sum KL_i                              (see stats.assemble)
    gradient  dL/dS_ij = k * G_ij with, for local row i and any column j,
              G = P + Q - (2 - a_i - a_j)[j = o+i] - a_i P~ - a_j Q~          (contrastive)
                + w_kd (P + Q - Pbar - Qbar)                                   (momentum KL)
              P = exp(S - r_i), Q = exp(S - c_j) (student row / column softmax), P~, Q~ the
              self-distillation teacher's (weight logits W / tau: W = S, or s XP YP^T from
              teacher embeddings, or the momentum teacher's T; spec.psd_source), Pbar, Qbar
              the momentum teacher's.
    backward  recompute G in column panels (bounded workspace), then GEMMs:
              dX = k s sum_p G_p Y_p,  dY_p = k s G_p^T X (to the owners via the gather's
              backward),  ds = k sum_ij G_ij <x_i, y_j> = <X, dX> / s.

G is kept unscaled (entries in [-2, 2]) so that bf16/fp16 panels lose nothing to underflow;
k, s and the incoming gradient are applied to the GEMM outputs in fp32.

    loss, terms = fused_loss(img, txt, scale, backend=ChunkedBackend(), spec=LossSpec())
"""
from __future__ import annotations

from collections import deque

import torch

from .gather import all_gather_with_grad
from .spec import Layout, LossSpec, as_scale, check_alpha, check_embeddings, subset_mask
from .stats import allreduce_stats, assemble, finalize


class WorkspaceLog:
    """What the launchers planned to allocate, in bounded memory (it lives for the whole run).

    Each launcher call opens a phase (``phase``) and adds its buffers (``alloc``) and the
    temporaries torch ops make next to them (``note``). Kept: the last ``keep`` launches as
    ``records`` (label, bytes), the launch count and the largest launch since ``reset``.

        WORKSPACE.reset(); loss.backward(); assert WORKSPACE.peak_bytes() <= budget
    """

    def __init__(self, keep: int = 8):
        self.records: deque = deque(maxlen=keep)   # [label, bytes] of the last launches
        self.launches = 0
        self._peak = 0

    def reset(self) -> None:
        self.records.clear()
        self._peak = 0

    def phase(self, name: str) -> str:
        """A fresh label for one launcher call's buffers (they live together)."""
        self.launches += 1
        label = f"{name}:{self.launches}"
        self.records.append([label, 0])
        return label

    def _add(self, phase: str, nbytes: int) -> None:
        if not self.records or self.records[-1][0] != phase:   # not the open launch: reopen it
            self.records.append([phase, 0])
        self.records[-1][1] += int(nbytes)
        self._peak = max(self._peak, self.records[-1][1])

    def alloc(self, phase: str, shape, dtype, device) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=device)
        self._add(phase, t.numel() * t.element_size())
        return t

    def note(self, phase: str, nbytes: int) -> None:
        """Account for temporaries that torch ops make next to the buffers of ``phase``."""
        self._add(phase, nbytes)

    def peak_bytes(self) -> int:
        """Largest total of one launch (its buffers live together) since ``reset``."""
        return self._peak


WORKSPACE = WorkspaceLog()


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in fp32; half inputs stay half in the GEMM (fp32 accumulate) on CUDA."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):   # older torch: no out_dtype
            return (a @ b).float()
    return a.float() @ b.float()


def backward_panels(backend, X, Y, XT, s32, lse_row, lse_col, a_row, a_col, layout: Layout,
                    spec: LossSpec, coef_s: torch.Tensor, need_dy: bool, XP=None, YP=None):
    """``G Y`` (fp32 ``[b, D]``) and ``dY = coef_s * G_y^T X``, one column panel at a time.
    ``XP`` / ``YP``: the self-distillation teacher's embeddings (``spec.psd_teacher``)."""
    b, D = X.shape
    N = Y.shape[0]
    width, bufs = backend.panels(b, N, X.dtype, X.device, spec)
    gy_sum = torch.zeros((b, D), dtype=torch.float32, device=X.device)
    dY = torch.empty_like(Y) if need_dy else None
    for p0 in range(0, N, width):
        p1 = min(N, p0 + width)
        gx, gy = backend.grad_panel(X, Y, XT, s32, lse_row, lse_col, a_row, a_col,
                                    layout.offset, p0, p1, spec, bufs, XP=XP, YP=YP)
        gy_sum += _mm_f32(gx, Y[p0:p1])
        if dY is not None:
            dY[p0:p1] = (_mm_f32(gy.t(), X) * coef_s).to(dY.dtype)
    return gy_sum, dY


class FusedGatheredLoss(torch.autograd.Function):
    """Inputs: local ``X [b, D]``, gathered ``Y [N, D]``, 0-dim ``scale``, optional teacher
    ``XT [b, D]``, subset masks ``m_row [b]`` / ``m_col [N]`` (or None), the self-distillation
    teacher's local images ``XP [b, D]`` and gathered texts ``YP [N, D]`` (None: unused, or for
    ``YP`` the student's ``Y``). Returns the loss and the detached terms
    ``[contrastive, clip, self_distill_ce, teacher_kl]``."""

    @staticmethod
    def forward(ctx, X, Y, scale, XT, m_row, m_col, alpha, spec, layout, backend, XP=None, YP=None):
        # statistics stay fp32 even inside an autocast region
        with torch.no_grad(), torch.autocast(X.device.type, enabled=False):
            s32 = scale.detach().float()
            (rmx, rsm), (cmx, csm) = backend.stats(X, Y, XT, s32, spec, XP=XP, YP=YP, group=layout.group)
            cmx, csm = allreduce_stats(cmx, csm, layout)
            lse_row, row_vals = finalize(rmx, rsm, spec)
            lse_col, col_vals = finalize(cmx, csm, spec)
            own = slice(layout.offset, layout.offset + X.shape[0])
            diag = s32 * (X.float() * Y[own].float()).sum(1)
            loss, terms = assemble(lse_row, row_vals, lse_col[:, own],
                                   {k: v[own] for k, v in col_vals.items()},
                                   diag, m_row, alpha, layout, spec)
        ctx.save_for_backward(X, Y, scale, XT, lse_row, lse_col, m_row, m_col, XP, YP)
        ctx.alpha, ctx.spec, ctx.layout, ctx.backend = alpha, spec, layout, backend
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, g_loss, _g_terms):
        X, Y, scale, XT, lse_row, lse_col, m_row, m_col, XP, YP = ctx.saved_tensors
        spec, layout = ctx.spec, ctx.layout
        s32 = scale.detach().float()
        coef = g_loss.float() * layout.norm
        a_row = ctx.alpha * m_row if m_row is not None else None
        a_col = ctx.alpha * m_col if m_col is not None else None
        with torch.autocast(X.device.type, enabled=False):
            gy_sum, dY = backward_panels(ctx.backend, X, Y, XT, s32, lse_row, lse_col, a_row,
                                         a_col, layout, spec, coef * s32, ctx.needs_input_grad[1],
                                         XP=XP, YP=YP)
        d_scale = None
        if ctx.needs_input_grad[2]:
            d_scale = (coef * (X.float() * gy_sum).sum()).to(scale.dtype)
        dX = gy_sum.mul_(coef * s32).to(X.dtype) if ctx.needs_input_grad[0] else None   # in place
        return dX, dY, d_scale, None, None, None, None, None, None, None, None, None


def fused_loss(image_emb, text_emb, logit_scale, *, backend, spec: LossSpec = LossSpec(),
               group=None, teacher_image_emb=None, self_distill_alpha: float = 0.0,
               self_distill_mask=None, self_distill_teacher_image=None,
               self_distill_teacher_text=None, sizes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the texts (with gradients) and run the fused loss on ``backend``.

        loss, terms = fused_loss(img, txt, scale, backend=ChunkedBackend(), spec=LossSpec())
        spec = LossSpec(psd=True, psd_source="teacher")   # soft targets from teacher embeddings
        loss, terms = fused_loss(img, txt, scale, backend=b, spec=spec, self_distill_alpha=0.3,
                                 self_distill_teacher_image=xp, self_distill_teacher_text=yp)

    The teacher texts (``self_distill_teacher_text``, local ``[b, D]``) are gathered without
    gradients; None means the student's gathered texts, detached."""
    check_embeddings(image_emb, text_emb, teacher_image_emb,
                     self_distill_teacher_image=self_distill_teacher_image,
                     self_distill_teacher_text=self_distill_teacher_text)
    if spec.ecl and teacher_image_emb is None:
        raise ValueError("spec.ecl needs teacher_image_emb. Got: None")
    if spec.psd_teacher and self_distill_teacher_image is None:
        raise ValueError("spec.psd_source='teacher' needs self_distill_teacher_image. Got: None")
    if self_distill_teacher_text is not None and self_distill_teacher_image is None:
        raise ValueError("self_distill_teacher_text needs self_distill_teacher_image. Got: None")
    layout = Layout.of(image_emb.shape[0], group, device=image_emb.device, sizes=sizes)
    texts = all_gather_with_grad(text_emb, group, list(layout.sizes))
    scale = as_scale(logit_scale, image_emb)
    m_row = m_col = None
    alpha = check_alpha(self_distill_alpha)
    if spec.psd:
        m_row = subset_mask(image_emb.shape[0], self_distill_mask, image_emb.device)
        with torch.no_grad():
            m_col = all_gather_with_grad(m_row, group, list(layout.sizes))
    xt = teacher_image_emb.detach() if spec.ecl else None
    xp = yp = None
    if spec.psd_teacher:
        xp = self_distill_teacher_image.detach()
        if self_distill_teacher_text is not None:
            with torch.no_grad():
                yp = all_gather_with_grad(self_distill_teacher_text.detach(), group, list(layout.sizes))
    return FusedGatheredLoss.apply(image_emb, texts, scale, xt, m_row, m_col, alpha, spec,
                                   layout, backend, xp, yp)
