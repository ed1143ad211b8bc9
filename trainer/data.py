"""WebDataset pipelines over img2dataset-layout shards (``KEY.jpg|png`` + ``KEY.txt`` + ``KEY.json``).

Training (``TrainStream``): shards resampled with replacement, a shuffle buffer, decode + CLIP
augmentation + tokenisation in loader workers, batches assembled in the workers. Images leave the
workers as uint8 (pinned on GPU machines) and are normalised where the model runs
(:func:`to_model_pixels`). Every random
choice is a pure function of ``(seed, epoch, rank, logical worker, sample index)``, and each batch
carries its worker's read position: the shard it is reading (which draw, how many samples in), the
shuffle buffer's samples as ``(draw, member, key)`` and the shuffle RNG's state. A resumed run
rebuilds the stream, rotates the worker order to where it stopped, and each worker re-reads only
the current shard up to its position and the samples its buffer held (verified by key), so it sees
the samples and augmentations the uninterrupted run would have seen without replaying the epoch.

Evaluation (``eval_batches``): each rank reads its share (by shard when there are enough shards,
else every world-th sample, seeking over the other ranks' samples in local files), with the
deterministic eval transform, decoded in loader workers.

A corrupt sample or unreadable shard is skipped, counted (``skipped`` in each batch, reported as
``data/skipped``) and logged once; it never stops the run.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import random
import re
import select
import signal
import tarfile
import threading
import time
from multiprocessing import forkserver, resource_tracker
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torchvision import transforms as T
from webdataset import tariterators

from .config import ConfigError
from .dist import from_rank0, launch_env, world_size
from .shapes import preset_shape

log = logging.getLogger("trainer.data")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_shards(spec, key: str) -> list[str]:
    """Resolve a directory, brace pattern, ``pipe:`` URL, or a list of those, to shard URLs."""
    if spec is None or spec == [] or spec == "":
        raise ConfigError(f"config key '{key}' is empty; give a directory, a pattern like "
                          f"'data/train-{{000000..000099}}.tar', or a list of those")
    urls: list[str] = []
    for item in (spec if isinstance(spec, list) else [spec]):
        item = str(item)
        if item.startswith("pipe:") or "://" in item:
            urls += list(braceexpand(item))
            continue
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise ConfigError(f"config key '{key}': directory {item} holds no *.tar shard")
            urls += found
            continue
        for pattern in braceexpand(item):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ConfigError(f"config key '{key}': no shard matches {pattern!r}")
            urls += matches
    return urls


# Shard lists of this process, by spec: what launch rank 0 expanded in the checks before the
# process group (check_shards), and the lists every rank holds once rank 0 shared them (shard_list).
_EXPANDED: dict[str, list[str]] = {}
_AGREED: set[str] = set()


def _spec_key(spec, key: str) -> str:
    return json.dumps([key, spec], sort_keys=True, default=str)


def check_shards(spec, key: str) -> list[str] | None:
    """The checks before any process group: launch rank 0 expands ``spec`` (a ConfigError names
    what matches nothing) and keeps the list for :func:`shard_list`; the other ranks of a
    multi-rank launch return None without touching the file system (if rank 0 exits 2, the
    launcher ends the job: torchrun does, and ``srun --kill-on-bad-exit=1`` in slurm/train.sbatch).

        urls = check_shards(cfg.data.train_shards, "data.train_shards")   # None on ranks > 0
    """
    le = launch_env()
    if le.world_size == 1:
        return expand_shards(spec, key)
    if le.rank != 0:
        return None
    ident = _spec_key(spec, key)
    if ident not in _EXPANDED:
        _EXPANDED[ident] = expand_shards(spec, key)
    return _EXPANDED[ident]


def shard_list(spec, key: str) -> list[str]:
    """:func:`expand_shards` once per run: in a process group of several ranks, rank 0 globs (or
    reuses what :func:`check_shards` found) and every rank gets its list; later calls with the same
    spec (each evaluation, each ECL round) are answered from memory. A collective the first time
    a spec is asked for: every rank calls it, in the same order. With one process it expands.

    At 512 ranks and 10^5 brace-expanded shard names, one glob per name per rank per expansion
    would be ~10^8 metadata calls on the shared file system; this is 10^5, once.
    """
    if world_size() == 1:
        return expand_shards(spec, key)
    ident = _spec_key(spec, key)
    if ident not in _AGREED:
        _EXPANDED[ident] = from_rank0(lambda: _EXPANDED.get(ident) or expand_shards(spec, key))
        _AGREED.add(ident)
    return list(_EXPANDED[ident])


class KeyManifest:
    """A plain key-per-line manifest, held whole in memory (every key of every shard)."""

    def __init__(self, keys: frozenset[str]):
        self.keys = keys

    def keys_for(self, url: str) -> frozenset[str]:
        return self.keys

    def __len__(self) -> int:
        return len(self.keys)


class ShardManifest:
    """A selection written by ``python -m trainer select`` (``manifest.txt`` + ``index.json``):
    the kept keys are stored shard by shard, in order, and ``index.json`` holds each shard's byte
    range in ``manifest.txt``, so a loader worker reads one shard's keys when it opens that
    shard (memory per worker: one shard's kept keys, not the whole selection's).

        m = ShardManifest("runs/sel")              # or the path of runs/sel/manifest.txt
        m.keys_for("/data/train-000012.tar")       # frozenset of that shard's kept keys
    """

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = json.loads((self.dir / "index.json").read_text())
        self.manifest = self.dir / index.get("manifest", "manifest.txt")
        self.ranges = {canonical_url(s["url"]): tuple(s["manifest"]) for s in index["shards"]}
        by_name: dict[str, list[str]] = {}
        for url in self.ranges:
            by_name.setdefault(os.path.basename(url), []).append(url)
        self._by_name = {name: urls[0] for name, urls in by_name.items() if len(urls) == 1}
        self.kept = sum(int(s.get("kept", 0)) for s in index["shards"])
        self._cached: tuple[str, frozenset[str]] | None = None

    def resolve(self, url: str) -> str | None:
        """The index entry of a training shard URL: the same path (symlinks and relative paths
        resolved), else the one shard with the same file name."""
        entry = canonical_url(url)
        return entry if entry in self.ranges else self._by_name.get(os.path.basename(url))

    def missing(self, urls: list[str]) -> list[str]:
        return [u for u in urls if self.resolve(u) is None]

    def keys_for(self, url: str) -> frozenset[str]:
        entry = self.resolve(url)
        if entry is None:
            raise RuntimeError(f"shard {url} is not in the selection {self.dir} (index.json)")
        if self._cached is not None and self._cached[0] == entry:
            return self._cached[1]
        start, end = self.ranges[entry]
        with open(self.manifest, "rb") as fh:
            fh.seek(start)
            keys = frozenset(fh.read(end - start).decode().split())
        self._cached = (entry, keys)
        return keys

    def __len__(self) -> int:
        return self.kept


def canonical_url(url: str) -> str:
    """A shard's name in a selection index: local paths absolute with symlinks resolved."""
    return url if ("://" in url or url.startswith("pipe:")) else os.path.realpath(url)


