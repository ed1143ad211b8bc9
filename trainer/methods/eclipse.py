"""ECLIPSE (Kim et al., AAAI 2024; docs/methods.md): a momentum image teacher, one shared
text encoder, and an expedited student distilled from the teacher's image-text alignments.

    eclipse.attach(model, cfg)                 # before the engine: adds model.teacher, installs EViT
    method = Eclipse(cfg, engine)              # after it (and after resume, load_state_dict)
    method.prepare(step)                       # the student's keep rate for this step
    image, text, scale, teacher = engine(..., with_teacher=True)
    ... loss with ctx.extras = method.extras(teacher) ... engine.step()
    method.update(step)                        # EMA after every applied optimizer step

**Where the teacher lives.** ``model.teacher`` is a frozen copy of the image tower (vision
transformer + visual projection) *inside* the module DeepSpeed wraps, so every ZeRO stage treats
it like the student: cast to the training precision, and under ZeRO-3 partitioned across ranks
and gathered layer by layer by the same hooks during its forward (about 1/world of a full copy
per rank). It has no gradients and no optimizer state.

**How the EMA is kept.** ``theta_bar <- m theta_bar + (1 - m) theta`` is accumulated in fp32
from the optimizer's fp32 master weights, never from the bf16 module copy: with ``m = 0.995``
the per-step increment ``(1 - m)(theta - theta_bar)`` is below bf16's resolution for most
weights, so a bf16 EMA would stall. Each rank keeps fp32 "shadows" of exactly the slices of the
master weights it owns, so the EMA itself needs no communication:

- ZeRO-3: the rank's partition of each parameter (``safe_get_local_fp32_param``); the teacher's
  own partition (``ds_tensor``) is refreshed from the shadow. Memory per rank: the teacher's
  partition, 1/world of a copy (measured for ViT-B/16 on 2 ranks: 164.4 of 328.8 MiB), which in
  fp32 training is the shadow itself; bf16 adds an fp32 shadow of the partition (4 B/param/world).
- ZeRO-1/2 in bf16/fp16, and DeepSpeed's bf16 optimizer: the rank's fragment of each parameter's
  flat master (``param._hp_mapping``); the full (replicated) teacher is rebuilt with one all-reduce
  of a flat buffer in the training dtype per step (every other rank contributes zeros there).
- fp32 under ZeRO-0/1/2: the replicated module weights are bit-equal to the fp32 masters, so each
  rank keeps the whole EMA itself (the teacher's weights are the shadow) and nothing is exchanged.
- fp16 under ZeRO-0: the masters are DeepSpeed's FP16 optimizer's own fp32 copies (per weight, or
  one flat tensor per group with a fused Adam), not the fp16 module weights; each rank keeps the
  whole EMA in an fp32 shadow and nothing is exchanged.
- ZeRO-3 keeps small parameters gathered between forwards; after writing the teacher's
  partitions the EMA re-gathers those (one collective), so every forward uses this step's teacher.

The shadows (with each slice's place in its parameter) are the teacher's state in checkpoints
(``trainer_state/rank_R.pt``); :func:`teacher_state_dict` assembles the full fp32 teacher from
those files for ``eval`` and ``export-hf --which teacher`` without DeepSpeed.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError
from ..flops import global_batch, similarity_flops, vision_flops, vision_tokens
from ..model import preset_shape
from ..sources import grown_weights, is_grown
from .base import Inherited, Method, MethodSpec, schedule_view
from .ema import ShadowTeacher, assemble_shadows, shadow_state_dict
from .evit import default_drop_layers, install, keep_rate_at, kept_patches, set_keep_rate

PREFIX = "teacher."
TOWER = ("vision_model", "visual_projection")   # what the teacher copies (the text tower is shared)


class TeacherTower(torch.nn.Module):
    """A frozen copy of the image tower; ``forward(pixels)`` gives L2-normalised embeddings."""

    def __init__(self, vision_model: torch.nn.Module, visual_projection: torch.nn.Module):
        super().__init__()
        self.vision_model = copy.deepcopy(vision_model)
        self.visual_projection = copy.deepcopy(visual_projection)
        self.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)


def check(cfg: Config, vision_layers: int) -> None:
    """Values a user can get wrong, against the model shape (exit 2 naming the key)."""
    e = cfg.eclipse
    if not e.enabled:
        return
    bad = [i for i in e.drop_layers if not isinstance(i, int) or not 0 <= i < vision_layers]
    if bad:
        raise ConfigError(f"config key 'eclipse.drop_layers' must hold layer indices in [0, {vision_layers}) "
                          f"(the vision tower has {vision_layers} layers); got {e.drop_layers!r}")
    if e.expedite == "evit":
        k = preset_shape(cfg.model)["shared_layers"]
        inside = [i for i in drop_layers(cfg, vision_layers) if i >= vision_layers - k]
        if inside:   # an EViT layer reorganises tokens: shared, it would drop text tokens too
            raise ConfigError(f"config keys 'eclipse.drop_layers' ({drop_layers(cfg, vision_layers)}"
                              f"{'' if e.drop_layers else ', the default'}) and 'model.shared_layers' ({k}): EViT "
                              f"drop layers {inside} are shared with the text tower (vision layers "
                              f"[{vision_layers - k}, {vision_layers}) are shared); drop tokens below layer "
                              f"{vision_layers - k}, share fewer layers, or set eclipse.expedite=random|none")
    if e.momentum_final is not None and not e.momentum <= e.momentum_final <= 1.0:
        raise ConfigError(f"config key 'eclipse.momentum_final' must be in [eclipse.momentum, 1]; "
                          f"got {e.momentum_final!r}")


def drop_layers(cfg: Config, vision_layers: int) -> list[int]:
    return list(cfg.eclipse.drop_layers) or default_drop_layers(vision_layers)


def attach(model: torch.nn.Module, cfg: Config) -> None:
    """Give ``model`` (a ``ClipTrainModel``) its teacher and an expedited student image tower.

    Call before ``deepspeed.initialize`` (and before loading weights for eval/export). The
    teacher is copied before the student's layers are reorganised, so it is the stock tower.
    """
    e = cfg.eclipse
    if not e.enabled:
        return
    model.teacher = TeacherTower(model.vision_model, model.visual_projection)
    if e.expedite != "none":
        install(model.vision_model, drop_layers(cfg, model.config.vision_config.num_hidden_layers),
                fuse=e.fuse_tokens, mode=e.expedite)
        model.expedited_tower = True


def momentum_at(cfg: Config, step: int) -> float:
    """``m``: constant, or a cosine from ``eclipse.momentum`` to ``eclipse.momentum_final``."""
    e = cfg.eclipse
    if e.momentum_final is None:
        return e.momentum
    progress = min(1.0, step / max(1, cfg.max_steps))
    return e.momentum_final - (e.momentum_final - e.momentum) * 0.5 * (1 + math.cos(math.pi * progress))


def keep_window(cfg: Config) -> tuple[int, int]:
    """``(warm-up, shrink)`` steps of the student's keep-rate schedule: the warm-up defaults to
    ``optim.warmup_steps`` and the shrink window to a third of the run (EViT's recipe shrinks over
    100 of its 300 epochs, then holds the target), both cut to fit in ``max_steps``."""
    e = cfg.eclipse
    warmup = cfg.optim.warmup_steps if e.keep_warmup_steps is None else e.keep_warmup_steps
    warmup = min(warmup, cfg.max_steps)
    shrink = round(cfg.max_steps / 3) if e.keep_shrink_steps is None else e.keep_shrink_steps
    return warmup, max(1, min(shrink, cfg.max_steps - warmup))


def student_keep_rate(cfg: Config, step: int) -> float:
    """The student's keep rate at ``step``: 1 through the warm-up, a cosine down to ``keep_rate``
    over the shrink window (:func:`keep_window`), then ``keep_rate`` held; or constant."""
    e = cfg.eclipse
    if e.expedite == "none":
        return 1.0
    if e.keep_schedule == "constant":
        return e.keep_rate
    return keep_rate_at(step, *keep_window(cfg), e.keep_rate)


def mean_keep_rate(cfg: Config) -> float:
    """The student's keep rate averaged over the run's steps ``1..max_steps``: what the
    expedition saves, on average, of the patch tokens after the drop layers."""
    return sum(student_keep_rate(cfg, t) for t in range(1, cfg.max_steps + 1)) / max(1, cfg.max_steps)


class Eclipse(Method):
    """What the train step calls when ``eclipse.enabled``: see the module doc."""
    name = "eclipse"
    outputs = 1   # the teacher's image embeddings

    def __init__(self, cfg: Config, engine):
        self.cfg, self.module = cfg, engine.module
        self.teacher = ShadowTeacher(engine, PREFIX, lambda step: momentum_at(*schedule_view(cfg, step)))
        self.forward_kwargs = {"with_teacher": True}

    def prepare(self, step: int) -> None:
        if self.cfg.eclipse.expedite != "none":
            set_keep_rate(self.module.vision_model, student_keep_rate(*schedule_view(self.cfg, step)))

    def describe(self) -> str:
        e, mem = self.cfg.eclipse, self.teacher.memory_bytes()
        where = (f"drop layers {drop_layers(self.cfg, self.module.config.vision_config.num_hidden_layers)}"
                 if e.expedite == "evit" else "input patch dropout")
        student = (f"student keep rate {e.keep_rate} ({e.expedite}, {where}; {e.keep_schedule} schedule, "
                   f"mean over the run {mean_keep_rate(self.cfg):.3f})") if e.expedite != "none" \
            else "student keeps every token"
        return (f"eclipse: momentum teacher ({self.teacher.kind}) m={e.momentum}, this rank holds "
                f"{mem['weights'] / 2**20:.1f} MiB of teacher weights + {mem['shadows'] / 2**20:.1f} MiB fp32 EMA "
                f"(a full copy: {mem['full_copy'] / 2**20:.1f} MiB); {student}; teacher_kl weight {e.kl_weight}")

    def extras(self, teacher_image: torch.Tensor) -> dict:
        return {"teacher_image": teacher_image, "teacher_text_grad": not self.cfg.eclipse.text_stop_grad}

    def update(self, step: int) -> None:
        self.teacher.update(step)

    def state_dict(self) -> dict:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state)

    def restore_elastic(self, states, where, workers: int, step: int) -> None:
        """Another world size: the full teacher from the old ranks' shadow slices, sliced anew."""
        self.teacher.load_full(assemble_shadows(states, PREFIX, where, pick=lambda st: st[self.name]))

    def inherit(self, init: Inherited) -> None:
        teacher = {k[len(PREFIX):]: v for k, v in init.weights.items() if k.startswith(PREFIX)}
        if teacher:   # a grown (or earlier) teacher, instead of a copy of the student
            self.teacher.load_full(teacher)


