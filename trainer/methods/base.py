"""The protocol every method implements, and what the rest of the trainer asks of it.

A method is one module under ``trainer/methods/`` that defines a :class:`MethodSpec` instance
named ``SPEC`` (the static part: config check, model changes, loss terms, weights in checkpoints,
evaluation and export views) and, when it acts during training, a :class:`Method` subclass (the
runtime part the train step calls). ``trainer/methods/__init__.py`` lists the specs; nothing
outside ``trainer/methods/`` imports a method module by name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Inherited:
    """What a fresh run inherits from ``checkpoint.init`` beyond the model weights (those are
    loaded into the model before DeepSpeed wraps it)."""
    path: Path                                   # the source: a step directory or a grow directory
    weights: dict[str, torch.Tensor] = field(default_factory=dict)   # method copies, under their prefixes
    optimizer: Path | None = None               # a grow directory's transformed AdamW state
    state: dict = field(default_factory=dict)   # a grow directory's carried method state, by method name


def schedule_clock(cfg, step: int) -> tuple[int, int]:
    """``(position, length)`` of the methods' step schedules at this run's optimizer step
    ``step``: ``growth.schedules=restart`` (or a run that is no later stage) gives ``(step,
    max_steps)``; ``continue`` gives ``(growth.schedule_start + step, growth.schedule_steps)``
    (empty: ``schedule_start + max_steps``), where ``grow`` put the source run's position."""
    g = cfg.growth
    if g.schedules == "restart":
        return step, cfg.max_steps
    length = g.schedule_steps if g.schedule_steps is not None else g.schedule_start + cfg.max_steps
    return g.schedule_start + step, length


def schedule_view(cfg, step: int):
    """``(cfg', t)`` to hand a schedule written as a function of ``(cfg, step)`` over
    ``cfg.max_steps`` (ECLIPSE's keep rate and momentum, PSD's ``a_t``): the step and length of
    :func:`schedule_clock`, so a later stage's schedules continue or restart as configured."""
    t, length = schedule_clock(cfg, step)
    return (cfg if length == cfg.max_steps else dataclasses.replace(cfg, max_steps=length)), t


