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
import os
import pickle
import re
import shutil
import signal
import zipfile
from pathlib import Path

import torch
import yaml

from .config import ConfigError
from .dist import all_reduce_flags, barrier, is_main, rank as this_rank
from .sources import resolve_checkpoint

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


def check_resumable(root: Path, tag: str, world_size: int, workers: int) -> None:
    """A checkpoint resumes exactly only with the world size and loader workers that wrote it
    (the data position is per rank and per worker); anything else is a ConfigError naming both."""
    where = Path(root) / tag
    ranks = len(list((where / "trainer_state").glob("rank_*.pt")))
    if ranks != world_size:
        raise ConfigError(f"cannot resume from {where}: it was written by world size {ranks}, this run has "
                          f"world size {world_size}; resume with {ranks} ranks (elastic resume is not supported)")
    saved = (yaml.safe_load((where / "config.yaml").read_text()) or {}).get("data", {}).get("workers")
    if saved is not None and int(saved) != workers:
        raise ConfigError(f"cannot resume from {where}: it was written with data.workers={saved}, this run has "
                          f"data.workers={workers}; resume with data.workers={saved}")


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

    def readable_tag(self, tag: str, root: Path | None = None) -> str:
        """``tag``, or if any rank finds one of its files of it unreadable, the newest older
        complete checkpoint of this run that every rank can read (a collective: call it on every
        rank). Only the run's own checkpoints fall back; another root's unreadable one is an error."""
        root = Path(root or self.root)
        own = root.resolve() == self.root.resolve()
        tags = self.tags() if own else []
        older = tags[: tags.index(tag)] if tag in tags else []
        for candidate in [tag, *reversed(older)]:
            problems = [f"{p}: {why}" for p in own_files(root / candidate, this_rank()) if (why := unreadable(p))]
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
