"""Progressive self-distillation (Andonian et al., CVPR 2022; docs/methods.md): soft
image-text targets for a subset of every batch, mixed with the one-hot targets by a weight that
grows over training.

    psd.attach(model, cfg)            # before the engine: a teacher copy when one is needed
    method = Psd(cfg, engine)         # after it
    method.prepare(step)              # a_t for this step
    image, text, scale, *teacher = engine(..., **method.forward_kwargs)
    ctx.extras = method.extras(*teacher)   # {"psd": SoftTargets(...)}: the subset, a_t, the teacher
    ... loss (term ``self_distill``) ... engine.step(); method.update(step)

Targets for row i of the subset ``B_s`` (both directions): ``(1 - a_t) onehot_i + a_t q_i`` with
``q_i = softmax(teacher logits_i / psd.teacher_tau)``; the teacher logits are ``s <x'_i, y'_j>``
(``s`` the student's scale, detached) for the teacher's embeddings ``x', y'``. The teacher
(``psd.teacher``) decides what carries information beyond the hard labels:

- ``self``: the same forward pass, detached (``x' = x``, ``y' = y``). At ``tau = 1`` the soft
  part's gradient cancels exactly (the logits' gradient is ``(1 - a)(p - e)``, a down-weighted
  hard-label loss); ``tau != 1`` changes it for free. Costs nothing beyond the loss's own pass.
- ``momentum``: an EMA of the model. With ECLIPSE on, its momentum image tower and the shared
  text tower (no second EMA; the loss kernel reuses ECLIPSE's teacher logits tile). Otherwise an
  EMA of both towers (``model.psd_teacher``, m = ``psd.momentum``): a second copy of the weights
  and a no-grad forward of both towers per micro-batch.
- ``previous``: the model as it was at the last refresh, every ``psd.refresh_every`` steps
  (default one data epoch: PS-KD's "predictions of the previous epoch"). The same copy and
  forward as ``momentum`` (a frozen snapshot costs no EMA arithmetic between refreshes); until
  the first refresh there is no previous model, so ``a_t = 0`` then (PS-KD's first epoch).

The subset is ``round(psd.subset * N)`` rows of the global batch, drawn from a generator seeded
by (seed, step, micro-batch): every rank takes its slice of the same draw, and a resumed run
draws the same subsets (the schedule is a function of the step, too), so neither needs state in
the checkpoint; the teacher copy's fp32 shadows do (trainer_state/rank_R.pt), with whether it
came from ``checkpoint.init``. A run started from a checkpoint or ``grow`` directory starts the
teacher copy from the source's (``grow`` grows it with the student's operator) unless
``psd.inherit_teacher`` is off; ``a_t`` follows ``growth.schedules`` (``base.schedule_view``).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as D
from ..config import Config, ConfigError
from ..dist import rank as this_rank
from ..flops import global_batch, pair_flops, similarity_flops
from ..model import preset_shape
from ..sources import grown_weights, is_grown
from .base import Inherited, MethodSpec, Method, schedule_view
from .eclipse import TeacherTower
from .ema import ShadowTeacher, assemble_shadows, shadow_state_dict

log = logging.getLogger("trainer")
PREFIX = "psd_teacher."


@dataclass
class SoftTargets:
    """What ``losses.compute_loss`` hands the streaming pass for one micro-batch."""
    alpha: float                         # a_t
    mask: torch.Tensor                   # bool [b]: this rank's rows of the step's subset
    tau: float                           # teacher temperature
    image: torch.Tensor | None = None    # teacher embeddings [b, D] (None: this pass)
    text: torch.Tensor | None = None
    from_eclipse: bool = False           # ECLIPSE's momentum image teacher + the shared texts


class PairTeacher(TeacherTower):
    """A frozen copy of both towers; ``forward(pixels, ids, mask)`` gives L2-normalised
    ``(image, text)`` embeddings. Parameter names mirror the student's (``text_model.*``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model.vision_model, model.visual_projection)
        self.text_model = copy.deepcopy(model.text_model)
        self.text_projection = copy.deepcopy(model.text_projection)
        self.requires_grad_(False)

    def forward(self, pixel_values, input_ids=None, attention_mask=None):
        image = super().forward(pixel_values)
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return image, F.normalize(self.text_projection(pooled), dim=-1)


