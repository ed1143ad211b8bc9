"""GrowCLIP (Deng et al., ICCV 2023; METHODS.md sections 4 and 6): stage-wise model growth by
checkpoint surgery, with function-preserving operators and parameter inheriting with momentum.

    python -m trainer grow --checkpoint runs/small --out runs/small-grown \\
        model.vision_layers=6 model.vision_width=256 model.vision_heads=8 [--pim-beta 0.9]
    python -m trainer train --config runs/small-grown/config.yaml output_dir=runs/stage2
    python -m trainer eval --checkpoint runs/small-grown        # and export-hf, select

``grow`` consolidates the checkpoint (any ZeRO stage) to fp32 with DeepSpeed's own reader, maps
the weights to the requested shape with the operators below, blends them with a fresh
initialisation (PIM), and writes ``DIR`` atomically: ``weights.pt`` (the ``CLIPModel`` state dict,
plus ``teacher.*`` for an ECLIPSE teacher grown by the same operator), ``config.yaml`` (the source
run's config with the grown shape spelled out and ``checkpoint.init: DIR``) and ``grow.json``
(what was done, and the measured function-preservation error). ``checkpoint.init=DIR`` starts a
run from those weights with a fresh optimizer and schedule (so the learning rate warms up again).

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
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..config import ConfigError, load_config, to_dict

log = logging.getLogger("trainer")

WEIGHTS, INFO = "weights.pt", "grow.json"
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


# ----------------------------------------------------------------------------- tensor maps

def _noise_gen(name: str, seed: int) -> torch.Generator:
    """Per-tensor noise, so the ECLIPSE teacher's tensors get the student's split (same names)."""
    g = torch.Generator()
    g.manual_seed(int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16))
    return g


def _dup(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return x.index_select(dim, idx)


def _split(x: torch.Tensor, dim: int, idx: torch.Tensor, f: int, noise: float, gen: torch.Generator | None):
    """Gather along ``dim`` by ``idx`` (each old index appears ``f`` times) and divide by ``f``;
    with ``noise`` add per-row zero-sum noise over the ``f`` positions of each old index, so the
    pieces still sum to the original column."""
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


def widen_layer(layer: dict, p: TowerPlan, d: int, noise: float, seed: int, name: str) -> dict:
    """One encoder layer's tensors (keys relative to the layer) at width ``f d``, heads ``g h``
    and MLP hidden ``f m`` (the MLP-ratio growth comes after)."""
    f = p.f
    if f == 1:
        return dict(layer)
    s, a, mi = _stream_idx(d, f), _inner_idx(d, p.heads, p.g, f), _stream_idx(p.m, f)
    r = f // p.g
    gen = lambda k: _noise_gen(f"{name}.{k}", seed)   # noqa: E731
    out = {}
    for k, x in layer.items():
        if k.startswith("layer_norm"):
            out[k] = _dup(x, 0, s)
        elif k.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            scale = 1 / math.sqrt(r) if ".q_proj." in k else 1.0
            rows = _dup(x, 0, a)
            out[k] = scale * (_split(rows, 1, s, f, noise, gen(k)) if x.dim() == 2 else rows)
        elif ".out_proj." in k:
            out[k] = _split(_dup(x, 0, s), 1, a, f, noise, gen(k)) if x.dim() == 2 else _dup(x, 0, s)
        elif ".fc1." in k:
            rows = _dup(x, 0, mi)
            out[k] = _split(rows, 1, s, f, noise, gen(k)) if x.dim() == 2 else rows
        elif ".fc2." in k:
            out[k] = _split(_dup(x, 0, s), 1, mi, f, noise, gen(k)) if x.dim() == 2 else _dup(x, 0, s)
        else:
            raise RuntimeError(f"grow: unknown encoder-layer tensor {k!r}")
    return out


def widen_mlp(layer: dict, p: TowerPlan, fresh: dict) -> dict:
    """MLP hidden ``f m -> m2``: the new units' ``fc1`` rows from the fresh model, ``fc2`` columns 0."""
    fm = p.f * p.m
    if p.m2 == fm:
        return layer
    out = dict(layer)
    out["mlp.fc1.weight"] = torch.cat([layer["mlp.fc1.weight"], fresh["mlp.fc1.weight"][fm:]])
    out["mlp.fc1.bias"] = torch.cat([layer["mlp.fc1.bias"], fresh["mlp.fc1.bias"][fm:]])
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


def _deepen(layers: list[dict], n2: int, neighbour: dict | None) -> list[dict]:
    out = []
    for src, new in depth_plan(len(layers), n2):
        block = layers[src] if src >= 0 else neighbour
        out.append(silent(block) if new else block)
    return out


