"""GrowCLIP (Deng et al., ICCV 2023; docs/methods.md): stage-wise model growth by
checkpoint surgery, with function-preserving operators and parameter inheriting with momentum.

    python -m trainer grow --checkpoint runs/small --out runs/small-grown \\
        model.vision_layers=6 model.vision_width=256 model.vision_heads=8 [--pim-beta 0.9]
    python -m trainer train --config runs/small-grown/config.yaml output_dir=runs/stage2
    python -m trainer eval --checkpoint runs/small-grown        # and export-hf, select

``grow`` consolidates the checkpoint (any ZeRO stage) to fp32 with DeepSpeed's own reader, maps
the weights to the requested shape with the operators below, blends them with a fresh
initialisation (PIM), and writes ``DIR`` atomically: ``weights.pt`` (the ``CLIPModel`` state dict,
plus the methods' copies grown by the same operator: ``teacher.*`` for an ECLIPSE teacher,
``psd_teacher.*`` for PSD's own), ``config.yaml`` (the source run's config with the grown shape
spelled out, ``checkpoint.init: DIR``, the methods' carried state, e.g. ECL's kept set as
``data.manifest``, and ``growth.schedule_start``/``schedule_steps``, where the methods' schedules
continue) and ``grow.json`` (what was done, the measured function-preservation error, and
``carried``: the methods' state the next stage continues with). ``checkpoint.init=DIR`` starts a
run from those weights with a fresh learning-rate schedule (it warms up again; the methods' schedules
continue from the source's position unless ``growth.schedules=restart``) and, by default
(``--optimizer reset``), a fresh AdamW.

``--optimizer transform`` also writes ``optimizer.pt``: the source's AdamW step count and moments
(read with DeepSpeed's ``ds_to_universal`` for ZeRO 1/2/3, from torch's state for ZeRO-0), mapped
with the weights' index maps (:func:`grow_moments`): ``m' = c gather(m)``, ``v' = c^2 gather(v)``,
zeros for depth-added blocks and new MLP units. ``c`` is the factor of the grown model's gradient
at the function-preserving point, ``g' = c gather(g)``: ``1 / f`` inside a tower of width ``x f``
(``sqrt(r) / f`` for ``q_proj`` when heads grow by ``f / r``), 1 for the joint-space projections and
the logit scale (not docs/methods.md's blanket "m/2, v/4"; tests/test_growth_optim.py checks it on real
gradients). That makes the moments exact for ``--split equal`` with ``--pim-beta 1``; the random
split and PIM blends move the gradients off the map, so there they are an approximation (grow.json
says which). The next stage sets them into its optimizer after ``deepspeed.initialize`` (any ZeRO
stage) and keeps the step count for Adam's bias correction; its learning-rate schedule is fresh.

**Operators** (pre-LN transformer; each exact, so with ``beta = 1`` the grown model computes the
same embeddings as the small one, within fp32 rounding):

- *width* ``d -> f d`` (integer ``f``): the residual stream is ``f`` copies of itself. Tensors
  that write it (embeddings, class/position embeddings, biases, LayerNorm gamma/beta, the output
  rows of every linear map into the stream) are tiled; LayerNorm of ``[v; v]`` is ``[LN(v);
  LN(v)]``. Linear maps that read copies split each input column into ``f`` pieces that sum to
  it: ``W / f`` each (``split="equal"``), or ``W / f`` plus zero-sum noise per output row
  (``split="random"``, LEMON's symmetry-breaking split; still exact). The joint-space
  projections read the stream: ``P' = [P, P] / f``.
- *heads* with the width: ``h -> g h`` for any ``g`` dividing ``f``. Each new head holds
  ``r = f / g`` copies of one old head (head dim ``r x`` the old one), and ``q`` is scaled by
  ``1 / sqrt(r)`` so the attention logits are unchanged. (At a fixed width a stock CLIP attention
  ties the head count to the head dim, so no exact operator changes the heads alone.)
- *MLP ratio* up: new hidden units take fresh ``fc1`` rows and zero ``fc2`` columns.
- *depth*: new blocks copy a neighbour with ``out_proj`` and ``fc2`` (weights and biases) zero,
  so the pre-LN residual block adds nothing. New blocks are spread evenly through the stack.
- *shared layers* (``model.shared_layers``): a tower is its private layers then the shared ones;
  each part grows on its own, the shared part once (the text tower's shared layers are the grown
  image-tower ones). A new shared layer adds nothing to either tower (zero outputs).

PIM: ``theta = beta * Grow(theta_old) + (1 - beta) * theta_fresh`` (``theta_fresh``: the grown
shape's initialisation with the run's seed), ``beta = 1`` is pure inheritance.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import math
from dataclasses import dataclass

import torch
from deepspeed.utils import safe_set_full_optimizer_state

from ..config import ConfigError
from .base import Inherited, Method, MethodSpec

log = logging.getLogger("trainer")

TEACHER = "teacher."
TOWERS = {"vision": "vision_model", "text": "text_model"}


# ----------------------------------------------------------------------------- the plan

@dataclass
class TowerPlan:
    """How one tower grows: width factor ``f``, head factor ``g`` (``r = f // g`` copies of a
    head inside each new head), MLP hidden ``m -> m2`` (after the width copies), private and
    shared depths."""
    f: int
    g: int
    heads: int
    m: int
    m2: int
    private: tuple[int, int]
    shared: tuple[int, int]


def plan_tower(old: dict, new: dict, tower: str) -> TowerPlan:
    """The operators that take ``tower`` from ``old`` to ``new`` (shapes from
    ``trainer.model.preset_shape``); a shape they cannot reach is a ConfigError saying why."""
    w, w2 = old[f"{tower}_width"], new[f"{tower}_width"]
    h, h2 = old[f"{tower}_heads"], new[f"{tower}_heads"]
    key = f"model.{tower}_"
    if w2 % w:
        raise ConfigError(f"{key}width {w} -> {w2}: width grows by whole factors only (d -> f d)")
    f = w2 // w
    if h2 % h or f % (h2 // h):
        raise ConfigError(f"{key}heads {h} -> {h2} with width x{f}: the heads can only grow with the width, "
                          f"by a factor that divides it (here: {', '.join(str(h * g) for g in range(1, f + 1) if f % g == 0)})")
    m, m2 = round(old["mlp_ratio"] * w), round(new["mlp_ratio"] * w2)
    if m2 < f * m:
        raise ConfigError(f"model.mlp_ratio {old['mlp_ratio']} -> {new['mlp_ratio']}: the MLP can only grow")
    k, k2 = old["shared_layers"], new["shared_layers"]
    p, p2 = old[f"{tower}_layers"] - k, new[f"{tower}_layers"] - k2
    if k2 < k:
        raise ConfigError(f"model.shared_layers {k} -> {k2}: shared layers cannot be split back into towers")
    if p2 < p:
        raise ConfigError(f"{key}layers {old[f'{tower}_layers']} -> {new[f'{tower}_layers']} with model.shared_layers "
                          f"{k} -> {k2}: the tower's private layers would go from {p} to {p2}; growth adds layers, "
                          "it never removes or shares existing ones")
    return TowerPlan(f=f, g=h2 // h, heads=h, m=m, m2=m2, private=(p, p2), shared=(k, k2))


def check_growth(old: dict, new: dict) -> dict[str, TowerPlan]:
    """Both towers' plans; everything else about the shape must stay (ConfigError naming it)."""
    for key in ("image_size", "patch_size", "context_length", "embed_dim"):
        if old[key] != new[key]:
            why = {"embed_dim": "new joint-space dimensions would start at zero and never get a gradient"}.get(
                key, "the inputs would change, not just the model")
            raise ConfigError(f"model.{key} {old[key]} -> {new[key]}: grow keeps it ({why})")
    return {tower: plan_tower(old, new, tower) for tower in TOWERS}


