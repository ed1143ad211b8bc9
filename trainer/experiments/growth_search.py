"""Which growth to take (GrowCLIP searches; docs/methods.md, "chosen"): make a few candidate
growths of one checkpoint, train each briefly on the newest data, and keep the best validation
loss per training FLOP.

    python -m trainer grow --checkpoint runs/stage1 --out runs/search --search [CANDIDATES.yaml] \\
        --search-steps 50 [--nproc 2] [--slurm] [data.train_shards=runs/new-data/train ...]

CANDIDATES.yaml maps names to model overrides (``{deeper-vision: {model.vision_layers: 6}}``);
without it the default set is: + half the depth on the image tower, the same on the text tower,
+ 2 shared layers on both (equal widths only), and width x2 (heads x2) on both. Each candidate is
grown into ``OUT/candidates/<name>`` (``grow``, idempotent), and all are trained by the sweep
runner (``OUT/sweep``: ``--slurm`` submits each as its own job; a killed search resumes). The
candidates train at equal compute (the cheapest one ``--search-steps`` steps, the others
proportionally fewer), so the lowest validation loss (``eval``'s ``val_loss``) is the best loss
per FLOP; ``OUT/search.md`` and ``OUT/search.json`` rank them, ``OUT/winner`` names the
winner's grown directory.

Each candidate runs its own schedule: the schedules ``max_steps`` sets (the cosine decay, EViT's
keep rate, PSD's a_t, ECLIPSE's momentum) follow its step count, and the ones given in steps
(``optim.warmup_steps``, and where set ``eclipse.keep_warmup_steps``, ``psd.refresh_every``,
``select.every_steps``) are scaled to it, keeping their share of the source config's ``max_steps``
(after the ``key=value`` arguments): :func:`trainer.experiments.budget.scaled_schedule`. A candidate with fewer steps thus
still reaches its peak learning rate and decays from it.

FLOPs are the trainer's analytic training FLOPs (:func:`trainer.methods.train_flops`: both towers
forward and backward, the loss, and whatever the enabled methods add: a teacher's forward, EViT's
dropped tokens, the text stream, ECL's scoring passes; trainer/flops.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from .. import methods
from ..config import ConfigError, load_config
from ..flops import pair_flops
from ..grow import grow
from ..methods.growth import check_growth
from ..model import preset_shape
from ..preflight import check_run_inputs
from ..sources import checkpoint_config
from .budget import scaled_schedule
from .sweep import collect, plan, run_sweep, yaml_arg


def forward_flops_per_sample(shape: dict) -> float:
    """One image-caption pair's forward FLOPs through both towers and projections (shared layers
    run in both towers, so they count twice: sharing saves parameters, not compute)."""
    return pair_flops(shape)


def train_flops(cfg, steps: int, world: int) -> float:
    """Training FLOPs of steps 1..``steps`` of ``cfg`` on ``world`` ranks (every enabled method's
    extra work included): :func:`trainer.methods.train_flops`."""
    return methods.train_flops(cfg, steps, world)


# ----------------------------------------------------------------------------- the search

def default_candidates(shape: dict) -> dict[str, dict]:
    """+ depth on either tower, + shared layers (equal widths and heads), width x2 (heads x2)."""
    dv, dt = max(1, shape["vision_layers"] // 2), max(1, shape["text_layers"] // 2)
    out = {"deeper-vision": {"model.vision_layers": shape["vision_layers"] + dv},
           "deeper-text": {"model.text_layers": shape["text_layers"] + dt}}
    if shape["vision_width"] == shape["text_width"] and shape["vision_heads"] == shape["text_heads"]:
        out["shared+2"] = {"model.vision_layers": shape["vision_layers"] + 2,
                           "model.text_layers": shape["text_layers"] + 2,
                           "model.shared_layers": shape["shared_layers"] + 2}
    out["wider-x2"] = {f"model.{t}_{k}": 2 * shape[f"{t}_{k}"] for t in ("vision", "text") for k in ("width", "heads")}
    return out


def load_candidates(path: str | None, shape: dict) -> dict[str, dict]:
    if path is None:
        return default_candidates(shape)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--search {path}: file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--search {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"--search {path} must map candidate names to model overrides, e.g. "
                          "'deeper: {model.vision_layers: 8}'")
    out = {}
    for name, body in raw.items():
        if not isinstance(body, dict) or not all(str(k).startswith("model.") for k in body):
            raise ConfigError(f"--search {path}: candidate {name!r} must map model.* keys to values; got {body!r}")
        out[str(name)] = body
    return out


def _trainable(candidates: dict, source: Path, train_overrides: list[str], world: int | None, given: bool) -> dict:
    """The candidates whose runs ``train`` would accept (checked before anything is grown): a
    default candidate that clashes with the run's config (e.g. shared layers where ECLIPSE drops
    tokens) is left out with a note; a given one is an error naming it."""

    cfg0 = load_config(source / "config.yaml", train_overrides)
    keep = {}
    for name, body in candidates.items():
        try:
            cfg = load_config(source / "config.yaml", [*train_overrides, *(f"{k}={yaml_arg(v)}" for k, v in body.items())])
            check_growth(preset_shape(cfg0.model), preset_shape(cfg.model))
            check_run_inputs(cfg, world)
        except ConfigError as err:
            if given:
                raise ConfigError(f"search candidate {name!r}: {err}") from None
            print(f"grow --search: default candidate {name!r} left out: {err}", file=sys.stderr)
            continue
        keep[name] = body
    if not keep:
        raise ConfigError("grow --search: no candidate can be trained with this run's config")
    return keep


def _candidate_config(source: Path, train_overrides: list[str], body: dict, extra: dict | None = None):
    return load_config(source / "config.yaml", [*train_overrides, *(f"{k}={yaml_arg(v)}" for k, v in body.items()),
                                                *(f"{k}={yaml_arg(v)}" for k, v in (extra or {}).items())])


def budget_steps(candidates: dict, source: Path, train_overrides: list[str], steps: int,
                 world: int = 1) -> dict[str, int]:
    """Equal training compute for every candidate: the cheapest per step trains ``steps`` steps,
    and each other one the step count (at least 1) whose training FLOPs, with its own scaled
    schedule (:func:`scaled_schedule`), come nearest the cheapest's. FLOPs are
    :func:`train_flops`, methods included (a method's per-step cost may follow the schedule,
    e.g. EViT's keep rate, so each count is summed over the steps, not multiplied)."""
    cfg0 = load_config(source / "config.yaml", train_overrides)

    def spent(body: dict, n: int) -> float:
        cfg = _candidate_config(source, train_overrides, body, {"max_steps": n, **scaled_schedule(cfg0, n)})
        return train_flops(cfg, n, world)
    per = {name: spent(body, steps) / steps for name, body in candidates.items()}
    cheapest = min(per, key=per.get)
    budget = spent(candidates[cheapest], steps)
    out = {}
    for name, body in candidates.items():
        guess = max(1, round(steps * per[cheapest] / per[name]))
        tries = [n for n in (guess - 1, guess, guess + 1) if n >= 1]
        out[name] = steps if name == cheapest else min(tries, key=lambda n: abs(spent(body, n) - budget))
    return out


def search(args, train_overrides: list[str]) -> int:
    """``grow --search``: grow every candidate, train each at the same FLOPs with the sweep
    runner, and keep the lowest validation loss."""
    import argparse

    model = [o for o in train_overrides if o.startswith("model.")]
    if model:   # the candidates say the shapes; the other key=value train them
        raise ConfigError(f"grow --search: the candidates give the model shapes; {model[0]!r} cannot be set here")
    if args.search_steps < 1:
        raise ConfigError(f"--search-steps must be >= 1; got {args.search_steps}")
    cfg, root, tag = checkpoint_config(args.checkpoint)
    shape = preset_shape(cfg.model)
    candidates = load_candidates(args.search if isinstance(args.search, str) else None, shape)
    candidates = _trainable(candidates, root / tag, train_overrides, args.nproc if not args.slurm else None,
                            given=isinstance(args.search, str))
    steps = budget_steps(candidates, root / tag, train_overrides, args.search_steps, args.nproc or 1)
    cfg0 = load_config(root / tag / "config.yaml", train_overrides)
    out = Path(args.out)
    (out / "candidates").mkdir(parents=True, exist_ok=True)
    variants = {"seeds": [cfg.seed]}
    for name, body in candidates.items():
        over = [f"{k}={yaml_arg(v)}" for k, v in body.items()]
        grown = grow(args.checkpoint, str(out / "candidates" / name), over, beta=args.pim_beta, split=args.split,
                     noise=args.split_noise, optimizer=args.optimizer)
        variants[name] = {**body, "checkpoint.init": str(grown), "max_steps": steps[name],
                          **scaled_schedule(cfg0, steps[name])}
    vfile = out / "candidates.yaml"
    vfile.write_text(yaml.safe_dump(variants, sort_keys=False))
    sweep_args = argparse.Namespace(config=str(root / tag / "config.yaml"), variants=str(vfile), out=str(out / "sweep"),
                                    slurm=args.slurm, nproc=args.nproc, overrides=list(train_overrides))
    status = run_sweep(sweep_args)
    if status != 0:
        return status
    sweep = plan(sweep_args)
    rows = {r["variant"]: r for r in collect(sweep)}
    runs = {r.variant: r for r in sweep.runs}
    start = _ungrown_val_loss(out, args.checkpoint)
    table = []
    for name in candidates:
        row, run = rows.get(name), runs[name]
        if row is None or row.get("val_loss") is None:
            raise ConfigError(f"search candidate {name!r} finished without a validation loss: "
                              "set data.val_shards for the search runs")
        world = (row.get("global_batch") or 0) // (run.cfg.data.batch_size * run.cfg.train.grad_accum_steps) or 1
        table.append({"candidate": name, "overrides": candidates[name], "params": row["params"],
                      "steps": row["steps"], "warmup_steps": run.cfg.optim.warmup_steps,
                      "train_flops": train_flops(run.cfg, row["steps"], world),
                      "val_loss": row["val_loss"], "zeroshot_top1": row.get("zeroshot_top1"),
                      "val_loss_change": None if start is None else row["val_loss"] - start})
    table.sort(key=lambda t: t["val_loss"])   # equal compute: the lowest validation loss wins
    winner = table[0]
    (out / "search.json").write_text(json.dumps({"source": str(root / tag), "start_val_loss": start,
                                                 "candidates": table, "winner": winner["candidate"]}, indent=2))
    (out / "winner").write_text(str((out / "candidates" / winner["candidate"]).resolve()) + "\n")
    lines = [f"# Growth search from {root / tag}", "",
             f"Each candidate trained for the same compute (the cheapest {args.search_steps} steps), each with its "
             f"own warm-up and decay (trainer/experiments/budget.py `scaled_schedule`); training FLOPs: "
             f"trainer/flops.py and the enabled methods' `step_flops`."
             + (f" Ungrown validation loss {start:.4f}." if start is not None else ""), "",
             "| candidate | params | steps | warm-up | train FLOPs | val loss | change | zero-shot top-1 % |",
             "|---|---|---|---|---|---|---|---|"]
    for t in table:
        zs = f"{100 * t['zeroshot_top1']:.1f}" if isinstance(t.get("zeroshot_top1"), float) else "n/a"
        change = f"{t['val_loss_change']:+.4f}" if t["val_loss_change"] is not None else "n/a"
        lines.append(f"| {t['candidate']} | {t['params'] / 1e6:.2f}M | {t['steps']} | {t['warmup_steps']} | "
                     f"{t['train_flops']:.3g} | "
                     f"{t['val_loss']:.4f} | {change} | {zs} |")
    lines += ["", f"Winner: **{winner['candidate']}** ({out / 'candidates' / winner['candidate']})", ""]
    (out / "search.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _ungrown_val_loss(out: Path, checkpoint: str) -> float | None:
    """The source checkpoint's validation loss (``eval`` once, cached in OUT/start_eval.json)."""
    import subprocess
    path = out / "start_eval.json"
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "trainer", "eval", "--checkpoint", checkpoint, "--out", str(path)],
                       check=True)
    return json.loads(path.read_text()).get("val_loss")
