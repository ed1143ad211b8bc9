"""Everything in a run's config a user can get wrong, checked before any process group starts.

    check_run_inputs(cfg, world_size)   # raises ConfigError naming the key or path

``train``, ``sweep`` and the growth search call it, so a bad variant fails before it launches.
"""
from __future__ import annotations

from . import data as D
from . import methods
from .config import check_world
from .engine import build_ds_config
from .eval_sets import check_eval_sets
from .evaluate import load_zeroshot
from .losses import build_terms
from .model import check_locks, preset_shape
from .sources import check_init


def check_run_inputs(cfg, world: int | None) -> None:
    """``world=None`` skips the batch arithmetic (a sweep checks its variants before it knows
    the world size of each run)."""
    if world is not None:
        check_world(cfg, world)
    methods.check(cfg)
    check_init(cfg)
    check_locks(cfg.model, preset_shape(cfg.model))
    build_terms(cfg.loss, methods.loss_terms(cfg))
    build_ds_config(cfg, world or 1)
    # Launch rank 0 alone globs the shard lists (None on the other ranks of a multi-rank launch;
    # they get the lists from rank 0 once the process group is up: data.shard_list).
    train_urls = D.check_shards(cfg.data.train_shards, "data.train_shards")
    if cfg.data.val_shards:
        D.check_shards(cfg.data.val_shards, "data.val_shards")
    if cfg.eval.zeroshot:
        load_zeroshot(cfg.eval.zeroshot)
    check_eval_sets(cfg)
    if train_urls is not None:
        D.read_manifest(cfg.data.manifest, train_urls, cfg.data.key_manifest_max_mb, cfg.data.train_shards)