KEY_MANIFEST_MAX_MB = 64.0   # data.key_manifest_max_mb's default


def read_manifest(path: str | None, urls: list[str] | None = None, max_mb: float | None = KEY_MANIFEST_MAX_MB,
                  shards_spec=None):
    """``data.manifest``: ``None`` keeps everything; a ``select`` output directory (or its
    ``manifest.txt``, whose ``index.json`` sits next to it) gives a :class:`ShardManifest`; any
    other file of kept keys, one per line (``#`` comments allowed), a :class:`KeyManifest`.
    With ``urls``, every training shard must be in a :class:`ShardManifest`'s index.

    A key-per-line file above ``max_mb`` (``data.key_manifest_max_mb``; None: no limit) is a
    ConfigError naming the command that converts it to the per-shard form
    (:func:`convert_key_manifest`): a :class:`KeyManifest` is held whole by every loader worker of
    every rank (10^9 keys: ~100 GB each); ``shards_spec`` (the training shards as configured) goes
    into that command."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir() or (p.is_file() and (p.parent / "index.json").is_file() and p.name == "manifest.txt"):
        directory = p if p.is_dir() else p.parent
        if not (directory / "index.json").is_file() or not (directory / "manifest.txt").is_file():
            raise ConfigError(f"config key 'data.manifest': {path} is a directory without the manifest.txt and "
                              "index.json that `python -m trainer select` writes")
        try:
            manifest = ShardManifest(directory)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"config key 'data.manifest': {directory}/index.json is not a selection index "
                              f"({type(err).__name__}: {err})") from None
        missing = manifest.missing(urls or [])
        if missing:
            raise ConfigError(f"config key 'data.manifest': training shard {missing[0]} (and {len(missing) - 1} more) "
                              f"is not in the selection {directory}; select over the same shards")
        return manifest
    if not p.is_file():
        raise ConfigError(f"config key 'data.manifest': file not found: {path}")
    size_mb = p.stat().st_size / 2**20
    if max_mb is not None and size_mb > max_mb:
        spec = " ".join(map(str, shards_spec)) if isinstance(shards_spec, list) else (shards_spec or "SHARDS")
        raise ConfigError(f"config key 'data.manifest': {path} is a key-per-line file of {size_mb:.0f} MB, above "
                          f"data.key_manifest_max_mb={max_mb:g} (every loader worker of every rank would hold all of "
                          f"its keys); convert it once to the per-shard form, which a worker reads one shard at a "
                          f"time: python -m trainer convert-manifest --manifest {path} --shards {spec} --out DIR, "
                          f"then data.manifest=DIR")
    with open(p) as fh:
        return KeyManifest(frozenset(line.strip() for line in fh if line.strip() and not line.startswith("#")))


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def shard_keys(url: str, counter: _Counter | None = None) -> Iterator[str]:
    """The sample keys of one shard, in order; a local tar's members are listed from their headers
    alone (no data is read), a ``pipe:`` stream is read through."""
    counter = counter or _Counter()
    if seekable(url):
        for sample in picked_samples(url, lambda i: True, counter, keys_only=True):
            yield sample["__key__"]
        return
    for sample in tariterators.tarfile_samples([{"url": url}], handler=counter.handler):
        yield sample["__key__"]


def convert_key_manifest(path: str | Path, urls: list[str], out: str | Path, chunk_keys: int = 1 << 22) -> dict:
    """A key-per-line manifest as the per-shard form :class:`ShardManifest` reads (``OUT/manifest.txt``,
    ``OUT/index.json``): each shard's listed keys, in the shard's order, one byte range per shard.

        convert_key_manifest("kept.txt", expand_shards("data/train", "k"), "runs/kept")  # data.manifest=runs/kept

    Memory: 8 bytes per listed key (a sorted array of 64-bit hashes; 8 GB at 10^9 keys), never the
    keys themselves; each shard's keys are listed from its tar headers and looked up. Exact up to a
    64-bit hash collision: a sample whose key is not listed is kept only if its hash equals a listed
    key's, an expected (samples x keys) / 2^64 of them (0.05 at 10^9 x 10^9). Returns counts:
    ``keys`` listed, ``kept`` found in the shards, ``samples`` in the shards."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts, chunk = [], []
    with open(path) as fh:
        for line in fh:
            key = line.strip()
            if key and not key.startswith("#"):
                chunk.append(_key_hash(key))
                if len(chunk) == chunk_keys:
                    parts.append(np.array(chunk, dtype=np.uint64))
                    chunk = []
    parts.append(np.array(chunk, dtype=np.uint64))
    listed = np.unique(np.concatenate(parts))
    del parts, chunk
    entries, kept, samples = [], 0, 0
    tmp = out / f"manifest.txt.{os.getpid()}.tmp"
    with open(tmp, "wb") as mf:
        for url in urls:
            keys = list(shard_keys(url))
            samples += len(keys)
            h = np.array([_key_hash(k) for k in keys], dtype=np.uint64)
            found = np.zeros(len(keys), dtype=bool)
            if listed.size:
                found = listed[np.minimum(np.searchsorted(listed, h), listed.size - 1)] == h
            text = "".join(k + "\n" for k, f in zip(keys, found) if f).encode()
            start = mf.tell()
            mf.write(text)
            entries.append({"url": canonical_url(url), "manifest": [start, start + len(text)], "kept": int(found.sum())})
            kept += int(found.sum())
        mf.flush()
        os.fsync(mf.fileno())
    os.replace(tmp, out / "manifest.txt")
    index = out / "index.json"
    tmp = index.with_name(f"index.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": "trainer-keys/1", "manifest": "manifest.txt", "source": str(path),
                               "shards": entries}, indent=1))
    os.replace(tmp, index)
    return {"keys": int(listed.size), "kept": kept, "samples": samples, "shards": len(urls), "out": str(out)}


