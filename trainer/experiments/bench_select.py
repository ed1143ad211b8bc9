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

With ``--merge-ranks N``, the merge alone, today's single process against the distributed one
(:func:`trainer.methods.selection.merge_distributed`) on ``N`` gloo ranks of this machine, each
rank a fresh process (seconds, peak RSS per rank; the files of both compared byte for byte):

    python -m trainer bench select --keys 10000000 --shards 1000 --merge-ranks 2 --work runs/bench-merge \
        --out bench/results/select_merge_cpu.json

With ``--checkpoints``, the score instead: how well each candidate confidence separates the noisy
pairs of shards whose samples carry ``"noisy"`` flags (``make-demo-data --noise-rate``), for each
checkpoint alone and for the ensemble (the sum over the checkpoints):

    python -m trainer bench select --checkpoints runs/w/checkpoints/step_80 runs/w/checkpoints/step_160 \
        --data runs/demo-noise30-5k/train --work runs/ecl-scores --out bench/results/ecl_scores_cpu.json

Every pair is embedded once per checkpoint (cached in ``--work``); each candidate is computed
from the embeddings and reported as the ROC AUC of the score as a clean-pair detector, the
precision and recall of the dropped set at keep 0.7, and the best precision at recall >= 0.8.
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
import torch

from .. import data as D
from ..methods import selection as S
from ..methods.selection import FORMAT, Unit, _write_lines
from ..select import _load_ensemble


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
    """This process's peak RSS: ``VmHWM`` of its own address space. Not ``getrusage``'s
    ``ru_maxrss``: Linux carries that across ``execve``, so a child spawned (vfork + exec) by a
    large parent starts at the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
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
    if what.startswith("dmerge:"):   # dmerge:RANK:WORLD:PORT
        import torch.distributed as dist
        rank, world, port = map(int, what.split(":")[1:])
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        t0 = time.perf_counter()
        summary = S.merge_distributed(work, _urls(shards), S.work_units(shards, 1), source="synthetic",
                                      rule=S.Rule(keep=0.7), carried=[], meta={})
        seconds = time.perf_counter() - t0
        dist.destroy_process_group()
        return {"rank": rank, "seconds": seconds, "peak_rss_mib": _peak_mib(), "base_rss_mib": base,
                "total": summary["total"], "kept": summary["kept"], "auc": summary["auc"]}
    if what == "worker_flat":
        t0 = time.perf_counter()
        m = D.read_manifest(str(work / "flat.txt"), max_mb=None)   # measured at any size
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
    p.add_argument("--merge-ranks", type=int, help="the merge alone: one process against this many gloo ranks")
    p.add_argument("--checkpoints", nargs="+", help="score candidates instead: these members' AUROC alone and summed")
    p.add_argument("--data", nargs="+", help="with --checkpoints: training shards whose samples carry \"noisy\" flags")
    p.add_argument("--pool", type=int, default=1024, help="with --checkpoints: the self-confidence's candidate pool")
    p.add_argument("--free", help="with --checkpoints: a run trained with select.free_scores=true on --data: "
                                  "its free scores alone and with the last checkpoint")
    p.add_argument("--free-window", type=int, default=40, help="--free: steps per window of free scores")
    args = p.parse_args(argv)
    work = Path(args.work)
    if args.checkpoints:
        return score_candidates(args, argv)
    if args.child:
        print(json.dumps(child(args.child, work, args.shards)))
        return 0
    result = {"keys": args.keys, "shards": args.shards, "write_parts_seconds": write_parts(work, args.keys, args.shards)}
    if args.merge_ranks:
        return merge_ranks(args, argv, work, result)

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


def _digests(work: Path) -> dict:
    import hashlib
    return {name: hashlib.sha256((work / name).read_bytes()).hexdigest()
            for name in ("scores.jsonl", "manifest.txt", "index.json")}


def merge_ranks(args, argv: list[str], work: Path, result: dict) -> int:
    """Today's merge (one process) against the distributed merge on ``--merge-ranks`` gloo ranks."""
    import socket
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "trainer", "bench", "select", "--work", str(work), "--shards", str(args.shards)]
    single = subprocess.run([*cmd, "--child", "merge"], capture_output=True, text=True, check=True, env=env)
    result["merge"] = json.loads(single.stdout.strip().splitlines()[-1])
    before = _digests(work)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    w = args.merge_ranks
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--child", f"dmerge:{r}:{w}:{port}"], stdout=subprocess.PIPE, text=True, env=env)
             for r in range(w)]
    outs = [p.communicate()[0] for p in procs]
    result["distributed_wall_seconds"] = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a distributed merge rank failed: {[p.returncode for p in procs]}")
    result["distributed"] = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    result["identical_files"] = _digests(work) == before
    result["machine"] = "2 CPU cores, shared with other jobs"
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["disk_mib"] = {name: (work / name).stat().st_size / 2**20 for name in ("scores.jsonl", "manifest.txt")}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".md").write_text(merge_report(result, " ".join(["python -m trainer bench select", *argv])))
    return 0


