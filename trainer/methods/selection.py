"""EfficientCLIP's ensemble confident learning (ECL, docs/methods.md): score every pair with
an ensemble, keep the best-scoring fraction of the current subset, train on that.

    python -m trainer select --checkpoints runs/a runs/b --shards data/train --out runs/sel --keep 0.7
    torchrun --nproc_per_node 8 -m trainer select ...                 # each rank scores its share
    sbatch --array 0-15 slurm/run.sbatch python -m trainer select ... # each array task its share
    python -m trainer train ... data.manifest=runs/sel                # train on the kept pairs

The score of pair ``i`` is ``c_i = sum_k s^(k)_i`` over the checkpoints given, plus the scores
carried over from earlier selections (``--scores-from``: the temporal ensemble of the public code,
where each epoch's model adds its scores to the running sum). A member's ``s_i`` is, by default,
confident learning's self-confidence (:func:`self_confidence`: the pair's log-softmax against a
candidate pool, the first ``pool`` pairs, both directions, at logits ``100 * cos``), or, with the
``cosine`` score, the public code's ``cos(f_I(x_i), f_T(t_i))`` (docs/methods.md has the measurements).
The kept set is the top ``keep`` fraction of the current subset by score (rank-based, ties broken
by data order; the public code keeps 0.9 per round), or everything at or above an absolute
``threshold`` or the score at a ``percentile`` of the subset.

Work is split in units, a shard each (a slice of every ``parts``-th sample of a shard when the
ranks outnumber the shards); rank ``r`` of ``w`` scores units ``r, r + w, ...``. Each unit is
written atomically to ``OUT/parts/`` when done, so a killed pass resumes by skipping the units
present, and nothing is scored twice. Ranks in a process group (training, ``select`` under
torchrun/srun) merge together, each its own shards (:func:`merge_distributed`); otherwise whoever
finishes the last unit merges (:func:`merge`, under a file lock). Either way:

    OUT/scores.jsonl   {"key", "score"} per scored sample, shard by shard, in shard order
    OUT/manifest.txt   the kept keys, shard by shard (what ``data.manifest`` reads)
    OUT/index.json     each shard's byte range in manifest.txt and in scores.jsonl: a loader
                       worker reads one shard's kept keys when it opens the shard, a later
                       round one shard's carried scores (memory per process: one shard)
    OUT/summary.json   written last, so its presence marks a finished selection: total, kept,
                       keep, checkpoints; with ``"noisy"`` in the shards' JSON, precision and
                       recall of the dropped set and the ROC AUC of the scores

Inside training (``select.enabled``), :class:`Selection` runs a round every ``select.every_steps``
(default: every epoch of the paired stream) with the model being trained, in lockstep across
ranks (ZeRO-3 gathers parameters in every forward), carrying the previous round's scores.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import heapq
import json
import logging
import os
import signal
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as tdist
from webdataset import tariterators

from .. import data as D
from ..config import Config, ConfigError
from ..dist import all_reduce_flags, barrier, comm_device, from_rank0, is_main, launch_env, rank as this_rank
from ..faults import StopRequested
from ..flops import pair_flops
from ..model import preset_shape
from .base import Inherited, Method, MethodSpec
from .evit import keep_rate

log = logging.getLogger("trainer.select")
FORMAT = "trainer-selection/1"
FREE_QUEUE = 1024


# ----------------------------------------------------------------------------- the rule

@dataclass(frozen=True)
class Rule:
    """Which scored samples survive: the top ``keep`` fraction, or ``score >= threshold``, or
    ``score >=`` the ``percentile``-th percentile of the subset's scores."""
    keep: float | None = 0.9
    threshold: float | None = None
    percentile: float | None = None

    def describe(self) -> dict:
        return {k: v for k, v in (("keep", self.keep), ("threshold", self.threshold),
                                  ("percentile", self.percentile)) if v is not None}

    def kept_mask(self, scores: np.ndarray) -> np.ndarray:
        if self.threshold is not None:
            return scores >= self.threshold
        if self.percentile is not None:
            return scores >= np.percentile(scores, self.percentile) if scores.size else scores > 0
        k = int(round(self.keep * scores.size))
        mask = np.zeros(scores.size, dtype=bool)
        mask[np.argsort(-scores, kind="stable")[:k]] = True   # ties: the earlier sample first
        return mask


