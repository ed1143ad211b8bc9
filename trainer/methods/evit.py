"""Cheaper image towers at run time: EViT token reorganisation (Liang et al., ICLR 2022) and FLIP's
random patch dropout, inside the ``transformers`` CLIP vision tower (docs/methods.md).

    install(model.vision_model, drop_layers=[3, 6, 9], fuse=True, mode="evit")
    set_keep_rate(model.vision_model, 0.7)           # 1.0: the stock tower, bit for bit
    with expedited(model.vision_model, 0.7): ...     # set, then restore

``install`` swaps the classes of the chosen encoder layers (``mode="evit"``) or of the patch
embeddings (``mode="random"``) for subclasses: parameters, names and the state dict are unchanged,
so a trained tower exports as a standard ``CLIPModel`` and runs at full capacity anywhere.

EViT, in each drop layer with ``n`` tokens (class token + ``n - 1`` others), after attention and
before the MLP: keep the ``ceil(k (n - 1))`` tokens the class token attends to most (its softmax
row, averaged over heads; kept in order of that attention, as EViT's ``topk(sorted=True)``), and
with ``fuse`` add one token, the sum of the dropped ones weighted by their attention. A fused token
from an earlier drop layer competes like any other token in the next one (EViT's reference does
the same). Attention itself stays on SDPA: q, k, v are computed once and the class token's row is
``softmax(q_cls k^T * scale)``, O(n) extra work.

FLIP (``mode="random"``): at the input, after the patch and position embeddings, each image keeps
``ceil(k (n - 1))`` patch tokens chosen uniformly at random (torch's RNG on the tensor's device, so
the trainer's saved RNG state makes it reproducible), and the class token.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings

MODES = ("evit", "random")


def default_drop_layers(num_layers: int) -> list[int]:
    """EViT's drop layers (0-indexed 3, 6, 9 of 12) at the same relative depths: ``[1, 2, 3]`` for
    the 4-layer tiny preset, ``[3, 6, 9]`` for 12 layers, ``[6, 12, 18]`` for 24."""
    if num_layers < 2:
        return []
    return sorted({min(num_layers - 1, max(1, round(f * num_layers))) for f in (3 / 12, 6 / 12, 9 / 12)})


def kept_patches(num_tokens: int, keep_rate: float) -> int:
    """Tokens kept out of ``num_tokens`` non-class tokens: ``ceil(keep_rate * num_tokens)``, at least 1
    (the small epsilon keeps ``0.7 * 10`` from rounding up to 8 through floating point)."""
    return max(1, min(num_tokens, math.ceil(keep_rate * num_tokens - 1e-9)))


def keep_rate_at(step: int, warmup_steps: int, shrink_steps: int, keep_rate: float) -> float:
    """EViT's schedule (its ``adjust_keep_rate``): 1 through ``warmup_steps``, then a cosine from 1
    down to ``keep_rate`` over the next ``shrink_steps``, then ``keep_rate`` held to the end."""
    if step <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, shrink_steps))
    return keep_rate + (1.0 - keep_rate) * 0.5 * (1 + math.cos(math.pi * progress))


class EViTEncoderLayer(CLIPEncoderLayer):
    """A CLIP encoder layer that reorganises its tokens when ``keep_rate < 1`` (module doc)."""
    keep_rate: float = 1.0
    fuse: bool = True
    tokens_out: int | None = None
    record: bool = False      # tests: keep the last selection in ``self.last``

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        n = hidden_states.shape[1]
        keep = kept_patches(n - 1, self.keep_rate)
        if self.keep_rate >= 1.0 or keep >= n - 1:
            self.tokens_out = n
            return super().forward(hidden_states, attention_mask, **kwargs)
        attn = self.self_attn
        b, _, d = hidden_states.shape
        residual = hidden_states
        h = self.layer_norm1(hidden_states)
        shape = (b, n, attn.num_heads, attn.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale,
                                             dropout_p=attn.dropout if self.training else 0.0)
        x = residual + attn.out_proj(out.transpose(1, 2).reshape(b, n, d))
        # the class token's attention to every token, mean over heads: [b, n - 1] (fp32 softmax)
        row = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * attn.scale
        cls_attn = row.softmax(-1).mean(1)[:, 0, 1:]
        order = cls_attn.argsort(dim=1, descending=True)
        top, rest = order[:, :keep], order[:, keep:]
        others = x[:, 1:]
        kept = others.gather(1, top.unsqueeze(-1).expand(-1, -1, d))
        parts = [x[:, :1], kept]
        if self.fuse:
            dropped = others.gather(1, rest.unsqueeze(-1).expand(-1, -1, d))
            weight = cls_attn.gather(1, rest).to(x.dtype).unsqueeze(-1)
            parts.append((dropped * weight).sum(1, keepdim=True))
        x = torch.cat(parts, dim=1)
        self.tokens_out = x.shape[1]
        if self.record:
            self.last = {"idx": top.detach(), "fused": parts[-1][:, 0].detach() if self.fuse else None}
        return x + self.mlp(self.layer_norm2(x))


class PatchDropoutEmbeddings(CLIPVisionEmbeddings):
    """Patch + position embeddings that keep a random ``keep_rate`` of the patches (FLIP)."""
    keep_rate: float = 1.0

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding=False) -> torch.Tensor:
        x = super().forward(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        n = x.shape[1] - 1
        keep = kept_patches(n, self.keep_rate)
        if self.keep_rate >= 1.0 or keep >= n:
            return x
        idx = torch.rand(x.shape[0], n, device=x.device).topk(keep, dim=1).indices
        kept = x[:, 1:].gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], kept], dim=1)


def _targets(vision_model) -> list:
    return [m for m in vision_model.modules() if isinstance(m, (EViTEncoderLayer, PatchDropoutEmbeddings))]


def install(vision_model, drop_layers: list[int], fuse: bool = True, mode: str = "evit") -> None:
    """Make ``vision_model`` (a CLIP vision transformer) expeditable; it keeps every token until
    :func:`set_keep_rate` says otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Got: {mode!r}")
    if mode == "random":
        vision_model.embeddings.__class__ = PatchDropoutEmbeddings
        return
    layers = vision_model.encoder.layers
    bad = [i for i in drop_layers if not isinstance(i, int) or not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"drop_layers must be indices in [0, {len(layers)}). Got: {list(drop_layers)}")
    for i in drop_layers:
        layers[i].__class__ = EViTEncoderLayer
        layers[i].fuse = fuse


