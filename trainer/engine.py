"""DeepSpeed engine, optimizer and schedule, built from one trainer config.

The batch size, accumulation, clipping and precision in the DeepSpeed JSON are written from the
trainer's config (one source of truth), and the resolved dict is saved with the run.

    ds_config = build_ds_config(cfg, world_size)
    engine, optimizer_name = build_engine(cfg, model, ds_config)
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from kernels.gather import set_grad_reduce_dtype

from .config import Config, ConfigError
from .model import compile_layers, param_groups

log = logging.getLogger("trainer")
DS_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def ds_config_path(cfg: Config) -> Path:
    if cfg.deepspeed.config:
        return Path(cfg.deepspeed.config)
    name = "zero3_offload.json" if cfg.deepspeed.offload else f"zero{cfg.deepspeed.zero_stage}.json"
    return DS_DIR / name


def build_ds_config(cfg: Config, world_size: int) -> dict:
    path = ds_config_path(cfg)
    if not path.is_file():
        raise ConfigError(f"config key 'deepspeed.config': file not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"config key 'deepspeed.config': {path} is not valid JSON: {err}") from None
    ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum_steps
    ds["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum_steps * world_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    prec = cfg.deepspeed.precision
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": prec == "bf16"}
    ds["fp16"] = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                  "min_loss_scale": 1, **ds.get("fp16", {}), "enabled": prec == "fp16"}
    apply_reduce_dtype(ds, cfg)
    ds.setdefault("steps_per_print", 10**9)  # the trainer does its own logging
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def apply_reduce_dtype(ds: dict, cfg: Config) -> None:
    """bf16 runs reduce gradients across ranks in ``deepspeed.reduce_dtype`` (default fp32), and
    at ZeRO 2-3 accumulate them over micro-batches in it too.

    Left alone, DeepSpeed 0.19.8 accumulates a bf16 model's gradients in bf16 (a micro-batch's
    gradient below 1/256 of the running sum vanishes) and reduces them in bf16 (a ring rounds
    at every hop). ``communication_data_type`` is honoured by every stage.
    ``data_types.grad_accum_dtype`` is set for stages 2 and 3 only (their ZeRO optimizer keeps
    fp32 gradient partitions): at stage 1 DeepSpeed swaps its ZeRO optimizer for BF16_Optimizer,
    whose checkpoints its own ``zero_to_fp32`` cannot read ("is not a zero checkpoint"; export,
    eval and grow read through it), and without ZeRO it raises NotImplementedError. So stages
    0 and 1 still accumulate in bf16 and reduce in fp32.
    """
    if cfg.deepspeed.precision != "bf16":
        return
    ds["communication_data_type"] = cfg.deepspeed.reduce_dtype
    types = ds.setdefault("data_types", {})
    if cfg.deepspeed.zero_stage >= 2:
        types["grad_accum_dtype"] = cfg.deepspeed.reduce_dtype
    else:
        types.pop("grad_accum_dtype", None)
    if not types:
        del ds["data_types"]


def grad_reduce_dtype(cfg: Config) -> torch.dtype | None:
    """The dtype the loss's gathered-embedding gradient is summed over ranks in (None: its own)."""
    return torch.float32 if cfg.deepspeed.reduce_dtype == "fp32" else None


def lr_lambda(cfg: Config):
    """Linear warm-up to the peak, then cosine down to ``min_lr_ratio`` of it at ``max_steps``."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def build_optimizer(cfg: Config, model: torch.nn.Module, on_gpu: bool):
    """AdamW: apex's fused one where installed, else DeepSpeed's (GPU) or torch's; returns (opt, name)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    choice = o.impl
    if cfg.deepspeed.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw), "deepspeed.DeepSpeedCPUAdam"
    if choice in ("auto", "apex"):
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam
            if on_gpu:
                return ApexFusedAdam(groups, adam_w_mode=True, **kw), "apex.FusedAdam"
        except ImportError:
            if choice == "apex":
                raise ConfigError("config key 'optim.impl' is 'apex' but NVIDIA apex is not installed") from None
    if choice in ("auto", "deepspeed") and on_gpu:
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(groups, adam_w_mode=True, **kw), "deepspeed.FusedAdam"
    if choice == "deepspeed":
        raise ConfigError("config key 'optim.impl' is 'deepspeed' but DeepSpeed's FusedAdam needs a GPU")
    return torch.optim.AdamW(groups, fused=on_gpu, foreach=not on_gpu, **kw), \
        f"torch.optim.AdamW({'fused' if on_gpu else 'foreach'})"


def build_engine(cfg: Config, model: torch.nn.Module, ds_config: dict):
    import deepspeed

    on_gpu = torch.cuda.is_available()
    set_grad_reduce_dtype(grad_reduce_dtype(cfg))   # the loss's gathered-embedding gradient
    if cfg.model.compile:
        compile_layers(model)
    optimizer, name = build_optimizer(cfg, model, on_gpu)
    # A callable, so the schedule drives the optimizer DeepSpeed wraps (ZeRO's), not the raw one.
    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine, name
