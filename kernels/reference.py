"""Plain-torch gathered CLIP loss: materialised logits, obviously correct.

Math (../shared/METHODS.md section 0): ``S = s * X Y^T`` over the global batch of ``N`` pairs.
Rank ``r`` owns rows ``o .. o+b`` and computes only them, in both directions:

    image -> text: local images  vs all N texts,  labels o + arange(b)
    text -> image: local texts   vs all N images, labels o + arange(b)

and returns ``world / (2N) * (sum of its 2b cross-entropies)``. With equal local batches that is
the ``1/(2b)`` of the design notes; the mean over ranks is the full-batch loss, so DeepSpeed's
gradient averaging gives the full-batch gradient (the gathers carry gradients back to the owners).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gather import all_gather_with_grad, gathered_layout, world_info
from .spec import DistillLoss, as_scale, check_alpha, check_embeddings, subset_mask


def clip_loss_torch(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                    *, group=None, sizes=None) -> torch.Tensor:
    """This rank's share of the symmetric contrastive loss (see module docstring)."""
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"image_emb and text_emb must both be [b, D]; got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    _, world = world_info(group)
    b = image_emb.shape[0]
    offset, sizes = gathered_layout(b, group, device=image_emb.device, sizes=sizes)
    all_images = all_gather_with_grad(image_emb, group, sizes)   # [N, D]
    all_texts = all_gather_with_grad(text_emb, group, sizes)     # [N, D]
    labels = torch.arange(offset, offset + b, device=image_emb.device)
    logits_i2t = logit_scale * image_emb.float() @ all_texts.float().T   # [b, N]
    logits_t2i = logit_scale * text_emb.float() @ all_images.float().T   # [b, N]
    total = (F.cross_entropy(logits_i2t, labels, reduction="sum")
             + F.cross_entropy(logits_t2i, labels, reduction="sum"))
    return total * (world / (2.0 * sum(sizes)))


def _log_softmax_terms(logits: torch.Tensor, labels: torch.Tensor, inv_tau: float):
    """Per-row one-hot CE and soft CE against ``softmax(stopgrad(logits) * inv_tau)``."""
    logp = F.log_softmax(logits, dim=1)
    hard = -logp.gather(1, labels[:, None]).squeeze(1)
    soft = -(F.softmax(logits.detach() * inv_tau, dim=1) * logp).sum(1)
    return hard, soft


def _teacher_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(teacher) || softmax(student))``, teacher without gradient."""
    return F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher.detach(), 1),
                    log_target=True, reduction="none").sum(1)


def distill_loss_torch(image_emb, text_emb, logit_scale, *, self_distill_alpha=None,
                       self_distill_mask=None, self_distill_tau: float = 1.0,
                       teacher_image_emb=None, teacher_weight: float = 1.0,
                       teacher_text_grad: bool = False, group=None, sizes=None) -> DistillLoss:
    """Materialised-logits reference of ``gathered_distill_loss`` (METHODS.md sections 1, 2).

    Both directions per rank: local images vs all texts and local texts vs all images.
    Self-distillation targets ``(1 - a_i) onehot + a_i softmax(stopgrad(S_i) / tau)`` with
    ``a_i = alpha * mask_i``; momentum teacher ``KL(softmax(s Xbar Y^T) || softmax(s X sg(Y)^T))``
    (text gradients stopped unless ``teacher_text_grad``).
    """
    check_embeddings(image_emb, text_emb, teacher_image_emb)
    _, world = world_info(group)
    b = image_emb.shape[0]
    offset, sizes = gathered_layout(b, group, device=image_emb.device, sizes=sizes)
    k = world / (2.0 * sum(sizes))
    s = as_scale(logit_scale, image_emb).float()
    x, y = image_emb.float(), text_emb.float()
    xa = all_gather_with_grad(image_emb, group, sizes).float()
    ya = all_gather_with_grad(text_emb, group, sizes).float()
    labels = torch.arange(offset, offset + b, device=image_emb.device)
    inv_tau = 1.0 / self_distill_tau
    hard_i, soft_i = _log_softmax_terms(s * x @ ya.T, labels, inv_tau)
    hard_t, soft_t = _log_softmax_terms(s * y @ xa.T, labels, inv_tau)
    hard, soft = hard_i + hard_t, soft_i + soft_t
    clip = k * hard.sum()
    zero = clip.new_zeros(())
    if self_distill_alpha is None:
        contrastive, sd_ce = clip, zero
    else:
        m = subset_mask(b, self_distill_mask, image_emb.device)
        a = check_alpha(self_distill_alpha) * m
        contrastive = k * ((1 - a) * hard + a * soft).sum()
        sd_ce = k * (m * soft).sum()
    kl = zero
    if teacher_image_emb is not None:
        xt = teacher_image_emb.detach().float()
        with torch.no_grad():
            xta = all_gather_with_grad(xt, group, sizes)
        y_s = y if teacher_text_grad else y.detach()
        ya_s = ya if teacher_text_grad else ya.detach()
        kl = k * (_teacher_kl(s * x @ ya_s.T, s * xt @ ya.T)
                  + _teacher_kl(s * y_s @ xa.T, s * y @ xta.T)).sum()
    loss = contrastive + teacher_weight * kl if teacher_image_emb is not None else contrastive
    return DistillLoss(loss, contrastive.detach(), clip.detach(), sd_ce.detach(), kl.detach())
