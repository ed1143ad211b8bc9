"""``python -m trainer grow``: GrowCLIP's checkpoint surgery as a command.

    python -m trainer grow --checkpoint runs/small --out runs/small-grown \\
        model.vision_layers=6 model.vision_width=256 model.vision_heads=8 [--pim-beta 0.9]
    python -m trainer train --config runs/small-grown/config.yaml output_dir=runs/stage2

The source is read through ``trainer.sources`` (any ZeRO stage, consolidated to fp32) with the
methods' weights and training copies (``trainer.methods.growth_weights``: ECLIPSE's and PSD's
teachers are grown with the student) and their carried state (``trainer.methods.carried_state``:
ECL's rounds and kept set); the operators, PIM and the optimizer-moment maps are GrowCLIP's
(``trainer/methods/growth.py``, whose docstring has the math). ``DIR`` is written atomically:
``weights.pt``, ``config.yaml`` (the grown shape spelled out, ``checkpoint.init: DIR``, the
methods' edits for their carried state, and ``growth.schedule_start``/``schedule_steps``: where
the methods' schedules stand, for ``growth.schedules=continue``), ``grow.json`` (the request, the
plans, the measured function error, the carried state) and, with ``--optimizer transform``,
``optimizer.pt``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from .checkpoint import atomic_torch_save, atomic_write_text
from .config import ConfigError, load_config, to_dict
from .data import load_tokenizer
from .methods import attach, carried_state, grown_config, growth_weights, prefixes, schedule_clock
from .methods.growth import (TEACHER, check_growth, grow_moments, grow_state_dict, grown_layer_index,
                             moments_exactness)
from .model import SHAPE_KEYS, ClipTrainModel, build_clip_config, build_model, param_groups, preset_shape
from .sources import INFO, OPTIM, WEIGHTS, checkpoint_config, fill_shared_layers, is_grown, step_of

log = logging.getLogger("trainer")


# ----------------------------------------------------------------------------- the source's optimizer state

def moments_source(root: Path, tag: str) -> str:
    """Where the AdamW state of ``root / tag`` is: ``"grown"`` (a grow directory's optimizer.pt),
    ``"zero"`` (ZeRO 1/2/3 optimizer files) or ``"zero0"`` (torch's state in the module states);
    none is a ConfigError (``--optimizer transform`` needs it)."""
    d = root / tag
    if is_grown(d):
        if (d / OPTIM).is_file():
            return "grown"
        raise ConfigError(f"--optimizer transform: {d} is a grow directory without {OPTIM} (it was grown with "
                          "--optimizer reset, so it has no optimizer state); grow from its source checkpoint, or "
                          "use --optimizer reset")
    if any(d.glob("*optim_states.pt")):
        return "zero"
    states = d / "mp_rank_00_model_states.pt"
    if states.is_file() and torch.load(states, map_location="cpu", weights_only=False).get("optimizer") is not None:
        return "zero0"
    raise ConfigError(f"--optimizer transform: checkpoint {d} has no optimizer state (no *optim_states.pt files, "
                      "and no optimizer in mp_rank_00_model_states.pt); use --optimizer reset (a fresh AdamW, "
                      "the learning rate warms up again)")


def _one_step(steps: set, where: Path) -> int:
    if len(steps) != 1:
        raise RuntimeError(f"{where}: the parameters' optimizer step counts differ ({sorted(steps)})")
    return int(steps.pop())


def _universal_moments(d: Path, work: Path) -> tuple[int, dict, dict]:
    """ZeRO 1/2/3: DeepSpeed's own converter (``ds_to_universal``) writes every parameter's full
    ``exp_avg`` and ``exp_avg_sq`` into ``work``; read them back and remove the copy."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal  # heavy: only for this conversion

    out = work / "universal" / d.name   # it also writes 'latest_universal' next to its output folder
    args = argparse.Namespace(input_folder=str(d), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=False,
                              inject_missing_state=True)   # our checkpoints carry no universal-checkpoint info
    try:
        with contextlib.redirect_stdout(sys.stderr):   # its progress lines; grow's stdout is its JSON
            ds_to_universal(args)
        zero, m, v, steps = out / "zero", {}, {}, set()
        read = lambda f: (lambda x: x["param"] if isinstance(x, dict) else x)(   # noqa: E731
            torch.load(f, map_location="cpu", weights_only=False))   # ZeRO 1/2: {"param": ...}; 3: flat tensor
        for p in sorted(q for q in zero.iterdir() if q.is_dir()):
            if (p / "exp_avg.pt").is_file():   # a parameter that never had a gradient has none
                m[p.name], v[p.name] = read(p / "exp_avg.pt").float(), read(p / "exp_avg_sq.pt").float()
            if (p / "step.pt").is_file():
                steps.add(float(torch.load(p / "step.pt", weights_only=False)))
        if not steps:   # ZeRO-3 writes no per-parameter step; its sub-groups' optimizer states hold it
            osd = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
            steps = {float(st["step"]) for st in osd["optimizer_state_dict"]["state"].values() if "step" in st}
        return _one_step(steps, d), m, v
    finally:
        shutil.rmtree(work / "universal", ignore_errors=True)


def _zero0_moments(d: Path, cfg) -> tuple[int, dict, dict]:
    """ZeRO-0: torch's AdamW state dict in the module states, keyed by the parameter's index in
    the param-group order of ``trainer/model.py param_groups`` (rebuilt from the run's config)."""
    st = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["optimizer"]
    if isinstance(st, dict) and "optimizer_state_dict" in st:   # bf16/fp16: DeepSpeed's FP16_(Unfused)Optimizer
        st = st["optimizer_state_dict"]
    if not isinstance(st, dict) or "state" not in st or "param_groups" not in st:
        raise ConfigError(f"--optimizer transform: {d} is a ZeRO-0 checkpoint whose optimizer state is not a torch "
                          f"optimizer's ({type(st).__name__}); use --optimizer reset")
    model = build_model(cfg.model, load_tokenizer(cfg.tokenizer.path), cfg.seed)
    attach(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, cfg.optim.weight_decay)
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in st["param_groups"]]:
        raise RuntimeError(f"{d}: the optimizer's parameter groups do not match the model of its config")
    m, v, steps = {}, {}, set()
    for group, saved in zip(groups, st["param_groups"]):
        for p, idx in zip(group["params"], saved["params"]):
            state = st["state"].get(idx)
            if state:   # none for a parameter that never had a gradient
                m[names[id(p)]], v[names[id(p)]] = state["exp_avg"].float(), state["exp_avg_sq"].float()
                steps.add(float(state["step"]))
    return _one_step(steps, d), m, v


def source_moments(root: Path, tag: str, cfg, weights: dict, work: Path) -> tuple[int, dict, dict]:
    """``(step, exp_avg, exp_avg_sq)`` of a checkpoint (any ZeRO stage) or a transform grow
    directory: fp32, by ``CLIPModel`` name, in the weights' shapes, both names of a shared layer;
    a student parameter without state (it never had a gradient) gets zeros."""
    kind = moments_source(root, tag)
    d = root / tag
    if kind == "grown":
        st = torch.load(d / OPTIM, map_location="cpu", weights_only=True)
        return int(st["step"]), st["exp_avg"], st["exp_avg_sq"]
    step, m, v = _universal_moments(d, work) if kind == "zero" else _zero0_moments(d, cfg)
    student = {k: w for k, w in weights.items() if not k.startswith(prefixes()) and not k.endswith("position_ids")}
    shape = preset_shape(cfg.model)
    for moments in (m, v):
        fill_shared_layers(moments, shape, d)
    out = []
    for moments in (m, v):
        missing = sorted(set(student) - set(moments))
        if missing:
            log.warning("grow: no optimizer state for %d parameter(s) of %s (e.g. %s): zero moments", len(missing),
                        d, missing[0])
        out.append({k: moments[k].reshape(w.shape) if k in moments else torch.zeros_like(w)
                    for k, w in student.items()})
    return step, out[0], out[1]


# ----------------------------------------------------------------------------- the verb

def spelled_out(cfg, shape: dict) -> dict:
    """``cfg`` as a dict with every shape key of the model section set (a grown model is a config)."""
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
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"--pim-beta must be in [0, 1]; got {beta}")
    if optimizer not in ("reset", "transform"):
        raise ConfigError(f"--optimizer {optimizer}: 'reset' (a fresh AdamW) or 'transform' (the moments mapped "
                          "like the weights)")
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
    if optimizer == "transform":
        moments_source(root, tag)   # no optimizer state: exit 2 before any work
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    copies = prefixes()   # the methods' copies (teachers) in the state dict, grown like the student
    sd = growth_weights(cfg, root, tag)
    carried = carried_state(cfg, root, tag)
    fresh = build_model(new_cfg.model, tokenizer, new_cfg.seed).state_dict()
    grown = grow_state_dict(sd, old_shape, new_shape, fresh, beta=beta, split=split, noise=noise, seed=cfg.seed,
                            copies=copies)

    # The grown model must load strictly into the new shape, and (beta = 1) compute the old function.
    old_model = ClipTrainModel(build_clip_config(cfg.model, tokenizer)).eval()
    old_model.load_state_dict({k: v for k, v in sd.items() if not k.startswith(copies)})
    new_model = ClipTrainModel(build_clip_config(new_cfg.model, tokenizer)).eval()
    new_model.load_state_dict({k: v for k, v in grown.items() if not k.startswith(copies)})
    error = function_error(old_model, new_model, tokenizer, old_shape)

    raw_new = spelled_out(new_cfg, new_shape)
    raw_new["checkpoint"]["init"] = str(out_dir)
    raw_new["checkpoint"]["resume"] = "auto"
    raw_new["output_dir"] = str(out_dir / "train")
    # e.g. ECL's latest kept set as data.manifest, ECLIPSE's drop layers where those layers are now
    grown_config(raw_new, cfg, carried, lambda tower, i: grown_layer_index(plans[tower], i))
    # Where the source's method schedules stand (a grow directory is at the start of its stage).
    at, length = schedule_clock(cfg, 0 if is_grown(root / tag) else step_of(root, tag))
    raw_new["growth"].update(schedule_start=at, schedule_steps=length)
    info = {"request": request, "source_step": step_of(root, tag), "old_shape": old_shape, "new_shape": new_shape,
            "plans": {t: vars(p) for t, p in plans.items()}, "teacher": any(k.startswith(TEACHER) for k in grown),
            "copies": sorted({p for p in copies for k in grown if k.startswith(p)}),
            "carried": carried, "schedules": {"position": at, "length": length},
            "params": {"old": sum(v.numel() for k, v in sd.items() if not k.startswith(copies)),
                       "new": sum(p.numel() for p in new_model.parameters())},
            "function_error": error}
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):   # left by a killed grow (never read)
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if optimizer == "transform":
            step, exp_avg, exp_avg_sq = source_moments(root, tag, cfg, sd, tmp)
            atomic_torch_save({"step": step,
                               "exp_avg": grow_moments(exp_avg, old_shape, new_shape, fresh, 1),
                               "exp_avg_sq": grow_moments(exp_avg_sq, old_shape, new_shape, fresh, 2)}, tmp / OPTIM)
            info["optimizer"] = {"mode": "transform", "step": step, **moments_exactness(plans, split, beta)}
        else:
            info["optimizer"] = {"mode": "reset"}
        atomic_torch_save(grown, tmp / WEIGHTS)
        atomic_write_text(tmp / "config.yaml", yaml.safe_dump(raw_new, sort_keys=False))
        atomic_write_text(tmp / INFO, json.dumps(info, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out_dir)   # all or nothing: a killed grow leaves only a .tmp directory
    log.info("grew %s (%d -> %d parameters) into %s; function error %s; optimizer %s", root / tag,
             info["params"]["old"], info["params"]["new"], out_dir, error,
             "reset" if optimizer == "reset" else
             f"moments transformed at step {info['optimizer']['step']} "
             f"({'exact' if info['optimizer']['exact'] else 'approximate: ' + '; '.join(info['optimizer']['approximate'])})")
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
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)
    try:
        return load_config(fh.name, overrides)
    finally:
        os.unlink(fh.name)


def main(args) -> int:
    """``python -m trainer grow`` without ``--search`` (trainer/cli.py)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    out = grow(args.checkpoint, args.out, args.overrides, beta=args.pim_beta, split=args.split,
               noise=args.split_noise, optimizer=args.optimizer)
    print(json.dumps({"out": str(out), **json.loads((out / INFO).read_text())}, indent=2))
    return 0