# ----------------------------------------------------------------------------- evaluation views

class TeacherView(torch.nn.Module):
    """``model`` with the teacher's image tower: what ``trainer.evaluate.evaluate`` calls."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def encode_text(self, input_ids, attention_mask=None):
        return self.model.encode_text(input_ids, attention_mask)

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, **_):
        image = self.model.teacher(pixel_values) if pixel_values is not None else None
        text = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        return image, text, None   # evaluation ranks by cosine; the scale is not needed (and under
        # ZeRO-3 it is only gathered inside the wrapped module's own forward)


def eval_views(model, cfg: Config):
    """``(prefix, model-like, keep rate)`` of the evaluations beyond the student at full capacity
    (the plain keys): the student expedited (``fast/``) and the teacher (``teacher/``)."""
    views = []
    if cfg.eclipse.expedite != "none":
        views.append(("fast/", model, cfg.eclipse.keep_rate))
    views.append(("teacher/", TeacherView(model), 1.0))
    return views


def teacher_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 teacher (``vision_model.*``, ``visual_projection.*``) of a checkpoint, assembled
    from every rank's shadow slices in ``trainer_state/``."""
    if is_grown(Path(root) / tag):   # a grow directory holds its teacher whole, under teacher.*
        sd = {k[len(PREFIX):]: v for k, v in grown_weights(Path(root) / tag).items() if k.startswith(PREFIX)}
        if not sd:
            raise ConfigError(f"{Path(root) / tag} has no ECLIPSE teacher (its source run had eclipse.enabled off)")
        return sd
    return shadow_state_dict(root, tag, lambda state: state.get("eclipse"), PREFIX,
                             "no ECLIPSE teacher (eclipse.enabled was off)")


