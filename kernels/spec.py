"""What a fused loss call computes: the options (``LossSpec``), the rank layout (``Layout``) and
the named result (``DistillLoss``). Shared by the reference, chunked and Triton paths.

    spec = LossSpec(psd=True, inv_tau=1.0, ecl=True, teacher_weight=1.0)
    spec.families        # 3: student, self-distillation teacher, momentum teacher
    LossSpec(psd=True, psd_source="teacher")   # soft targets from teacher embeddings XP, YP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .gather import gathered_layout, world_info

GPU_WORKSPACE_BYTES = 256 << 20   # kernels/README.md: the Triton backward panel stays under ~256 MB
CPU_WORKSPACE_BYTES = 64 << 20    # the chunked path: CPU GEMMs need no wider chunks
PSD_SOURCES = ("self", "teacher", "ecl")   # LossSpec.psd_source; the Triton PSD_SRC is the index


@dataclass(frozen=True)
class LossSpec:
    """Which statistics the streaming pass keeps and how the gradient is combined.

    Families of online-softmax statistics, in this order: the student (always), the
    self-distillation teacher ``softmax(W * inv_tau)`` when ``psd``, the momentum teacher
    ``softmax(s * Xbar Y^T)`` when ``ecl``. ``psd_source`` says where the self-distillation
    weight logits ``W`` come from (the value averaged under them is always the student's S):

    - ``"self"``: ``W = stopgrad(S)``, the same pass (no extra dot product);
    - ``"teacher"``: ``W = s * XP YP^T`` from teacher embeddings (local images XP, gathered
      texts YP; an extra dot product per tile);
    - ``"ecl"``: ``W = T = s * Xbar Y^T``, the momentum family's logits, reused (needs ``ecl``;
      the case ``XP is Xbar`` and ``YP`` = the student texts).
    """
    psd: bool = False
    inv_tau: float = 1.0
    ecl: bool = False
    psd_source: str = "self"
    teacher_weight: float = 1.0
    teacher_text_grad: bool = False   # ECLIPSE stops the KL's gradient at the text tower
    workspace_bytes: int | None = None   # None: the backend's default

    def __post_init__(self):
        if self.psd_source not in PSD_SOURCES:
            raise ValueError(f"psd_source must be one of {PSD_SOURCES}. Got: {self.psd_source!r}")
        if self.psd_source == "ecl" and not self.ecl:
            raise ValueError("psd_source='ecl' reuses the momentum teacher's logits: it needs ecl=True. "
                             "Got: ecl=False")

    @property
    def psd_teacher(self) -> bool:
        """True when the pass needs the teacher embeddings XP, YP (one more dot per tile)."""
        return self.psd and self.psd_source == "teacher"

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
    - ``self_distill_ce``: CE against the self-distillation teacher's distribution over the subset
      (the model's own detached one, or that of ``self_distill_teacher_*`` embeddings)
    - ``teacher_kl``: ``KL(momentum teacher || student)``, both directions (0 without a teacher)
    """
    loss: torch.Tensor
    contrastive: torch.Tensor
    clip: torch.Tensor
    self_distill_ce: torch.Tensor
    teacher_kl: torch.Tensor


def check_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor,
                     teacher_image_emb: torch.Tensor | None = None, **teachers) -> None:
    """Shape checks with messages that name what was passed."""
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError("image_emb and text_emb must both be [b, D]. "
                         f"Got: {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if image_emb.device != text_emb.device:
        raise ValueError(f"image_emb and text_emb must share a device. Got: {image_emb.device} "
                         f"and {text_emb.device}")
    for name, t in dict(teachers, teacher_image_emb=teacher_image_emb).items():
        if t is not None and t.shape != image_emb.shape:
            raise ValueError(f"{name} must have image_emb's shape "
                             f"{tuple(image_emb.shape)}. Got: {tuple(t.shape)}")


def psd_source(self_distill_teacher_image, self_distill_teacher_text, teacher_image_emb) -> str:
    """Where the self-distillation teacher's logits come from (``LossSpec.psd_source``).

    ``"ecl"`` when the teacher images are the momentum teacher's very tensor (``is``) and the
    texts are the student's: then ``s XP YP^T`` is the momentum family's T, already computed."""
    if self_distill_teacher_image is None:
        if self_distill_teacher_text is not None:
            raise ValueError("self_distill_teacher_text needs self_distill_teacher_image (the "
                             "teacher's images). Got: self_distill_teacher_image=None")
        return "self"
    if self_distill_teacher_image is teacher_image_emb and self_distill_teacher_text is None:
        return "ecl"
    return "teacher"


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