def _geometry(image_size: int, crop_scale_min: float, train: bool) -> list:
    if train:
        return [T.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    return [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]


def image_transforms(image_size: int, crop_scale_min: float, train: bool):
    """PIL image -> uint8 ``[3, H, W]``: the crop (random for training, centre for evaluation),
    no normalisation. What the trainer's decoders ship through loader workers and pinned memory
    (a quarter of float32's bytes); :func:`to_model_pixels` normalises on the device."""
    return T.Compose([*_geometry(image_size, crop_scale_min, train), T.PILToTensor()])


def build_transforms(image_size: int, mean, std, crop_scale_min: float, train: bool):
    """PIL image -> normalised float32 ``[3, H, W]`` (torchvision's ToTensor + Normalize): the
    same crop as :func:`image_transforms` with the normalisation on the host. The trainer ships
    uint8 instead; this is the reference the uint8 path is tested against, and a decoder built
    with it still works (:func:`to_model_pixels` passes float images through)."""
    return T.Compose([*_geometry(image_size, crop_scale_min, train), T.ToTensor(), T.Normalize(mean, std)])


def to_model_pixels(images: torch.Tensor, device, dtype: torch.dtype, mean=None, std=None) -> torch.Tensor:
    """The model's pixel input: uint8 ``[N, 3, H, W]`` images (from :func:`image_transforms`) moved
    to ``device`` as uint8 (non-blocking from pinned memory), then ``(x / 255 - mean) / std`` in
    float32 there and cast to ``dtype`` (the training precision) - the same arithmetic, in the
    same order, as ToTensor + Normalize on the host, so the model sees the same values.

        x = to_model_pixels(batch["image"], engine.device, torch.bfloat16, cfg.data.image_mean, cfg.data.image_std)

    A floating-point ``images`` is taken as already normalised (a caller's own preprocessing) and
    only moved and cast."""
    if images.is_floating_point():
        return images.to(device, dtype, non_blocking=True)
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (or already normalised floats), got {images.dtype}")
    if mean is None or std is None:
        raise ValueError("uint8 images need the normalisation's mean and std (cfg.data.image_mean/image_std)")
    x = images.to(device, non_blocking=True)
    m, s = _norm_constants(tuple(float(v) for v in mean), tuple(float(v) for v in std), x.device)
    return x.float().div_(255).sub_(m).div_(s).to(dtype)


@functools.lru_cache(maxsize=16)
def _norm_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # float32, as Normalize makes them from the same lists; made once per device, not per batch
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))


def model_pixels(cfg):
    """:func:`to_model_pixels` with ``cfg.data``'s mean and std: ``pixels(images, device, dtype)``."""
    return functools.partial(to_model_pixels, mean=tuple(cfg.data.image_mean), std=tuple(cfg.data.image_std))


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class _Counter:
    """Skipped-sample bookkeeping of one worker: counts everything, logs each kind once."""

    def __init__(self, start: int = 0):
        self.skipped = start
        self._logged: set[str] = set()

    def handler(self, exn: Exception) -> bool:
        self.skipped += 1
        where = str(exn.args[-1]) if exn.args else "?"
        if where not in self._logged:
            self._logged.add(where)
            log.warning("skipping unreadable data (%s: %s); further errors there are only counted",
                        type(exn).__name__, exn)
        return True

    def bad_sample(self, key: str, err: Exception) -> None:
        self.skipped += 1
        if "sample" not in self._logged:
            self._logged.add("sample")
            log.warning("skipping corrupt sample %s (%s: %s); further ones are only counted",
                        key, type(err).__name__, err)


def _raw_samples(urls, counter: _Counter, manifest, max_empty_shards: int = 100, where: dict | None = None,
                 current=None) -> Iterator[dict]:
    """Samples shard by shard (never grouped across shard boundaries), filtered by the manifest.
    A shard that yields no sample at all (empty, or unreadable from the start) counts as skipped.

    ``where`` follows the read position: ``draw`` (the current shard's index among the shards
    opened, counting from where's start value) and ``member`` (raw samples read from it, kept or
    not); each sample carries the two as ``__draw__`` and ``__member__``. ``current``: a shard
    ``(url, members)`` already opened and read up to ``where``, to continue before ``urls``."""
    where = {"draw": -1, "member": 0} if where is None else where
    urls = iter(urls)
    empty = 0
    while True:
        if current is not None:   # resumed mid-shard: it gave a kept sample before the save
            (url, members), current, n_kept = current, None, 1
        else:
            item = next(urls, None)
            if item is None:
                return
            url, start, read = (item["url"], int(item["start"]), bool(item["read"])) if isinstance(item, dict) \
                else (item, 0, True)
            where["draw"], where["member"], n_kept = where["draw"] + 1, 0, 0
            if not read:   # a carried shard only its buffered samples were taken from (elastic_position)
                continue
            members = iter(tariterators.tarfile_samples([{"url": url}], handler=counter.handler))
            if start:   # a carried shard another run's worker had read up to ``start``: skip within it
                for _ in range(start):
                    if next(members, None) is None:
                        break
                    where["member"] += 1
                n_kept = 1
        errors_before = counter.skipped
        keep = None if manifest is None else manifest.keys_for(url)
        for sample in members:
            sample["__draw__"], sample["__member__"] = where["draw"], where["member"]
            where["member"] += 1
            if keep is None or sample["__key__"] in keep:
                n_kept += 1
                yield sample
        if where["member"] == 0 and counter.skipped == errors_before:
            counter.handler(ValueError("shard holds no sample", url))
        empty = 0 if n_kept else empty + 1
        if empty >= max_empty_shards:  # resampling would otherwise spin forever
            raise RuntimeError(f"no usable sample in the last {empty} shard reads (last: {url}); "
                               "the shards are unreadable or data.manifest keeps none of their keys")


