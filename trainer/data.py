"""WebDataset pipelines over img2dataset-layout shards (``KEY.jpg|png`` + ``KEY.txt`` + ``KEY.json``).

Training (``TrainStream``): shards resampled with replacement, a shuffle buffer, decode + CLIP
augmentation + tokenisation in loader workers, batches assembled in the workers. Every random
choice is a pure function of ``(seed, epoch, rank, logical worker, sample index)``, and each batch
carries its worker's count of raw samples consumed. A resumed run rebuilds the stream, rotates
the worker order to where it stopped and skips exactly the raw samples already consumed (before
decoding), so it sees the samples and augmentations the uninterrupted run would have seen.

Evaluation (``eval_batches``): each rank reads its share (by shard when there are enough shards,
else every world-th sample), in order, with the deterministic eval transform.

A corrupt sample or unreadable shard is skipped, counted (``skipped`` in each batch, reported as
``data/skipped``) and logged once; it never stops the run.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import random
from pathlib import Path
from typing import Iterator

import torch
from braceexpand import braceexpand
from PIL import Image
from torchvision import transforms as T
from webdataset import tariterators

from .config import ConfigError

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


def read_manifest(path: str | None) -> frozenset[str] | None:
    """Kept sample keys, one per line (``#`` comments allowed); ``None`` keeps everything."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ConfigError(f"config key 'data.manifest': file not found: {path}")
    with open(path) as fh:
        return frozenset(line.strip() for line in fh if line.strip() and not line.startswith("#"))


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


def _raw_samples(urls, counter: _Counter, manifest, max_empty_shards: int = 100) -> Iterator[dict]:
    """Samples shard by shard (never grouped across shard boundaries), filtered by the manifest.
    A shard that yields no sample at all (empty, or unreadable from the start) counts as skipped."""
    empty = 0
    for url in urls:
        n_raw = n_kept = 0
        errors_before = counter.skipped
        for sample in tariterators.tarfile_samples([{"url": url}], handler=counter.handler):
            n_raw += 1
            if manifest is None or sample["__key__"] in manifest:
                n_kept += 1
                yield sample
        if n_raw == 0 and counter.skipped == errors_before:
            counter.handler(ValueError("shard holds no sample", url))
        empty = 0 if n_kept else empty + 1
        if empty >= max_empty_shards:  # resampling would otherwise spin forever
            raise RuntimeError(f"no usable sample in the last {empty} shard reads (last: {url}); "
                               "the shards are unreadable or data.manifest keeps none of their keys")


def _shuffled(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(len(buf))
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


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


class TrainStream(torch.utils.data.IterableDataset):
    """Infinite, resumable stream of training batches for one rank and one epoch.

        stream = TrainStream(urls, decoder, batch_size=64, seed=0, epoch=0, rank=r, world=w,
                             workers=2, shuffle_buffer=1000, resume=None)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)

    ``resume`` is ``{"worker_offset": k, "consumed": {logical_worker: n}, "skipped": {...}}`` as
    returned by :meth:`position_after`.
    """

    def __init__(self, urls, decoder: SampleDecoder, *, batch_size: int, seed: int, epoch: int,
                 rank: int, world: int, workers: int, shuffle_buffer: int, manifest=None, resume=None):
        super().__init__()
        self.urls, self.decoder, self.batch_size = list(urls), decoder, batch_size
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.n_logical = max(1, workers)
        self.shuffle_buffer, self.manifest = shuffle_buffer, manifest
        self.resume = resume or {"worker_offset": 0, "consumed": {}, "skipped": {}}

    def _logical_worker(self) -> int:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        return (wid + self.resume["worker_offset"]) % self.n_logical

    def __iter__(self) -> Iterator[dict]:
        w = self._logical_worker()
        base = (self.seed, self.epoch, self.rank, w)
        shard_rng, shuffle_rng = random.Random(_seed("shards", *base)), random.Random(_seed("shuffle", *base))
        counter = _Counter()
        urls = iter(lambda: shard_rng.choice(self.urls), None)  # resampled, with replacement
        samples = _shuffled(_raw_samples(urls, counter, self.manifest), self.shuffle_buffer, shuffle_rng)
        consumed = int(self.resume["consumed"].get(str(w), 0))
        for _ in range(consumed):  # resume: skip raw samples already trained on, undecoded
            next(samples)
        # The replay read exactly the raw data the interrupted run had read when it saved, so it
        # met the same unreadable entries again; the saved count already holds them (and the
        # corrupt samples it decoded), so it replaces the replay's count instead of adding to it.
        counter.skipped = int(self.resume["skipped"].get(str(w), 0))
        images, captions, keys = [], [], []
        for sample in samples:
            consumed += 1
            try:
                pixels, caption, _ = self.decoder(sample, seed=_seed("aug", *base, consumed))
            except Exception as err:  # noqa: BLE001 - any decode failure is a corrupt sample
                counter.bad_sample(sample.get("__key__", "?"), err)
                continue
            images.append(pixels)
            captions.append(caption)
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield {"image": torch.stack(images), **self.decoder.tokenize(captions), "keys": keys,
                       "worker": w, "consumed": consumed, "skipped": counter.skipped}
                images, captions, keys = [], [], []


def position_after(batch_meta: dict, state: dict, n_logical: int) -> dict:
    """Update a stream position with a consumed batch's worker counters (trainer state)."""
    w = str(batch_meta["worker"])
    state.setdefault("consumed", {})[w] = int(batch_meta["consumed"])
    state.setdefault("skipped", {})[w] = int(batch_meta["skipped"])
    state["worker_offset"] = (int(batch_meta["worker"]) + 1) % n_logical
    return state


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