class MethodSpec:
    """A method as the rest of the trainer sees it.

    ``enabled(cfg)``: whether the run uses it. ``check(cfg)``: values a user can get wrong (a
    ``ConfigError`` naming the key), before any process starts. ``attach(model, cfg)``: change the
    model before DeepSpeed wraps it (and before eval/export load weights), in ascending
    ``attach_rank``. ``build(cfg, engine)``: the runtime :class:`Method` (None: nothing to do in
    training). ``loss_terms(cfg)``: ``{term: weight}`` it adds to the loss. ``prefixes``: module
    state-dict prefixes of its own copies, which are not part of the CLIP model.
    ``saved_weights(cfg, root, tag)``: weights it keeps in a checkpoint outside the module state
    (ECLIPSE's fp32 teacher), under its prefix. ``eval_views(model, cfg)``: extra
    ``(prefix, model-like, keep rate)`` evaluations. ``export_towers(model)``: image towers
    ``export-hf --which NAME`` may write instead of the student's. ``step_flops(cfg, step, world)``:
    the training FLOPs it adds to optimizer step ``step`` on ``world`` ranks beyond plain CLIP's
    (``trainer.flops.clip_step_flops``; negative where it saves, as EViT's dropped tokens).

    Growth (``grow`` and the next stage's ``checkpoint.init``): ``training_copies(cfg, root,
    tag)``: weights of its training copies that are not model (PSD's teacher), under its prefix,
    which ``grow`` grows with the student's operator and a run started from the checkpoint may
    inherit. ``carried_state(cfg, root, tag)``: what the method learned during the source run
    that the next stage continues with (JSON: ECL's rounds and kept set), or None; ``grow``
    writes it to ``grow.json`` and the next stage's method gets it in ``Inherited.state[name]``.
    ``grown_config(raw, cfg, state, layer_index)``: edit the grown config (a dict; ``cfg`` the
    source's) for the grown model and the carried ``state`` (None without), e.g. ECL's kept set as
    ``data.manifest``, ECLIPSE's drop layers moved to where ``layer_index(tower, i)`` puts old
    layer ``i``.
    """
    name = "none"
    prefixes: tuple[str, ...] = ()
    attach_rank = 0

    def enabled(self, cfg) -> bool:
        return False

    def cached_negatives_ok(self, cfg) -> bool:
        """Can its run use ``train.accum_negatives`` (the loss over cached embeddings only)? Not
        when it adds loss inputs or reads the training forward."""
        return False

    def check(self, cfg) -> None:
        pass

    def attach(self, model: torch.nn.Module, cfg) -> None:
        pass

    def build(self, cfg, engine) -> "Method | None":
        return None

    def loss_terms(self, cfg) -> dict[str, float]:
        return {}

    def saved_weights(self, cfg, root: Path, tag: str) -> dict[str, torch.Tensor]:
        return {}

    def eval_views(self, model, cfg) -> list[tuple[str, object, float]]:
        return []

    def export_towers(self, model) -> dict[str, dict]:
        return {}

    def step_flops(self, cfg, step: int, world: int) -> float:
        return 0.0

    def steady_overrides(self, cfg, bench_steps: int) -> dict:
        """Config overrides under which a benchmark of ``bench_steps`` steps runs this method at
        the per-step cost of the whole run ``cfg`` describes: schedules that change a step's cost
        held at their run mean, events between steps (a selection round) kept out of the window."""
        return {}

    def training_copies(self, cfg, root: Path, tag: str) -> dict[str, torch.Tensor]:
        return {}

    def carried_state(self, cfg, root: Path, tag: str) -> dict | None:
        return None

    def grown_config(self, raw: dict, cfg, state: dict | None, layer_index) -> None:
        pass