def _shuffled(samples: Iterator[dict], bufsize: int, rng: random.Random, buf: list | None = None) -> Iterator[dict]:
    """A shuffle buffer; ``buf`` (changed in place, so a caller can record it) may start filled."""
    buf = [] if buf is None else buf
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(len(buf))
        buf[i], sample = sample, buf[i]
        yield sample
        while len(buf) > bufsize:   # several workers' buffers carried into one (elastic_position)
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


RESTORE_ATTEMPTS = 3


class _Resume:
    """Puts one worker's reader back where a checkpoint recorded it, reading only what it must.

    The record (``reader`` in a batch) is the current shard's draw index and how many raw samples
    had been read from it, the shuffle buffer as ``(draw, member, key)`` per slot, and the shuffle
    RNG's state. The shard draws are replayed without I/O (they are seeded RNG calls); then each
    shard that holds a buffered sample is read up to its last buffered member, and the current
    shard up to the recorded position, where reading continues. So a restart reads one shard
    prefix per worker plus the shards its buffer still holds samples of, whatever the epoch
    position. A shard that reads differently (shorter, or another key where a buffered sample was:
    a transient error, or changed data) is read again, up to ``RESTORE_ATTEMPTS`` times, then the
    run stops with an error rather than continue on a shifted stream.
    """

    def __init__(self, urls: list[str], shard_rng: random.Random, record: dict, counter: _Counter,
                 carry: list[dict] = ()):
        self.record, self.counter, self.restored = record, counter, False
        self.buffer = _buffer_of(record)
        # The worker's shards: those carried over by an elastic resume, then its own draws (no I/O).
        self.drawn = _shards_opened(urls, shard_rng, [c["url"] for c in carry], int(record["draw"]) + 1)

    def _handler(self, exn: Exception) -> bool:
        """Errors met again while restoring are in the saved count; after it, the current shard's count."""
        return (self.counter if self.restored else _Counter()).handler(exn)

    def apply(self, shuffle_rng: random.Random) -> tuple[list[dict], tuple]:
        """The refilled buffer and the current shard ``(url, members)`` opened at the position."""
        rec, cur = self.record, int(self.record["draw"])
        wanted: dict[int, dict[int, int]] = {}
        for slot, (draw, member, _key) in enumerate(self.buffer):
            wanted.setdefault(int(draw), {})[int(member)] = slot
        buf: list = [None] * len(self.buffer)
        for draw in sorted(d for d in wanted if d != cur):
            self._read(draw, wanted[draw], max(wanted[draw]) + 1, buf)
        if cur < 0:   # an elastic start: the carried buffer only, no shard opened yet
            self.restored = True
            return buf, None
        members = self._read(cur, wanted.get(cur, {}), int(rec["member"]), buf)
        shuffle_rng.setstate(_rng_state_in(rec["shuffle_rng"]))
        self.restored = True
        return buf, (self.drawn[cur], members)

    def _read(self, draw: int, wanted: dict[int, int], upto: int, buf: list):
        """Read shard ``draw``'s first ``upto`` raw samples into ``buf``'s slots; return the open rest."""
        url, problem = self.drawn[draw], ""
        for _attempt in range(RESTORE_ATTEMPTS):
            members = iter(tariterators.tarfile_samples([{"url": url}], handler=self._handler))
            n, problem = 0, ""
            while n < upto and (sample := next(members, None)) is not None:
                if n in wanted:
                    key = self.buffer[wanted[n]][2]
                    if sample["__key__"] != key:
                        problem = f"sample {n} is {sample['__key__']!r}, the checkpoint recorded {key!r}"
                        break
                    sample["__draw__"], sample["__member__"] = draw, n
                    buf[wanted[n]] = sample
                n += 1
            if not problem and n == upto:
                return members
            problem = problem or f"it gave {n} samples, the checkpoint's position needs {upto}"
            log.warning("resume: re-reading shard %s (%s)", url, problem)
        raise RuntimeError(f"cannot resume the data stream exactly: shard {url} read differently "
                           f"{RESTORE_ATTEMPTS} times ({problem}); the shard changed or is unreadable")


def _reader_record(where: dict, buf: list[dict], shuffle_rng: random.Random) -> dict:
    """A worker's read position as a batch carries it: tensors and one string, which the loader
    passes through as they are (a list of a thousand tuples would cost it milliseconds a batch)."""
    version, internal, gauss = shuffle_rng.getstate()
    return {"draw": where["draw"], "member": where["member"],
            "shuffle_rng": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
            "buffer_at": torch.tensor([(b["__draw__"], b["__member__"]) for b in buf],
                                      dtype=torch.int64).reshape(-1, 2),
            "buffer_keys": "\n".join(b["__key__"] for b in buf)}


def _buffer_of(record: dict) -> list[tuple[int, int, str]]:
    """The recorded shuffle buffer as ``(draw, member, key)`` per slot."""
    keys = record["buffer_keys"].split("\n") if record["buffer_keys"] else []
    return [(int(d), int(m), k) for (d, m), k in zip(record["buffer_at"].tolist(), keys)]


def _rng_state_in(state: dict) -> tuple:
    """``random.Random.getstate()``'s tuple from its recorded form."""
    return int(state["version"]), tuple(int(x) for x in state["internal"].tolist()), state["gauss"]


class SampleDecoder:
    """Bytes -> ``(image tensor, input_ids, attention_mask, label)``; raises on a corrupt sample."""

    def __init__(self, tokenizer, context_length: int, transform):
        self.tokenizer, self.context_length, self.transform = tokenizer, context_length, transform

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=self.context_length, return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def __call__(self, sample: dict, seed: int | None = None):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "txt" not in sample:
            raise ValueError(f"sample lacks an image or a caption (has {sorted(k for k in sample if not k.startswith('__'))})")
        image = Image.open(io.BytesIO(sample[ext]))
        image = image.convert("RGB")
        if seed is None:
            pixels = self.transform(image)
        else:  # augmentation randomness is a function of the sample's position, not of history
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                pixels = self.transform(image)
        caption = sample["txt"].decode("utf-8")
        meta = json.loads(sample["json"]) if "json" in sample else {}
        return pixels, caption, int(meta.get("label", -1))

    def collate(self, items: list) -> dict:
        """Training batch of ``__call__`` results: ``image``, ``input_ids``, ``attention_mask``."""
        return {"image": torch.stack([it[0] for it in items]), **self.tokenize([it[1] for it in items])}


