"""ECL at web scale without a model: the merge time of ``select`` and the memory a loader worker
spends on the selection, for synthetic keys.

    python -m trainer bench select --keys 10000000 --shards 1000 --work runs/bench-select \
        --out bench/results/select_scale_cpu.json

Writes ``--shards`` scored parts of ``--keys / --shards`` samples each (what the scoring ranks
write; scores drawn clean ~ N(0.2, 0.1), 30 % noisy ~ N(0, 0.1)), then, each in a fresh
process so that one measurement's memory does not inflate another's:

- ``merge``: :func:`trainer.methods.selection.merge` at keep 0.7 (seconds, peak RSS);
- ``worker_flat``: a worker holding ``manifest.txt`` as one key set (``KeyManifest``: what
  ``data.manifest`` did before the per-shard index), RSS growth;
- ``worker_sharded``: a worker opening every shard in turn through ``index.json``
  (``ShardManifest``: one shard's kept keys at a time), RSS growth and seconds per shard open.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .. import data as D
from ..methods import selection as S
from ..methods.selection import FORMAT, Unit, _write_lines


def _urls(n: int) -> list[str]:
    return [f"/synthetic/train-{s:06d}.tar" for s in range(n)]


def write_parts(work: Path, keys: int, shards: int, seed: int = 0) -> float:

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    per = keys // shards
    (work / "parts").mkdir(parents=True, exist_ok=True)
    for s, url in enumerate(_urls(shards)):
        noisy = rng.random(per) < 0.3
        score = np.where(noisy, rng.normal(0.0, 0.1, per), rng.normal(0.2, 0.1, per))
        unit = Unit(s, 0, 1)
        header = {"format": FORMAT, "unit": unit.name, "url": url, "source": "synthetic", "samples": per,
                  "scored": per, "skipped": 0, "seconds": 0.0, "models": 1}
        rows = ({"i": i, "key": f"{s:06d}{i:07d}", "score": float(score[i]), "noisy": bool(noisy[i])} for i in range(per))
        _write_lines(work / "parts" / f"{unit.name}.jsonl", [header, *rows])
    return time.perf_counter() - t0


def _rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def _peak_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(what: str, work: Path, shards: int) -> dict:
    """One measurement, in this (fresh) process."""

    base = _rss_mib()
    if what == "merge":
        t0 = time.perf_counter()
        summary = S.merge(work, _urls(shards), S.work_units(shards, 1), source="synthetic", rule=S.Rule(keep=0.7),
                          carried=[], meta={})
        return {"seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_mib(), "base_rss_mib": base,
                "total": summary["total"], "kept": summary["kept"], "precision": summary["precision"],
                "recall": summary["recall"], "auc": summary["auc"]}
    if what == "worker_flat":
        t0 = time.perf_counter()
        m = D.read_manifest(str(work / "flat.txt"))
        return {"seconds_to_load": time.perf_counter() - t0, "rss_growth_mib": _rss_mib() - base, "keys": len(m)}
    if what == "worker_sharded":
        m = D.read_manifest(str(work))
        t0 = time.perf_counter()
        peak, n = 0.0, 0
        for url in _urls(shards):
            n += len(m.keys_for(url))
            peak = max(peak, _rss_mib() - base)
        return {"seconds_per_shard_open": (time.perf_counter() - t0) / shards, "rss_growth_mib": peak, "keys": n}
    raise ValueError(what)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer bench select", description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=10_000_000)
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--work", default="runs/bench-select", help="scratch directory (parts, manifest: GBs at 1e7 keys)")
    p.add_argument("--out", help="write the results JSON (and a .md next to it) here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.work)
    if args.child:
        print(json.dumps(child(args.child, work, args.shards)))
        return 0
    result = {"keys": args.keys, "shards": args.shards, "write_parts_seconds": write_parts(work, args.keys, args.shards)}

    def run(what: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "trainer", "bench", "select", "--child", what, "--work", str(work),
                              "--shards", str(args.shards)], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(out.stdout.strip().splitlines()[-1])

    result["merge"] = run("merge")
    # The flat form: the same kept keys as one key-per-line file without the index.
    (work / "flat.txt").write_bytes((work / "manifest.txt").read_bytes())
    result["worker_flat"] = run("worker_flat")
    result["worker_sharded"] = run("worker_sharded")
    result["disk_mib"] = {name: (work / name).stat().st_size / 2**20 for name in ("scores.jsonl", "manifest.txt", "index.json")}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".md").write_text(report(result, " ".join(["python -m trainer bench select", *argv])))
    return 0


def report(r: dict, command: str) -> str:
    m, f, s = r["merge"], r["worker_flat"], r["worker_sharded"]
    return f"""# ECL selection at scale: merge time and loader-worker memory ({r['keys']:,} synthetic keys)

Command: `{command}` (CPU, this repository's machine; one process per measurement).

| what | value |
|---|--:|
| keys, shards | {r['keys']:,} in {r['shards']:,} |
| merge (scores.jsonl + manifest.txt + index.json + summary) | {m['seconds']:.1f} s, peak RSS {m['peak_rss_mib']:.0f} MiB ({m['peak_rss_mib'] - m['base_rss_mib']:.0f} MiB above the process after its imports) |
| kept at keep 0.7 | {m['kept']:,} (precision {m['precision']:.3f}, recall {m['recall']:.3f}, AUC {m['auc']:.3f} on the synthetic scores) |
| worker, flat manifest (one key set) | +{f['rss_growth_mib']:.0f} MiB, {f['seconds_to_load']:.1f} s to load |
| worker, per-shard index (one shard's keys) | +{s['rss_growth_mib']:.1f} MiB peak, {1000 * s['seconds_per_shard_open']:.2f} ms per shard open |
| on disk | scores.jsonl {r['disk_mib']['scores.jsonl']:.0f} MiB, manifest.txt {r['disk_mib']['manifest.txt']:.0f} MiB, index.json {r['disk_mib']['index.json']:.2f} MiB |

Every loader worker of every rank holds the selection: with the flat form that is the RSS growth
above per worker (x workers x ranks per node); with the index it is one shard's kept keys.
"""
