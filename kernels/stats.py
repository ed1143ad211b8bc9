"""Online-softmax statistics: merging partials, combining them across ranks, and turning them
into loss terms. Used by both fused paths (chunked torch and Triton).

A *family* f is one softmax over a line (a row or a column of the similarity matrix) with
weight logits ``w`` and, optionally, a value ``v`` averaged under it. Its statistics are
``mx = max w``, ``sm[0] = sum exp(w - mx)``, ``sm[1] = sum exp(w - mx) * v``. Partials over
disjoint pieces of a line combine exactly:

    M = max_p mx_p,   sm = sum_p sm_p * exp(mx_p - M)

which is also how the column statistics combine across ranks: an all-reduce MAX of ``mx``, then
an all-reduce SUM of the rescaled ``sm`` (N floats each), instead of a second b x N GEMM.

Families (see LossSpec): 0 student (w = S), psd teacher (w = W / tau, v = S, with W = S, or
s XP YP^T from teacher embeddings, or T: ``LossSpec.psd_source``), ecl teacher
(w = T = s Xbar Y^T, v = T - S). The statistics, their merges and the terms below are the same
whichever W the psd family has. Per line then:

    lse      = mx_0 + log sm_0[0]
    soft CE  = lse - sm_psd[1] / sm_psd[0]                  (CE of student vs psd teacher)
    KL       = sm_ecl[1] / sm_ecl[0] - lse_ecl + lse        (KL(teacher || student))
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .gather import comm_device
from .spec import Layout, LossSpec


def merge_partials(mx: torch.Tensor, sm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partials along axis 1: ``mx [F, P, L]``, ``sm [F, 2, P, L]`` -> ``[F, L]``, ``[F, 2, L]``."""
    top = mx.amax(dim=1)
    # a piece with no entries has mx = -inf and contributes 0 (never NaN: top is finite on
    # every line that has at least one entry, and all lines do)
    w = torch.exp(mx - top.unsqueeze(1)).nan_to_num_(nan=0.0)
    return top, (sm * w.unsqueeze(1)).sum(dim=2)


def merge_two(a: tuple, b: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two complete statistics ``(mx [F, L], sm [F, 2, L])`` of disjoint pieces."""
    return merge_partials(torch.stack([a[0], b[0]], 1), torch.stack([a[1], b[1]], 2))


def merge_into(acc: tuple, part: tuple) -> None:
    """Merge complete statistics ``part`` into ``acc`` in place (both ``(mx [F, L], sm [F, 2, L])``
    of disjoint pieces); temporaries: three ``[F, L]`` tensors at most."""
    amx, asm = acc
    pmx, psm = part
    top = torch.maximum(amx, pmx)
    asm.mul_(torch.exp(amx - top).nan_to_num_(nan=0.0).unsqueeze(1))
    asm.addcmul_(psm, torch.exp(pmx - top).nan_to_num_(nan=0.0).unsqueeze(1))
    amx.copy_(top)


def allreduce_stats(mx: torch.Tensor, sm: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Column statistics over every rank's rows: MAX, then a rescaled SUM (2 all-reduces).

    The reduced tensors live on the backend's communication device (``gather.comm_device``);
    the results come back to ``mx``'s device."""
    if layout.world == 1:
        return mx, sm
    home = mx.device
    comm = comm_device(layout.group, home)
    mx = mx.to(comm)
    top = mx.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=layout.group)
    scaled = sm.to(comm) * torch.exp(mx - top).nan_to_num_(nan=0.0).unsqueeze(1)
    dist.all_reduce(scaled, op=dist.ReduceOp.SUM, group=layout.group)
    return top.to(home), scaled.to(home)


def finalize(mx: torch.Tensor, sm: torch.Tensor, spec: LossSpec) -> tuple[torch.Tensor, dict]:
    """Per-line log-sum-exps ``[F, L]`` and the per-line soft CE / KL values."""
    lse = mx + torch.log(sm[:, 0])
    vals = {}
    if spec.psd:
        f = spec.f_psd
        vals["soft"] = lse[0] - sm[f, 1] / sm[f, 0]
    if spec.ecl:
        f = spec.f_ecl
        vals["kl"] = sm[f, 1] / sm[f, 0] - lse[f] + lse[0]
    return lse, vals


def assemble(row_lse, row_vals, col_lse, col_vals, diag, m_row, alpha: float, layout: Layout,
             spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's loss and its terms ``[contrastive, clip, self_distill_ce, teacher_kl]``.

    ``col_*`` are already restricted to this rank's own columns (its texts); ``m_row`` is the
    self-distillation subset mask (fp32 0/1), ``a_i = alpha * m_i`` the soft-target weight."""
    k = layout.norm
    hard = (row_lse[0] - diag) + (col_lse[0] - diag)
    zero = hard.new_zeros(())
    clip = k * hard.sum()
    if spec.psd:
        soft = row_vals["soft"] + col_vals["soft"]
        a_row = alpha * m_row
        contrastive = k * ((1.0 - a_row) * hard + a_row * soft).sum()
        sd_ce = k * (m_row * soft).sum()
    else:
        contrastive, sd_ce = clip, zero
    kl = k * (row_vals["kl"] + col_vals["kl"]).sum() if spec.ecl else zero
    loss = contrastive + spec.teacher_weight * kl if spec.ecl else contrastive
    return loss, torch.stack([contrastive, clip, sd_ce, kl])
