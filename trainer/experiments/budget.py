"""Equal compute: a run's schedule scaled to another step count, and the step count that spends a
FLOP budget. Shared by the sweep runner (``sweep --budget-flops``) and the growth search.

    extra = scaled_schedule(cfg, 120)                  # {"optim.warmup_steps": 12, ...}
    steps = steps_for_budget(lambda n: load_config(path, [*args, f"max_steps={n}",
                             *overrides_for(cfg, n)]), budget=2e13, world=2)

Training FLOPs are the trainer's analytic count (:func:`trainer.methods.train_flops`: both towers
forward and backward, the loss, and what each enabled method adds at each step: a teacher's
forward, EViT's dropped tokens, the text stream, ECL's scoring passes; trainer/flops.py).
"""
from __future__ import annotations

from typing import Callable

from .. import methods
from ..config import Config, ConfigError


def scaled_schedule(cfg: Config, steps: int) -> dict:
    """Overrides that give a run of ``steps`` steps the schedule ``cfg`` has over its own
    ``max_steps``: each schedule key given in steps keeps its share of ``max_steps`` (the warm-up
    stays shorter than the run; intervals stay >= 1). Keys left unset (their defaults follow the
    data epoch, the warm-up or ``max_steps``) stay unset."""
    ratio = steps / cfg.max_steps

    def scale(value: int, least: int) -> int:
        return max(least, round(value * ratio))
    warmup = scale(cfg.optim.warmup_steps, 0)
    if cfg.optim.warmup_steps < cfg.max_steps:
        warmup = min(warmup, steps - 1)
    out = {"optim.warmup_steps": warmup}
    if cfg.eclipse.keep_warmup_steps is not None:
        out["eclipse.keep_warmup_steps"] = min(scale(cfg.eclipse.keep_warmup_steps, 0), max(0, steps - 1))
    if cfg.eclipse.keep_shrink_steps is not None:
        out["eclipse.keep_shrink_steps"] = scale(cfg.eclipse.keep_shrink_steps, 1)
    if cfg.psd.refresh_every is not None:
        out["psd.refresh_every"] = scale(cfg.psd.refresh_every, 1)
    if cfg.select.every_steps is not None:
        out["select.every_steps"] = scale(cfg.select.every_steps, 1)
    return out


def steps_for_budget(config_at: Callable[[int], Config], budget: float, world: int) -> int:
    """The largest step count ``n`` whose run, ``config_at(n)`` (its own schedule at ``n`` steps),
    spends at most ``budget`` training FLOPs on ``world`` ranks. The count grows with ``n``
    (every step costs something), so a bisection finds it. ConfigError when one step already
    costs more than the budget."""
    def spent(n: int) -> float:
        return methods.train_flops(config_at(n), n, world)
    first = spent(1)
    if first > budget:
        raise ConfigError(f"--budget-flops {budget:.3g} is less than one training step ({first:.3g} FLOPs)")
    lo, hi = 1, 2
    while spent(hi) <= budget:   # lo fits, hi does not
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if spent(mid) <= budget else (lo, mid)
    return lo