# ----------------------------------------------------------------------------- training FLOPs

def student_layer_tokens(cfg: Config, shape: dict, rate: float) -> tuple[list[tuple[int, int]], float]:
    """The expedited student's ``(tokens in, tokens out)`` per vision layer at keep rate ``rate``,
    and the forward FLOPs per image of EViT's class-token attention rows (``2 n d`` in each layer
    that drops). EViT: a drop layer with ``n`` tokens attends over all of them and keeps
    ``1 + ceil(rate (n - 1))`` (+1 fused) for its MLP and onwards; FLIP: every layer sees
    ``1 + ceil(rate (n - 1))`` tokens."""
    e, n, layers = cfg.eclipse, vision_tokens(shape), shape["vision_layers"]
    if e.expedite == "none" or rate >= 1.0:
        return [(n, n)] * layers, 0.0
    if e.expedite == "random":
        kept = 1 + kept_patches(n - 1, rate)
        return [(kept, kept)] * layers, 0.0
    drops, out, row = set(drop_layers(cfg, layers)), [], 0.0
    for i in range(layers):
        keep = kept_patches(n - 1, rate)
        if i in drops and keep < n - 1:
            row += 2.0 * n * shape["vision_width"]
            out.append((n, 1 + keep + (1 if e.fuse_tokens else 0)))
            n = out[-1][1]
        else:
            out.append((n, n))
    return out, row