class TextDecoder(SampleDecoder):
    """Text-only samples (``KEY.txt``, the language-modelling stream): caption -> tokens.

        dec = TextDecoder(tokenizer, context_length=24)
        stream = ResumableStream(urls, dec, batch_size=16, ..., stream_id="text")
    """

    def __init__(self, tokenizer, context_length: int):
        super().__init__(tokenizer, context_length, None)

    def __call__(self, sample: dict, seed: int | None = None) -> str:
        if "txt" not in sample:
            raise ValueError(f"text sample lacks a .txt (has {sorted(k for k in sample if not k.startswith('__'))})")
        return sample["txt"].decode("utf-8")

    def collate(self, items: list) -> dict:
        return self.tokenize(list(items))


class TrainStream(torch.utils.data.IterableDataset):
    """Infinite, resumable stream of training batches for one rank and one epoch.

        stream = TrainStream(urls, decoder, batch_size=64, seed=0, epoch=0, rank=r, world=w,
                             workers=2, shuffle_buffer=1000, resume=None)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)

    ``decoder(sample, seed)`` turns a raw sample into an item (raising on a corrupt one) and
    ``decoder.collate(items)`` makes the batch dict (``SampleDecoder``: image-text pairs,
    ``TextDecoder``: text only). ``stream_id`` names the stream in every random choice, so two
    streams of one run (pairs, text) draw independently; ``"pairs"`` keeps the historical seeds.
    ``resume`` is ``{"worker_offset": k, "consumed": {logical_worker: n}, "skipped": {...},
    "reader": {...}}`` as returned by :func:`position_after` (a position without ``reader``,
    written before readers were recorded, is replayed from the epoch's start).
    """

    def __init__(self, urls, decoder: SampleDecoder, *, batch_size: int, seed: int, epoch: int,
                 rank: int, world: int, workers: int, shuffle_buffer: int, manifest=None, resume=None,
                 stream_id: str = "pairs"):
        super().__init__()
        self.urls, self.decoder, self.batch_size = list(urls), decoder, batch_size
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.n_logical = max(1, workers)
        self.shuffle_buffer, self.manifest, self.stream_id = shuffle_buffer, manifest, stream_id
        self.resume = resume or {"worker_offset": 0, "consumed": {}, "skipped": {}}

    def _logical_worker(self) -> int:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        return (wid + self.resume["worker_offset"]) % self.n_logical

    def __iter__(self) -> Iterator[dict]:
        w = self._logical_worker()
        base = _stream_base(self.seed, self.epoch, self.rank, w, self.stream_id, self.resume.get("elastic"))
        shard_rng, shuffle_rng = random.Random(_seed("shards", *base)), random.Random(_seed("shuffle", *base))
        consumed = int(self.resume["consumed"].get(str(w), 0))
        record = self.resume.get("reader", {}).get(str(w))
        carry = self.resume.get("carry", {}).get(str(w), [])
        # The saved count holds the unreadable entries and corrupt samples met before the save;
        # what a resume reads again is not counted a second time.
        counter = _Counter(int(self.resume["skipped"].get(str(w), 0)))
        where = {"draw": -1, "member": 0}
        buf, current = [], None
        if record is not None:
            buf, current = _Resume(self.urls, shard_rng, record, counter, carry).apply(shuffle_rng)
            where = {"draw": int(record["draw"]), "member": int(record["member"])}
        # the shards carried over by an elastic resume not yet reached, then resampled, with replacement
        urls = itertools.chain(carry[where["draw"] + 1:], iter(lambda: shard_rng.choice(self.urls), None))
        samples = _shuffled(_raw_samples(urls, counter, self.manifest, where=where, current=current),
                            self.shuffle_buffer, shuffle_rng, buf)
        if record is None and consumed:   # a position saved before readers were recorded: replay it
            for _ in range(consumed):
                next(samples)
            counter.skipped = int(self.resume["skipped"].get(str(w), 0))   # the replay met them again
        items, keys = [], []
        for sample in samples:
            consumed += 1
            try:
                item = self.decoder(sample, seed=_seed("aug", *base, consumed))
            except Exception as err:  # noqa: BLE001 - any decode failure is a corrupt sample
                counter.bad_sample(sample.get("__key__", "?"), err)
                continue
            items.append(item)
            keys.append(sample["__key__"])
            if len(items) == self.batch_size:
                reader = _reader_record(where, buf, shuffle_rng)
                yield {**self.decoder.collate(items), "keys": keys, "worker": w, "consumed": consumed,
                       "skipped": counter.skipped, "reader": reader}
                items, keys = [], []


def _stream_base(seed: int, epoch: int, rank: int, worker: int, stream_id: str, elastic=None) -> tuple:
    """What every random choice of one (rank, logical worker) stream is seeded from; ``elastic``
    (the step of an elastic resume) gives the streams that continue an epoch at another layout
    seeds of their own, so they do not draw the shards the epoch's first streams drew."""
    return ((seed, epoch, rank, worker) + (() if stream_id == "pairs" else (stream_id,))
            + (() if elastic is None else ("elastic", int(elastic))))


def _drawn_shards(urls: list[str], seed: int, epoch: int, rank: int, worker: int, stream_id: str,
                  stream: dict, n: int) -> list[str]:
    """The first ``n`` shards a recorded stream's worker opened (its carried ones, then its draws)."""
    carry = [c["url"] for c in stream.get("carry", {}).get(str(worker), [])]
    rng = random.Random(_seed("shards", *_stream_base(seed, epoch, rank, worker, stream_id, stream.get("elastic"))))
    return _shards_opened(urls, rng, carry, n)[:n]


def _shards_opened(urls: list[str], shard_rng: random.Random, carried: list[str], n: int) -> list[str]:
    """A worker's shards up to its ``n``-th: those carried over by an elastic resume (all of them,
    even past ``n``), then draws from ``shard_rng`` (advanced by them: a live stream keeps drawing
    from it afterwards)."""
    return carried + [shard_rng.choice(urls) for _ in range(max(0, n - len(carried)))]