def own_teacher(cfg: Config) -> bool:
    """Does PSD keep its own copy of the model (rather than this pass or ECLIPSE's teacher)?"""
    p = cfg.psd
    return p.enabled and (p.teacher == "previous" or (p.teacher == "momentum" and not cfg.eclipse.enabled))


def check(cfg: Config) -> None:
    """Warn about the degenerate teacher; refuse what cannot work."""
    p = cfg.psd
    if not p.enabled:
        return
    if p.teacher == "self" and p.teacher_tau == 1.0:
        log.warning("psd.teacher=self with psd.teacher_tau=1 is degenerate: the soft targets' gradient "
                    "cancels and PSD is a down-weighted hard-label loss (docs/methods.md)")
    if p.subset * cfg.data.batch_size <= 0 and p.alpha_max > 0:
        raise ConfigError("config key 'psd.subset' is 0: no row gets soft targets; set it in (0, 1] or psd.enabled=false")


def attach(model: torch.nn.Module, cfg: Config) -> None:
    """Give ``model`` the teacher copy ``psd_teacher`` when ``own_teacher(cfg)``; call before
    ``deepspeed.initialize`` and before any other method reorganises the student's towers."""
    if own_teacher(cfg):
        model.psd_teacher = PairTeacher(model)


def alpha_at(cfg: Config, step: int) -> float:
    """``a_t`` for optimizer step ``step`` (1-based): ``a_max * t / T`` or constant ``a_max``."""
    p = cfg.psd
    if p.schedule == "constant":
        return p.alpha_max
    return p.alpha_max * min(1.0, step / max(1, cfg.max_steps))


def subset_mask(cfg: Config, step: int, micro: int, rank: int, world: int, b: int) -> torch.Tensor:
    """This rank's rows (bool ``[b]``) of the global subset for (step, micro-batch): the same
    draw on every rank and in every resumed run."""
    n = b * world
    seed = np.random.SeedSequence([cfg.seed, step, micro]).generate_state(1)[0]
    g = torch.Generator().manual_seed(int(seed))
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=g)[: round(cfg.psd.subset * n)]] = True
    return chosen[rank * b: (rank + 1) * b]


def refresh_every(cfg: Config, world: int) -> int:
    """Steps between refreshes of the ``previous`` teacher (default: one data epoch)."""
    if cfg.psd.refresh_every is not None:
        return cfg.psd.refresh_every
    return D.steps_per_epoch(cfg, world)


class Psd(Method):
    """What the train step calls when ``psd.enabled``: see the module doc."""
    name = "psd"

    def __init__(self, cfg: Config, engine):
        self.cfg = cfg
        self.rank, self.world = this_rank(), engine.dp_world_size
        self.device = engine.device
        self.step, self.micro = 0, 0
        self.every = refresh_every(cfg, self.world)
        self.teacher = None
        self.inherited = False   # the teacher came from checkpoint.init (a previous model exists from step 1)
        if own_teacher(cfg):
            if cfg.psd.teacher == "momentum":
                momentum = lambda step: cfg.psd.momentum   # noqa: E731
            else:   # a copy at each refresh, frozen in between
                momentum = lambda step: 0.0 if step % self.every == 0 else 1.0   # noqa: E731
            self.teacher = ShadowTeacher(engine, PREFIX, momentum)
            self.forward_kwargs = {"with_psd_teacher": True}
            self.outputs = 2

    def prepare(self, step: int) -> None:
        self.step, self.micro = step, 0

    def alpha(self, step: int) -> float:
        if self.cfg.psd.teacher == "previous" and step <= self.every and not self.inherited:
            return 0.0   # no previous model yet: the teacher would be the initial weights
        return alpha_at(*schedule_view(self.cfg, step))   # a grown run's schedule may continue the source's

    def extras(self, *teacher) -> dict:
        b = self.cfg.data.batch_size
        mask = subset_mask(self.cfg, self.step, self.micro, self.rank, self.world, b).to(self.device)
        self.micro += 1
        p = self.cfg.psd
        image, text = teacher if teacher else (None, None)
        return {"psd": SoftTargets(self.alpha(self.step), mask, p.teacher_tau, image, text,
                                   from_eclipse=p.teacher == "momentum" and self.cfg.eclipse.enabled)}

    def update(self, step: int) -> None:
        if self.teacher is not None:
            self.teacher.update(step)

    def describe(self) -> str:
        p = self.cfg.psd
        source = {"self": "this pass, detached",
                  "momentum": "ECLIPSE's momentum image teacher + shared texts" if self.cfg.eclipse.enabled
                  else f"an EMA of both towers, m={p.momentum}",
                  "previous": f"the model as it was at the last refresh (every {self.every} steps)"}[p.teacher]
        return (f"psd: soft targets from {source} at tau={p.teacher_tau}, a_max={p.alpha_max} ({p.schedule}), "
                f"subset {p.subset} of each global batch")

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "inherited": self.inherited} if self.teacher is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.teacher is not None:
            if "teacher" not in state:
                raise RuntimeError("checkpoint has no PSD teacher state: it was written with another psd.teacher")
            self.teacher.load_state_dict(state["teacher"])
            self.inherited = bool(state.get("inherited", False))

    def restore_elastic(self, states, where, workers: int, step: int) -> None:
        """Another world size: the full teacher from the old ranks' shadow slices, sliced anew."""
        if self.teacher is None:
            return
        if "teacher" not in states[0].get(self.name, {}):
            raise RuntimeError("checkpoint has no PSD teacher state: it was written with another psd.teacher")
        self.teacher.load_full(assemble_shadows(states, PREFIX, where, pick=lambda st: st[self.name]["teacher"]))
        self.inherited = bool(states[0][self.name].get("inherited", False))

    def inherit(self, init: Inherited) -> None:
        """``checkpoint.init`` with a PSD teacher of the same kind of copy (a grow directory's is
        grown with the student's operator): start from it unless ``psd.inherit_teacher`` is off."""
        teacher = {k[len(PREFIX):]: v for k, v in init.weights.items() if k.startswith(PREFIX)}
        if self.teacher is None or not teacher:
            return
        if not self.cfg.psd.inherit_teacher:
            log.info("psd: teacher starts from the student (psd.inherit_teacher=false), not from %s", init.path)
            return
        self.teacher.load_full(teacher)
        self.inherited = True
        log.info("psd: teacher inherited from %s", init.path)