def depth_plan(n: int, n2: int) -> list[tuple[int, bool]]:
    """``[(source layer, is_new), ...]`` for ``n -> n2`` layers: the ``n2 - n`` new blocks spread
    evenly, each after (and copying) the old layer it follows; the first old layer when ``n = 0``
    is impossible, so callers give a neighbour from elsewhere (``source = -1``)."""
    if n == 0:
        return [(-1, True)] * n2
    added = n2 - n
    after = [((t + 1) * n) // (added + 1) for t in range(added)]   # in [0, n)
    out = []
    for i in range(n):
        out.append((i, False))
        out.extend((i, True) for a in after if a == i)
    # `after` can name n - 1 at most once per new block, so every new block is placed
    return out


def grown_layer_index(p: TowerPlan, i: int) -> int:
    """Where old layer ``i`` of a tower (private layers, then shared ones) is in the grown tower."""
    (np_, np2), (k, k2) = p.private, p.shared
    part, offset, n, n2 = (i, 0, np_, np2) if i < np_ else (i - np_, np2, k, k2)
    return offset + [j for j, (_, new) in enumerate(depth_plan(n, n2)) if not new][part]


# ----------------------------------------------------------------------------- tensor maps

def _noise_gen(name: str, seed: int) -> torch.Generator:
    """Per-tensor noise, so the ECLIPSE teacher's tensors get the student's split (same names)."""
    g = torch.Generator()
    g.manual_seed(int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16))
    return g