def set_keep_rate(vision_model, keep_rate: float) -> None:
    """The fraction of tokens kept from now on (1.0: the stock tower)."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1]. Got: {keep_rate}")
    targets = _targets(vision_model)
    if not targets and keep_rate < 1.0:
        raise ValueError("this vision tower drops no tokens: call install() first")
    for m in targets:
        m.keep_rate = float(keep_rate)


def keep_rate_of(vision_model) -> float:
    targets = _targets(vision_model)
    return targets[0].keep_rate if targets else 1.0


@contextlib.contextmanager
def expedited(vision_model, keep_rate: float):
    """``keep_rate`` inside the block, the previous rate after it."""
    before = keep_rate_of(vision_model)
    set_keep_rate(vision_model, keep_rate)
    try:
        yield vision_model
    finally:
        set_keep_rate(vision_model, before)


def token_counts(vision_model) -> dict[int, int]:
    """Tokens leaving each drop layer in the last forward: ``{layer index: tokens}``."""
    return {i: layer.tokens_out for i, layer in enumerate(vision_model.encoder.layers)
            if isinstance(layer, EViTEncoderLayer)}


@contextlib.contextmanager
def keep_rate(model, rate: float):
    """The student's image tower of ``model`` at keep rate ``rate`` inside the block (a no-op when
    it drops no tokens); the rate it had is restored after."""
    if not getattr(model, "expedited_tower", False):
        yield
        return
    with expedited(model.vision_model, rate):
        yield
