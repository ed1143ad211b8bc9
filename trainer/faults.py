"""Non-finite values in a step: detect them on any rank, agree, and leave the weights untouched.

Two places a step can go non-finite:

- the loss (NaN/inf in a forward, on any rank; the gathered loss spreads it to every rank):
  ``train_step`` keeps a device flag per micro-batch and runs the backward anyway (every rank
  enters the same collectives); at the accumulation boundary the ranks agree on the flags, skip
  the poisoned update and run the good micro-batches again in place of the dropped one;
- the gradients of a finite loss (an overflow inside the backward): :class:`GradGuard` checks
  the step's reduced gradients in DeepSpeed's flat partitions once, at the accumulation
  boundary, and all ranks agree (the same all-reduce) whether to apply the step; if not,
  :func:`skip_update` lets DeepSpeed finish its step bookkeeping (gradients cleared, partitions
  untouched) without the optimizer moving a weight or a moment, as its own fp16 overflow path does.

DeepSpeed only checks gradients itself for some stages and precisions (ZeRO-1/2 bf16, or fp32
with clipping; the bf16 optimizer of stage 0), never for ZeRO-3 in bf16/fp32; the guard makes
every stage behave alike.

fp16 is different: DeepSpeed's dynamic loss scaling overflows on purpose (at the start, and each
time it raises the scale) and owns that case: it skips the update and lowers the scale. So under
fp16 a non-finite scaled gradient is a fault only when the scale is already at its floor
(:func:`fp16_loss_scale`); above it, the step is skipped and counted as an overflow, not as bad
micro-batches. A non-finite *loss* is a fault in every precision (it is computed unscaled).

    guard = GradGuard(engine)
    ... engine.backward(loss) ...      # each micro-batch: no check, no host sync
    if all_reduce(guard.flag(), "max").item():   # once, at the boundary
        with skip_update(engine):
            engine.step()

Fault injection for tests (``debug.inject_nan_steps``, ``debug.inject_nan_where``) lives here too.
"""
from __future__ import annotations

import contextlib

import torch


class StopRequested(Exception):
    """A stop signal (SIGUSR1/SIGTERM) reached some rank during long work outside the training
    step (an evaluation, an ECL round); raised on every rank at the same point, after the ranks
    agreed in a collective they make anyway, so the run can checkpoint or exit 75 in time."""


class GradGuard:
    """Whether this step's reduced gradients hold a NaN or an infinity: checked once per optimizer
    step, at the accumulation boundary, on the buffers DeepSpeed reduced them into, as its own fp16
    overflow check does; kept on the device (the caller reduces the flag across ranks with the
    step's other flags, its one host read).

    Where the gradients are after the boundary's backward (its reduction included):

    - ZeRO-3: this rank's partition of every gradient, one flat buffer
      (``grad_partitions_flat_buffer``, accumulated over the micro-batches): one kernel;
    - ZeRO-1/2: this rank's reduced partition per parameter group (``averaged_gradients``);
    - ZeRO-0: the all-reduced ``.grad`` of every parameter.

    A NaN or an infinity on any rank survives the reduction (it sums into the owner's partition),
    so each rank checks only its partition and the ranks' flags together cover every gradient.
    Before: a hook per parameter summed each micro-batch's gradient as autograd produced it, a
    kernel per parameter per micro-batch (four, before that).

        guard = GradGuard(engine)
        ... engine.backward(loss) ...      # the last micro-batch's backward reduces
        bad = all_reduce(guard.flag(), "max").item()   # once, at the boundary
    """

    def __init__(self, engine):
        self._engine = engine

    def reduced_grads(self) -> list[torch.Tensor]:
        """The tensors that hold this rank's share of the step's reduced gradients (see the class)."""
        opt, stage = self._engine.optimizer, self._engine.zero_optimization_stage()
        if stage == 3:
            return [opt.grad_partitions_flat_buffer]
        if stage in (1, 2):
            groups = getattr(opt, "averaged_gradients", None) or {}
            if len(groups) != len(opt.bit16_groups) or any(g is None for g in groups.values()):
                raise RuntimeError(f"ZeRO-{stage}: DeepSpeed has not reduced the gradients into its partitions "
                                   "(averaged_gradients); GradGuard.flag() belongs after the boundary's backward")
            return [g for group in groups.values() for g in group if g is not None]
        return [p.grad for p in self._engine.module.parameters() if p.grad is not None]

    def flag(self) -> torch.Tensor:
        """1.0 if a reduced gradient is non-finite, as a float32 device scalar (no host sync)."""
        return non_finite(self.reduced_grads(), self._engine.device)