def _dup(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return x.index_select(dim, idx)


def _split(x: torch.Tensor, dim: int, idx: torch.Tensor, f: int, noise: float, gen: torch.Generator | None,
           moments: bool = False):
    """Gather along ``dim`` by ``idx`` (each old index appears ``f`` times) and divide by ``f``;
    with ``noise`` add per-row zero-sum noise over the ``f`` positions of each old index, so the
    pieces still sum to the original column. ``moments``: the gather alone (:func:`grow_moments`)."""
    if moments:
        return x.index_select(dim, idx)
    out = x.index_select(dim, idx) / f
    if noise and f > 1:
        n = torch.randn(out.shape, generator=gen) * noise * float(x.std())
        group_sum = torch.zeros_like(x).index_add_(dim, idx, n)
        out += n - group_sum.index_select(dim, idx) / f
    return out


def _stream_idx(d: int, f: int) -> torch.Tensor:
    return torch.arange(d * f) % d


def _inner_idx(d: int, heads: int, g: int, f: int) -> torch.Tensor:
    """New attention dim -> old: new head ``J = a h + j`` holds ``r = f / g`` copies of old head
    ``j`` (see the module doc)."""
    hd, r = d // heads, f // g
    new_hd = hd * r
    J = torch.arange(d * f) // new_hd
    t = torch.arange(d * f) % new_hd
    return (J % heads) * hd + t % hd


def widen_layer(layer: dict, p: TowerPlan, d: int, noise: float, seed: int, name: str,
                moments: bool = False) -> dict:
    """One encoder layer's tensors (keys relative to the layer) at width ``f d``, heads ``g h``
    and MLP hidden ``f m`` (the MLP-ratio growth comes after). ``moments``: the same gathers
    without the split's ``1 / f``, its noise, or ``q``'s scale (:func:`grow_moments`)."""
    f = p.f
    if f == 1:
        return dict(layer)
    s, a, mi = _stream_idx(d, f), _inner_idx(d, p.heads, p.g, f), _stream_idx(p.m, f)
    r = f // p.g
    gen = lambda k: _noise_gen(f"{name}.{k}", seed)   # noqa: E731
    m = moments
    out = {}
    for k, x in layer.items():
        if k.startswith("layer_norm"):
            out[k] = _dup(x, 0, s)
        elif k.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            scale = 1 / math.sqrt(r) if ".q_proj." in k and not m else 1.0
            rows = _dup(x, 0, a)
            out[k] = scale * (_split(rows, 1, s, f, noise, gen(k), m) if x.dim() == 2 else rows)
        elif ".out_proj." in k:
            out[k] = _split(_dup(x, 0, s), 1, a, f, noise, gen(k), m) if x.dim() == 2 else _dup(x, 0, s)
        elif ".fc1." in k:
            rows = _dup(x, 0, mi)
            out[k] = _split(rows, 1, s, f, noise, gen(k), m) if x.dim() == 2 else rows
        elif ".fc2." in k:
            out[k] = _split(_dup(x, 0, s), 1, mi, f, noise, gen(k), m) if x.dim() == 2 else _dup(x, 0, s)
        else:
            raise RuntimeError(f"grow: unknown encoder-layer tensor {k!r}")
    return out


def widen_mlp(layer: dict, p: TowerPlan, fresh: dict, moments: bool = False) -> dict:
    """MLP hidden ``f m -> m2``: the new units' ``fc1`` rows from the fresh model, ``fc2`` columns 0
    (``moments``: zero ``fc1`` rows too, the new units have no optimizer history)."""
    fm = p.f * p.m
    if p.m2 == fm:
        return layer
    new_rows = (lambda t: torch.zeros_like(t)) if moments else (lambda t: t)   # noqa: E731
    out = dict(layer)
    out["mlp.fc1.weight"] = torch.cat([layer["mlp.fc1.weight"], new_rows(fresh["mlp.fc1.weight"][fm:])])
    out["mlp.fc1.bias"] = torch.cat([layer["mlp.fc1.bias"], new_rows(fresh["mlp.fc1.bias"][fm:])])
    w2 = layer["mlp.fc2.weight"]
    out["mlp.fc2.weight"] = torch.cat([w2, w2.new_zeros(w2.shape[0], p.m2 - fm)], dim=1)
    return out


def silent(layer: dict) -> dict:
    """A copy of ``layer`` whose residual branches write nothing: an exact identity block."""
    out = {k: v.clone() for k, v in layer.items()}
    for k in ("self_attn.out_proj.weight", "self_attn.out_proj.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
        out[k].zero_()
    return out


def _layers(sd: dict, prefix: str) -> list[dict]:
    """``prefix.encoder.layers.{i}.*`` of ``sd`` as a list of per-layer dicts."""
    head = f"{prefix}.encoder.layers."
    layers: dict[int, dict] = {}
    for k, v in sd.items():
        if k.startswith(head):
            i, rest = k[len(head):].split(".", 1)
            layers.setdefault(int(i), {})[rest] = v
    return [layers[i] for i in range(len(layers))]


def _deepen(layers: list[dict], n2: int, neighbour: dict | None, moments: bool = False) -> list[dict]:
    out = []
    new_block = (lambda b: {k: torch.zeros_like(v) for k, v in b.items()}) if moments else silent   # noqa: E731
    for src, new in depth_plan(len(layers), n2):
        block = layers[src] if src >= 0 else neighbour
        out.append(new_block(block) if new else block)
    return out


def grow_tower(sd: dict, prefix: str, proj: str | None, p: TowerPlan, old: dict, tower: str, fresh: dict,
               noise: float, seed: int, shared: list[dict] | None = None,
               moments: bool = False) -> tuple[dict, list[dict]]:
    """One tower's grown tensors (``prefix.*`` and its projection), and its grown shared layers
    (the text tower gets the image tower's through ``shared``). ``moments``: the operators'
    moments mode (:func:`grow_moments`)."""
    d = old[f"{tower}_width"]
    s, f = _stream_idx(d, p.f), p.f
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix + ".") or ".encoder.layers." in k:
            continue
        if k.endswith("position_ids"):
            out[k] = v
        elif k.endswith("patch_embedding.weight") or k.endswith("class_embedding"):
            out[k] = _dup(v, 0, s)
        else:   # token/position embeddings [n, d], LayerNorms [d]
            out[k] = _dup(v, v.dim() - 1, s)
    if proj is not None:
        out[proj + ".weight"] = _split(sd[proj + ".weight"], 1, s, f, noise, _noise_gen(proj, seed), moments)
    layers = _layers(sd, prefix)
    fresh_layers = _layers(fresh, prefix)
    grown = [widen_mlp(widen_layer(layer, p, d, noise, seed, f"{prefix}.{i}", moments), p, fresh_layers[i], moments)
             for i, layer in enumerate(layers)]
    (np_, np2), (k, k2) = p.private, p.shared
    private = _deepen(grown[:np_], np2, None, moments)
    if shared is None:
        shared = _deepen(grown[np_:], k2, (grown[np_ - 1] if np_ else None) if k == 0 else None, moments)
    for i, layer in enumerate(private + shared):
        for rest, v in layer.items():
            out[f"{prefix}.encoder.layers.{i}.{rest}"] = v
    return out, shared


def _grow_towers(sd: dict, plans: dict, old: dict, new: dict, fresh: dict, noise: float, seed: int) -> dict:
    """The towers ``sd`` holds (student names: both, or the image tower alone), grown; the text
    tower's shared layers are the grown image tower's."""
    out, vision_shared = grow_tower(sd, "vision_model", "visual_projection", plans["vision"], old, "vision",
                                    fresh, noise, seed)
    if any(k.startswith("text_model.") for k in sd):
        text, _ = grow_tower(sd, "text_model", "text_projection", plans["text"], old, "text", fresh, noise, seed,
                             shared=vision_shared if new["shared_layers"] else None)
        out.update(text)
    return out


def grow_state_dict(sd: dict, old: dict, new: dict, fresh: dict, *, beta: float = 1.0, split: str = "equal",
                    noise: float = 0.1, seed: int = 0, copies: tuple[str, ...] = (TEACHER,)) -> dict[str, torch.Tensor]:
    """``sd`` (a ``CLIPModel`` state dict of shape ``old``, optionally with the methods' copies
    under the ``copies`` prefixes with student names: ECLIPSE's image-tower teacher ``teacher.*``,
    PSD's two-tower teacher ``psd_teacher.*``) grown to ``new``, then PIM-blended with ``fresh``
    (the new shape's initial state dict): ``beta * Grow(sd) + (1 - beta) * fresh``. Each copy is
    grown by the student's operator, with the same split noise (by tensor name)."""
    plans = check_growth(old, new)
    sd = {k: v.detach().float() for k, v in sd.items()}
    fresh = {k: v.detach().float() for k, v in fresh.items()}
    noise = noise if split == "random" else 0.0
    copies = tuple(copies)
    out = _grow_towers({k: v for k, v in sd.items() if not k.startswith(copies)}, plans, old, new, fresh, noise, seed)
    out["logit_scale"] = sd["logit_scale"].reshape(fresh["logit_scale"].shape)   # ZeRO holds it as [1]
    for prefix in copies:
        copy = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if copy:
            out.update({prefix + k: v for k, v in _grow_towers(copy, plans, old, new, fresh, noise, seed).items()})

    def student_name(k: str) -> str:
        return next((k[len(p):] for p in copies if k.startswith(p)), k)

    missing = sorted(set(fresh) - {student_name(k) for k in out})
    if missing:
        raise RuntimeError(f"grow produced no tensor for {missing[:5]}")
    if beta != 1.0:
        out = {k: v if k.endswith("position_ids") else beta * v + (1 - beta) * fresh[student_name(k)]
               for k, v in out.items()}
    for k, v in out.items():
        ref = fresh[student_name(k)]
        if v.shape != ref.shape:
            raise RuntimeError(f"grow: {k} has shape {tuple(v.shape)}, the grown model wants {tuple(ref.shape)}")
    return {k: v.contiguous() for k, v in out.items()}


def moment_scales(plans: dict[str, TowerPlan], key: str) -> float:
    """The factor ``c`` of the gradient at the function-preserving point, ``g' = c gather(g)``:
    ``1 / f`` for a tower's tensors (the stream is ``f`` copies, each read with weight ``1 / f``),
    ``sqrt(r) / f`` for ``q_proj`` when a new head holds ``r`` copies of an old one (the inverse of
    the weights' ``1 / sqrt(r)``), 1 for the joint-space projections (their outputs are not
    copied) and the logit scale. Checked numerically in tests/test_growth_optim.py."""
    for tower, prefix in TOWERS.items():
        if key.startswith(prefix + "."):
            p = plans[tower]
            r = p.f // p.g
            return (math.sqrt(r) if ".self_attn.q_proj." in key else 1.0) / p.f
    return 1.0


def grow_moments(moments: dict, old: dict, new: dict, fresh: dict, power: int) -> dict[str, torch.Tensor]:
    """AdamW moments (``power`` 1: ``exp_avg``, 2: ``exp_avg_sq``; ``CLIPModel`` names, no teacher)
    mapped like the weights: the operators' moments mode (the same gathers; zeros for what is new:
    depth-added blocks, new MLP units' ``fc1`` rows and ``fc2`` columns) times
    ``moment_scales ** power``, so they are the moments of the gradients the grown model gets.
    No PIM: the fresh initialisation has no history."""
    plans = check_growth(old, new)
    m = {k: v.detach().float() for k, v in moments.items()}
    fresh = {k: v for k, v in fresh.items() if not k.startswith(TEACHER)}
    out, vision_shared = grow_tower(m, "vision_model", "visual_projection", plans["vision"], old, "vision", fresh,
                                    0.0, 0, moments=True)
    text, _ = grow_tower(m, "text_model", "text_projection", plans["text"], old, "text", fresh, 0.0, 0,
                         shared=vision_shared if new.get("shared_layers", 0) else None, moments=True)
    out.update(text)
    out["logit_scale"] = m["logit_scale"].reshape(fresh["logit_scale"].shape)
    for k, v in out.items():
        if v.shape != fresh[k].shape:
            raise RuntimeError(f"grow: the moments of {k} have shape {tuple(v.shape)}, the grown model wants "
                               f"{tuple(fresh[k].shape)}")
    return {k: (v * moment_scales(plans, k) ** power).contiguous() for k, v in out.items()}


def moments_exactness(plans: dict[str, TowerPlan], split: str, beta: float) -> dict:
    """Whether the transformed moments are exactly those of the grown model's gradients (grow.json)."""
    why = []
    if beta != 1.0:
        why.append(f"--pim-beta {beta}: the blend moves the grown model off the small one's function, so off its "
                   "gradients")
    if split == "random" and any(p.f > 1 for p in plans.values()):
        why.append("--split random: the noisy pieces of a split column get different gradients; the moments are "
                   "the equal split's")
    return {"exact": not why, "approximate": why,
            "rule": "m' = c gather(m), v' = c^2 gather(v) with the weights' index maps; c = 1/f in a tower of width "
                    "x f (sqrt(r)/f for q_proj when a new head holds r old heads' copies), 1 for the projections "
                    "and the logit scale; zeros for new blocks and new MLP units; the step count is kept",
            "new_zero": "depth-added blocks; new MLP units (fc1 rows, fc2 columns)"}


# ----------------------------------------------------------------------------- optimizer state

def _seed_adam_state(base, flat: torch.Tensor, step: int) -> None:
    """Create the AdamW state of ``flat`` as the optimizer's first step would (zero moments), at
    ``step``: torch keeps ``step`` as a tensor (on the device only when fused/capturable),
    DeepSpeed's and apex's Adams an int (and a group-level one)."""
    state = base.state[flat]
    if isinstance(base, torch.optim.Adam):   # AdamW is a subclass
        d = base.defaults
        dev = flat.device if d.get("fused") or d.get("capturable") else torch.device("cpu")
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=dev)
    else:
        state["step"] = int(step)
        for group in base.param_groups:
            group["step"] = int(step)
    for key in ("exp_avg", "exp_avg_sq"):
        if key not in state:
            state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)