def elastic_position(old: list[dict | None], old_workers: int, rank: int, world: int, workers: int, *,
                     urls: list[str], seed: int, stream_id: str = "pairs", key: int = 0) -> dict | None:
    """This rank's :class:`ResumableStream` position continuing the epoch that ``old`` (every
    old rank's position, in rank order; ``old_workers`` loader workers each) stood at, on
    ``world`` ranks with ``workers`` workers each (``key``: the resume's step, seeds the new streams).

    The rule. The epoch number and the samples consumed in it carry over (the epoch ends after
    the same number of samples, to within one micro-batch per rank). Each old (rank, worker)
    reader, numbered ``j = rank x old_workers + worker`` of ``R_old``, goes to new reader
    ``i = j x R_new // R_old`` (contiguous blocks when shrinking, spread when growing), which
    first delivers that reader's shuffle buffer (the samples it had read and not yet delivered;
    re-read by key from their shards) and then the rest of the shard it was reading, from where
    it stood; after that, and from the start for a new reader that inherited none, it draws
    shards with replacement from a fresh stream seeded by ``(seed, epoch, rank, worker,
    "elastic", key)``. So no sample delivered before the checkpoint is delivered again by this
    epoch's continuation of its shard, and no sample read into a buffer is lost; which shards
    come next, the order and the augmentation draws differ from the uninterrupted run's.

        pos = elastic_position([st["data"] for st in rank_states], 2, rank=0, world=1, workers=2,
                               urls=urls, seed=0, key=4)
    """
    first = old[0]
    if not first:
        return None
    ow, nw = max(1, old_workers), max(1, workers)
    n_old, n_new = len(old) * ow, world * nw
    mine = {rank * nw + w: [] for w in range(nw)}
    # The old readers j with j * n_new // n_old among mine: only their ranks' positions are read.
    lo, hi = -(-rank * nw * n_old // n_new), -(-(rank + 1) * nw * n_old // n_new)
    skipped = 0
    for r in range(lo // ow, min(len(old), -(-hi // ow))):
        pos = old[r] or {}
        stream = pos.get("stream") or {}
        for w in range(ow):
            i = (r * ow + w) * n_new // n_old
            if i not in mine:
                continue
            # each old reader's skipped count goes to the one new reader that inherits it (and its
            # rank's earlier epochs' count with its worker 0), so the ranks' sum stays the total
            skipped += int(stream.get("skipped", {}).get(str(w), 0)) + (int(pos.get("skipped_before", 0)) if w == 0 else 0)
            record = stream.get("reader", {}).get(str(w))
            if record is not None:
                mine[i].append((r, w, stream, record))
    out = {}
    for i, inherited in mine.items():
        carry, at, keys = [], [], []
        for r, w, stream, record in inherited:
            draw = int(record["draw"])
            buffer = _buffer_of(record)
            # A reader that itself continues an elastic resume may still have carried shards ahead
            # of the one it reads (draws > draw), and buffered samples from them: they go along.
            pending = stream.get("carry", {}).get(str(w), [])[draw + 1:]
            wanted = {b[0] for b in buffer} | ({draw} if draw >= 0 else set()) | \
                set(range(draw + 1, draw + 1 + len(pending)))
            shards = _drawn_shards(urls, seed, int(first["epoch"]), r, w, stream_id, stream, max(wanted) + 1)
            index = {}
            for d in sorted(wanted):
                index[d] = len(carry)
                if d > draw:      # not reached yet: as it was carried
                    carry.append(dict(pending[d - draw - 1]))
                elif d == draw:   # the shard it was reading: the rest of it
                    carry.append({"url": shards[d], "start": int(record["member"]), "read": True})
                else:             # read before: only its buffered samples are taken
                    carry.append({"url": shards[d], "start": 0, "read": False})
            for d, m, k in buffer:
                at.append((index[d], m))
                keys.append(k)
        if carry:
            out[str(i - rank * max(1, workers))] = (carry, {
                "draw": -1, "member": 0, "shuffle_rng": None,
                "buffer_at": torch.tensor(at, dtype=torch.int64).reshape(-1, 2), "buffer_keys": "\n".join(keys)})
    per_rank_done = int(first["in_epoch"]) * len(old) // world
    stream = {"worker_offset": 0, "consumed": {}, "skipped": {}, "elastic": int(key),
              "carry": {w: c for w, (c, _) in out.items()}, "reader": {w: rec for w, (_, rec) in out.items()}}
    return {"epoch": int(first["epoch"]), "in_epoch": per_rank_done, "stream": stream, "skipped_before": skipped}


def position_after(batch_meta: dict, state: dict, n_logical: int) -> dict:
    """Update a stream position with a consumed batch's worker counters (trainer state)."""
    w = str(batch_meta["worker"])
    state.setdefault("consumed", {})[w] = int(batch_meta["consumed"])
    state.setdefault("skipped", {})[w] = int(batch_meta["skipped"])
    state.setdefault("reader", {})[w] = batch_meta["reader"]
    state["worker_offset"] = (int(batch_meta["worker"]) + 1) % n_logical
    return state


def steps_per_epoch(cfg, world: int) -> int:
    """Optimizer steps in one epoch of the paired stream (``data.train_num_samples`` pairs)."""
    return max(1, cfg.data.train_num_samples // (cfg.data.batch_size * world * cfg.train.grad_accum_steps))


def train_decoder(cfg, tokenizer) -> "SampleDecoder":
    """The training decoder: random resized crop (``data.crop_scale_min``), uint8 images."""
    shape = preset_shape(cfg.model)
    return SampleDecoder(tokenizer, shape["context_length"],
                         image_transforms(shape["image_size"], cfg.data.crop_scale_min, train=True))


def eval_decoder(cfg, tokenizer) -> "SampleDecoder":
    """The deterministic decoder of evaluation (and of ECL scoring): resize, centre crop, uint8 images."""
    shape = preset_shape(cfg.model)
    return SampleDecoder(tokenizer, shape["context_length"], image_transforms(shape["image_size"], 1.0, train=False))


def dummy_batch(decoder: "SampleDecoder", image_size: int) -> dict:
    """A one-sample batch for a rank out of work in a lockstep pass (ZeRO-3 gathers per forward)."""
    return {"image": torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8), **decoder.tokenize([""]),
            "label": torch.tensor([-1])}


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
WORKER_STARTS = ("forkserver", "spawn", "fork")


def ignore_stop_signals(_worker_id: int) -> None:
    """Loader-worker init: SLURM signals every process of a job step, loader workers included;
    torch's worker handler would die on a SIGTERM that is not from its parent and take the rank
    down before it can checkpoint. Only the main process acts on USR1/TERM/INT."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _worker_init(rank_pid: int, worker_id: int) -> None:
    """Loader-worker init: ignore the stop signals (:func:`ignore_stop_signals`) and end with the
    rank. A worker started by ``forkserver`` is the server's child, and torch's own watchdog only
    asks whether the worker's parent changed, so a rank killed outright (SIGKILL, an OOM kill) would
    leave its workers, and through them the server, running for ever, holding the job's output
    pipes open. A thread waits on the rank's pidfd instead."""
    ignore_stop_signals(worker_id)
    if rank_pid != os.getppid():
        threading.Thread(target=_exit_with, args=(rank_pid,), name="rank-watch", daemon=True).start()


def _exit_with(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(0)
    except OSError:   # no pidfd (Linux < 5.3): poll
        while _alive(pid):
            time.sleep(1.0)
        os._exit(0)
    select.select([fd], [], [])
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _worker_context(start: str, *made_of) -> multiprocessing.context.BaseContext:
    """The multiprocessing context loader workers start from (``data.worker_start``).

    ``forkserver`` (the default): a rank runs other threads (gloo's or NCCL's, the training
    loader's queue feeders), and forking a multi-threaded process can hang the child in CPython
    3.11's after-fork clean-up when another thread held the interpreter's thread-state lock at that
    instant (seen once in ~80 evaluation forks beside gloo). The server is one single-threaded
    process per rank, started at the first loader (or :func:`prestart_workers`) with the modules of
    ``made_of`` (the dataset, its decoder) and of the tokenizer preloaded, so each worker forks from
    it in milliseconds; a dataset of another module pays that module's import in each worker. The
    server starts with the stop signals blocked, which it and its workers inherit: a SLURM signal to
    every process of the step must not kill it, or its workers (whose parent it is) would exit under
    a rank that is checkpointing. ``spawn`` and ``forkserver`` run a script's main module again in
    each worker, so a script that starts loaders needs the ``if __name__ == "__main__":`` guard."""
    if start not in WORKER_STARTS:
        raise ConfigError(f"config key 'data.worker_start' must be one of {', '.join(WORKER_STARTS)}; got {start!r}")
    ctx = multiprocessing.get_context(start)
    if start == "forkserver":
        made_of += tuple(getattr(o, "tokenizer", None) for o in made_of)
        modules = {__name__} | {(o if isinstance(o, type) else type(o)).__module__ for o in made_of}
        ctx.set_forkserver_preload(sorted(modules - {"builtins", "__main__"}))
        # The resource tracker first: its own start unblocks SIGINT and SIGTERM when it is done.
        resource_tracker.ensure_running()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            forkserver.ensure_running()   # a no-op while this process's server is alive
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return ctx


def prestart_workers(start: str, dataset_type: type, decoder) -> None:
    """Start the loader workers' server now (``forkserver``: it imports torch and the data pipeline,
    seconds), so that it overlaps the model's and the engine's construction."""
    _worker_context(start, dataset_type, decoder)


def worker_loader(dataset: torch.utils.data.IterableDataset, workers: int, start: str = "forkserver",
                  **loader_kw) -> Iterator:
    """Iterate ``dataset`` (which yields whole batches) through ``workers`` loader processes
    (0: in this one), started by ``start`` (:func:`_worker_context`); the workers ignore SLURM's
    stop signals and end with this process (:func:`_worker_init`).

        batches = worker_loader(EvalStream(urls, decoder, 64, rank, world), workers=2)
    """
    if workers == 0:
        return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0, **loader_kw))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                            worker_init_fn=functools.partial(_worker_init, os.getpid()),
                                            multiprocessing_context=_worker_context(start, dataset, getattr(dataset, "decoder", None)),
                                            **loader_kw))


