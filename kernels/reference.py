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


def clip_loss_torch(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                    *, group=None) -> torch.Tensor:
    """This rank's share of the symmetric contrastive loss (see module docstring)."""
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"image_emb and text_emb must both be [b, D]; got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    _, world = world_info(group)
    b = image_emb.shape[0]
    offset, sizes = gathered_layout(b, group, device=image_emb.device)
    all_images = all_gather_with_grad(image_emb, group, sizes)   # [N, D]
    all_texts = all_gather_with_grad(text_emb, group, sizes)     # [N, D]
    labels = torch.arange(offset, offset + b, device=image_emb.device)
    logits_i2t = logit_scale * image_emb.float() @ all_texts.float().T   # [b, N]
    logits_t2i = logit_scale * text_emb.float() @ all_images.float().T   # [b, N]
    total = (F.cross_entropy(logits_i2t, labels, reduction="sum")
             + F.cross_entropy(logits_t2i, labels, reduction="sum"))
    return total * (world / (2.0 * sum(sizes)))