def merge_report(r: dict, command: str) -> str:
    m, d = r["merge"], r["distributed"]
    rows = "\n".join(f"| distributed, rank {x['rank']} of {len(d)} | {x['seconds']:.1f} | {x['peak_rss_mib']:.0f} | "
                     f"{x['peak_rss_mib'] - x['base_rss_mib']:.0f} |" for x in d)
    return f"""# ECL merge: one process against {len(d)} ranks ({r['keys']:,} synthetic keys in {r['shards']:,} shards)

Command: `{command}`
Machine: {r['machine']} (other jobs' load varies: compare rows of one run). Date: {r['date']}.
Rule: keep 0.7; scores clean ~ N(0.2, 0.1), 30 % noisy ~ N(0, 0.1); each rank is a fresh
process (peak RSS: `VmHWM` of that process, with its imports: torch, the trainer; not
`getrusage`'s `ru_maxrss`, which a child inherits from its parent across exec).

| merge | seconds | peak RSS MiB | above the process after its imports, MiB |
|---|--:|--:|--:|
| today's `merge()`, rank 0 alone | {m['seconds']:.1f} | {m['peak_rss_mib']:.0f} | {m['peak_rss_mib'] - m['base_rss_mib']:.0f} |
{rows}

Distributed wall time, process start to the last rank's exit: {r['distributed_wall_seconds']:.1f} s.
The distributed merge wrote the same scores.jsonl, manifest.txt and index.json byte for byte:
{r['identical_files']}. Kept {d[0]['kept']:,} of {d[0]['total']:,} (AUC {d[0]['auc']:.4f}; today's {m['auc']:.4f}).
On disk: scores.jsonl {r['disk_mib']['scores.jsonl']:.0f} MiB, manifest.txt {r['disk_mib']['manifest.txt']:.0f} MiB.
"""


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


# ----------------------------------------------------------------------------- the score

