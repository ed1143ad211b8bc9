"""open_clip's training step for ``bench train`` (``open_clip_train.train.train_one_epoch`` with
accum_freq 1): ``open_clip.model.CLIP`` with a preset's shape, ``ClipLoss``, DDP, torch AdamW as
open_clip_train builds it, its ``cosine_lr`` and autocast, and its logit-scale clamp.
"""
from __future__ import annotations

import math

from ..data import model_pixels
from ..engine import lr_lambda
from .bare_loop import autocast_for, ddp_wrap, grad_scaler, torch_loop

def build_openclip_model(shape: dict, tokenizer):
    """``open_clip.model.CLIP`` with a preset's shape: quick_gelu (as transformers' CLIP configs)
    and text pooling at our tokenizer's eos id (open_clip's default argmax pools at the largest
    token id, which is the eos token of OpenAI's BPE only)."""
    import open_clip

    vision = dict(layers=shape["vision_layers"], width=shape["vision_width"], patch_size=shape["patch_size"],
                  head_width=shape["vision_width"] // shape["vision_heads"], image_size=shape["image_size"],
                  mlp_ratio=shape["mlp_ratio"])
    text = dict(context_length=shape["context_length"], vocab_size=len(tokenizer), width=shape["text_width"],
                heads=shape["text_heads"], layers=shape["text_layers"], mlp_ratio=shape["mlp_ratio"], pool_type="eos",
                eos_id=tokenizer.eos_token_id)
    return open_clip.model.CLIP(embed_dim=shape["embed_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=True,
                                output_dict=True)


def build_openclip(cfg, tokenizer, shape, device, le, data, phases):
    """open_clip's training step (open_clip_train.train.train_one_epoch, accum_freq 1)."""
    import torch
    from open_clip.loss import ClipLoss

    torch.manual_seed(cfg.seed)
    model = build_openclip_model(shape, tokenizer).to(device)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    ddp = ddp_wrap(model, device)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=le.rank,
                       world_size=le.world_size)
    o = cfg.optim
    # open_clip_train.main's AdamW: no decay on gains, biases and the logit scale; default flags.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": o.weight_decay}],
                                  lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    schedule = openclip_schedule(optimizer, cfg)
    precision = {"bf16": "amp_bf16", "fp16": "amp", "fp32": "fp32"}[cfg.deepspeed.precision]
    try:
        from open_clip_train.precision import get_autocast
        autocast = get_autocast(precision, device_type=device.type)
    except ImportError:
        autocast = autocast_for(cfg.deepspeed.precision, device)

    pixels = model_pixels(cfg)   # uint8 images, normalised on the device (open_clip_train normalises in workers)

    def forward_loss(mb):
        images = pixels(mb["image"], device, torch.float32)
        texts = mb["input_ids"].to(device=device, non_blocking=True)
        with autocast():
            losses = loss_fn(**ddp(images, texts), output_dict=True)
            return sum(losses.values())

    def clamp():
        with torch.no_grad():  # "we clamp to 4.6052 = ln(100), as in the original paper"
            model.logit_scale.clamp_(0, math.log(100))
    step = torch_loop(cfg, data, phases, ddp, optimizer, grad_scaler(cfg, device), forward_loss,
                       before=lambda n: schedule(n - 1), after=clamp)
    return step, {"params": sum(p.numel() for p in model.parameters()), "loss_impl": "open_clip.ClipLoss",
                  "optimizer": "torch.optim.AdamW(default flags: for-loop on CPU, foreach on CUDA)"}


def openclip_schedule(optimizer, cfg):
    try:
        from open_clip_train.scheduler import cosine_lr
    except ImportError:
        fn = lr_lambda(cfg)

        def cosine_lr(opt, base_lr, _warmup, _steps):
            def adjust(i):
                for g in opt.param_groups:
                    g["lr"] = base_lr * fn(i)
            return adjust
    return cosine_lr(optimizer, cfg.optim.lr, cfg.optim.warmup_steps, cfg.max_steps)
