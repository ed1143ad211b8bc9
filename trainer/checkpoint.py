"""DeepSpeed checkpoints that are either complete and named by ``latest``, or ignored.

Layout under ``output_dir/checkpoints``::

    step_200/                 DeepSpeed's files (model/optimizer shards, per ZeRO rank)
    step_200/trainer_state/rank_0.pt ...   step, data position, RNG states of each rank
    step_200/config.yaml      the resolved run config (makes the checkpoint self-contained)
    latest                    "step_200": written last, atomically, after every rank finished

A kill at any point of a save leaves ``latest`` naming the previous complete checkpoint; the
half-written directory is removed when that step is saved again or pruned. Every file of a
checkpoint, DeepSpeed's shards included, is fsync'd by the rank that wrote it before ``latest``
names it. A checkpoint that is unreadable all the same (a truncated or corrupted shard: a disk
or file-system fault, or a copy cut short) is found before loading (:meth:`CheckpointManager.readable_tag`:
each rank checks the files it wrote, and the ranks agree) and the run resumes from the previous
complete checkpoint, with a warning naming both.

    ckpt = CheckpointManager(root, keep_last=3)
    ckpt.save(engine, step, trainer_state, config_yaml)
    tag = ckpt.latest_tag(); trainer_state = ckpt.load(engine, tag)
"""
from __future__ import annotations

import logging
import argparse
import contextlib
import os
import pickle
import re
import shutil
import signal
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .config import ConfigError
from .dist import all_reduce_flags, barrier, is_main, rank as this_rank, world_size as this_world
from .sources import fp32_state_dict, resolve_checkpoint

