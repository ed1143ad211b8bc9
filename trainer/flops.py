"""Training FLOPs, analytically, counted the way ``torch.utils.flop_counter.FlopCounterMode``
counts them: every matrix product (linear layers, the attention scores and weighted sums, the
patch-embedding convolution, the similarity matrices of the loss, a language-modelling head),
2 FLOPs per multiply-add; layer norms, softmaxes, GELUs, the optimizer and the EMA are not
counted. A backward pass costs 2 x the forward of what gets gradients (an input gradient and a
weight gradient per product), except the patch convolution, whose input (the pixels) needs no
gradient: 1 x. Attention is counted over the full ``n x n`` (the causal text tower too, as
FlopCounterMode counts it).

    base = clip_step_flops(cfg, world)     # plain CLIP: one optimizer step, every rank together
    trainer.methods.step_flops(cfg, step, world)   # plus what the enabled methods add (the registry)

The per-method extras (a teacher's forward, EViT's dropped tokens, the text-only stream, an ECL
scoring pass) are each method's ``MethodSpec.step_flops``, built from the pieces here; the sum is
``trainer.methods.step_flops`` / ``train_flops``. tests/test_flops.py checks the total against
FlopCounterMode on real training steps.
"""
from __future__ import annotations

from .model import preset_shape


def block_flops(tokens: int, width: int, mlp: int, tokens_out: int | None = None) -> float:
    """Forward FLOPs of one pre-LN transformer block on one sample of ``tokens`` tokens: the
    q/k/v/out projections (``8 n d^2``), the attention scores and weighted sum (``4 n^2 d``) and
    the MLP (``4 n' d m``) on ``tokens_out`` tokens (EViT drops tokens between attention and MLP;
    default ``tokens``)."""
    n_mlp = tokens if tokens_out is None else tokens_out
    return 8.0 * tokens * width * width + 4.0 * tokens * tokens * width + 4.0 * n_mlp * width * mlp


def mlp_width(shape: dict, tower: str) -> int:
    return round(shape["mlp_ratio"] * shape[f"{tower}_width"])


def vision_tokens(shape: dict) -> int:
    """Tokens of the image tower: the patches and the class token."""
    return (shape["image_size"] // shape["patch_size"]) ** 2 + 1


def patch_embed_flops(shape: dict) -> float:
    """Forward FLOPs of the patch-embedding convolution for one image."""
    patches = vision_tokens(shape) - 1
    return 2.0 * patches * 3 * shape["patch_size"] ** 2 * shape["vision_width"]


def vision_flops(shape: dict, layer_tokens: list[tuple[int, int]] | None = None, projection: bool = True) -> float:
    """Forward FLOPs of the image tower for one image: the patch embedding, each layer on its
    ``(tokens in, tokens out)`` (default: every token in every layer) and the projection."""
    n, d, m = vision_tokens(shape), shape["vision_width"], mlp_width(shape, "vision")
    if layer_tokens is None:
        layer_tokens = [(n, n)] * shape["vision_layers"]
    if len(layer_tokens) != shape["vision_layers"]:
        raise ValueError(f"layer_tokens has {len(layer_tokens)} entries for {shape['vision_layers']} vision layers")
    layers = sum(block_flops(t_in, d, m, t_out) for t_in, t_out in layer_tokens)
    return patch_embed_flops(shape) + layers + (2.0 * d * shape["embed_dim"] if projection else 0.0)


def text_flops(shape: dict, projection: bool = True) -> float:
    """Forward FLOPs of the text tower for one text (``context_length`` tokens: texts are padded
    to it), and its projection. Shared layers run in both towers, so they count in both."""
    n, d = shape["context_length"], shape["text_width"]
    layers = shape["text_layers"] * block_flops(n, d, mlp_width(shape, "text"))
    return layers + (2.0 * d * shape["embed_dim"] if projection else 0.0)


def pair_flops(shape: dict) -> float:
    """Forward FLOPs of one image-caption pair through both towers and projections, every token kept."""
    return vision_flops(shape) + text_flops(shape)


def similarity_flops(rows: int, dim: int) -> float:
    """Forward FLOPs of one ``rows x rows`` similarity matrix of ``dim``-wide embeddings (over the
    ranks: each rank forms its ``b x N`` block)."""
    return 2.0 * rows * rows * dim


def global_batch(cfg, world: int) -> int:
    """Image-text pairs per optimizer step on ``world`` ranks."""
    return cfg.data.batch_size * cfg.train.grad_accum_steps * world


def clip_step_flops(cfg, world: int) -> float:
    """Plain CLIP's training FLOPs of one optimizer step on ``world`` ranks: forward and backward of
    both towers for the global batch (3 x forward, the patch convolution 2 x), and the loss's two
    similarity matrices (image->text, text->image; each forward + both embeddings' gradients).
    With K = ``train.grad_accum_steps`` > 1 each micro-batch's loss sees its own batch_size x world
    pairs (K matrices of (B/K)^2), unless ``train.accum_negatives``: then one loss over all B pairs
    of the step, and every micro-batch's forward runs twice (the cached embeddings' pass, then again
    for its backward)."""
    shape = preset_shape(cfg.model)
    batch = global_batch(cfg, world)
    towers = batch * (3.0 * pair_flops(shape) - patch_embed_flops(shape))
    k = cfg.train.grad_accum_steps
    if cfg.train.accum_negatives:
        towers += batch * pair_flops(shape)
        sims = similarity_flops(batch, shape["embed_dim"])
    else:
        sims = k * similarity_flops(batch // k, shape["embed_dim"])
    return towers + 2 * 3.0 * sims


# Dense peak FLOP/s of a device (no sparsity), by the name CUDA reports, for MFU = achieved model
# FLOP/s / peak. Tensor-core peaks for bf16/fp16; fp32 is the non-tensor FP32 rate (TF32 is not
# assumed: torch leaves matmul TF32 off by default). Vendor data sheets; SXM parts unless named.
# The longest matching key wins ("H100 PCIe" before "H100").
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """The dense peak TFLOP/s of ``device_name`` (``torch.cuda.get_device_name()``) at
    ``precision``, or None where unknown (every CPU, an unlisted GPU): MFU is then not reported.

    >>> peak_tflops("NVIDIA H100 80GB HBM3", "bf16"), peak_tflops("NVIDIA H100 PCIe", "bf16")
    (989.0, 756.0)
    """
    if not device_name:
        return None
    hits = [k for k in PEAK_TFLOPS if k in device_name]
    if not hits:
        return None
    return PEAK_TFLOPS[max(hits, key=len)].get(precision)