def grow_tower(sd: dict, prefix: str, proj: str | None, p: TowerPlan, old: dict, tower: str, fresh: dict,
               noise: float, seed: int, shared: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """One tower's grown tensors (``prefix.*`` and its projection), and its grown shared layers
    (the text tower gets the image tower's through ``shared``)."""
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
        out[proj + ".weight"] = _split(sd[proj + ".weight"], 1, s, f, noise, _noise_gen(proj, seed))
    layers = _layers(sd, prefix)
    fresh_layers = _layers(fresh, prefix)
    grown = [widen_mlp(widen_layer(layer, p, d, noise, seed, f"{prefix}.{i}"), p, fresh_layers[i])
             for i, layer in enumerate(layers)]
    (np_, np2), (k, k2) = p.private, p.shared
    private = _deepen(grown[:np_], np2, None)
    if shared is None:
        shared = _deepen(grown[np_:], k2, (grown[np_ - 1] if np_ else None) if k == 0 else None)
    for i, layer in enumerate(private + shared):
        for rest, v in layer.items():
            out[f"{prefix}.encoder.layers.{i}.{rest}"] = v
    return out, shared


def grow_state_dict(sd: dict, old: dict, new: dict, fresh: dict, *, beta: float = 1.0, split: str = "equal",
                    noise: float = 0.1, seed: int = 0) -> dict[str, torch.Tensor]:
    """``sd`` (a ``CLIPModel`` state dict of shape ``old``, optionally with ``teacher.*``, the
    ECLIPSE image-tower teacher) grown to ``new``, then PIM-blended with ``fresh`` (the new
    shape's initial state dict): ``beta * Grow(sd) + (1 - beta) * fresh``."""
    plans = check_growth(old, new)
    sd = {k: v.detach().float() for k, v in sd.items()}
    fresh = {k: v.detach().float() for k, v in fresh.items()}
    noise = noise if split == "random" else 0.0
    out, vision_shared = grow_tower(sd, "vision_model", "visual_projection", plans["vision"], old, "vision",
                                    fresh, noise, seed)
    text, _ = grow_tower(sd, "text_model", "text_projection", plans["text"], old, "text", fresh, noise, seed,
                         shared=vision_shared if new["shared_layers"] else None)
    out.update(text)
    out["logit_scale"] = sd["logit_scale"].reshape(fresh["logit_scale"].shape)   # ZeRO holds it as [1]
    teacher = {k[len(TEACHER):]: v for k, v in sd.items() if k.startswith(TEACHER)}
    if teacher:   # the same operator (and the same split noise, by tensor name) on the teacher's tower
        t, _ = grow_tower(teacher, "vision_model", "visual_projection", plans["vision"], old, "vision", fresh,
                          noise, seed)
        out.update({TEACHER + k: v for k, v in t.items()})
    missing = sorted(set(fresh) - {k[len(TEACHER):] if k.startswith(TEACHER) else k for k in out})
    if missing:
        raise RuntimeError(f"grow produced no tensor for {missing[:5]}")
    if beta != 1.0:
        out = {k: v if k.endswith("position_ids") else
               beta * v + (1 - beta) * fresh[k[len(TEACHER):] if k.startswith(TEACHER) else k] for k, v in out.items()}
    for k, v in out.items():
        ref = fresh[k[len(TEACHER):] if k.startswith(TEACHER) else k]
        if v.shape != ref.shape:
            raise RuntimeError(f"grow: {k} has shape {tuple(v.shape)}, the grown model wants {tuple(ref.shape)}")
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- the verb

def is_grown(path: str | Path) -> bool:
    p = Path(path)
    return (p / INFO).is_file() and (p / WEIGHTS).is_file() and (p / "config.yaml").is_file()


def grown_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``grow`` directory's state dict (with ``teacher.*`` when it grew an ECLIPSE teacher)."""
    return torch.load(Path(path) / WEIGHTS, map_location="cpu", weights_only=True)


def source_weights(root: Path, tag: str, cfg) -> dict[str, torch.Tensor]:
    """The fp32 weights of a checkpoint or ``grow`` directory: the student (``CLIPModel`` layout),
    and the ECLIPSE teacher under ``teacher.*`` when the run had one. PSD's teacher copy is
    training state, not model, and is left behind."""
    from ..export import fp32_state_dict
    from .eclipse import PREFIX, teacher_state_dict
    from .psd import PREFIX as PSD_PREFIX

    sd = {k: v for k, v in fp32_state_dict(root, tag).items() if not k.startswith((PREFIX, PSD_PREFIX))}
    if cfg.eclipse.enabled:
        sd.update({PREFIX + k: v for k, v in teacher_state_dict(root, tag).items()})
    return sd


def spelled_out(cfg, shape: dict) -> dict:
    """``cfg`` as a dict with every shape key of the model section set (a grown model is a config)."""
    from ..model import SHAPE_KEYS
    raw = to_dict(cfg)
    raw["model"].update({k: shape[k] for k in SHAPE_KEYS})
    return raw


def _probe(model, tokenizer, shape: dict, seed: int = 0):
    """Embeddings of a fixed random image batch and caption batch (the function check)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(4, 3, shape["image_size"], shape["image_size"], generator=g)
    enc = tokenizer(["a photo of a red circle", "two blue squares", "a green triangle on grey", "x"],
                    padding="max_length", truncation=True, max_length=shape["context_length"], return_tensors="pt")
    with torch.no_grad():
        image, text, scale = model(pixel_values=pixels, input_ids=enc["input_ids"],
                                   attention_mask=enc["attention_mask"])[:3]
    return image, text, scale


def function_error(old_model, new_model, tokenizer, shape: dict) -> dict:
    """Max |difference| of the two models' embeddings and logits on the probe batch."""
    a, b = _probe(old_model, tokenizer, shape), _probe(new_model, tokenizer, shape)
    logits = lambda img, txt, s: s * img @ txt.T   # noqa: E731
    return {"image": float((a[0] - b[0]).abs().max()), "text": float((a[1] - b[1]).abs().max()),
            "logits": float((logits(*a) - logits(*b)).abs().max())}


def grow(checkpoint: str, out: str, overrides: list[str], beta: float = 0.9, split: str = "equal",
         noise: float = 0.1, optimizer: str = "reset") -> Path:
    """Checkpoint surgery (module doc); returns ``out``. Re-running the same request on a
    finished ``out`` is a no-op (safe to resubmit); another request for it is refused."""
    from ..checkpoint import atomic_torch_save, atomic_write_text
    from ..data import load_tokenizer
    from ..export import checkpoint_config
    from ..model import ClipTrainModel, build_clip_config, build_model, preset_shape

    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"--pim-beta must be in [0, 1]; got {beta}")
    if optimizer != "reset":
        raise ConfigError(f"--optimizer {optimizer}: only 'reset' is implemented (a fresh AdamW, the learning "
                          "rate warms up again)")
    bad = [o for o in overrides if not o.startswith("model.")]
    if bad:
        raise ConfigError(f"grow changes the model only; {bad[0]!r} is not a model.* key (set training keys "
                          "when you train the grown model)")
    cfg, root, tag = checkpoint_config(checkpoint)
    raw_old = to_dict(cfg)
    new_cfg = _with_overrides(raw_old, overrides)   # the normal loader: bad keys and values are named
    old_shape, new_shape = preset_shape(cfg.model), preset_shape(new_cfg.model)
    out_dir = Path(out).resolve()
    request = {"source": str((root / tag).resolve()), "overrides": list(overrides), "pim_beta": beta,
               "split": split, "noise": noise if split == "random" else 0.0, "optimizer": optimizer}
    if out_dir.exists():
        if is_grown(out_dir) and json.loads((out_dir / INFO).read_text()).get("request") == request:
            log.info("grow: %s already holds this growth; nothing to do", out_dir)
            return out_dir
        raise ConfigError(f"--out {out_dir} already exists and is not this growth (other source or options); "
                          "choose a new directory or remove it")
    plans = check_growth(old_shape, new_shape)
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    sd = source_weights(root, tag, cfg)
    fresh = build_model(new_cfg.model, tokenizer, new_cfg.seed).state_dict()
    grown = grow_state_dict(sd, old_shape, new_shape, fresh, beta=beta, split=split, noise=noise, seed=cfg.seed)

    # The grown model must load strictly into the new shape, and (beta = 1) compute the old function.
    old_model = ClipTrainModel(build_clip_config(cfg.model, tokenizer)).eval()
    old_model.load_state_dict({k: v for k, v in sd.items() if not k.startswith(TEACHER)})
    new_model = ClipTrainModel(build_clip_config(new_cfg.model, tokenizer)).eval()
    new_model.load_state_dict({k: v for k, v in grown.items() if not k.startswith(TEACHER)})
    error = function_error(old_model, new_model, tokenizer, old_shape)

    raw_new = spelled_out(new_cfg, new_shape)
    raw_new["checkpoint"]["init"] = str(out_dir)
    raw_new["checkpoint"]["resume"] = "auto"
    raw_new["output_dir"] = str(out_dir / "train")
    info = {"request": request, "source_step": step_of(root, tag), "old_shape": old_shape, "new_shape": new_shape,
            "plans": {t: vars(p) for t, p in plans.items()}, "teacher": any(k.startswith(TEACHER) for k in grown),
            "params": {"old": sum(v.numel() for k, v in sd.items() if not k.startswith(TEACHER)),
                       "new": sum(p.numel() for p in new_model.parameters())},
            "function_error": error}
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):   # left by a killed grow (never read)
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_torch_save(grown, tmp / WEIGHTS)
    atomic_write_text(tmp / "config.yaml", yaml.safe_dump(raw_new, sort_keys=False))
    atomic_write_text(tmp / INFO, json.dumps(info, indent=2))
    os.replace(tmp, out_dir)   # all or nothing: a killed grow leaves only a .tmp directory
    log.info("grew %s (%d -> %d parameters) into %s; function error %s", root / tag, info["params"]["old"],
             info["params"]["new"], out_dir, error)
    return out_dir


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _with_overrides(raw: dict, overrides: list[str]):
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)
    try:
        return load_config(fh.name, overrides)
    finally:
        os.unlink(fh.name)