def make_rule(keep: float | None, threshold: float | None, percentile: float | None, where: str) -> Rule:
    """The one rule given (none: keep 0.9, the public code's per-round fraction)."""
    given = [n for n, v in (("keep", keep), ("threshold", threshold), ("percentile", percentile)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}: give one of keep, threshold, percentile; got {', '.join(given)}")
    if keep is not None and not 0.0 < keep <= 1.0:
        raise ConfigError(f"{where}: keep must be in (0, 1]; got {keep}")
    if percentile is not None and not 0.0 <= percentile < 100.0:
        raise ConfigError(f"{where}: percentile must be in [0, 100); got {percentile}")
    if threshold is not None or percentile is not None:
        return Rule(keep=None, threshold=threshold, percentile=percentile)
    return Rule(keep=0.9 if keep is None else keep)


# ----------------------------------------------------------------------------- work units

@dataclass(frozen=True)
class Unit:
    shard: int   # index into the shard list
    part: int    # this unit scores the samples with index % parts == part
    parts: int

    @property
    def name(self) -> str:
        return f"{self.shard:06d}-{self.part}of{self.parts}"


def work_units(n_shards: int, world: int) -> list[Unit]:
    """A unit per shard; when the ranks outnumber the shards, each shard split into as many
    interleaved slices as it takes for every rank to have one."""
    parts = 1 if n_shards >= world else -(-world // n_shards)
    return [Unit(s, j, parts) for s in range(n_shards) for j in range(parts)]


def share(units: list[Unit], rank: int, world: int) -> list[Unit]:
    return units[rank::world]


def launch_share() -> tuple[int, int]:
    """``(rank, world)`` of this scoring process: torchrun/srun ranks, times SLURM array tasks
    (task ``t`` of an array of ``n`` with ``p`` ranks each is ranks ``t*p .. t*p + p - 1``)."""
    le = launch_env()
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        return task * le.world_size + le.rank, count * le.world_size
    return le.rank, le.world_size


# ----------------------------------------------------------------------------- scoring

def _noisy(sample: dict):
    if "json" not in sample:
        return None
    try:
        flag = json.loads(sample["json"]).get("noisy")
    except (ValueError, AttributeError):
        return None
    return None if flag is None else bool(flag)


class UnitStream(torch.utils.data.IterableDataset):
    """Reading and decoding of scoring units, for a DataLoader's workers (worker ``w`` of ``n``
    takes units ``w, w + n, ...``): per unit, messages ``{"unit": j, "records": [...new records],
    "positions": [...], "batch": {...}}`` (positions index the unit's records so far) and a last one
    with ``"done": (skipped, seconds)``. :func:`_unit_events` puts the records back together."""

    def __init__(self, urls: list[str], units: list[Unit], decoder: D.SampleDecoder, subset, batch_size: int):
        super().__init__()
        self.urls, self.units, self.decoder, self.subset, self.batch_size = urls, units, decoder, subset, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j in range(worker, len(self.units), workers):
            yield from self._unit(j)

    def _unit(self, j: int) -> Iterator[dict]:
        unit, decoder = self.units[j], self.decoder
        t0 = time.perf_counter()
        url = self.urls[unit.shard]
        counter = D._Counter()
        keep = None if self.subset is None else self.subset.keys_for(url)
        new: list[dict] = []
        n_records = 0
        items, positions = [], []
        for i, sample in enumerate(tariterators.tarfile_samples([{"url": url}], handler=counter.handler)):
            if i % unit.parts != unit.part:
                continue
            key = sample["__key__"]
            new.append({"i": i, "key": key, "score": None, "noisy": _noisy(sample)})
            n_records += 1
            if keep is not None and key not in keep:
                continue          # not in the current subset: counted, not scored
            try:
                pixels, caption, _ = decoder(sample)
            except Exception as err:  # noqa: BLE001 - a corrupt sample is skipped and counted
                counter.bad_sample(key, err)
                new[-1]["corrupt"] = True
                continue
            items.append((pixels, caption))
            positions.append(n_records - 1)
            if len(items) == self.batch_size:
                yield {"unit": j, "records": new, "positions": positions, "batch": decoder.collate(items)}
                new, items, positions = [], [], []
        if items:
            yield {"unit": j, "records": new, "positions": positions, "batch": decoder.collate(items)}
            new = []
        yield {"unit": j, "records": new, "done": (counter.skipped, time.perf_counter() - t0)}


def _unit_events(urls: list[str], units: list[Unit], decoder: D.SampleDecoder, subset, batch_size: int,
                 done: Callable[[Unit], bool], workers: int = 0, start: str = "forkserver") -> Iterator[tuple]:
    """``("batch", records, positions, batch)`` to score, then ``("done", unit, records, skipped,
    seconds)`` once per unit (after all of its batches were scored; ``seconds``: the unit's wall
    time, reading, decoding and scoring). Units already done are passed over. Reading and
    decoding run in ``workers`` loader processes started by ``start`` (0: in this one;
    ``D.worker_loader``); units of several workers
    interleave, each unit's events in order."""
    todo = [u for u in units if not done(u)]
    stream = UnitStream(urls, todo, decoder, subset, batch_size)
    messages = D.worker_loader(stream, min(workers, len(todo)), start)
    records: dict[int, list[dict]] = {}
    for msg in messages:
        mine = records.setdefault(msg["unit"], [])
        mine.extend(msg["records"])
        if "done" in msg:
            skipped, seconds = msg["done"]
            yield "done", todo[msg["unit"]], records.pop(msg["unit"]), skipped, seconds
        else:
            yield "batch", mine, msg["positions"], msg["batch"]


def self_confidence(img: torch.Tensor, txt: torch.Tensor, pool_img: torch.Tensor, pool_txt: torch.Tensor,
                    temperature: float, same: torch.Tensor | None = None) -> torch.Tensor:
    """Confident learning's self-confidence of each pair (float64): the log-probability that the
    image picks its own caption among the caption and the pool's captions, and that the caption
    picks its own image among the image and the pool's images, at logits ``temperature * cos``,
    averaged over the two directions. ``same[i, j]``: pool entry ``j`` is pair ``i`` itself (left
    out, so that it is not its own competitor). Embeddings are L2-normalised, ``[B, d]`` / ``[P, d]``."""
    img, txt, pool_img, pool_txt = (x.double() for x in (img, txt, pool_img, pool_txt))
    own = temperature * (img * txt).sum(-1)
    i2t, t2i = temperature * img @ pool_txt.T, temperature * txt @ pool_img.T
    if same is not None:
        i2t, t2i = i2t.masked_fill(same, float("-inf")), t2i.masked_fill(same, float("-inf"))
    lse_i2t = torch.logsumexp(torch.cat([own[:, None], i2t], 1), 1)
    lse_t2i = torch.logsumexp(torch.cat([own[:, None], t2i], 1), 1)
    return ((own - lse_i2t) + (own - lse_t2i)) / 2


@dataclass(frozen=True)
class Score:
    """What a pair's score is, per member (the ensemble sums the members' scores):
    ``cosine``: ``cos(f_I(x), f_T(t))``, the public code's; ``selfconf``: :func:`self_confidence`
    against the first ``pool`` pairs to score, at logits ``temperature * cos`` (None: the member's
    own logit scale)."""
    kind: str = "selfconf"
    temperature: float | None = 100.0
    pool: int = 1024

    def describe(self) -> dict:
        return {"score": self.kind} if self.kind == "cosine" else \
            {"score": self.kind, "temperature": self.temperature or "logit scale", "pool": self.pool}


SCORES = ("selfconf", "cosine")


def make_score(kind: str, temperature: float | None, pool: int, where: str) -> Score:
    if kind not in SCORES:
        raise ConfigError(f"{where}: score must be one of {', '.join(SCORES)}; got {kind!r}")
    if temperature is not None and not temperature > 0:
        raise ConfigError(f"{where}: temperature must be > 0 (or null: the model's logit scale); got {temperature}")
    if pool < 1:
        raise ConfigError(f"{where}: pool must be >= 1; got {pool}")
    return Score(kind, temperature, pool)


def score_of(cfg: Config) -> Score:
    sc = cfg.select
    return make_score(sc.score, sc.temperature, sc.pool, "config section 'select'")


def candidate_pool(urls: list[str], decoder: D.SampleDecoder, subset, size: int,
                   batch_size: int = 256) -> Iterator[tuple[list[str], dict]]:
    """The first ``size`` decodable samples of the shards (of the subset), in shard order, as
    ``(keys, batch)`` of up to ``batch_size``: the competitors of every pair's self-confidence,
    the same on every rank."""
    keys, items, n = [], [], 0
    for url in urls:
        keep = None if subset is None else subset.keys_for(url)
        for sample in tariterators.tarfile_samples([{"url": url}], handler=D._Counter().handler):
            if keep is not None and sample["__key__"] not in keep:
                continue
            try:
                pixels, caption, _ = decoder(sample)
            except Exception:  # noqa: BLE001 - a corrupt sample is no competitor (scoring counts it)
                continue
            keys.append(sample["__key__"])
            items.append((pixels, caption))
            n += 1
            if len(items) == batch_size or n == size:
                yield keys, decoder.collate(items)
                keys, items = [], []
            if n == size:
                return
    if items:
        yield keys, decoder.collate(items)


@torch.no_grad()
def _embed(model, batch: dict, device, dtype, pixels=D.to_model_pixels) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One member's ``(image, text, logit scale)`` for a batch, float32 on the CPU, at full
    capacity (an ECLIPSE student's expedition is switched off). ``pixels``: ``D.model_pixels(cfg)``
    (uint8 images normalised on the device)."""
    with keep_rate(model, 1.0):
        img, txt, scale, *_ = model(pixel_values=pixels(batch["image"], device, dtype),
                                    input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device))
    return img.float().cpu(), txt.float().cpu(), float(scale)


class Scorer:
    """A batch's ensemble scores (float64) under :class:`Score`; with ``selfconf``, each member
    first embeds the candidate pool (``pool`` forwards, the same on every rank)."""

    def __init__(self, models: list, score: Score, device, dtype, pool: Iterator[tuple[list[str], dict]] = (),
                 pixels=D.to_model_pixels):
        self.models, self.score, self.device, self.dtype, self.pixels = models, score, device, dtype, pixels
        self.pool_keys: dict[str, int] = {}
        self.pools: list[tuple[torch.Tensor, torch.Tensor]] = []
        if score.kind == "selfconf":
            keys, parts = [], [[] for _ in models]
            for chunk_keys, batch in pool:
                keys += chunk_keys
                for k, model in enumerate(models):
                    parts[k].append(_embed(model, batch, device, dtype, pixels)[:2])
            if not keys:
                raise ConfigError("select: no sample was scored: the shards (of the subset) hold no decodable "
                                  "image-caption pair, not even for the self-confidence's candidate pool")
            self.pool_keys = {key: j for j, key in enumerate(keys)}
            self.pools = [(torch.cat([p[0] for p in mine]), torch.cat([p[1] for p in mine])) for mine in parts]

    def __call__(self, batch: dict, keys: list[str] | None = None) -> torch.Tensor:
        n = batch["input_ids"].shape[0]
        total = torch.zeros(n, dtype=torch.float64)
        same = None
        if self.score.kind == "selfconf":
            same = torch.zeros(n, len(self.pool_keys), dtype=torch.bool)
            for i, key in enumerate(keys or []):
                if key in self.pool_keys:
                    same[i, self.pool_keys[key]] = True
        for k, model in enumerate(self.models):
            img, txt, scale = _embed(model, batch, self.device, self.dtype, self.pixels)
            if self.score.kind == "cosine":
                total += (img * txt).sum(-1).double()
            else:
                t = self.score.temperature if self.score.temperature is not None else scale
                total += self_confidence(img, txt, *self.pools[k], t, same)
        return total


def score_units(models: list, urls: list[str], units: list[Unit], decoder: D.SampleDecoder, out: Path, *,
                source: str, device, dtype=torch.float32, subset=None, batch_size: int = 256,
                lockstep: bool = False, dummy: dict | None = None, on_unit: Callable[[Unit], None] | None = None,
                score: Score = Score("cosine"), should_stop: Callable[[], bool] | None = None,
                workers: int = 0, worker_start: str = "forkserver", pixels=D.to_model_pixels) -> int:
    """Score this process's ``units`` into ``out/parts/UNIT.jsonl``; returns the units written.
    ``pixels``: how a batch's images become the model's input (``D.model_pixels(cfg)`` for the
    uint8 images of ``D.eval_decoder``).

    ``source`` identifies what is scored with (checkpoints, subset, precision): a part written
    from another source is scored again. ``lockstep``: every rank runs the same number of
    forwards (a rank out of work runs ``dummy``), as ZeRO-3's parameter gathering needs, and
    ``should_stop()`` true on any rank raises ``StopRequested`` on every rank at the same forward
    (the units written so far are kept and not scored again). ``workers``: loader processes that
    read and decode the units (0: this process; ``worker_start``: ``data.worker_start``), so the
    scoring process only runs the models."""
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    todo = [u for u in units if _part_source(parts, u) != source]
    if not todo and not lockstep:
        return 0
    pool = candidate_pool(urls, decoder, subset, score.pool, batch_size) if score.kind == "selfconf" else ()
    scorer = Scorer(models, score, device, dtype, pool, pixels)
    events = _unit_events(urls, units, decoder, subset, batch_size, lambda u: _part_source(parts, u) == source,
                          workers, worker_start)
    written = 0
    while True:
        ev = next(events, None)
        while ev is not None and ev[0] == "done":
            _, unit, records, skipped, seconds = ev
            header = {"format": FORMAT, "unit": unit.name, "url": urls[unit.shard], "source": source,
                      "samples": len(records), "scored": sum(r["score"] is not None for r in records),
                      "skipped": skipped, "seconds": seconds, "models": len(models)}
            _write_lines(parts / f"{unit.name}.jsonl", [header, *records])
            written += 1
            if on_unit is not None:
                on_unit(unit)
            ev = next(events, None)
        if lockstep:
            anyone, stop = all_reduce_flags(float(ev is not None), float(bool(should_stop and should_stop())))
            if stop:
                raise StopRequested
            if not anyone:
                break
        elif ev is None:
            break
        if ev is not None:
            _, records, positions, batch = ev
            sc = scorer(batch, [records[pos]["key"] for pos in positions])
            for pos, c in zip(positions, sc.tolist()):
                records[pos]["score"] = c
        else:
            scorer(dummy)
    return written


def _write_lines(path: Path, rows) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _part_source(parts: Path, unit: Unit) -> str | None:
    path = parts / f"{unit.name}.jsonl"
    if not path.is_file():
        return None
    with open(path) as fh:
        try:
            return json.loads(fh.readline()).get("source")
        except ValueError:
            return None


def missing_units(out: Path, units: list[Unit], source: str) -> list[Unit]:
    return [u for u in units if _part_source(out / "parts", u) != source]


# ----------------------------------------------------------------------------- merging

class CarriedScores(D.ShardManifest):
    """An earlier selection's ``scores.jsonl``, read one shard at a time through its index."""

    def __init__(self, directory):
        directory = Path(directory)
        if not (directory / "summary.json").is_file():
            raise ConfigError(f"--scores-from {directory}: not a finished selection (no summary.json)")
        super().__init__(directory)
        index = json.loads((directory / "index.json").read_text())
        self.score_ranges = {D.canonical_url(s["url"]): tuple(s["scores"]) for s in index["shards"]}

    def scores_for(self, url: str) -> dict[str, float]:
        entry = self.resolve(url)
        if entry is None:
            raise ConfigError(f"--scores-from {self.dir}: it holds no scores of shard {url}")
        start, end = self.score_ranges[entry]
        with open(self.dir / "scores.jsonl", "rb") as fh:
            fh.seek(start)
            return {r["key"]: r["score"] for r in map(json.loads, fh.read(end - start).decode().splitlines())}


def _unit_records(path: Path) -> Iterator[dict]:
    with open(path) as fh:
        fh.readline()
        for line in fh:
            yield json.loads(line)


def _label(rec: dict) -> int:
    """The record's noise label as stored in the arrays: 1 noisy, 0 clean, -1 unknown."""
    return -1 if rec["noisy"] is None else int(rec["noisy"])


def _shard_scores(parts: Path, mine: list[Unit], url: str, carried: list[CarriedScores],
                  counts: dict) -> Iterator[tuple[dict, float | None]]:
    """One shard's records from its units' parts, in sample order, each with its total score (its
    own plus the carried rounds'; None for a sample that was not scored). Adds the units' header
    counts (skipped, seconds) and the unscored and corrupt samples to ``counts``; the single-process
    and the distributed merge both read the parts through this."""
    carried_s = [c.scores_for(url) for c in carried]
    for u in mine:
        with open(parts / f"{u.name}.jsonl") as fh:
            header = json.loads(fh.readline())
        counts["skipped"] += int(header["skipped"])
        counts["seconds"] += float(header.get("seconds", 0.0))
    for rec in heapq.merge(*[_unit_records(parts / f"{u.name}.jsonl") for u in mine], key=lambda r: r["i"]):
        if rec["score"] is None:
            counts["unscored"] += 1
            counts["corrupt"] += bool(rec.get("corrupt"))
            yield rec, None
            continue
        total = rec["score"]
        for c, cs in zip(carried, carried_s):
            if rec["key"] not in cs:
                raise ConfigError(f"--scores-from {c.dir}: no score for sample {rec['key']} of {url} "
                                  "(the earlier selection scored other data)")
            total += cs[rec["key"]]
        yield rec, total


def _auc(scores: np.ndarray, noisy: np.ndarray) -> float | None:
    """ROC AUC of the score as a detector of clean pairs (P(score_clean > score_noisy), ties
    counted half): Mann-Whitney U over average ranks."""
    n_pos, n_neg = int((~noisy).sum()), int(noisy.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[~noisy].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _dropped_stats(noisy_dropped: int, dropped: int, noisy_total: int) -> dict:
    return {"precision": noisy_dropped / dropped if dropped else None,
            "recall": noisy_dropped / noisy_total if noisy_total else None}


def merge(out: Path, urls: list[str], units: list[Unit], *, source: str, rule: Rule, carried: list[CarriedScores],
          meta: dict) -> dict:
    """Combine the parts into scores.jsonl, manifest.txt, index.json and (last) summary.json."""
    t_merge = time.perf_counter()
    parts = out / "parts"
    missing = missing_units(out, units, source)
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} unit(s) not scored yet (first: {missing[0].name})")
    scores, noisy, in_shards_noisy = array("d"), array("b"), array("b")
    shard_entries = []
    counts = {"skipped": 0, "seconds": 0.0, "unscored": 0, "corrupt": 0}
    with open(out / f"scores.jsonl.{os.getpid()}.tmp", "w") as sf:
        for s, url in enumerate(urls):
            start, n_scored = sf.tell(), 0
            for rec, total in _shard_scores(parts, [u for u in units if u.shard == s], url, carried, counts):
                in_shards_noisy.append(_label(rec))
                if total is None:
                    continue
                sf.write(json.dumps({"key": rec["key"], "score": total}) + "\n")
                scores.append(total)
                noisy.append(_label(rec))
                n_scored += 1
            shard_entries.append({"url": D.canonical_url(url), "scores": [start, sf.tell()], "scored": n_scored})
        sf.flush()
        os.fsync(sf.fileno())
    skipped, seconds, unscored, corrupt = (counts[k] for k in ("skipped", "seconds", "unscored", "corrupt"))
    score_arr = np.frombuffer(scores, dtype=np.float64)
    if score_arr.size == 0:
        raise ConfigError(f"select: no sample was scored in {len(urls)} shard(s) (empty shards, every sample corrupt, "
                          "or a manifest that keeps none of their keys)")
    kept = rule.kept_mask(score_arr)
    if not kept.any():
        raise ConfigError(f"select: the rule {rule.describe()} keeps none of the {score_arr.size} scored samples "
                          f"(scores {score_arr.min():.4g} .. {score_arr.max():.4g})")
    os.replace(out / f"scores.jsonl.{os.getpid()}.tmp", out / "scores.jsonl")
    # The manifest in the same order, each shard's kept keys one contiguous range.
    pos = 0
    with open(out / "scores.jsonl") as sf, open(out / f"manifest.txt.{os.getpid()}.tmp", "w") as mf:
        for entry in shard_entries:
            start, n_kept = mf.tell(), 0
            for _ in range(entry["scored"]):
                key = json.loads(sf.readline())["key"]
                if kept[pos]:
                    mf.write(key + "\n")
                    n_kept += 1
                pos += 1
            entry.update(manifest=[start, mf.tell()], kept=n_kept)
        mf.flush()
        os.fsync(mf.fileno())
    os.replace(out / f"manifest.txt.{os.getpid()}.tmp", out / "manifest.txt")
    _write_json(out / "index.json", {"format": FORMAT, "manifest": "manifest.txt", "shards": shard_entries})
    summary = {"total": int(score_arr.size), "kept": int(kept.sum()), **rule.describe(),
               "kept_fraction": float(kept.mean()), "samples_in_shards": len(in_shards_noisy),
               "not_in_subset": unscored - corrupt, "skipped": skipped,
               "score_min": float(score_arr.min()), "score_max": float(score_arr.max()),
               "score_threshold": float(score_arr[kept].min()),
               # a rank scores its units one after the other: scored samples per unit-second
               "scoring_samples_per_s_per_rank": score_arr.size / seconds if seconds else None,
               "merge_seconds": time.perf_counter() - t_merge, **meta}
    summary.update(_noise_summary(score_arr, np.frombuffer(noisy, dtype=np.int8), kept,
                                  np.frombuffer(in_shards_noisy, dtype=np.int8)))
    _write_json(out / "summary.json", summary)
    return summary


def _noise_summary(scores: np.ndarray, noisy: np.ndarray, kept: np.ndarray, all_noisy: np.ndarray) -> dict:
    """With ``"noisy"`` flags: of the dropped set, over all samples of the shards (everything not in
    the manifest is dropped: earlier rounds' drops included), and over this round's candidates."""
    if (noisy < 0).any() or noisy.size == 0 or (all_noisy < 0).any():
        return {}
    flags = noisy.astype(bool)
    noisy_total = int((all_noisy == 1).sum())
    noisy_kept = int(flags[kept].sum())
    dropped_all = all_noisy.size - int(kept.sum())
    out = _dropped_stats(noisy_total - noisy_kept, dropped_all, noisy_total)
    rnd = _dropped_stats(int(flags[~kept].sum()), int((~kept).sum()), int(flags.sum()))
    out.update(round_precision=rnd["precision"], round_recall=rnd["recall"], noisy_in_shards=noisy_total,
               kept_noise_rate=noisy_kept / max(1, int(kept.sum())), auc=_auc(scores, flags))
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    with open(tmp) as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def merge_lock(out: Path):
    """Yields True for the one process that may merge now (False: another one is merging)."""
    with open(out / ".merge.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def source_id(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the distributed merge
#
# With a process group (rounds inside training; any caller with ``world > 1`` ranks), no rank reads
# every scored pair: rank r merges the shards s with s % world == r (all units of a shard: one
# reader), the keep threshold is an exact order statistic found by radix selection over all-reduced
# histograms, and each rank writes its shards' bytes into scores.jsonl and manifest.txt at offsets
# from all-reduced per-shard lengths, so the files are byte for byte those of :func:`merge`.

RADIX_BITS = 16
_after_stage: Callable[[int], None] | None = None   # tests: called after each shard is staged (a kill there)
STAGE = "merge"   # OUT/merge/SHARD.npz: a shard's merged records, complete or absent (resume)


def ordered_keys(scores: np.ndarray) -> np.ndarray:
    """float64 -> uint64 with the same order (``-0.0`` = ``0.0``; NaN lowest, as ``argsort(-x)`` puts it last)."""
    x = np.asarray(scores, dtype=np.float64)
    nan, neg = np.isnan(x), np.signbit(x) & (x != 0)
    keys = (x + 0.0).view(np.uint64)           # in place from here: one array of the size of the scores
    np.invert(keys, out=keys, where=neg)
    np.bitwise_or(keys, np.uint64(1 << 63), out=keys, where=~neg)
    keys[nan] = 0
    return keys


def key_value(key: int) -> float:
    """The float64 of an :func:`ordered_keys` key."""
    key = np.uint64(key)
    bits = key & ~np.uint64(1 << 63) if key >> np.uint64(63) else ~key
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def order_statistic(keys: np.ndarray, r: int, reduce: Callable[[np.ndarray], np.ndarray]) -> int:
    """The key of rank ``r`` (0-based, ascending) among every process's ``keys``: 64 / 16 passes, each
    one all-reduced histogram (``reduce``: the sum over processes) of the next 16 bits of the keys
    that share the bits found so far."""
    prefix, cand = 0, keys
    for shift in range(64 - RADIX_BITS, -1, -RADIX_BITS):
        digit = cand >> np.uint64(shift)
        digit &= np.uint64((1 << RADIX_BITS) - 1)
        digit = digit.view(np.int64)               # < 2^16: the same numbers, no copy
        hist = reduce(np.bincount(digit, minlength=1 << RADIX_BITS).astype(np.int64))
        cum = np.cumsum(hist)
        b = int(np.searchsorted(cum, r, side="right"))
        r -= int(cum[b - 1]) if b else 0
        prefix |= b << shift
        cand = cand[digit == b]
    return prefix


def percentile_of(n: int, p: float, stat: Callable[[int], float]) -> float:
    """``np.percentile(x, p)`` (linear) of ``n`` values from their order statistics ``stat(i)``,
    with numpy's own index and interpolation arithmetic."""
    virtual = (n - 1) * np.true_divide(p, 100)
    lo = int(np.floor(virtual))
    hi = lo + 1
    if virtual >= n - 1:
        lo = hi = n - 1
    elif virtual < 0:
        lo = hi = 0
    gamma = np.asanyarray(virtual - lo)
    a = np.float64(stat(lo))
    b = np.float64(stat(hi)) if hi != lo else a
    diff = b - a
    out = a + diff * gamma
    if gamma >= 0.5:
        out = b - diff * (1 - gamma)
    return float(out)


def _stage_shard(out: Path, s: int, url: str, units: list[Unit], carried: list[CarriedScores], stamp: str) -> Path:
    """Merge shard ``s``'s units (plus carried scores) into ``OUT/merge/SHARD.npz``, unless a
    complete one of this ``stamp`` is there; returns its path."""
    path = out / STAGE / f"{s:06d}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                if json.loads(str(z["header"]))["stamp"] == stamp:
                    return path
        except (OSError, ValueError, KeyError):
            pass
    head = {"stamp": stamp, "skipped": 0, "seconds": 0.0, "unscored": 0, "corrupt": 0}
    scores, noisy, all_noisy = array("d"), array("b"), array("b")
    lines, keys = [], []
    for rec, total in _shard_scores(out / "parts", [u for u in units if u.shard == s], url, carried, head):
        all_noisy.append(_label(rec))
        if total is None:
            continue
        lines.append(json.dumps({"key": rec["key"], "score": total}) + "\n")
        keys.append(rec["key"] + "\n")
        scores.append(total)
        noisy.append(_label(rec))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    text = "".join(lines).encode()
    head["lines_bytes"] = len(text)
    np.savez(tmp, header=np.array(json.dumps(head)), scores=np.frombuffer(scores, dtype=np.float64),
             noisy=np.frombuffer(noisy, dtype=np.int8), all_noisy=np.frombuffer(all_noisy, dtype=np.int8),
             lines=np.frombuffer(text, dtype=np.uint8),
             keys=np.frombuffer("".join(keys).encode(), dtype=np.uint8))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


class _Comm:
    """The few collectives of the distributed merge (gloo: CPU tensors; NCCL: the current device)."""

    def __init__(self, group=None):
        self.d, self.group, self.device = tdist, group, comm_device()
        self.rank, self.world = tdist.get_rank(group), tdist.get_world_size(group)

    def reduce(self, x: np.ndarray, op: str = "sum") -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        self.d.all_reduce(t, op={"sum": self.d.ReduceOp.SUM, "max": self.d.ReduceOp.MAX,
                                 "min": self.d.ReduceOp.MIN}[op], group=self.group)
        return t.cpu().numpy()

    def gather_object(self, obj) -> list:
        got: list = [None] * self.world
        self.d.all_gather_object(got, obj, group=self.group)
        return got

    def errors(self, err: BaseException | None) -> None:
        """Every rank raises when one did (the first rank's error, a ConfigError for bad input)."""
        got = self.gather_object(None if err is None else (isinstance(err, ConfigError), str(err)))
        failed = [(r, e) for r, e in enumerate(got) if e is not None]
        if not failed:
            return
        if err is not None:
            raise err
        r, (config, text) = failed[0]
        raise (ConfigError if config else RuntimeError)(text if config else f"rank {r}: {text}")

    def barrier(self) -> None:
        if self.device.type == "cuda":
            self.d.barrier(group=self.group, device_ids=[self.device.index])
        else:
            self.d.barrier(group=self.group)

    def exchange(self, keys: np.ndarray, counts: list[int]) -> np.ndarray:
        """All-to-all of a uint64 array: its first ``counts[0]`` items to rank 0, the next
        ``counts[1]`` to rank 1, ...; returns what this rank received."""
        sizes = self.reduce_sizes(np.array(counts, dtype=np.int64))
        send = torch.from_numpy(keys.view(np.int64)).to(self.device)
        recv = torch.empty(int(sizes.sum()), dtype=torch.int64, device=self.device)
        self.d.all_to_all_single(recv, send, output_split_sizes=sizes.tolist(), input_split_sizes=list(counts),
                                 group=self.group)
        return recv.cpu().numpy().view(np.uint64)

    def reduce_sizes(self, mine: np.ndarray) -> np.ndarray:
        """``out[r]``: how many items rank ``r`` sends this rank (from every rank's ``mine``)."""
        t = torch.from_numpy(mine).to(self.device)
        got = torch.empty_like(t)
        self.d.all_to_all_single(got, t, group=self.group)
        return got.cpu().numpy()


def _distributed_auc(comm: _Comm, keys: np.ndarray, noisy: np.ndarray, n_clean: int, n_noisy: int) -> float:
    """:func:`_auc` over every rank's scores, exactly: a sample sort (splitters from every rank's
    quantiles of its own keys; equal keys go to one rank) moves each key to the rank of its range,
    then ``2U = sum over noisy of (2 * clean above + clean equal)`` in int64, the clean keys below
    a rank's range counted by an all-reduce. Moves ``keys.size`` keys per rank."""
    w = comm.world
    local = np.sort(keys[::max(1, keys.size // 65536)])   # a strided sample: splitters balance, ties stay whole anyway
    qs = local[np.linspace(0, local.size - 1, w + 1).astype(np.int64)[1:-1]] if local.size else np.zeros(w - 1, np.uint64)
    sample = np.zeros((w, w - 1), dtype=np.uint64)
    sample[comm.rank] = qs
    weights = np.zeros(w, dtype=np.int64)
    weights[comm.rank] = keys.size
    sample = comm.reduce(sample.view(np.int64)).view(np.uint64)
    weights = comm.reduce(weights)
    pool = np.sort(sample[weights > 0].ravel())
    splitters = pool[np.linspace(0, pool.size - 1, w + 1).astype(np.int64)[1:-1]] if pool.size else np.zeros(w - 1, np.uint64)
    out = []
    for flags in (~noisy, noisy):
        k = np.sort(keys[flags])
        cuts = np.concatenate([[0], np.searchsorted(k, splitters, side="right"), [k.size]])
        got = comm.exchange(k, np.diff(cuts).tolist())
        del k
        got.sort()
        out.append(got)
    clean, bad = out
    below = np.zeros(w, dtype=np.int64)
    below[comm.rank] = clean.size
    below = comm.reduce(below)
    offset = int(below[:comm.rank].sum())
    lo = np.searchsorted(clean, bad, side="left")
    hi = np.searchsorted(clean, bad, side="right")   # clean keys <= each noisy key: hi + offset
    twice_u = comm.reduce(np.array([int((2 * (n_clean - hi - offset) + (hi - lo)).sum())], dtype=np.int64))[0]
    return float(twice_u / 2.0 / (n_clean * n_noisy))


def merge_distributed(out: Path, urls: list[str], units: list[Unit], *, source: str, rule: Rule,
                      carried: list[CarriedScores], meta: dict, group=None, comm: _Comm | None = None) -> dict:
    """:func:`merge` on every rank of ``group`` (a process group: all its ranks call this): the same
    scores.jsonl, manifest.txt, index.json and summary.json, each rank reading and writing only the
    shards ``s`` with ``s % world == rank``. A killed merge reruns what is missing: each shard's
    merged records are kept in ``OUT/merge/`` (complete or absent) until the summary is written.
    ``comm``: the collectives (tests: ranks as threads); by default :class:`_Comm` over ``group``."""
    t_merge = time.perf_counter()
    comm = comm or _Comm(group)
    rank, world = comm.rank, comm.world
    n_shards = len(urls)
    owned = list(range(rank, n_shards, world))
    stamp = source_id(source, [str(c.dir) for c in carried])
    err, staged = None, {}
    try:
        mine = [u for u in units if u.shard % world == rank]
        missing = missing_units(out, mine, source)
        if missing:
            raise RuntimeError(f"{out}: unit(s) not scored yet (first: {missing[0].name})")
        for s in owned:
            staged[s] = _stage_shard(out, s, urls[s], units, carried, stamp)
            if _after_stage is not None:
                _after_stage(s)
    except Exception as e:  # noqa: BLE001 - every rank raises it (below), none waits in a collective
        err = e
    comm.errors(err)
    scores, noisy, all_noisy, heads = {}, {}, {}, {}
    for s, path in staged.items():
        with np.load(path) as z:
            scores[s], noisy[s], all_noisy[s] = z["scores"], z["noisy"], z["all_noisy"]
            heads[s] = json.loads(str(z["header"]))
    cat = np.concatenate([scores[s] for s in owned]) if owned else np.zeros(0)
    cat_noisy = np.concatenate([noisy[s] for s in owned]) if owned else np.zeros(0, np.int8)
    cat_all = np.concatenate([all_noisy[s] for s in owned]) if owned else np.zeros(0, np.int8)
    bounds = np.cumsum([0] + [scores[s].size for s in owned])
    scores = {s: cat[bounds[j]:bounds[j + 1]] for j, s in enumerate(owned)}   # views: one copy of the scores
    del noisy, all_noisy
    counts = comm.reduce(np.array([cat.size, cat_all.size, sum(h["unscored"] for h in heads.values()),
                                   sum(h["corrupt"] for h in heads.values()), sum(h["skipped"] for h in heads.values()),
                                   int((cat_noisy < 0).sum()), int((cat_all < 0).sum()), int((cat_all == 1).sum()),
                                   int((cat_noisy == 1).sum())], dtype=np.int64))
    total, in_shards, unscored, corrupt, skipped, unknown, unknown_all, noisy_total, noisy_round = map(int, counts)
    seconds = float(comm.reduce(np.array([sum(h["seconds"] for h in heads.values())]))[0])
    if total == 0:
        raise ConfigError(f"select: no sample was scored in {len(urls)} shard(s) (empty shards, every sample corrupt, "
                          "or a manifest that keeps none of their keys)")
    big = np.finfo(np.float64).max
    lo_hi = comm.reduce(np.array([-(cat.min() if cat.size else big), cat.max() if cat.size else -big]), "max")
    score_min, score_max = -float(lo_hi[0]), float(lo_hi[1])
    keys = ordered_keys(cat)
    reduce = comm.reduce
    kept = {}
    if rule.threshold is not None:
        kept = {s: scores[s] >= rule.threshold for s in owned}
    elif rule.percentile is not None:
        t = percentile_of(total, rule.percentile, lambda i: key_value(order_statistic(keys, i, reduce)))
        kept = {s: scores[s] >= t for s in owned}
    else:
        k = int(round(rule.keep * total))
        if k > 0:
            tk = np.uint64(order_statistic(keys, total - k, reduce))
            ties = np.zeros(n_shards, dtype=np.int64)
            above, first = {}, 0
            for s in owned:
                ks = keys[first:first + scores[s].size]
                first += scores[s].size
                above[s], ties[s] = ks > tk, int((ks == tk).sum())
            greater = int(reduce(np.array([sum(int(a.sum()) for a in above.values())], dtype=np.int64))[0])
            ties = reduce(ties)
            room = np.clip(k - greater - (np.cumsum(ties) - ties), 0, ties)   # ties kept per shard, in shard order
            first = 0
            for s in owned:
                ks = keys[first:first + scores[s].size]
                first += scores[s].size
                eq = ks == tk
                kept[s] = above[s] | (eq & (np.cumsum(eq) <= room[s]))
        else:
            kept = {s: np.zeros(scores[s].size, dtype=bool) for s in owned}
    cat_kept = np.concatenate([kept[s] for s in owned]) if owned else np.zeros(0, bool)
    n_kept = int(reduce(np.array([int(cat_kept.sum())], dtype=np.int64))[0])
    if n_kept == 0:
        raise ConfigError(f"select: the rule {rule.describe()} keeps none of the {total} scored samples "
                          f"(scores {score_min:.4g} .. {score_max:.4g})")
    threshold = -float(reduce(np.array([-(cat[cat_kept].min() if cat_kept.any() else big)]), "max")[0])
    # The files: each shard's bytes at its offset, shards in order (the layout of merge()).
    def kept_keys(s: int) -> bytes:
        with np.load(staged[s]) as z:
            kb = z["keys"].tobytes()
        return b"".join(k + b"\n" for k, m in zip(kb.split(b"\n"), kept[s]) if m)

    lengths = np.zeros((2, n_shards), dtype=np.int64)
    for s in owned:   # one shard's keys at a time (read again below: memory, not time, is short)
        lengths[0, s], lengths[1, s] = heads[s]["lines_bytes"], len(kept_keys(s))
    lengths = reduce(lengths)
    starts = np.cumsum(lengths, axis=1) - lengths
    tmps = [out / "scores.jsonl.merging", out / "manifest.txt.merging"]
    if rank == 0:
        for tmp, size in zip(tmps, lengths.sum(axis=1)):
            with open(tmp, "wb") as fh:
                fh.truncate(int(size))
    comm.barrier()
    fds = [os.open(tmp, os.O_WRONLY) for tmp in tmps]
    try:
        for s in owned:
            with np.load(staged[s]) as z:
                os.pwrite(fds[0], z["lines"].tobytes(), int(starts[0, s]))
            os.pwrite(fds[1], kept_keys(s), int(starts[1, s]))
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    kept_per_shard = np.zeros(n_shards, dtype=np.int64)
    scored_per_shard = np.zeros(n_shards, dtype=np.int64)
    for s in owned:
        kept_per_shard[s], scored_per_shard[s] = int(kept[s].sum()), scores[s].size
    kept_per_shard, scored_per_shard = reduce(kept_per_shard), reduce(scored_per_shard)
    noise = {}
    if unknown == 0 and unknown_all == 0 and total > 0:
        flags = cat_noisy.astype(bool)
        nk, nd, d = reduce(np.array([int(flags[cat_kept].sum()), int(flags[~cat_kept].sum()),
                                     int((~cat_kept).sum())], dtype=np.int64)).tolist()
        noise = _dropped_stats(noisy_total - nk, in_shards - n_kept, noisy_total)
        rnd = _dropped_stats(nd, d, noisy_round)
        n_clean = total - noisy_round
        auc = _distributed_auc(comm, keys, flags, n_clean, noisy_round) if n_clean and noisy_round else None
        noise.update(round_precision=rnd["precision"], round_recall=rnd["recall"], noisy_in_shards=noisy_total,
                     kept_noise_rate=nk / max(1, n_kept), auc=auc)
    summary = {"total": total, "kept": n_kept, **rule.describe(), "kept_fraction": n_kept / total,
               "samples_in_shards": in_shards, "not_in_subset": unscored - corrupt, "skipped": skipped,
               "score_min": score_min, "score_max": score_max, "score_threshold": threshold,
               "scoring_samples_per_s_per_rank": total / seconds if seconds else None,
               "merge_seconds": time.perf_counter() - t_merge, **meta, **noise}
    comm.barrier()   # every rank's bytes are written
    if rank == 0:
        os.replace(tmps[0], out / "scores.jsonl")
        os.replace(tmps[1], out / "manifest.txt")
        entries = [{"url": D.canonical_url(url), "scores": [int(starts[0, s]), int(starts[0, s] + lengths[0, s])],
                    "scored": int(scored_per_shard[s]), "manifest": [int(starts[1, s]), int(starts[1, s] + lengths[1, s])],
                    "kept": int(kept_per_shard[s])} for s, url in enumerate(urls)]
        _write_json(out / "index.json", {"format": FORMAT, "manifest": "manifest.txt", "shards": entries})
        summary["merge_seconds"] = time.perf_counter() - t_merge
        _write_json(out / "summary.json", summary)
    comm.barrier()
    for path in staged.values():   # the summary marks the merge done: the staged copies go
        path.unlink(missing_ok=True)
    comm.barrier()
    if rank == 0:
        with contextlib.suppress(OSError):
            (out / STAGE).rmdir()
    return summary


# ----------------------------------------------------------------------------- rounds in training

class Selection(Method):
    """ECL rounds inside a training run (``select.*``); present in every run, since its state
    (the rounds done and the current manifest) is in every checkpoint.

        sel = Selection(cfg, rank, world)                 # then restore() on resume
        data = TrainData(..., manifest=sel.data_manifest())
        ...after the checkpoint of step S (wants_checkpoint(S) forces one):
        new = sel.between_steps(S, engine, tokenizer, log_metrics)   # a round, when due
        if new: data.set_manifest(read_manifest(new))

    Round ``k`` (1, 2, ...) scores the current subset with the model as it is at step ``S``,
    plus round ``k-1``'s scores (``select.temporal``), into ``output_dir/select/round_k``, and
    the stream reads only its kept samples from then on, in a new epoch. The checkpoint at ``S``
    is written before the round, so a kill during scoring re-runs the round on resume (the
    units already written are kept: scoring is deterministic) and ends with the same manifest.
    """

    name = "select"

    def __init__(self, cfg: Config, rank: int, world: int, state: dict | None = None):
        self.cfg, self.rank, self.world = cfg, rank, world
        sc = cfg.select
        self.every = sc.every_steps or D.steps_per_epoch(cfg, world)
        self.rule = make_rule(sc.keep, sc.threshold, sc.percentile, "config section 'select'")
        self.score = score_of(cfg)
        self.state = state or {"rounds": 0, "manifest": cfg.data.manifest, "last_step": 0}
        self.step, self.queue = 0, ([], [])

    @property
    def manifest(self) -> str | None:
        return self.state["manifest"]

    def data_manifest(self) -> str | None:
        return self.manifest

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state

    def inherit(self, init: Inherited) -> None:
        """A later stage (``checkpoint.init`` = a grow directory) continues the source run's rounds:
        round ``k + 1`` comes next and carries round ``k``'s scores, on the kept set the grown config
        reads (``data.manifest``). A config that reads other data restarts at round 1."""
        carried = init.state.get(self.name)
        if not carried:
            return
        if carried["manifest"] != self.cfg.data.manifest:
            log.warning("selection: %s carries %d round(s) ending in %s, but data.manifest is %s: the rounds "
                        "restart at 1 on that data", init.path, carried["rounds"], carried["manifest"],
                        self.cfg.data.manifest)
            return
        self.state = {"rounds": int(carried["rounds"]), "manifest": carried["manifest"], "last_step": 0}
        log.info("selection: continuing after round %d of %s (its kept set and scores)", carried["rounds"],
                 init.path)

    def wants_checkpoint(self, step: int) -> bool:
        return self.due(step)

    def prepare(self, step: int) -> None:
        self.step = step

    @torch.no_grad()
    def observe(self, batch: dict, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> None:
        """``select.free_scores``: each pair's confidence under the model before it trains on the
        pair's micro-batch, among the micro-batch and the rank's last ``FREE_QUEUE`` pairs."""
        if not self.cfg.select.free_scores:
            return
        img, txt, s = image.detach().float().cpu(), text.detach().float().cpu(), float(scale)
        eye = torch.eye(img.shape[0], dtype=torch.bool)
        q_img = torch.cat([img, *self.queue[0]]) if self.queue[0] else img
        q_txt = torch.cat([txt, *self.queue[1]]) if self.queue[1] else txt
        same = torch.zeros(img.shape[0], q_img.shape[0], dtype=torch.bool)
        same[:, :img.shape[0]] = eye
        rows = {"cos": (img.double() * txt.double()).sum(-1),
                "sc_batch": self_confidence(img, txt, img, txt, s, eye),
                "sc_queue": self_confidence(img, txt, q_img, q_txt, s, same),
                "sc_queue_t30": self_confidence(img, txt, q_img, q_txt, 30.0, same)}
        for buf, x in zip(self.queue, (img, txt)):
            buf.append(x)
            while sum(t.shape[0] for t in buf) > FREE_QUEUE:
                buf.pop(0)
        path = Path(self.cfg.output_dir) / "select" / "free" / f"rank_{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            for i, key in enumerate(batch["keys"]):
                fh.write(json.dumps({"step": self.step, "key": key, "scale": s,
                                     **{k: float(v[i]) for k, v in rows.items()}}) + "\n")

    def between_steps(self, step: int, engine, tokenizer, log_metrics, should_stop=None) -> str | None:
        """One round on every rank when due; its summary goes to TensorBoard (``select/...``)."""
        if not self.due(step):
            return None
        path, summary = self.round(engine.module, step, tokenizer, engine.device, should_stop)
        log_metrics(log_values(summary), step, "select")
        log.info("selection round %d at step %d: kept %d of %d (%s)", self.state["rounds"], step, summary["kept"],
                 summary["total"], ", ".join(f"{k}={summary[k]:.3f}" for k in ("precision", "recall", "auc")
                                             if summary.get(k) is not None) or "no noise labels")
        return path

    def _on_unit(self, step: int):
        """Fault injection after each scored unit: ``debug.kill_during_select_step`` (SIGKILL) and
        ``debug.signal_during_select_step`` (SIGUSR1, as SLURM's warning), on rank 0."""
        d = self.cfg.debug
        if self.rank != 0:
            return None
        if d.kill_during_select_step == step:
            return lambda _u: os.kill(os.getpid(), signal.SIGKILL)
        if d.signal_during_select_step == step:
            return lambda _u: os.kill(os.getpid(), signal.SIGUSR1)
        return None

    def due(self, step: int) -> bool:
        sc = self.cfg.select
        return (sc.enabled and step > 0 and step % self.every == 0 and step > self.state["last_step"]
                and step < self.cfg.max_steps and (sc.max_rounds is None or self.state["rounds"] < sc.max_rounds))

    def round_dir(self, k: int) -> Path:
        return Path(self.cfg.output_dir) / "select" / f"round_{k:03d}"

    def round(self, model, step: int, tokenizer, device, should_stop=None) -> tuple[str, dict]:
        """Run the round due at ``step`` on every rank; returns the new manifest path and summary."""
        k = self.state["rounds"] + 1
        out = self.round_dir(k)
        urls = D.shard_list(self.cfg.data.train_shards, "data.train_shards")
        # after round k - 1 the manifest is that round's directory (this run's, or a grown run's source's)
        prev = Path(self.manifest) if k > 1 and self.cfg.select.temporal else None
        subset = D.read_manifest(self.manifest, urls, self.cfg.data.key_manifest_max_mb, self.cfg.data.train_shards)
        source = source_id("train", step, self.manifest, str(prev), self.score.describe())
        units = work_units(len(urls), self.world)
        decoder = D.eval_decoder(self.cfg, tokenizer)
        summary_path = out / "summary.json"
        # Rank 0 reads "is this round done?" for everyone: a rank with a stale view of the shared
        # file system would otherwise skip the scoring its peers wait for in lockstep (a hang).
        done = from_rank0(lambda: summary_path.is_file() and json.loads(summary_path.read_text()).get("source") == source)
        if not done:
            dtype = next(model.parameters()).dtype
            was_training = model.training
            model.eval()
            try:
                score_units([model], urls, share(units, self.rank, self.world), decoder, out, source=source,
                            device=device, dtype=dtype, subset=subset, batch_size=self.cfg.select.batch_size,
                            lockstep=True, dummy=D.dummy_batch(decoder, preset_shape(self.cfg.model)["image_size"]),
                            on_unit=self._on_unit(step), score=self.score, should_stop=should_stop,
                            workers=self.cfg.data.workers, worker_start=self.cfg.data.worker_start,
                            pixels=D.model_pixels(self.cfg))
            finally:
                model.train(was_training)
            barrier()
            meta = {"step": step, "round": k, "source": source, "manifest_in": self.manifest,
                    **self.score.describe(), "scores_from": [str(prev)] if prev else []}
            if self.world > 1 and tdist.is_initialized():   # every rank merges its shards
                merge_distributed(out, urls, units, source=source, rule=self.rule,
                                  carried=[CarriedScores(prev)] if prev is not None else [], meta=meta)
            elif is_main():
                merge(out, urls, units, source=source, rule=self.rule,
                      carried=[CarriedScores(prev)] if prev is not None else [], meta=meta)
            barrier()
        summary = from_rank0(lambda: json.loads(summary_path.read_text()))
        self.state = {"rounds": k, "manifest": str(out), "last_step": step}
        return str(out), summary


def check(cfg: Config) -> None:
    """``select.*`` against the rest of the config (before any process group starts)."""
    sc = cfg.select
    make_rule(sc.keep, sc.threshold, sc.percentile, "config section 'select'")
    score_of(cfg)
    if sc.enabled and sc.every_steps is not None and sc.every_steps >= cfg.max_steps:
        log.warning("select.every_steps=%d >= max_steps=%d: no selection round will run", sc.every_steps, cfg.max_steps)


def log_values(summary: dict) -> dict:
    """The summary's numbers for TensorBoard's ``select/...`` scalars."""
    names = ("kept", "kept_fraction", "precision", "recall", "auc", "round_precision", "round_recall",
             "kept_noise_rate", "score_threshold")
    return {k: float(summary[k]) for k in names if summary.get(k) is not None}


def scored_samples(cfg: Config, k: int) -> int:
    """Pairs round ``k`` (1, 2, ...) scores, an estimate from the config: ``data.train_num_samples``
    in the first round (the shards' size is not in the config), then what the rule keeps of
    each round (``keep``: that fraction; ``percentile`` p: 1 - p/100; ``threshold``: unknown,
    counted as keeping all)."""
    sc = cfg.select
    rule = make_rule(sc.keep, sc.threshold, sc.percentile, "config section 'select'")
    n = cfg.data.train_num_samples
    for _ in range(k - 1):
        if rule.keep is not None:
            n = int(round(rule.keep * n))
        elif rule.percentile is not None:
            n = int(round((1 - rule.percentile / 100) * n))
    return n


def step_flops(cfg: Config, step: int, world: int) -> float:
    """What ECL adds to a step: the scoring pass of a round (forward of both towers at full
    capacity, no gradient, :func:`scored_samples` pairs; with ``select.score=selfconf`` also the
    candidate pool's forward on every rank and each pair's similarities to the pool, both
    directions), charged to the step after the one it
    is due at (it runs between them). Rounds are due as in :meth:`Selection.due`: every
    ``select.every_steps`` (default one epoch) before ``max_steps``, at most ``select.max_rounds``."""
    sc = cfg.select
    done = step - 1
    if not sc.enabled or done <= 0 or done >= cfg.max_steps:
        return 0.0
    every = sc.every_steps or D.steps_per_epoch(cfg, world)
    k = done // every
    if done % every or (sc.max_rounds is not None and k > sc.max_rounds):
        return 0.0
    shape = preset_shape(cfg.model)
    n = scored_samples(cfg, k)
    flops = n * pair_flops(shape)
    if sc.score == "selfconf":   # every rank embeds the candidate pool; each pair meets it both ways
        pool = min(sc.pool, n)
        flops += world * pool * pair_flops(shape) + 2 * similarity_rect(n, pool, shape["embed_dim"])
    return flops


def similarity_rect(rows: int, cols: int, dim: int) -> float:
    """Forward FLOPs of a ``rows x cols`` matrix of ``dim``-wide dot products."""
    return 2.0 * rows * cols * dim


class SelectionSpec(MethodSpec):
    name = "select"

    def enabled(self, cfg: Config) -> bool:
        return True   # rounds run only with select.enabled, but every checkpoint carries the state

    def cached_negatives_ok(self, cfg: Config) -> bool:
        return not cfg.select.free_scores   # rounds run between steps; free scores read the training forward

    def check(self, cfg: Config) -> None:
        check(cfg)

    def build(self, cfg: Config, engine) -> Selection:
        return Selection(cfg, this_rank(), engine.dp_world_size)

    def step_flops(self, cfg: Config, step: int, world: int) -> float:
        return step_flops(cfg, step, world)

    def steady_overrides(self, cfg: Config, bench_steps: int) -> dict:
        """No round inside the benchmark: the scoring pass runs between steps, not in one
        (its FLOPs are in the run's count, its time is not a step's)."""
        return {"select.every_steps": bench_steps} if cfg.select.enabled else {}

    def carried_state(self, cfg: Config, root: Path, tag: str) -> dict | None:
        """The rounds done and the last round's directory (its kept set and scores), absolute."""
        state = torch.load(Path(root) / tag / "trainer_state" / "rank_0.pt", map_location="cpu",
                           weights_only=False).get(self.name) or {}
        if not state.get("rounds"):
            return None
        manifest = Path(state["manifest"])
        if not manifest.is_absolute():   # round directories are under output_dir, which is root's parent
            out = Path(cfg.output_dir)
            manifest = (Path(root).parent / manifest.relative_to(out) if manifest.is_relative_to(out)
                        else manifest).resolve()
        if not (manifest / "summary.json").is_file():
            raise ConfigError(f"{Path(root) / tag}: its selection round {state['rounds']} ({manifest}) is gone; "
                              "grow needs it to carry the kept set")
        return {"rounds": int(state["rounds"]), "manifest": str(manifest)}

    def grown_config(self, raw: dict, cfg: Config, state: dict | None, layer_index) -> None:
        if state:   # the next stage reads the last round's kept set
            raw["data"]["manifest"] = state["manifest"]


SPEC = SelectionSpec()
