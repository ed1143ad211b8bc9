"""WebDataset pipelines over img2dataset-layout shards (``KEY.jpg|png`` + ``KEY.txt`` + ``KEY.json``).

Training (``TrainStream``): shards resampled with replacement, a shuffle buffer, decode + CLIP
augmentation + tokenisation in loader workers, batches assembled in the workers. Every random
choice is a pure function of ``(seed, epoch, rank, logical worker, sample index)``, and each batch
carries its worker's read position: the shard it is reading (which draw, how many samples in), the
shuffle buffer's samples as ``(draw, member, key)`` and the shuffle RNG's state. A resumed run
rebuilds the stream, rotates the worker order to where it stopped, and each worker re-reads only
the current shard up to its position and the samples its buffer held (verified by key), so it sees
the samples and augmentations the uninterrupted run would have seen without replaying the epoch.

Evaluation (``eval_batches``): each rank reads its share (by shard when there are enough shards,
else every world-th sample), in order, with the deterministic eval transform.

A corrupt sample or unreadable shard is skipped, counted (``skipped`` in each batch, reported as
``data/skipped``) and logged once; it never stops the run.
"""
from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import logging
import os
import random
import signal
from pathlib import Path
from typing import Iterator

import torch
from braceexpand import braceexpand
from PIL import Image
from torchvision import transforms as T
from webdataset import tariterators

from .config import ConfigError
from .model import preset_shape

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


def read_manifest(path: str | None, urls: list[str] | None = None):
    """``data.manifest``: ``None`` keeps everything; a ``select`` output directory (or its
    ``manifest.txt``, whose ``index.json`` sits next to it) gives a :class:`ShardManifest`; any
    other file of kept keys, one per line (``#`` comments allowed), a :class:`KeyManifest`.
    With ``urls``, every training shard must be in a :class:`ShardManifest`'s index."""
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
    with open(p) as fh:
        return KeyManifest(frozenset(line.strip() for line in fh if line.strip() and not line.startswith("#")))


def build_transforms(image_size: int, mean, std, crop_scale_min: float, train: bool):
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if train:
        return T.Compose([T.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0),
                                              interpolation=T.InterpolationMode.BICUBIC), *norm])
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), *norm])


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
        self.drawn = [c["url"] for c in carry] + [shard_rng.choice(urls)
                                                  for _ in range(int(record["draw"]) + 1 - len(carry))]

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
    return (carry + [rng.choice(urls) for _ in range(max(0, n - len(carry)))])[:n]


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


def eval_decoder(cfg, tokenizer) -> "SampleDecoder":
    """The deterministic decoder of evaluation (and of ECL scoring): resize, centre crop."""
    shape = preset_shape(cfg.model)
    return SampleDecoder(tokenizer, shape["context_length"], build_transforms(
        shape["image_size"], cfg.data.image_mean, cfg.data.image_std, 1.0, train=False))


def dummy_batch(decoder: "SampleDecoder", image_size: int) -> dict:
    """A one-sample batch for a rank out of work in a lockstep pass (ZeRO-3 gathers per forward)."""
    return {"image": torch.zeros(1, 3, image_size, image_size), **decoder.tokenize([""]),
            "label": torch.tensor([-1])}


def ignore_stop_signals(_worker_id: int) -> None:
    """Loader-worker init: SLURM signals every process of a job step, loader workers included;
    torch's worker handler would die on a SIGTERM that is not from its parent and take the rank
    down before it can checkpoint. Only the main process acts on USR1/TERM/INT."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class ResumableStream:
    """Micro-batches for one rank, epoch after epoch, with a position that resumes exactly.

        stream = ResumableStream(urls, SampleDecoder(...), batch_size=64, num_samples=10000,
                                 seed=0, rank=r, world=w, workers=2, shuffle_buffer=1000)
        batch = stream.next()            # {"image"?, "input_ids", "attention_mask", "keys", ...}
        state["data"] = stream.position  # a plain dict: checkpoint it, pass it back as position=

    An epoch is ``num_samples // (batch_size * world)`` micro-batches; each epoch reseeds the
    shard and shuffle order. ``set_manifest`` switches to another selection of the data (an ECL
    round) and starts a new epoch there.
    """

    def __init__(self, urls, decoder, *, batch_size: int, num_samples: int, seed: int, rank: int, world: int,
                 workers: int, shuffle_buffer: int, manifest=None, position: dict | None = None,
                 stream_id: str = "pairs"):
        self.urls, self.decoder, self.rank, self.world = list(urls), decoder, rank, world
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
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.workers,
                                                worker_init_fn=ignore_stop_signals,
                                                prefetch_factor=4 if self.workers else None))

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


def _eval_samples(urls: list[str], rank: int, world: int, counter: _Counter) -> Iterator[dict]:
    if len(urls) >= world:
        yield from _raw_samples(urls[rank::world], counter, None)
        return
    for i, sample in enumerate(_raw_samples(urls, counter, None)):
        if i % world == rank:
            yield sample


def eval_batches(urls: list[str], decoder: SampleDecoder, batch_size: int, rank: int,
                 world: int) -> Iterator[dict]:
    """This rank's share of the validation set, in order, as batches with ``label``."""
    counter = _Counter()
    images, captions, labels, keys = [], [], [], []

    def batch():
        return {"image": torch.stack(images), **decoder.tokenize(captions), "label": torch.tensor(labels),
                "keys": list(keys)}
    for sample in _eval_samples(urls, rank, world, counter):
        try:
            pixels, caption, label = decoder(sample)
        except Exception as err:  # noqa: BLE001
            counter.bad_sample(sample.get("__key__", "?"), err)
            continue
        images.append(pixels)
        captions.append(caption)
        labels.append(label)
        keys.append(sample["__key__"])
        if len(images) == batch_size:
            yield batch()
            images, captions, labels, keys = [], [], [], []
    if images:
        yield batch()


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
