"""ECL's distributed merge (trainer/methods/selection.py: merge_distributed) against the
single-process merge(): the same scores.jsonl, manifest.txt and index.json byte for byte and the
same summary, over small synthetic part files with ties at the threshold; ranks as threads of
this process (the fast tier) and as 2 gloo processes (the full tier); a merge killed on one rank
resumes."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from trainer.dist import exit_process
from trainer.methods import selection as S

# ----------------------------------------------------------------------------- synthetic parts

def urls_of(n: int) -> list[str]:
    return [f"/synthetic/merge-{s:03d}.tar" for s in range(n)]


def write_parts(out: Path, n_shards: int, per: list[int], score_world: int, seed: int, offset: float = 0.0,
                unknown_noise: bool = False, absent_rate: float = 0.1) -> list[S.Unit]:
    """Parts as the scoring ranks write them: scores rounded to 0.1 (many ties), some samples not
    in the subset (score None), one corrupt; a shard split in interleaved units when
    ``score_world`` ranks outnumber the shards."""
    rng = np.random.default_rng(seed)
    units = S.work_units(n_shards, score_world)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        noisy = rng.random(per[s]) < 0.3
        score = np.round(np.where(noisy, rng.normal(0.0, 0.2, per[s]), rng.normal(0.3, 0.2, per[s])), 1) + offset
        absent = rng.random(per[s]) < absent_rate
        for u in (u for u in units if u.shard == s):
            rows = []
            for i in range(u.part, per[s], u.parts):
                rec = {"i": i, "key": f"k{s:03d}-{i:04d}", "score": None if absent[i] else float(score[i]),
                       "noisy": None if unknown_noise and i == 0 else bool(noisy[i])}
                if absent[i] and i % 7 == 0:
                    rec["corrupt"] = True
                rows.append(rec)
            header = {"format": S.FORMAT, "unit": u.name, "url": urls_of(n_shards)[s], "source": "syn",
                      "samples": len(rows), "scored": sum(r["score"] is not None for r in rows),
                      "skipped": s, "seconds": 0.5, "models": 1}
            S._write_lines(out / "parts" / f"{u.name}.jsonl", [header, *rows])
    return units


RULES = {"keep": S.Rule(keep=0.7), "keep-all": S.Rule(keep=1.0), "keep-few": S.Rule(keep=0.013),
         "threshold": S.Rule(keep=None, threshold=0.3), "percentile": S.Rule(keep=None, percentile=37.5)}


def case_dir(root: Path, name: str) -> Path:
    """A case: parts (and, for "carried", an earlier selection) under ``root/name/ref``; the
    single-process merge's outputs in ``ref``, a copy of the parts in ``dist`` for the ranks."""
    n_shards, per, score_world = {"one-shard": (1, [37], 2)}.get(name, (3, [61, 40, 23], 5))
    base = root / name
    ref = base / "ref"
    units = write_parts(ref, n_shards, per, score_world, seed=len(name), unknown_noise=name == "unknown-noise")
    carried = []
    if name == "carried":
        prev = base / "prev"
        write_parts(prev, n_shards, per, score_world, seed=99, offset=0.05, absent_rate=0.0)
        S.merge(prev, urls_of(n_shards), units, source="syn", rule=S.Rule(keep=1.0), carried=[], meta={})
        carried = [prev]
    shutil.copytree(ref / "parts", base / "dist" / "parts")
    rule = RULES.get(name, RULES["keep"])
    S.merge(ref, urls_of(n_shards), units, source="syn", rule=rule, carried=[S.CarriedScores(c) for c in carried],
            meta={"case": name})
    return base


CASES = [*RULES, "carried", "one-shard", "unknown-noise"]