def _set_zero3_state(opt, param, value: torch.Tensor, key: str) -> None:
    """``safe_set_full_optimizer_state`` for a ZeRO-3 parameter. DeepSpeed 0.19.8's
    ``set_full_hp_param`` narrows ``value`` to the rank's whole partition, which runs past the end on
    the last rank(s) when the size does not divide by the world size (it raises); for those the
    rank's own slice is written here, the padding zero."""
    world = opt._get_param_partition_world_size(param)
    if param.ds_numel % world == 0:
        safe_set_full_optimizer_state(param, value, key)
        return
    part, group = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * opt._get_param_partition_rank(param)
    piece = value.flatten()[start:start + part.numel()]
    part.data.zero_()
    part.data[:piece.numel()].copy_(piece.to(part.device, part.dtype))
    if opt._swappable_optimizer_subgroup(group):
        opt._optimizer_states_and_gradient_swap_out(group)


def load_optimizer_state(engine, state: dict) -> tuple[int, int]:
    """Put a grow directory's transformed moments and step count into a freshly built engine's
    optimizer (every ZeRO stage; DeepSpeed's ``safe_set_full_optimizer_state`` where the state is
    partitioned; ZeRO-0 writes the torch optimizer's state of the parameter or of its fp32 master
    copy). Torch's AdamW makes its state at the first step, so it is created here first (zeros, at
    ``step``) and, for ZeRO 1/2 and the bf16 optimizer, linked to the parameters' fragments.
    Returns (parameters set, trainable parameters without inherited state)."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)   # ZeRO's and the bf16/fp16 wrappers hold the torch optimizer
    zero3 = hasattr(opt, "fp32_partitioned_groups_flat")
    linked = hasattr(opt, "_lazy_init_hp_params_optimizer_state")   # ZeRO 1/2, BF16_Optimizer
    masters = {}   # ZeRO-0 bf16/fp16: parameter -> (the fp32 tensor the torch optimizer steps, offset in it)
    if not (zero3 or linked) and hasattr(opt, "fp16_groups"):
        if hasattr(opt, "fp32_groups_flat"):   # FP16_Optimizer (a fused Adam): one flat fp32 copy per group
            for lps, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
                offsets = [0, *itertools.accumulate(lp.numel() for lp in lps)]
                masters.update({id(lp): (flat, off) for lp, off in zip(lps, offsets)})
        elif hasattr(opt, "fp32_groups"):      # FP16_UnfusedOptimizer: an fp32 copy per parameter
            masters = {id(lp): (hp, 0) for lps, hps in zip(opt.fp16_groups, opt.fp32_groups)
                       for lp, hp in zip(lps, hps)}
    if not (zero3 or linked or masters or opt is base):
        raise RuntimeError(f"checkpoint.init: cannot set the inherited optimizer state in {type(opt).__name__}; "
                           "use ZeRO 1-3, or grow with --optimizer reset")
    step = int(state["step"])
    flats = list(opt.fp32_partitioned_groups_flat) if zero3 else [p for g in base.param_groups for p in g["params"]]
    for flat in flats:
        _seed_adam_state(base, flat, step)
    if linked:
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    done, fresh = 0, []
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if name not in state["exp_avg"]:
            fresh.append(name)
            continue
        numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        for key in ("exp_avg", "exp_avg_sq"):
            value = state[key][name].float()
            if value.numel() != numel:
                raise RuntimeError(f"checkpoint.init: {key} of {name} has {value.numel()} elements, the parameter "
                                   f"{numel}")
            if hasattr(p, "ds_id"):
                _set_zero3_state(opt, p, value.to(flats[0].device), key)
            elif hasattr(p, "_hp_mapping"):
                safe_set_full_optimizer_state(p, value.to(flats[0].device), key)
            else:   # ZeRO-0: the torch optimizer steps the module's own parameters (fp32) or fp32 copies
                target, off = masters.get(id(p), (p, 0))
                dst = base.state[target][key].view(-1).narrow(0, off, numel)
                dst.copy_(value.flatten().to(dst.device, dst.dtype))
        done += 1
    if fresh:
        log.warning("checkpoint.init: %d trainable parameter(s) have no inherited optimizer state (e.g. %s): "
                    "zero moments", len(fresh), fresh[0])
    return done, len(fresh)


# ----------------------------------------------------------------------------- checkpoint.init

class Growth(Method):
    """A fresh run started from ``checkpoint.init`` (a trained or grown model): after the engine is
    built, a ``grow --optimizer transform`` directory's AdamW moments and step count go into the
    engine's optimizer (the learning-rate schedule starts fresh either way)."""
    name = "growth"

    def __init__(self, engine):
        self.engine = engine

    def checkpoint_state(self) -> dict:
        return {}   # nothing of its own to carry: the optimizer state is the engine's from now on

    def restore(self, trainer_state: dict, where) -> None:
        pass

    def inherit(self, init: Inherited) -> None:
        opt = "fresh optimizer"
        if init.optimizer is not None:
            state = torch.load(init.optimizer, map_location="cpu", weights_only=True)
            done, _ = load_optimizer_state(self.engine, state)
            opt = f"AdamW moments of {done} parameters and step {int(state['step'])} inherited"
        log.info("started from the weights of %s (checkpoint.init; %s, fresh learning-rate schedule)%s", init.path, opt,
                 f"; method copies inherited ({', '.join(sorted({k.split('.')[0] for k in init.weights}))})"
                 if init.weights else "")


class GrowthSpec(MethodSpec):
    name = "growth"

    def enabled(self, cfg) -> bool:
        return bool(cfg.checkpoint.init)

    def cached_negatives_ok(self, cfg) -> bool:
        return True   # the start's weights only

    def build(self, cfg, engine) -> Growth:
        return Growth(engine)


SPEC = GrowthSpec()
