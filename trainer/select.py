"""``python -m trainer select``: EfficientCLIP's ensemble confident learning over checkpoints.

    python -m trainer select --checkpoints runs/a runs/b --shards data/train --out runs/sel --keep 0.7
    torchrun --nproc_per_node 8 -m trainer select ...                 # each rank scores its share
    sbatch --array 0-15 slurm/run.sbatch python -m trainer select ... # each array task its share
    python -m trainer train ... data.manifest=runs/sel                # train on the kept pairs

The checkpoints (any source ``trainer.sources`` reads) are loaded as trained models and score
every pair of the shards (``--score``: each member's self-confidence, by default, or cosine); the
scoring, the units of work, the merge and the outputs are ECL's (``trainer/methods/selection.py``,
which also runs the rounds inside training). Ranks of one launch (torchrun, srun) merge together
once all have scored (``merge_distributed``: each rank its shards); SLURM array tasks and a single
process leave the merge to the last one to finish (``merge``, under a file lock).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from . import data as D
from .config import ConfigError
from .data import load_tokenizer
from .dist import init_distributed, launch_env, select_device, shutdown
from .methods import load_trained_model
from .methods.selection import (CarriedScores, launch_share, make_rule, make_score, merge, merge_distributed, merge_lock,
                                missing_units, score_units, share, source_id, work_units)
from .sources import checkpoint_config

log = logging.getLogger("trainer.select")


def _load_ensemble(checkpoints: list[str]):
    """``(configs, models, tokenizer, cfg)`` of the checkpoints; they must share the model and the
    input pipeline (each sample is decoded once for the whole ensemble)."""
    loaded = []
    for path in checkpoints:
        cfg, root, tag = checkpoint_config(path)
        loaded.append((path, cfg, root, tag))
    first = loaded[0][1]
    for path, cfg, _, _ in loaded[1:]:
        for section in ("model", "tokenizer"):
            a, b = vars(getattr(first, section)), vars(getattr(cfg, section))
            diff = sorted(k for k in a if a[k] != b[k])
            if diff:
                raise ConfigError(f"--checkpoints: {path} has another {section} than {loaded[0][0]} "
                                  f"({', '.join(f'{section}.{k}: {b[k]!r} vs {a[k]!r}' for k in diff)}); "
                                  "the ensemble's members must share one model shape and tokenizer")
        if (cfg.data.image_mean, cfg.data.image_std) != (first.data.image_mean, first.data.image_std):
            raise ConfigError(f"--checkpoints: {path} normalises images differently from {loaded[0][0]}")
    tokenizer = load_tokenizer(first.tokenizer.path)
    models = []
    for path, cfg, root, tag in loaded:
        try:
            models.append(load_trained_model(cfg, root, tag, tokenizer))
        except RuntimeError as err:
            raise ConfigError(f"--checkpoints {path}: its weights do not fit its config.yaml's model ({err})") from None
    return [str(Path(r) / t) for _, _, r, t in loaded], models, tokenizer, first


def _temperature(text: str) -> float | None:
    if text == "scale":
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"select --temperature: a number or 'scale'; got {text!r}") from None


def main(args) -> int:
    """``python -m trainer select ...`` (see the module docstring)."""
    rule = make_rule(args.keep, args.threshold, args.percentile, "select")
    score = make_score(args.score, _temperature(args.temperature), args.pool, "select")
    urls = D.expand_shards(args.shards, "--shards")
    out = Path(args.out)
    rank, world = launch_share()
    names, models, tokenizer, cfg = _load_ensemble(args.checkpoints)
    subset = D.read_manifest(args.manifest, urls, shards_spec=args.shards) if args.manifest else None
    carried = [CarriedScores(d) for d in args.scores_from or []]
    for c in carried:
        missing = c.missing(urls)
        if missing:
            raise ConfigError(f"--scores-from {c.dir}: it holds no scores of shard {missing[0]}")
    device = select_device(launch_env().local_rank)   # LOCAL_RANK mod the GPUs this task sees
    dtype = torch.bfloat16 if (args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")) else torch.float32
    source = source_id(names, [str(Path(u)) for u in urls], args.manifest, dtype, score.describe())
    units = work_units(len(urls), world)
    out.mkdir(parents=True, exist_ok=True)
    if not args.merge_only:
        for m in models:
            m.to(device, dtype)
        decoder = D.eval_decoder(cfg, tokenizer)
        mine = share(units, rank, world)
        n = score_units(models, urls, mine, decoder, out, source=source, device=device, dtype=dtype, subset=subset,
                        batch_size=args.batch_size, score=score, workers=cfg.data.workers,
                        worker_start=cfg.data.worker_start, pixels=D.model_pixels(cfg))
        log.warning("select: rank %d/%d scored %d unit(s) (%d of its %d were done already)",
                    rank, world, n, len(mine) - n, len(mine))
    meta = {"checkpoints": names, **score.describe(), "scores_from": [str(c.dir) for c in carried], "manifest_in": args.manifest,
            "units": len(units), "world": world}
    le = launch_env()
    left = missing_units(out, units, source)
    if left and args.merge_only:
        raise ConfigError(f"select --merge-only: {len(left)} unit(s) are not scored yet (first: {left[0].name} "
                          f"= shard {urls[left[0].shard]}); run the scoring tasks first")
    if le.world_size > 1 and world == le.world_size:
        # torchrun / srun ranks (not array tasks): every rank merges its shards, in a process group
        # that forms once every rank has scored its share (a dead peer fails it after dist.timeout_s)
        init_distributed(le, backend="gloo", timeout_s=cfg.dist.timeout_s)
        summary = merge_distributed(out, urls, units, source=source, rule=rule, carried=carried, meta=meta)
        shutdown()
        if rank == 0:
            print(json.dumps(summary, indent=2))
        return 0
    if left:
        return 0   # another array task finishes last and merges
    with merge_lock(out) as mine_to_merge:
        if not mine_to_merge:
            return 0
        summary = merge(out, urls, units, source=source, rule=rule, carried=carried, meta=meta)
    print(json.dumps(summary, indent=2))
    return 0