class ThreadComm(S._Comm):
    """The merge's collectives between threads of this process (each thread a rank): the fast
    tier's stand-in for a process group (the gloo one: the full tier below)."""

    def __init__(self, rank: int, world: int, shared: dict):
        self.rank, self.world, self.shared = rank, world, shared

    def gather_object(self, obj) -> list:
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = obj
        barrier.wait()
        got = list(slots)
        barrier.wait()
        return got

    def reduce(self, x, op="sum"):
        fn = {"sum": np.add, "max": np.maximum, "min": np.minimum}[op]
        got = self.gather_object(np.array(x))
        out = got[0].copy()
        for g in got[1:]:
            out = fn(out, g)
        return out

    def barrier(self) -> None:
        self.shared["barrier"].wait()

    def exchange(self, keys, counts):
        cuts = np.cumsum([0, *counts])
        got = self.gather_object([keys[cuts[r]:cuts[r + 1]] for r in range(self.world)])
        return np.concatenate([g[self.rank] for g in got]).astype(np.uint64)


class Killed(BaseException):
    """A rank gone mid-merge (not an error the merge catches and shares)."""


def _merge_case(base: Path, name: str, comm=None) -> None:
    n_shards = len(json.loads((base / "ref" / "index.json").read_text())["shards"])
    carried = [S.CarriedScores(base / "prev")] if name == "carried" else []
    S.merge_distributed(base / "dist", urls_of(n_shards), _units(base / "dist", n_shards), source="syn",
                        rule=RULES.get(name, RULES["keep"]), carried=carried, meta={"case": name}, comm=comm)


def thread_ranks(base: Path, name: str, world: int = 2, kill: tuple[int, int] | None = None) -> list:
    """The merge on ``world`` threads; ``kill=(rank, shard)``: that rank vanishes once it staged the
    shard. Returns each rank's exception (None: it finished)."""
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world, timeout=60)}
    errors = [None] * world

    def hook(s):
        if kill is not None and threading.current_thread().name == f"rank{kill[0]}" and s == kill[1]:
            raise Killed()

    def run(r):
        try:
            _merge_case(base, name, ThreadComm(r, world, shared))
        except Exception as err:  # noqa: BLE001 - the merge shares it: every rank raises, no one waits
            errors[r] = err
        except Killed as err:
            errors[r] = err
            shared["barrier"].abort()   # as a peer's closed connection fails the others' collectives

    S._after_stage = hook
    try:
        threads = [threading.Thread(target=run, args=(r,), name=f"rank{r}") for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        S._after_stage = None
    return errors


def _units(out: Path, n_shards: int) -> list[S.Unit]:
    names = {p.stem for p in (out / "parts").glob("*.jsonl")}
    for world in range(1, 16):
        units = S.work_units(n_shards, world)
        if {u.name for u in units} == names:
            return units
    raise AssertionError(names)


def assert_same(base: Path) -> None:
    ref, got = base / "ref", base / "dist"
    for name in ("scores.jsonl", "manifest.txt", "index.json"):
        assert (got / name).read_bytes() == (ref / name).read_bytes(), name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, got))
    assert list(a) == list(b)
    for key in a:
        if key == "merge_seconds":
            continue
        if key == "auc" and a[key] is not None:
            assert b[key] == pytest.approx(a[key], abs=1e-12)
        else:
            assert b[key] == a[key], key
    assert not (got / "merge").exists()   # the staged shards go with the summary


@pytest.mark.parametrize("name", CASES)
def test_the_distributed_merge_writes_what_the_single_process_merge_writes(tmp_path, name):
    base = case_dir(tmp_path, name)
    worlds = (2, 3) if name == "keep" else (2,)    # 3 ranks over 3 shards: one each
    for world in worlds:
        assert thread_ranks(base, name, world) == [None] * world
        assert_same(base)
        (base / "dist" / "summary.json").unlink()
    summary = json.loads((base / "ref" / "summary.json").read_text())
    if name == "keep":   # the kept count crosses a tie: 0.1-rounded scores
        scores = [json.loads(x)["score"] for x in (base / "ref" / "scores.jsonl").read_text().splitlines()]
        assert scores.count(summary["score_threshold"]) > 1 and summary["auc"] is not None
    if name == "unknown-noise":
        assert "auc" not in summary