def non_finite(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """1.0 if any element of ``tensors`` is NaN or infinite, else 0.0: a float32 scalar on ``device``.

    Each tensor's L1 norm, accumulated in float32 whatever the tensor's dtype (torch's multi-tensor
    ``_foreach_norm``, as its gradient clipping uses: one launch for many tensors on CUDA), then their
    sum: a NaN propagates through every sum, and an infinity of either sign adds as +inf. Finite
    gradients would need an L1 norm near 3e38 to overflow it; fp16's 65504 is not a limit."""
    if not tensors:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(tensors, 1, dtype=torch.float32)
    total = torch.stack([n.to(device) for n in norms]).sum()
    return (~torch.isfinite(total)).to(torch.float32)


def fp16_loss_scale(engine) -> tuple[float, float] | None:
    """DeepSpeed's dynamic fp16 loss scale as ``(current, floor)``, or None where it does not
    scale dynamically (bf16, fp32, a static fp16 scale)."""
    opt = engine.optimizer
    scaler = getattr(opt, "loss_scaler", None)          # ZeRO 1-3: a DynamicLossScaler
    if scaler is not None and getattr(scaler, "dynamic", False):
        return float(scaler.cur_scale), float(scaler.min_scale)
    conf = getattr(opt, "loss_scale_config", None)      # ZeRO 0: FP16_(Unfused)Optimizer
    if conf is not None and getattr(conf, "dynamic_loss_scale", False):
        return float(conf.cur_scale), float(conf.min_loss_scale)
    return None


_SCALE_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _scalers(engine) -> list:
    opt = engine.optimizer
    # ZeRO 1-3: a DynamicLossScaler; ZeRO 0's fp16 optimizers: their LossScaleConfig
    return [x for x in (getattr(opt, "loss_scaler", None), getattr(opt, "loss_scale_config", None))
            if x is not None and hasattr(x, "cur_scale")]


def loss_scale_state(engine) -> list[dict]:
    """DeepSpeed's fp16 loss-scale bookkeeping (scale, iteration, last overflow, hysteresis)."""
    return [{k: getattr(x, k) for k in _SCALE_STATE if hasattr(x, k)} for x in _scalers(engine)]


def restore_loss_scale(engine, state: list[dict]) -> None:
    """Put back what :func:`loss_scale_state` recorded: an update skipped for a non-finite *loss*
    is not a loss-scale overflow, and DeepSpeed's scaler must not halve for it."""
    for x, values in zip(_scalers(engine), state):
        for k, v in values.items():
            setattr(x, k, v)


@contextlib.contextmanager
def skip_update(engine):
    """``engine.step()`` inside this block clears the gradients but updates nothing.

    The wrapped optimizer's ``step`` becomes a no-op that reports an overflow, so DeepSpeed's
    engine counts a skipped step and does not advance the lr schedule, exactly as when its own
    overflow check fires (which may happen first; then the no-op is never called).
    """
    outer = engine.optimizer
    inner = getattr(outer, "optimizer", outer)  # ZeRO / bf16 wrappers hold the torch optimizer
    scaler = getattr(outer, "loss_scaler", None)
    if scaler is not None:  # at the floor the trainer's fault count decides, not DeepSpeed's exception
        scaler.raise_error_at_min_scale = False

    def no_update(*_args, **_kwargs):
        outer.overflow = True

    inner.step = no_update
    try:
        yield
    finally:
        del inner.step  # the instance attribute shadowed the class's method
        if outer is inner:  # a bare torch optimizer: nobody else resets the flag
            outer.overflow = False


class NanInjector:
    """Test-only faults on rank 0, at one micro-batch (``debug.inject_nan_microbatch``) of the configured steps."""

    def __init__(self, steps, where: str, rank: int, done: list):
        self.steps, self.where, self.rank, self.done = set(steps), where, rank, done

    def due(self, step: int) -> bool:
        if step in self.steps and step not in self.done:
            self.done.append(step)  # checkpointed with the trainer state: once per step, ever
            return self.rank == 0
        return False

    @staticmethod
    def forward_hook(module: torch.nn.Module):
        """A NaN that arises inside the vision tower (its last layer norm's output)."""
        def poison(_mod, _inp, out):
            return out * float("nan")
        return module.vision_model.post_layernorm.register_forward_hook(poison)

    @staticmethod
    def poison_grad(tensor: torch.Tensor) -> None:
        """A finite loss whose backward yields non-finite gradients (from ``tensor`` down)."""
        tensor.register_hook(lambda g: g * float("nan"))