def step_flops(cfg: Config, step: int, world: int) -> float:
    """What ECLIPSE adds to a step: the teacher's forward of the stock image tower (no gradient),
    the student's saving from the tokens it drops at this step's keep rate (forward and backward;
    the class-token rows EViT adds, with a gradient only when the dropped tokens are fused), and
    the KL's four similarity matrices (teacher's and student's, both directions; the teacher's
    without gradient; the student's with both operands' gradients, but for the stopped text side
    of the image->text one under ``text_stop_grad``: the text->image one still needs its text
    side's, through the logit scale)."""
    shape = preset_shape(cfg.model)
    batch, dim = global_batch(cfg, world), shape["embed_dim"]
    layers, row = student_layer_tokens(cfg, shape, student_keep_rate(cfg, step))
    saving = 3.0 * (vision_flops(shape, layers) - vision_flops(shape))
    rows = row * (3.0 if cfg.eclipse.fuse_tokens else 1.0)
    student_kl = 5.0 if cfg.eclipse.text_stop_grad else 6.0   # forward + backward of the two
    return batch * (vision_flops(shape) + saving + rows) + (student_kl + 2) * similarity_flops(batch, dim)


class EclipseSpec(MethodSpec):
    name = "eclipse"
    prefixes = (PREFIX,)

    def enabled(self, cfg: Config) -> bool:
        return cfg.eclipse.enabled

    def check(self, cfg: Config) -> None:
        check(cfg, preset_shape(cfg.model)["vision_layers"])

    def attach(self, model, cfg: Config) -> None:
        attach(model, cfg)

    def build(self, cfg: Config, engine) -> Eclipse:
        return Eclipse(cfg, engine)

    def loss_terms(self, cfg: Config) -> dict[str, float]:
        return {"teacher_kl": cfg.eclipse.kl_weight}

    def saved_weights(self, cfg: Config, root: Path, tag: str) -> dict:
        return {PREFIX + k: v for k, v in teacher_state_dict(root, tag).items()}

    def eval_views(self, model, cfg: Config):
        return eval_views(model, cfg)

    def export_towers(self, model) -> dict[str, dict]:
        return {"teacher": model.teacher.state_dict()} if hasattr(model, "teacher") else {}

    def step_flops(self, cfg: Config, step: int, world: int) -> float:
        return step_flops(cfg, step, world)

    def steady_overrides(self, cfg: Config, bench_steps: int) -> dict:
        """The student held at the run's mean keep rate (a benchmark's few steps would be all warm-up)."""
        return {"eclipse.keep_schedule": "constant", "eclipse.keep_rate": mean_keep_rate(cfg)}

    def grown_config(self, raw: dict, cfg: Config, state: dict | None, layer_index) -> None:
        """EViT drops tokens in the same layers of the grown tower (spelled out: growth inserts
        layers), so the expedited student keeps its function too, not only the full one."""
        if cfg.eclipse.enabled and cfg.eclipse.expedite == "evit":
            old = drop_layers(cfg, preset_shape(cfg.model)["vision_layers"])
            raw["eclipse"]["drop_layers"] = [layer_index("vision", i) for i in old]


SPEC = EclipseSpec()