class ResumableStream:
    """Micro-batches for one rank, epoch after epoch, with a position that resumes exactly.

        stream = ResumableStream(urls, SampleDecoder(...), batch_size=64, num_samples=10000,
                                 seed=0, rank=r, world=w, workers=2, shuffle_buffer=1000,
                                 worker_start="forkserver")   # data.worker_start
        batch = stream.next()            # {"image"?, "input_ids", "attention_mask", "keys", ...}
        state["data"] = stream.position  # a plain dict: checkpoint it, pass it back as position=

    An epoch is ``num_samples // (batch_size * world)`` micro-batches; each epoch reseeds the
    shard and shuffle order. ``set_manifest`` switches to another selection of the data (an ECL
    round) and starts a new epoch there.
    """

    def __init__(self, urls, decoder, *, batch_size: int, num_samples: int, seed: int, rank: int, world: int,
                 workers: int, shuffle_buffer: int, manifest=None, position: dict | None = None,
                 stream_id: str = "pairs", worker_start: str = "forkserver"):
        self.urls, self.decoder, self.rank, self.world = list(urls), decoder, rank, world
        self.worker_start = worker_start
        self.batch_size, self.seed, self.workers, self.shuffle_buffer = batch_size, seed, workers, shuffle_buffer
        self.manifest, self.stream_id = manifest, stream_id
        self.per_epoch = max(1, num_samples // (batch_size * world))
        self.position = position or {"epoch": 0, "in_epoch": 0, "stream": {}, "skipped_before": 0}
        self._it = None

    def skipped_local(self) -> int:
        """Corrupt samples this rank's workers skipped, all epochs so far."""
        this_epoch = sum(int(v) for v in self.position["stream"].get("skipped", {}).values())
        return self.position["skipped_before"] + this_epoch

    def _loader(self):
        stream = TrainStream(self.urls, self.decoder, batch_size=self.batch_size, seed=self.seed,
                             epoch=self.position["epoch"], rank=self.rank, world=self.world, workers=self.workers,
                             shuffle_buffer=self.shuffle_buffer, manifest=self.manifest,
                             resume=self.position["stream"] or None, stream_id=self.stream_id)
        # Pinned batches (on a GPU machine): the step's copies to the device are asynchronous.
        return worker_loader(stream, self.workers, self.worker_start, prefetch_factor=4 if self.workers else None,
                             pin_memory=torch.cuda.is_available())

    def close(self) -> None:
        """Shut the loader's worker processes down now (the run is over or failing)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def _new_epoch(self) -> None:
        self.close()
        self.position = {"epoch": self.position["epoch"] + 1, "in_epoch": 0, "stream": {},
                         "skipped_before": self.skipped_local()}

    def set_manifest(self, manifest) -> None:
        """Read only ``manifest``'s samples from now on, starting a new epoch."""
        self.manifest = manifest
        self._new_epoch()

    def next(self) -> dict:
        if self.position["in_epoch"] >= self.per_epoch:
            self._new_epoch()
        if self._it is None:
            self._it = self._loader()
        batch = next(self._it)
        position_after(batch, self.position["stream"], max(1, self.workers))
        self.position["in_epoch"] += 1
        return batch


def seekable(url: str) -> bool:
    """A local uncompressed ``.tar`` (not a ``pipe:`` command, a remote URL or a ``.tar.gz``): its
    members can be skipped by seeking."""
    return not (url.startswith("pipe:") or "://" in url) and url.endswith(".tar")


def picked_samples(url: str, wanted, counter: _Counter, keys_only: bool = False) -> Iterator[dict]:
    """The samples of a local tar shard whose index ``i`` (0, 1, ... in the shard, as webdataset
    groups members by key) has ``wanted(i)``, as webdataset's sample dicts; the other samples'
    data is seeked over, never read (only their 512-byte headers are); ``keys_only``: no data at
    all, ``{"__key__", "__url__"}`` per wanted sample.

        picked_samples("val-000000.tar", lambda i: i % 4 == 1, _Counter())   # a quarter of the bytes
    """
    try:
        with open(url, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
            index, prefix, sample = -1, None, None
            for info in tf:
                tf.members = []   # headers only, not a list of every member of the shard
                if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
                    continue
                key, ext = tariterators.base_plus_ext(info.name)
                if key is None:
                    continue
                if key != prefix:
                    if sample is not None and (len(sample) > 2 or keys_only):
                        yield sample
                    index, prefix, sample = index + 1, key, None
                    if wanted(index):
                        sample = {"__key__": key, "__url__": url}
                if sample is not None and not keys_only:
                    sample[ext.lower()] = tf.extractfile(info).read()
            if sample is not None and (len(sample) > 2 or keys_only):
                yield sample
    except (OSError, tarfile.TarError, EOFError) as err:   # an unreadable shard: skipped and counted
        counter.handler(ValueError(f"{type(err).__name__}: {err} @ {url}", url))


def _eval_samples(urls: list[str], rank: int, world: int, counter: _Counter, worker: int = 0,
                  workers: int = 1) -> Iterator[dict]:
    """What loader worker ``worker`` of ``workers`` on ``rank`` reads of the validation set. With at
    least as many shards as ranks, rank ``r`` reads shards ``r, r + world, ...`` (its workers
    every ``workers``-th of those); with fewer, the samples are split: reader ``rank + world *
    worker`` of ``world * workers`` reads every ``world * workers``-th sample of each shard (so
    rank ``r`` holds the samples with ``i % world == r``), seeking over the others' data in local
    files (a ``pipe:`` stream is read through, and filtered)."""
    if len(urls) >= world:
        yield from _raw_samples(urls[rank::world][worker::workers], counter, None)
        return
    readers, me = world * workers, rank + world * worker
    for url in urls:
        if seekable(url):
            yield from picked_samples(url, lambda i: i % readers == me, counter)
            continue
        members = tariterators.tarfile_samples([{"url": url}], handler=counter.handler)
        for i, sample in enumerate(members):
            if i % readers == me:
                yield sample


class EvalStream(torch.utils.data.IterableDataset):
    """This rank's share of the validation set as decoded batches (``image``, ``input_ids``,
    ``attention_mask``, ``label``, ``keys``); under a DataLoader each worker reads and decodes its
    part (:func:`_eval_samples`), so the main process only runs the model."""

    def __init__(self, urls: list[str], decoder: SampleDecoder, batch_size: int, rank: int, world: int):
        super().__init__()
        self.urls, self.decoder, self.batch_size, self.rank, self.world = list(urls), decoder, batch_size, rank, world

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter, decoder = _Counter(), self.decoder
        images, captions, labels, keys = [], [], [], []

        def batch():
            return {"image": torch.stack(images), **decoder.tokenize(captions), "label": torch.tensor(labels),
                    "keys": list(keys)}
        for sample in _eval_samples(self.urls, self.rank, self.world, counter, worker, workers):
            try:
                pixels, caption, label = decoder(sample)
            except Exception as err:  # noqa: BLE001
                counter.bad_sample(sample.get("__key__", "?"), err)
                continue
            images.append(pixels)
            captions.append(caption)
            labels.append(label)
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield batch()
                images, captions, labels, keys = [], [], [], []
        if images:
            yield batch()


def eval_batches(urls: list[str], decoder: SampleDecoder, batch_size: int, rank: int,
                 world: int, workers: int = 0, start: str = "forkserver") -> Iterator[dict]:
    """This rank's share of the validation set as batches with ``label`` (:class:`EvalStream`),
    decoded in ``workers`` loader processes started by ``start`` (0: in this one; see
    :func:`worker_loader`). Every sample is in exactly one rank's share; with ``workers`` the order
    of the batches is the workers' round robin."""
    return worker_loader(EvalStream(urls, decoder, batch_size, rank, world), workers, start)


def load_tokenizer(path: str | None):
    """A local tokenizer directory (never a hub download)."""
    from transformers import AutoTokenizer

    if path is None:
        raise ConfigError("config key 'tokenizer.path' is empty; give a local tokenizer directory "
                          "(make-demo-data writes one under DIR/tokenizer)")
    if not Path(path).is_dir():
        raise ConfigError(f"config key 'tokenizer.path': directory not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - a user's directory that is not a tokenizer
        raise ConfigError(f"config key 'tokenizer.path': {path} is not a tokenizer directory that "
                          f"transformers.AutoTokenizer loads ({type(err).__name__}: {err})") from None