def _tamper(base: Path, shard: int) -> None:
    """Shard ``shard``'s parts now score otherwise: only a rerun that reuses the shard's staged
    records (and redoes the rest) still writes the reference's files."""
    for part in (base / "dist" / "parts").glob(f"{shard:06d}-*.jsonl"):
        head, *rows = part.read_text().splitlines()
        rows = [json.dumps({**r, "score": None if r["score"] is None else -r["score"]}) for r in map(json.loads, rows)]
        part.write_text("\n".join([head, *rows]) + "\n")


def test_a_merge_killed_on_one_rank_reruns_what_is_missing_to_the_same_files(tmp_path):
    base = case_dir(tmp_path, "keep")
    errors = thread_ranks(base, "keep", kill=(1, 1))         # rank 1 (shard 1) gone once shard 1 is staged
    assert isinstance(errors[1], Killed) and errors[0] is not None
    assert (base / "dist" / "merge" / "000001.npz").is_file() and not (base / "dist" / "summary.json").exists()
    _tamper(base, 1)
    assert thread_ranks(base, "keep") == [None, None]
    assert_same(base)


def test_bad_input_on_one_rank_fails_every_rank_with_its_message(tmp_path):
    base = case_dir(tmp_path, "carried")
    part = base / "dist" / "parts" / "000002-0of2.jsonl"         # shard 2: rank 0's, scored from another source
    part.write_text(part.read_text().replace('"source": "syn"', '"source": "other"', 1))
    errors = thread_ranks(base, "carried")
    assert [type(e) for e in errors] == [RuntimeError, RuntimeError]
    assert all("000002-0of2" in str(e) for e in errors)


# ----------------------------------------------------------------------------- real ranks (gloo)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_ranks(rank: int, world: int, port: int, root: str, cases: list[str], kill_after: int | None) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if kill_after is not None and rank == 1:
        S._after_stage = lambda s: os._exit(9) if s == kill_after else None
    try:
        for name in cases:
            _merge_case(Path(root) / name, name)
    finally:
        dist.destroy_process_group()
    exit_process(0)   # gloo's threads can abort a finalizing interpreter (trainer.dist.exit_process)


def spawn(root: Path, cases: list[str], kill_after: int | None = None) -> None:
    mp.spawn(_gloo_ranks, args=(2, _free_port(), str(root), cases, kill_after), nprocs=2, join=True)


@pytest.mark.full   # two spawned processes importing the trainer (~1 min on the 2-core CI machine); the thread ranks above are the fast tier
def test_on_two_gloo_processes_and_killed_there(tmp_path):
    cases = ["keep", "percentile", "carried"]
    for name in cases:
        case_dir(tmp_path, name)
    spawn(tmp_path, cases)
    for name in cases:
        assert_same(tmp_path / name)
    killed = tmp_path / "killed"
    case_dir(killed, "keep")
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        spawn(killed, ["keep"], kill_after=1)                # a real kill: rank 1's process exits
    assert (killed / "keep" / "dist" / "merge" / "000001.npz").is_file()
    _tamper(killed / "keep", 1)
    spawn(killed, ["keep"])
    assert_same(killed / "keep")


# ----------------------------------------------------------------------------- the pieces

def test_ordered_keys_keep_the_order_of_the_scores_and_map_back():
    x = np.array([-np.inf, -1e300, -2.5, -1e-310, -0.0, 0.0, 1e-310, 0.1, 3.0, 1e300, np.inf])
    k = S.ordered_keys(x)
    assert (np.diff(k.astype(object)) >= 0).all() and k[4] == k[5]
    assert [S.key_value(int(v)) for v in k] == [float(v) + 0.0 for v in x]


def test_the_order_statistic_and_percentile_are_numpys():
    rng = np.random.default_rng(1)
    for n in (1, 2, 5, 200):
        x = np.round(rng.normal(size=n), 1)
        keys = S.ordered_keys(x)

        def stat(i, keys=keys):   # one process: the reduce is the identity (two ranks: the tests above)
            return S.key_value(S.order_statistic(keys, i, lambda h: h))

        assert [stat(i) for i in range(n)] == np.sort(x).tolist()
        for p in (0.0, 12.5, 37.5, 50.0, 99.9):
            assert S.percentile_of(n, p, stat) == np.percentile(x, p)