def step_of(root: Path, tag: str) -> int:
    """The training step of a checkpoint; of a grow directory, its source's."""
    if is_grown(root / tag):
        return int(json.loads((root / tag / INFO).read_text())["source_step"])
    return int(tag.split("_")[-1])


def main(args) -> int:
    """``python -m trainer grow`` (trainer/cli.py)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    if args.search is not None:   # the candidates say the shapes; the other key=value train them
        from .growth_search import search
        model = [o for o in args.overrides if o.startswith("model.")]
        if model:
            raise ConfigError(f"grow --search: the candidates give the model shapes; {model[0]!r} cannot be set here")
        return search(args, args.overrides)
    out = grow(args.checkpoint, args.out, args.overrides, beta=args.pim_beta, split=args.split,
               noise=args.split_noise, optimizer=args.optimizer)
    print(json.dumps({"out": str(out), **json.loads((out / INFO).read_text())}, indent=2))
    return 0


# ----------------------------------------------------------------------------- checkpoint.init

class Inherited:
    """The weights a run starts from (``checkpoint.init``), loaded into the model before DeepSpeed
    wraps it; ``apply(method)`` after the engine hands a grown ECLIPSE teacher to the method."""

    def __init__(self, path: str, teacher: dict | None):
        self.path, self.teacher = path, teacher

    def apply(self, method) -> None:
        if self.teacher:
            method.inherit({"teacher": self.teacher})
        log.info("started from the weights of %s (checkpoint.init; fresh optimizer and schedule)%s", self.path,
                 "; ECLIPSE teacher inherited" if self.teacher else "")


def init_source(path: str):
    """``(config, root, tag)`` of a ``checkpoint.init`` path: a checkpoint or a grow directory."""
    from ..export import checkpoint_config
    try:
        return checkpoint_config(path)
    except ConfigError:
        raise ConfigError(f"config key 'checkpoint.init': {path} is neither a checkpoint (step_N directory or run "
                          "directory) nor a 'grow' output directory") from None


def check_init(cfg) -> None:
    """The init's model shape must be this run's (exit 2 naming both), before any process starts."""
    if not cfg.checkpoint.init:
        return
    from ..model import preset_shape
    src, root, tag = init_source(cfg.checkpoint.init)
    have, want = preset_shape(src.model), preset_shape(cfg.model)
    diff = {k: (have[k], want[k]) for k in want if have.get(k) != want[k]}
    if diff:
        raise ConfigError(f"config key 'checkpoint.init': {root / tag} holds a model of another shape "
                          f"({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in diff.items())}); "
                          f"train it with --config {root / tag / 'config.yaml'} or set model.* to match")


def load_init(model, cfg) -> Inherited | None:
    """On a fresh start with ``checkpoint.init``: load its weights into ``model`` (strictly, but for
    the method copies the run adds) and return what the engine-side methods still need."""
    from ..checkpoint import resume_source
    if not cfg.checkpoint.init or resume_source(cfg) is not None:
        return None
    src, root, tag = init_source(cfg.checkpoint.init)
    sd = source_weights(root, tag, src)
    student = {k: v for k, v in sd.items() if not k.startswith(TEACHER)}
    missing, unexpected = model.load_state_dict(student, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids") and not k.startswith((TEACHER, "psd_teacher."))]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint.init {root / tag} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    teacher = {k[len(TEACHER):]: v for k, v in sd.items() if k.startswith(TEACHER)}
    return Inherited(str(root / tag), teacher if cfg.eclipse.enabled and teacher else None)
