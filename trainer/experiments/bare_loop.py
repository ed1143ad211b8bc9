"""The bare loop of ``bench train``: our model and loss in a plain DDP + torch AdamW loop, no
DeepSpeed (the engine's overhead made visible), and the torch loop and phase timer that the
open_clip step (``openclip_step.py``) shares.
"""
from __future__ import annotations

import contextlib
import time

from kernels import gathered_clip_loss, resolve_impl

from ..data import model_pixels
from ..engine import lr_lambda
from ..model import build_model, compile_layers, param_groups

PHASES = ("data", "forward", "backward", "optimizer", "other")


class Phases:
    """Wall time per step phase; ``mark(name)`` books the time since the previous mark to ``name``."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.sums = dict.fromkeys(PHASES, 0.0)
        self.last = 0.0

    def _now(self) -> float:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset(self) -> None:
        self.sums = dict.fromkeys(PHASES, 0.0)

    def begin(self) -> None:
        self.last = self._now()

    def mark(self, name: str) -> None:
        now = self._now()
        self.sums[name] += now - self.last
        self.last = now


def torch_loop(cfg, data, phases, ddp, optimizer, scaler, forward_loss, *, before, after):
    """One optimizer step of a plain DDP loop: zero grad, micro-batches, clip, step, ``after()``."""
    import torch

    accum, clip = cfg.train.grad_accum_steps, cfg.optim.grad_clip
    params = [p for p in ddp.parameters() if p.requires_grad]

    def step(n: int):
        before(n)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(accum):
            mb = data.next()
            phases.mark("data")
            with ddp.no_sync() if i < accum - 1 else contextlib.nullcontext():
                loss = forward_loss(mb)
                phases.mark("forward")
                scaled = loss / accum if accum > 1 else loss
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                phases.mark("backward")
            total = total + loss.detach()  # kept on the device: no host sync per step
        if scaler is not None and clip:
            scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        after()
        phases.mark("optimizer")
        return total / accum
    return step


def ddp_wrap(model, device):
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def autocast_for(precision: str, device):
    import torch
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def grad_scaler(cfg, device):
    import torch
    return torch.amp.GradScaler(device.type) if cfg.deepspeed.precision == "fp16" else None


def loss_impl_name(cfg, device) -> str:
    fn = "gathered_distill_loss" if cfg.eclipse.enabled or cfg.psd.enabled else "gathered_clip_loss"
    return f"kernels.{fn}({resolve_impl(cfg.loss.impl, device)})"


def build_bare(cfg, tokenizer, shape, device, le, data, phases):
    """Our model and loss in a plain DDP + torch AdamW loop: the engine's overhead made visible."""
    import torch

    model = build_model(cfg.model, tokenizer, cfg.seed).to(device)
    if cfg.model.compile:
        compile_layers(model)
    ddp = ddp_wrap(model, device)
    o, on_gpu = cfg.optim, device.type == "cuda"
    # What build_optimizer falls back to without apex / DeepSpeed's FusedAdam.
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  fused=on_gpu, foreach=not on_gpu)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    autocast = autocast_for(cfg.deepspeed.precision, device)
    pixels = model_pixels(cfg)   # uint8 images, normalised on the device as our step does

    def forward_loss(mb):
        with autocast():
            image, text, scale = ddp(pixel_values=pixels(mb["image"], device, torch.float32),
                                     input_ids=mb["input_ids"].to(device, non_blocking=True),
                                     attention_mask=mb["attention_mask"].to(device, non_blocking=True))
            return gathered_clip_loss(image, text, scale, impl=cfg.loss.impl)
    step = torch_loop(cfg, data, phases, ddp, optimizer, grad_scaler(cfg, device), forward_loss,
                       before=lambda n: None, after=schedule.step)
    name = f"torch.optim.AdamW({'fused' if on_gpu else 'foreach'})"
    return step, {"params": sum(p.numel() for p in model.parameters()), "optimizer": name,
                  "loss_impl": loss_impl_name(cfg, device)}