def embed(checkpoints: list[str], shards, work: Path, batch_size: int = 256) -> dict:
    """Every pair's image and caption embedding under each checkpoint, its key and noise flag,
    and each checkpoint's logit scale; cached in ``work/embeddings.pt``."""
    cache = work / "embeddings.pt"
    names, models, tokenizer, cfg = _load_ensemble(checkpoints)
    if cache.is_file():
        got = torch.load(cache)
        if got["members"] == names:
            return got
    urls = D.expand_shards(shards, "--shards")
    decoder, pixels = D.eval_decoder(cfg, tokenizer), D.model_pixels(cfg)
    units = S.work_units(len(urls), 1)
    out = {"members": names, "img": [[] for _ in models], "txt": [[] for _ in models],
           "scale": [float(m.scale().detach()) for m in models], "keys": [], "noisy": []}
    with torch.no_grad():
        for ev in S._unit_events(urls, units, decoder, None, batch_size, lambda u: False):
            if ev[0] == "done":
                out["keys"] += [r["key"] for r in ev[2]]
                out["noisy"] += [bool(r["noisy"]) for r in ev[2]]
                continue
            batch = ev[3]
            for k, model in enumerate(models):
                img, txt, *_ = model.eval()(pixel_values=pixels(batch["image"], "cpu", torch.float32),
                                            input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"])
                out["img"][k].append(img.float())
                out["txt"][k].append(txt.float())
    out["img"] = [torch.cat(x) for x in out["img"]]
    out["txt"] = [torch.cat(x) for x in out["txt"]]
    work.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def _pooled(img, txt, temperature: float, pool: int | None, chunk: int = 1024) -> torch.Tensor:
    """Self-confidence against the first ``pool`` pairs (None: all), each pair left out of its own pool."""
    n = img.shape[0]
    p = n if pool is None else min(pool, n)
    out = []
    for a in range(0, n, chunk):
        rows = torch.arange(a, min(a + chunk, n))
        same = rows[:, None] == torch.arange(p)[None, :]
        out.append(S.self_confidence(img[rows], txt[rows], img[:p], txt[:p], temperature, same))
    return torch.cat(out)


def _in_batch(img, txt, temperature: float, batch: int) -> torch.Tensor:
    """Self-confidence among the other pairs of each scoring batch (data order)."""
    out = []
    for a in range(0, img.shape[0], batch):
        i, t = img[a:a + batch], txt[a:a + batch]
        out.append(S.self_confidence(i, t, i, t, temperature, torch.eye(i.shape[0], dtype=torch.bool)))
    return torch.cat(out)


def _csls(img, txt, pool: int, k: int) -> torch.Tensor:
    """``2 cos - r_T(x) - r_I(t)``, ``r``: the mean cosine to the ``k`` nearest of the other modality in the pool."""
    img, txt = img.double(), txt.double()
    near_t = (img @ txt[:pool].T).topk(k, 1).values.mean(1)
    near_i = (txt @ img[:pool].T).topk(k, 1).values.mean(1)
    return 2 * (img * txt).sum(-1) - near_t - near_i


def _z(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def candidates(e: dict, pool: int) -> dict[str, list[torch.Tensor]]:
    """``{candidate: [score under member k, ...]}``; the ensemble is the sum over the members."""
    cands: dict[str, list[torch.Tensor]] = {}
    for img, txt, s in zip(e["img"], e["txt"], e["scale"]):
        cos = (img.double() * txt.double()).sum(-1)
        sc_pool = _pooled(img, txt, s, pool)
        rows = {"cosine (today)": cos,
                "cosine, z-scored per member": _z(cos),
                "cosine rank (0..1) per member": torch.argsort(torch.argsort(cos)).double() / cos.numel(),
                "logit: scale x cosine": s * cos,
                "self-conf., in batch of 256, T = scale": _in_batch(img, txt, s, 256),
                f"self-conf., pool {pool}, T = scale": sc_pool,
                "self-conf., all pairs, T = scale": _pooled(img, txt, s, None),
                f"self-conf., pool {pool}, z-scored per member": _z(sc_pool)}
        for t in (10.0, 30.0, 100.0):
            rows[f"self-conf., pool {pool}, T = {t:g}"] = _pooled(img, txt, t, pool)
        rows[f"self-conf., pool {pool}, T = 100, z-scored per member"] = _z(rows[f"self-conf., pool {pool}, T = 100"])
        rows[f"hubness-corrected cosine (CSLS, 50 neighbours in pool {pool})"] = _csls(img, txt, pool, 50)
        for name, v in rows.items():
            cands.setdefault(name, []).append(v)
    return cands


def separation(score: np.ndarray, noisy: np.ndarray, keep: float = 0.7) -> dict:
    """AUROC, the dropped set's precision and recall at ``keep``, and the best precision of a
    dropped set (the lowest scores) with recall >= 0.8."""
    order = np.argsort(score, kind="stable")              # lowest first: dropped first
    hits = np.cumsum(noisy[order])
    n_drop = score.size - int(round(keep * score.size))
    recall = hits / noisy.sum()
    precision = hits / np.arange(1, score.size + 1)
    at = int(np.argmax(recall >= 0.8))
    return {"auroc": S._auc(score, noisy), "precision_at_keep": float(precision[n_drop - 1]),
            "recall_at_keep": float(recall[n_drop - 1]), "precision_at_recall_0.8": float(precision[at:].max()),
            "drop_fraction_at_recall_0.8": (at + 1) / score.size}


BOOTSTRAP = 200


def gain_interval(ensemble: np.ndarray, member: np.ndarray, noisy: np.ndarray, boot: np.ndarray) -> list[float]:
    """95 % interval of ``AUROC(ensemble) - AUROC(member)`` over pairs resampled with replacement
    (paired: both scores on the same resample)."""
    gains = [S._auc(ensemble[i], noisy[i]) - S._auc(member[i], noisy[i]) for i in boot]
    return [float(np.percentile(gains, 2.5)), float(np.percentile(gains, 97.5))]


def score_candidates(args, argv: list[str]) -> int:
    work = Path(args.work)
    t0 = time.perf_counter()
    e = embed(args.checkpoints, args.data, work)
    t_embed = time.perf_counter() - t0
    noisy = np.array(e["noisy"])
    steps = [Path(m).name for m in e["members"]]
    result = {"members": e["members"], "scales": e["scale"], "pairs": int(noisy.size), "noisy": int(noisy.sum()),
              "pool": args.pool, "embed_seconds": t_embed, "candidates": {}}
    boot = np.random.default_rng(0).integers(noisy.size, size=(BOOTSTRAP, noisy.size))
    for name, per_member in candidates(e, args.pool).items():
        row = {step: separation(v.numpy(), noisy) for step, v in zip(steps, per_member)}
        ens = sum(per_member).numpy()
        row["ensemble"] = separation(ens, noisy)
        best = per_member[int(np.argmax([row[s]["auroc"] for s in steps]))].numpy()
        row["ensemble"]["gain_interval"] = gain_interval(ens, best, noisy, boot)
        result["candidates"][name] = row
    if args.free:
        last = _pooled(e["img"][-1], e["txt"][-1], 100.0, args.pool).numpy()
        result["free"] = free_scores(Path(args.free), e["keys"], noisy, last, args.free_window, boot)
    text = json.dumps(result, indent=2)
    md = scores_report(result, " ".join(["python -m trainer bench select", *argv]))
    print(md)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".md").write_text(md)
    return 0


FREE_FIELDS = {"cos": "cosine", "sc_batch": "self-conf. in the micro-batch, T = scale",
               "sc_queue": "self-conf. vs micro-batch + last 1024, T = scale",
               "sc_queue_t30": "self-conf. vs micro-batch + last 1024, T = 30"}


def free_scores(run: Path, keys: list[str], noisy: np.ndarray, last: np.ndarray, window: int,
                boot: np.ndarray) -> dict:
    """The free scores ``select.free_scores`` recorded (``run/select/free/rank_*.jsonl``): per
    field, the AUROC of each pair's mean score in each window of steps (over the pairs seen in
    it), of its mean over all steps and over the second half, and of the last checkpoint's
    self-confidence (T = 100, ``last``) plus the second half's mean (pairs never seen there:
    the median)."""
    idx = {k: i for i, k in enumerate(keys)}
    rows = [json.loads(line) for f in sorted((run / "select" / "free").glob("rank_*.jsonl"))
            for line in f.read_text().splitlines()]
    steps = max(r["step"] for r in rows)
    out = {"steps": steps, "window": window, "fields": {}}

    def mean(field: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        total, count = np.zeros(len(keys)), np.zeros(len(keys))
        for r in rows:
            if lo <= r["step"] <= hi:
                total[idx[r["key"]]] += r[field]
                count[idx[r["key"]]] += 1
        return total / np.maximum(count, 1), count > 0

    for field in FREE_FIELDS:
        res = {"windows": []}
        for lo in range(1, steps + 1, window):
            v, seen = mean(field, lo, lo + window - 1)
            res["windows"].append({"steps": [lo, min(lo + window - 1, steps)], "pairs": int(seen.sum()),
                                   "auroc": S._auc(v[seen], noisy[seen])})
        for name, lo in (("all steps", 1), ("second half", steps // 2 + 1)):
            v, seen = mean(field, lo, steps)
            res[name] = {"pairs": int(seen.sum()), "auroc": S._auc(v[seen], noisy[seen])}
        v, seen = mean(field, steps // 2 + 1, steps)
        filled = np.where(seen, v, np.median(v[seen]))
        res["last checkpoint"] = separation(last, noisy)
        res["second half, every pair"] = separation(filled, noisy)
        res["last checkpoint + second half"] = separation(last + filled, noisy)
        best = last if res["last checkpoint"]["auroc"] >= res["second half, every pair"]["auroc"] else filled
        res["last checkpoint + second half"]["gain_interval"] = gain_interval(last + filled, best, noisy, boot)
        out["fields"][field] = res
    return out


def scores_report(r: dict, command: str) -> str:
    steps = [Path(m).name for m in r["members"]]
    cols = [*steps, "ensemble"]
    head = "| candidate | " + " | ".join(f"AUROC {c}" for c in cols) + " | ensemble beats best member | " \
           "ensemble P / R at keep 0.7 | ensemble best P at R >= 0.8 |\n|---|" + "--:|" * (len(cols) + 3) + "\n"
    lines = []
    for name, row in r["candidates"].items():
        best = max(row[s]["auroc"] for s in steps)
        ens = row["ensemble"]
        lines.append(f"| {name} | " + " | ".join(f"{row[c]['auroc']:.4f}" for c in cols)
                     + f" | {_beats(ens, best)}"
                     + f" | {ens['precision_at_keep']:.3f} / {ens['recall_at_keep']:.3f}"
                     + f" | {ens['precision_at_recall_0.8']:.3f} |")
    scales = ", ".join(f"{s} {v:.1f}" for s, v in zip(steps, r["scales"]))
    pr = ["| candidate | " + " | ".join(f"{c}: P / R at keep 0.7, best P at R >= 0.8" for c in cols) + " |",
          "|---|" + "--:|" * len(cols)]
    for name, row in r["candidates"].items():
        pr.append(f"| {name} | " + " | ".join(f"{row[c]['precision_at_keep']:.3f} / {row[c]['recall_at_keep']:.3f}, "
                                             f"{row[c]['precision_at_recall_0.8']:.3f}" for c in cols) + " |")
    free = _free_report(r["free"]) if "free" in r else ""
    return f"""# ECL's score: which confidence makes the ensemble beat its members

Command: `{command}` (CPU; `bash bench/ecl_scores.sh` makes the data and the run, then runs it).
{r['pairs']:,} training pairs, {r['noisy']:,} of them noisy (a
caption of another pair); logit scales: {scales}. AUROC: the score as a detector of clean pairs.
The ensemble is the sum of the members' scores; "beats": its AUROC minus the best member's,
with a 95 % interval from {BOOTSTRAP} paired bootstrap resamples of the pairs. P / R: precision and recall of the dropped set
(the lowest 30 %); best P at R >= 0.8: the precision of the smallest dropped set that holds 80 %
of the noisy pairs. Goal: the ensemble above every member, AUROC >= 0.95, P >= 0.9 at R >= 0.8.

{head}""" + "\n".join(lines) + """

The dropped set of each score (P / R: precision and recall at keep 0.7; then the best precision
at recall >= 0.8):

""" + "\n".join(pr) + "\n" + free


def _beats(ens: dict, best: float) -> str:
    lo, hi = ens["gain_interval"]
    verdict = "yes" if lo > 0 else "no" if hi < 0 else "within noise"
    return f"{verdict}: {ens['auroc'] - best:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _free_report(f: dict) -> str:
    wins = [f"steps {w['steps'][0]}-{w['steps'][1]}" for w in next(iter(f["fields"].values()))["windows"]]
    lines = ["| free score | " + " | ".join(wins) + " | mean, all steps | mean, second half | member: second half, "
             "every pair | member: last checkpoint (self-conf. T = 100) | ensemble: their sum | ensemble beats best "
             "member | ensemble P / R at keep 0.7, best P at R >= 0.8 |",
             "|---|" + "--:|" * (len(wins) + 7)]
    for field, res in f["fields"].items():
        a, b, c = (res[k]["auroc"] for k in ("last checkpoint", "second half, every pair", "last checkpoint + second half"))
        ens = res["last checkpoint + second half"]
        lines.append(f"| {FREE_FIELDS[field]} | " + " | ".join(f"{w['auroc']:.4f} ({w['pairs']})" for w in res["windows"])
                     + f" | {res['all steps']['auroc']:.4f} ({res['all steps']['pairs']})"
                     + f" | {res['second half']['auroc']:.4f} ({res['second half']['pairs']})"
                     + f" | {b:.4f} | {a:.4f} | {c:.4f} | {_beats(ens, max(a, b))}"
                     + f" | {ens['precision_at_keep']:.3f} / {ens['recall_at_keep']:.3f}, {ens['precision_at_recall_0.8']:.3f} |")
    return f"""
Free scores (`select.free_scores=true`: each pair's confidence under the model before it trains on
the pair's micro-batch, read from the training forward; {f['steps']} steps). Each cell: the AUROC of
each pair's mean score in those steps, over the pairs seen there (their count in brackets; the
stream resamples shards with replacement, so a window sees some pairs several times and others
not at all). The ensemble: the sum of the last checkpoint's self-confidence and the pair's mean
free score over the second half, the median for a pair not seen there (both members over every pair).

""" + "\n".join(lines) + "\n"