def teacher_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 PSD teacher copy (both towers, student names) of a checkpoint, from every rank's
    shadow slices in ``trainer_state/``."""
    return shadow_state_dict(root, tag, lambda state: (state.get("psd") or {}).get("teacher"), PREFIX,
                             "no PSD teacher copy (psd.teacher was self, or momentum with ECLIPSE on)")


def step_flops(cfg: Config, step: int, world: int) -> float:
    """What PSD adds to a step: with its own teacher copy, that copy's forward of both towers (no
    gradient, every token); with any teacher but ``self``, the teacher's two similarity matrices
    (no gradient; the loss's torch reference forms them even for ECLIPSE's teacher, whose logits
    the streaming kernels reuse). ``self`` reuses the step's own logits: nothing."""
    if cfg.psd.teacher == "self":
        return 0.0
    shape = preset_shape(cfg.model)
    batch = global_batch(cfg, world)
    copy_forward = batch * pair_flops(shape) if own_teacher(cfg) else 0.0
    return copy_forward + 2 * similarity_flops(batch, shape["embed_dim"])


class PsdSpec(MethodSpec):
    name = "psd"
    prefixes = (PREFIX,)   # the teacher copy is training state, not model: eval and export leave it behind
    attach_rank = -1       # copies the stock towers, before ECLIPSE expedites the student's

    def enabled(self, cfg: Config) -> bool:
        return cfg.psd.enabled

    def check(self, cfg: Config) -> None:
        check(cfg)

    def attach(self, model, cfg: Config) -> None:
        attach(model, cfg)

    def build(self, cfg: Config, engine) -> Psd:
        return Psd(cfg, engine)

    def training_copies(self, cfg: Config, root: Path, tag: str) -> dict[str, torch.Tensor]:
        """The teacher copy of a checkpoint (or of a grow directory, grown), for grow and checkpoint.init."""
        if not own_teacher(cfg):
            return {}
        if is_grown(Path(root) / tag):
            return {k: v for k, v in grown_weights(Path(root) / tag).items() if k.startswith(PREFIX)}
        return {PREFIX + k: v for k, v in teacher_state_dict(root, tag).items()}

    def loss_terms(self, cfg: Config) -> dict[str, float]:
        return {"self_distill": 1.0}   # its strength is a_t, applied inside the pass

    def step_flops(self, cfg: Config, step: int, world: int) -> float:
        return step_flops(cfg, step, world)


SPEC = PsdSpec()