TAG_RE = re.compile(r"^step_(\d+)$")
# DeepSpeed's per-rank files (zero_pp_rank_R_..., bf16_zero_pp_rank_R_...) and the trainer's
# trainer_state/rank_R.pt; every other file (mp_rank_00_model_states.pt, config.yaml) is rank 0's.
OWNER_RE = re.compile(r"(?:pp_rank_|^rank_)(\d+)[_.]")
log = logging.getLogger("trainer")


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` that is on disk (data and name) before it returns, or not there at all."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def own_files(tag_dir: Path, rank: int) -> list[Path]:
    """The files of a checkpoint that ``rank`` wrote (and is the one to fsync and check).

    Names are matched before anything is stat'ed (``scandir``'s entry types come with the
    listing): with a thousand ranks each listing a thousand shard names, a stat per entry per
    rank would be a million metadata calls per save on a shared file system."""
    mine = []
    for where in (Path(tag_dir), Path(tag_dir) / "trainer_state"):
        if not where.is_dir():
            continue
        with os.scandir(where) as entries:
            for entry in entries:
                m = OWNER_RE.search(entry.name)
                if (int(m.group(1)) if m else 0) == rank and not entry.name.endswith(".tmp") and entry.is_file():
                    mine.append(Path(entry.path))
    return sorted(mine)


def fsync_files(paths: list[Path]) -> None:
    """Data of each file, then each directory holding them, on disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for parent in sorted({p.parent for p in paths}):
        _fsync_dir(parent)


def unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be loaded, or None. torch.save's zip archives are read through and
    their CRCs checked (a truncated file has no central directory); any other ``.pt`` is loaded."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            return f"member {bad} fails its CRC" if bad else None
        if path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=False)
        return None
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
        return f"{type(err).__name__}: {err}"


def requeued() -> bool:
    """A SLURM job that was requeued (preempted, or its node failed) and runs again."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def resume_source(cfg) -> tuple[Path, str] | None:
    """The checkpoint a run starts from, as ``(root, tag)``, or None for a fresh start.

    The run's own ``output_dir/checkpoints/latest`` wins once it exists, whatever
    ``checkpoint.resume`` says: a run branched from another run's checkpoint that is killed or
    requeued continues from its own newest checkpoint, not from the branch point (which would
    truncate its metrics and overwrite its newer checkpoints). ``resume=none`` refuses an
    output_dir with checkpoints (the CLI says so) except in a requeued SLURM job.
    """
    own = CheckpointManager(Path(cfg.output_dir) / "checkpoints")
    tag = own.latest_tag()
    if tag is not None and (cfg.checkpoint.resume != "none" or requeued()):
        return own.root, tag
    if cfg.checkpoint.resume not in ("auto", "latest", "none"):
        return resolve_checkpoint(cfg.checkpoint.resume)
    return None


@dataclass(frozen=True)
class ResumePlan:
    """How a run resumes from ``root / tag`` (:func:`resume_plan`): the writer's world size,
    loader workers and global batch, and this run's ``train.grad_accum_steps``. ``elastic``:
    the world size or the worker count differs from the writer's (model and optimizer through
    DeepSpeed's universal checkpoint when the world size differs, the data position redistributed;
    :func:`trainer.data.elastic_position`)."""
    root: Path
    tag: str
    world: int         # the writer's
    workers: int       # the writer's data.workers
    global_batch: int  # the writer's data.batch_size x grad_accum_steps x world size
    accum: int         # this run's train.grad_accum_steps
    elastic: bool


def saved_layout(where: Path) -> tuple[int, int | None, int | None, int | None]:
    """``(world size, data.workers, data.batch_size, train.grad_accum_steps)`` of the run that
    wrote the checkpoint ``where`` (None: its config.yaml does not say)."""
    world = len(list((where / "trainer_state").glob("rank_*.pt")))
    raw = (yaml.safe_load((where / "config.yaml").read_text()) or {}) if (where / "config.yaml").is_file() else {}

    def get(section: str, key: str) -> int | None:
        value = raw.get(section, {}).get(key)
        return None if value is None else int(value)
    return world, get("data", "workers"), get("data", "batch_size"), get("train", "grad_accum_steps")


def elastic_accum(global_batch: int, batch_size: int, world: int, configured: int, policy: str,
                  where) -> int:
    """This run's ``train.grad_accum_steps`` on resuming a checkpoint trained at ``global_batch``.

    The rule: ``data.batch_size`` (the memory-bound micro-batch) stays, the global batch is kept,
    so the accumulation becomes ``global_batch / (batch_size x world)`` when that is a whole
    number; otherwise ``checkpoint.elastic_batch=keep`` (the default) is a ConfigError naming the
    numbers, and ``change`` resumes with the configured accumulation (another global batch).

        elastic_accum(64, 8, 2, 1, "keep", where)   # 4 (64 = 8 x 4 x 2)
    """
    per_step = batch_size * world
    if policy == "change":
        return configured
    if global_batch % per_step == 0:
        return global_batch // per_step
    fits = [w for w in range(1, global_batch // batch_size + 1) if global_batch % (batch_size * w) == 0]
    smaller = (f", set data.batch_size to a divisor of {global_batch // world}" if global_batch % world == 0 else "")
    raise ConfigError(f"cannot resume from {where} with its global batch {global_batch}: data.batch_size "
                      f"{batch_size} x world size {world} = {per_step} does not divide it (world sizes that do: "
                      f"{', '.join(map(str, fits[:12]))}{' ...' if len(fits) > 12 else ''}); launch one of those"
                      f"{smaller}, or set checkpoint.elastic_batch=change to resume with global batch "
                      f"{per_step * configured} (data.batch_size x train.grad_accum_steps x world size)")


def resume_plan(cfg, world_size: int) -> ResumePlan | None:
    """How this run resumes (None: a fresh start); a ConfigError for a checkpoint it cannot
    resume. Reads the shared file system: in a running job only rank 0 calls it and broadcasts
    the answer (``trainer.train``); the CLI calls it before any process group to fail early."""
    source = resume_source(cfg)
    if source is None:
        return None
    root, tag = Path(source[0]), source[1]
    world, workers, batch, accum = saved_layout(root / tag)
    if world == 0:
        raise ConfigError(f"cannot resume from {root / tag}: it has no trainer_state/rank_*.pt files")
    workers = cfg.data.workers if workers is None else workers
    saved_global = (batch or cfg.data.batch_size) * (accum or cfg.train.grad_accum_steps) * world
    new_accum = elastic_accum(saved_global, cfg.data.batch_size, world_size, cfg.train.grad_accum_steps,
                              cfg.checkpoint.elastic_batch, root / tag)
    return ResumePlan(root, tag, world, workers, saved_global, new_accum,
                      elastic=world != world_size or workers != cfg.data.workers)


def apply_plan(cfg, plan: ResumePlan | None) -> None:
    """Set ``cfg``'s accumulation to the plan's (the global batch the checkpoint trained at),
    saying so when it changes. ``train.accum_negatives`` over one micro-batch per step is the plain
    loss over the same pairs, so it is turned off where the accumulation becomes 1."""
    if plan is None or plan.accum == cfg.train.grad_accum_steps:
        return
    log.warning("resuming %s (written by world size %d, global batch %d): train.grad_accum_steps %d -> %d keeps "
                "the global batch (checkpoint.elastic_batch=keep)", Path(plan.root) / plan.tag, plan.world,
                plan.global_batch, cfg.train.grad_accum_steps, plan.accum)
    cfg.train.grad_accum_steps = plan.accum
    if cfg.train.accum_negatives and plan.accum < 2:
        cfg.train.accum_negatives = False   # one micro-batch per step: its loss already spans the global batch


def to_universal(root: Path, tag: str, work: Path) -> Path:
    """DeepSpeed's universal checkpoint of ``root / tag`` (``ds_to_universal``: every parameter's
    fp32 weight and Adam moments whole, any ZeRO stage), written to ``work / tag`` atomically and
    reused when it is there; returns ``work`` (load it with ``tag`` and ``"checkpoint":
    {"load_universal": true}`` in the DeepSpeed config). One process converts, serially: its cost is
    reading the optimizer shards once and writing them again (O(model), not O(world))."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal  # heavy: only for this

    out = Path(work) / tag
    if (out / "converted").is_file():
        return Path(work)
    for stale in Path(work).glob(f".{tag}.tmp-*"):   # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(work) / f".{tag}.tmp-{os.getpid()}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(input_folder=str(Path(root) / tag), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=False,
                              inject_missing_state=True)   # our checkpoints carry no universal-checkpoint info
    with contextlib.redirect_stdout(sys.stderr):   # its progress lines
        ds_to_universal(args)
    (tmp / "converted").write_text(f"{Path(root) / tag}\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    _fsync_dir(Path(work))
    return Path(work)


def load_elastic(engine, root: Path, tag: str, universal: bool) -> None:
    """Load a checkpoint written at another world size into ``engine``: model, optimizer moments,
    learning-rate schedule and step, from ``root / tag`` (a universal checkpoint when
    ``universal``: ZeRO 1-3 partition the optimizer by world size; ZeRO-0's state is whole)."""
    loaded = engine._config.load_universal_checkpoint   # DeepSpeed reads the flag at load time
    engine._config.load_universal_checkpoint = universal
    try:
        path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = loaded
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(root) / tag}")


class RankStates(Sequence):
    """The trainer states of a checkpoint written by ``world`` ranks, ``states[r]`` loaded when
    asked (rank 0's kept; one other at a time): a reader takes only the ranks it needs.

        states = RankStates(root, "step_200", 8); states[0]["step"]
    """

    def __init__(self, root: Path, tag: str, world: int):
        self.where, self.world = Path(root) / tag / "trainer_state", world
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.world

    def __getitem__(self, r: int) -> dict:
        if not 0 <= r < self.world:
            raise IndexError(r)
        if r not in self._cache:
            if len(self._cache) > 1:
                self._cache = {0: self._cache[0]} if 0 in self._cache else {}
            self._cache[r] = torch.load(self.where / f"rank_{r}.pt", map_location="cpu", weights_only=False)
        return self._cache[r]

    def field(self, *keys: str) -> "Sequence":
        """``view[r]`` is ``states[r][keys[0]][keys[1]]...`` (None where a key is absent), loaded
        when indexed: one part of every old rank's state, for ``data.elastic_position``.

            old_positions = states.field("text_lm", "position")
        """
        return _Field(self, keys)


class _Field(Sequence):
    def __init__(self, states: RankStates, keys: tuple[str, ...]):
        self.states, self.keys = states, keys

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, r: int):
        value = self.states[r]
        for k in self.keys:
            value = None if value is None else value.get(k)
        return value


def restore_frozen(engine, root: Path, tag: str, skip: tuple[str, ...] = ()) -> None:
    """Frozen weights (``model.lock_*``) after a universal load, which restores only what the
    optimizer holds: ZeRO 0-2 from the module states (whole), ZeRO-3 from the consolidated
    checkpoint on rank 0 into the gathered parameter. ``skip``: prefixes restored elsewhere (the
    methods' teachers, from their own state)."""
    import deepspeed

    frozen = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad and not n.startswith(skip)]
    if not frozen:
        return
    if not hasattr(frozen[0][1], "ds_id"):
        module = torch.load(Path(root) / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)["module"]
        with torch.no_grad():
            for n, p in frozen:
                p.data.copy_(module[n])
        return
    sd = fp32_state_dict(Path(root), tag) if is_main() else {}
    with torch.no_grad():
        for n, p in frozen:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if is_main():
                    p.data.copy_(sd[n])


def tag_for(step: int) -> str:
    return f"step_{step}"


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root, self.keep_last = Path(root), keep_last

    def tags(self) -> list[str]:
        """Checkpoints with their trainer state, oldest first."""
        if not self.root.is_dir():
            return []
        found = sorted((int(m.group(1)), p.name) for p in self.root.iterdir()
                       if p.is_dir() and (m := TAG_RE.match(p.name)) and (p / "trainer_state").is_dir())
        return [name for _, name in found]

    def readable_tag(self, tag: str, root: Path | None = None, writers: int | None = None) -> str:
        """``tag``, or if any rank finds one of its files of it unreadable, the newest older
        complete checkpoint of this run that every rank can read (a collective: call it on every
        rank). Only the run's own checkpoints fall back; another root's unreadable one is an error.
        ``writers``: the world size that wrote it, when it is not this one's (an elastic resume):
        rank ``r`` checks the files of writer ranks ``r, r + world, ...``."""
        root = Path(root or self.root)
        own = root.resolve() == self.root.resolve()
        tags = self.tags() if own else []
        older = tags[: tags.index(tag)] if tag in tags else []
        for candidate in [tag, *reversed(older)]:
            problems = [f"{p}: {why}" for r in range(this_rank(), writers or this_world(), this_world())
                        for p in own_files(root / candidate, r) if (why := unreadable(p))]
            for problem in problems:
                log.warning("checkpoint %s is unreadable: %s", root / candidate, problem)
            (bad,) = all_reduce_flags(float(bool(problems)))
            if not bad:
                if candidate != tag:
                    log.warning("newest checkpoint %s is unreadable (see above); resuming from the previous "
                                "complete checkpoint %s", root / tag, root / candidate)
                return candidate
        raise RuntimeError(f"checkpoint {root / tag} is unreadable (see the warnings above) and no older "
                           f"complete checkpoint of this run is readable"
                           + ("" if own else "; it is not this run's own, so no other is tried"))

    def latest_tag(self) -> str | None:
        path = self.root / "latest"
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.root / tag / "trainer_state").is_dir():
            raise RuntimeError(f"{path} names {tag!r}, which is not a complete checkpoint")
        return tag

    def save(self, engine, step: int, trainer_state: dict, config_yaml: str, *, kill_before_latest: bool = False) -> str:
        tag = tag_for(step)
        tag_dir = self.root / tag
        if is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # left by a save that was killed, or an older run: never trusted
                shutil.rmtree(tag_dir)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        rank = this_rank()
        state_dir = tag_dir / "trainer_state"
        state_dir.mkdir(parents=True, exist_ok=True)
        # Durable before the barrier: `latest` must never name a checkpoint whose per-rank state
        # a crash of the file system's cache could still lose.
        atomic_torch_save(trainer_state, state_dir / f"rank_{rank}.pt")
        if is_main():
            atomic_write_text(tag_dir / "config.yaml", config_yaml)
        fsync_files(own_files(tag_dir, rank))   # DeepSpeed's shards: it closes them without an fsync
        if is_main():
            _fsync_dir(self.root)
        barrier()
        if kill_before_latest:  # fault injection (debug.kill_during_save_step): die mid-save
            os.kill(os.getpid(), signal.SIGKILL)
        if is_main():
            atomic_write_text(self.root / "latest", tag)
            self._prune(keep=tag)
        barrier()
        return tag

    def _prune(self, keep: str) -> None:
        complete = [self.root / t for t in self.tags()]
        for path in complete[: max(0, len(complete) - self.keep_last)]:
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, engine, tag: str, root: Path | None = None) -> dict:
        root = Path(root or self.root)
        path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
        rank = this_rank()
        state_file = root / tag / "trainer_state" / f"rank_{rank}.pt"
        if not state_file.is_file():
            raise RuntimeError(f"{state_file} is missing: the checkpoint was written by a run with fewer "
                               f"ranks; resume with the same world size")
        return torch.load(state_file, weights_only=False)
