"""What a fused loss call computes: the options (``LossSpec``), the rank layout (``Layout``) and
the named result (``DistillLoss``). Shared by the reference, chunked and Triton paths.

    spec = LossSpec(psd=True, inv_tau=1.0, ecl=True, teacher_weight=1.0)
    spec.families        # 3: student, self-distillation teacher, momentum teacher
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .gather import gathered_layout, world_info

GPU_WORKSPACE_BYTES = 256 << 20   # KERNELS.md: the Triton backward panel stays under ~256 MB
CPU_WORKSPACE_BYTES = 64 << 20    # the chunked path: CPU GEMMs need no wider chunks


@dataclass(frozen=True)
class LossSpec:
    """Which statistics the streaming pass keeps and how the gradient is combined.

    Families of online-softmax statistics, in this order: the student (always), the
    self-distillation teacher ``softmax(stopgrad(S) * inv_tau)`` when ``psd``, the momentum
    teacher ``softmax(s * Xbar Y^T)`` when ``ecl``.
    """
    psd: bool = False
    inv_tau: float = 1.0
    ecl: bool = False
    teacher_weight: float = 1.0
    teacher_text_grad: bool = False   # ECLIPSE stops the KL's gradient at the text tower
    workspace_bytes: int | None = None   # None: the backend's default

    def budget(self, default: int) -> int:
        """The workspace budget in bytes (``default`` when none was given)."""
        return int(self.workspace_bytes) if self.workspace_bytes is not None else default

    @property
    def families(self) -> int:
        return 1 + int(self.psd) + int(self.ecl)

    @property
    def f_psd(self) -> int:
        return 1

    @property
    def f_ecl(self) -> int:
        return 1 + int(self.psd)

    @property
    def split_gy(self) -> bool:
        """True when dY needs its own gradient panel (the KL term must not reach the texts)."""
        return self.ecl and not self.teacher_text_grad and self.teacher_weight != 0.0


@dataclass(frozen=True)
class Layout:
    """Where this rank's rows sit in the gathered batch, and the loss normaliser."""
    group: object
    rank: int
    world: int
    offset: int
    sizes: tuple

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def norm(self) -> float:
        """``world / (2N)``: each rank's share, so the mean over ranks is the full-batch loss."""
        return self.world / (2.0 * self.total)

    @classmethod
    def of(cls, local_rows: int, group=None, device=None, sizes=None) -> "Layout":
        """``device``: the embeddings' (the row counts travel on ``gather.comm_device``);
        ``sizes``: every rank's row count when the caller knows it (no collective then)."""
        rank, world = world_info(group)
        offset, sizes = gathered_layout(local_rows, group, device=device, sizes=sizes)
        return cls(group, rank, world, offset, tuple(int(s) for s in sizes))


class DistillLoss(NamedTuple):
    """Named terms of ``gathered_distill_loss``; each is this rank's share (mean over ranks =
    the full-batch value). Only ``loss`` carries gradients.

    - ``loss = contrastive + teacher_weight * teacher_kl``
    - ``contrastive``: soft-target CE with targets ``(1 - a_i) onehot + a_i p~_i``, both directions
    - ``clip``: the plain one-hot CLIP loss (what ``gathered_clip_loss`` returns)
    - ``self_distill_ce``: CE against the model's own detached distribution over the subset
    - ``teacher_kl``: ``KL(momentum teacher || student)``, both directions (0 without a teacher)
    """
    loss: torch.Tensor
    contrastive: torch.Tensor
    clip: torch.Tensor
    self_distill_ce: torch.Tensor
    teacher_kl: torch.Tensor


def check_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor,
                     teacher_image_emb: torch.Tensor | None = None) -> None:
    """Shape checks with messages that name what was passed."""
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError("image_emb and text_emb must both be [b, D]. "
                         f"Got: {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if image_emb.device != text_emb.device:
        raise ValueError(f"image_emb and text_emb must share a device. Got: {image_emb.device} "
                         f"and {text_emb.device}")
    if teacher_image_emb is not None and teacher_image_emb.shape != image_emb.shape:
        raise ValueError("teacher_image_emb must have image_emb's shape "
                         f"{tuple(image_emb.shape)}. Got: {tuple(teacher_image_emb.shape)}")


def check_alpha(alpha) -> float:
    """The one-hot/soft mixing weight ``a_t`` of self-distillation, as a float in [0, 1]."""
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"self_distill_alpha must be in [0, 1]. Got: {alpha}")
    return a


def subset_mask(b: int, mask: torch.Tensor | None, device) -> torch.Tensor:
    """The self-distillation subset as fp32 0/1 ``[b]`` (all rows when ``mask`` is None)."""
    if mask is None:
        return torch.ones(b, device=device)
    if mask.shape != (b,):
        raise ValueError(f"self_distill_mask must be [b] = [{b}]. Got: {tuple(mask.shape)}")
    return (mask.to(device=device) != 0).to(torch.float32)


def as_scale(logit_scale, like: torch.Tensor) -> torch.Tensor:
    """The exponentiated logit scale as a 0-dim tensor on ``like``'s device (keeps autograd)."""
    if not torch.is_tensor(logit_scale):
        return torch.tensor(float(logit_scale), device=like.device)
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must hold one value. Got: {tuple(logit_scale.shape)}")
    return logit_scale.reshape(())