class Method:
    """What the train step calls on the enabled method (the no-op here is plain CLIP).

    ``prepare(step)`` before the forward; ``engine(..., **micro_kwargs(device))`` once per
    micro-batch (default: the constant ``forward_kwargs``; a method with a data stream of its own
    hands its next batch there); ``extras(*more)`` turns the forward's outputs beyond
    ``(image, text, scale)`` into ``LossContext.extras``; ``observe(batch, image, text, scale)``
    sees each micro-batch's forward before its backward; ``update(step)`` after each applied
    optimizer step; ``checkpoint_state()`` (``{name: state}`` or ``{}``) goes into every
    checkpoint's per-rank trainer state and ``restore`` takes it back; ``close()`` when the run
    ends (on every path): shut down loader workers the method started.
    """
    name = "none"
    forward_kwargs: dict = {}
    outputs = 0   # forward outputs after (image, text, scale) that ``extras`` takes

    def prepare(self, step: int) -> None:
        pass

    def micro_kwargs(self, device) -> dict:
        """The forward's keyword inputs for the next micro-batch (called once per micro-batch)."""
        return self.forward_kwargs

    def extras(self, *more) -> dict:
        return {}

    def observe(self, batch: dict, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> None:
        """After each micro-batch's forward, before its backward: the batch (with its ``keys``)
        and the model's embeddings and logit scale, as the model was before training on it."""

    def update(self, step: int) -> None:
        pass

    def describe(self) -> str | None:
        """One log line about the method at start-up (None: nothing to say)."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def checkpoint_state(self) -> dict:
        return {self.name: self.state_dict()} if self.name != "none" else {}

    def restore(self, trainer_state: dict, where) -> None:
        """Take this method's entry out of a resumed checkpoint's trainer state and load it."""
        if self.name == "none":
            return
        if self.name not in trainer_state:
            raise RuntimeError(f"checkpoint {where} has no '{self.name}' state: it was written with the method off")
        self.load_state_dict(trainer_state.pop(self.name))

    def restore_elastic(self, states, where, workers: int, step: int) -> None:
        """Resume from a checkpoint written at another world size or worker count: ``states[r]``
        is old rank ``r``'s trainer state (``len(states)`` ranks, ``workers`` loader workers each;
        loaded when indexed), ``step`` the checkpoint's step. The default takes rank 0's entry,
        which is right for state that is the same on every rank whatever the layout (ECL's
        rounds); a method whose state is per rank (teacher slices, a data stream) overrides it."""
        self.restore(dict(states[0]), where)

    def inherit(self, init: "Inherited") -> None:
        """A fresh run started from a trained or grown model (``checkpoint.init``), after the
        engine is built: ``init.weights`` holds the source's method copies under their prefixes
        (e.g. ECLIPSE's ``teacher.*``, PSD's ``psd_teacher.*``), ``init.optimizer`` a grow
        directory's AdamW state, ``init.state`` a grow directory's carried method state."""

    def data_manifest(self) -> str | None:
        """The subset of the training shards the paired stream reads (None: ``data.manifest``)."""
        return None

    def wants_checkpoint(self, step: int) -> bool:
        """Whether ``step`` must be checkpointed before :meth:`between_steps` runs at it."""
        return False

    def between_steps(self, step: int, engine, tokenizer, log_metrics, should_stop=None) -> str | None:
        """Work between optimizer steps (after ``step``'s checkpoint), on every rank; returns a
        new manifest for the paired stream, or None. ``log_metrics(values, step, prefix)``.
        Long work polls ``should_stop()`` and, when it is true on any rank, raises
        ``trainer.faults.StopRequested`` on every rank."""
        return None

    def close(self) -> None:
        pass


class Methods(Method):
    """Several enabled methods at once (ECLIPSE + PSD): each gets its own forward outputs, in
    the order the model returns them, and its own entry in the checkpoint."""

    def __init__(self, methods: list[Method]):
        self.methods = methods
        self.name = "+".join(m.name for m in methods)
        self.forward_kwargs = {k: v for m in methods for k, v in m.forward_kwargs.items()}
        self.outputs = sum(m.outputs for m in methods)

    def prepare(self, step: int) -> None:
        for m in self.methods:
            m.prepare(step)

    def micro_kwargs(self, device) -> dict:
        return {k: v for m in self.methods for k, v in m.micro_kwargs(device).items()}

    def extras(self, *more) -> dict:
        out, i = {}, 0
        for m in self.methods:
            out.update(m.extras(*more[i:i + m.outputs]))
            i += m.outputs
        return out

    def observe(self, batch: dict, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> None:
        for m in self.methods:
            m.observe(batch, image, text, scale)

    def update(self, step: int) -> None:
        for m in self.methods:
            m.update(step)

    def describe(self) -> str | None:
        return "; ".join(d for d in (m.describe() for m in self.methods) if d) or None

    def checkpoint_state(self) -> dict:
        return {k: v for m in self.methods for k, v in m.checkpoint_state().items()}

    def restore(self, trainer_state: dict, where) -> None:
        for m in self.methods:
            m.restore(trainer_state, where)

    def restore_elastic(self, states, where, workers: int, step: int) -> None:
        for m in self.methods:
            m.restore_elastic(states, where, workers, step)

    def inherit(self, init: "Inherited") -> None:
        for m in self.methods:
            m.inherit(init)

    def data_manifest(self) -> str | None:
        return next((p for p in (m.data_manifest() for m in self.methods) if p is not None), None)

    def wants_checkpoint(self, step: int) -> bool:
        return any(m.wants_checkpoint(step) for m in self.methods)

    def between_steps(self, step: int, engine, tokenizer, log_metrics, should_stop=None) -> str | None:
        new = [p for p in (m.between_steps(step, engine, tokenizer, log_metrics, should_stop) for m in self.methods)
               if p]
        return new[-1] if new else None

    def close(self) -> None:
        for m in self.methods:
            m.close()
