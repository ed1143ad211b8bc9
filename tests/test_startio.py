"""Start-up and evaluation I/O at scale (issue 20 §7): shard lists globbed once on rank 0,
``checkpoint.init`` consolidated once, a validation shard split by sample without every rank
reading all of it, decoding in loader workers, file-system decisions made on rank 0, and a
key-per-line manifest above a size refused with its conversion command.

The single-process parts are fast; the two-rank parts share one spawned gloo pair (full tier)."""
from __future__ import annotations

import glob
import json
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import data_overrides
from trainer import data as D
from trainer.config import ConfigError, load_config

CONFIG = "trainer/configs/demo.yaml"


def _cfg(demo_data: Path, out: Path, *extra):
    return load_config(CONFIG, [*data_overrides(demo_data, out), "model.context_length=24", "data.batch_size=8",
                                "data.train_num_samples=64", *extra])


def _decoder(demo_data: Path):
    tok = D.load_tokenizer(str(demo_data / "tokenizer"))
    return D.SampleDecoder(tok, 24, D.build_transforms(64, [0.5] * 3, [0.5] * 3, 1.0, train=False))


class _CountingFile:
    """A read-only file that counts the bytes read through it (seeks are free)."""

    def __init__(self, fh, tally: list):
        self.fh, self.tally = fh, tally

    def read(self, n=-1):
        data = self.fh.read(n)
        self.tally[0] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _tar_samples(url: str) -> list[dict]:
    """The reference reading: webdataset's, every sample of the shard in order."""
    return list(D.tariterators.tarfile_samples([{"url": url}]))


# ------------------------------------------------------------------------- the validation set

def test_one_val_shard_on_two_ranks_each_rank_reads_about_half_the_bytes(demo_data, monkeypatch):
    """96 samples in one shard, 2 ranks: each rank decodes its 48 and reads their bytes plus the
    tar headers, not the whole shard (before: every rank read all of it, then dropped half)."""
    (url,) = D.expand_shards(str(demo_data / "val"), "k")
    size = os.path.getsize(url)
    ref = _tar_samples(url)
    tallies = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return _CountingFile(fh, tallies[-1]) if path == url and "b" in mode else fh
    monkeypatch.setattr(D, "open", counting_open, raising=False)
    got = []
    for rank in range(2):
        tallies.append([0])
        got.append([s for s in D._eval_samples([url], rank, 2, D._Counter())])
    with tarfile.open(url) as tf:
        headers = 512 * (len(tf.getmembers()) + 2)   # one block per member, two closing blocks
    for rank, (samples, (n_bytes,)) in enumerate(zip(got, tallies)):
        assert [s["__key__"] for s in samples] == [s["__key__"] for s in ref[rank::2]]
        assert samples == ref[rank::2]             # the same bytes as webdataset's reading
        data = sum(len(v) for s in samples for k, v in s.items() if not k.startswith("__"))
        # its own samples' data and every header, nothing of the other rank's samples
        assert data <= n_bytes <= data + headers < size, (rank, n_bytes, data, headers, size)


class _PidDecoder(D.SampleDecoder):
    """Marks each batch with the process that tokenized (so decoded) it."""

    def tokenize(self, texts):
        return {**super().tokenize(texts), "pid": os.getpid()}


def _pid_decoder(demo_data: Path) -> _PidDecoder:
    dec = _decoder(demo_data)
    return _PidDecoder(dec.tokenizer, dec.context_length, dec.transform)


@pytest.mark.full   # ~2 s (two loaders' workers); the fast tier's 2-rank evaluation (test_eval) decodes in 1 worker
def test_val_split_with_workers_covers_every_sample_once_decoded_in_the_workers(demo_data):
    (url,) = D.expand_shards(str(demo_data / "val"), "k")
    dec = _pid_decoder(demo_data)
    ref = [s["__key__"] for s in _tar_samples(url)]
    world = 2   # without workers: tests/test_data.py's split test, worlds 1 to 3
    for r in range(world):
        batches = list(D.eval_batches([url], dec, 10, r, world, workers=2))
        assert sorted(k for b in batches for k in b["keys"]) == sorted(ref[r::world]), r
        assert len({b["pid"] for b in batches}) == 2 and os.getpid() not in {b["pid"] for b in batches}


@pytest.mark.full   # ~3 s; the fast tier's rounds inside training (test_selection) score with data.workers loaders
def test_ecl_scoring_units_are_read_and_decoded_in_workers_as_in_process(demo_data):
    from trainer.methods.selection import _unit_events, work_units

    urls = D.expand_shards(str(demo_data / "train"), "k")[:1]
    dec = _pid_decoder(demo_data)
    units = work_units(len(urls), 2)   # 1 shard, 2 ranks: 2 interleaved parts
    subset = D.KeyManifest(frozenset(s["__key__"] for s in _tar_samples(urls[0])[::3]))   # 43 of 128 decoded

    def by_unit(workers):
        got, pids = {}, set()
        for ev in _unit_events(urls, units, dec, subset, 6, lambda u: False, workers):
            if ev[0] == "batch":
                records, positions, batch = ev[1:]
                pids.add(batch["pid"])
                got.setdefault(id(records), []).append(([records[p]["key"] for p in positions], batch["image"]))
            else:
                _, unit, records, skipped, _ = ev
                got[unit.name] = (records, got.pop(id(records), []), skipped)
        return got, pids
    alone, pids0 = by_unit(0)
    inside, pids2 = by_unit(2)
    assert pids0 == {os.getpid()} and len(pids2) == 2 and os.getpid() not in pids2
    assert sorted(alone) == sorted(inside) == sorted(u.name for u in units)
    assert sum(len(k) for _, batches, _ in alone.values() for k, _ in batches) == len(subset)
    for name, (records, batches, skipped) in alone.items():
        records2, batches2, skipped2 = inside[name]
        assert records2 == records and skipped2 == skipped == 0 and len(records) == 64
        assert [k for k, _ in batches2] == [k for k, _ in batches] and len(batches) > 1
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(batches, batches2))


def test_a_pipe_val_shard_split_by_sample_reads_the_same_samples(demo_data):
    (url,) = D.expand_shards(str(demo_data / "val"), "k")
    for rank in range(3):
        by_file = [s["__key__"] for s in D._eval_samples([url], rank, 3, D._Counter())]
        by_pipe = [s["__key__"] for s in D._eval_samples([f"pipe:cat {url}"], rank, 3, D._Counter())]
        assert by_pipe == by_file and len(by_file) == 32


# ------------------------------------------------------------------------- shard lists

def test_only_launch_rank_0_globs_in_the_checks_before_the_process_group(demo_data, tmp_path, monkeypatch):
    from trainer.preflight import check_run_inputs

    monkeypatch.setattr(D, "_EXPANDED", {})
    calls = []
    real = glob.glob
    monkeypatch.setattr(glob, "glob", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cfg = _cfg(demo_data, tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    check_run_inputs(cfg, 2)
    assert calls == []
    monkeypatch.setenv("RANK", "0")
    check_run_inputs(cfg, 2)
    assert sorted(calls) == sorted([f"{demo_data}/train/*.tar", f"{demo_data}/val/*.tar"])
    calls.clear()
    check_run_inputs(cfg, 2)   # kept for shard_list: no second glob on rank 0
    assert calls == []


# ------------------------------------------------------------------------- key-per-line manifests

def test_a_key_manifest_above_the_limit_exits_2_with_the_conversion_command(demo_data, tmp_path, capsys):
    from trainer.cli import main
    from trainer.preflight import check_run_inputs

    keys = [f"train_{i:08d}" for i in range(0, 768, 3)] + ["not_in_any_shard"]
    flat = tmp_path / "kept.txt"
    flat.write_text("# kept\n" + "\n".join(keys) + "\n")
    cfg = _cfg(demo_data, tmp_path / "run", f"data.manifest={flat}", "data.key_manifest_max_mb=0.001")
    with pytest.raises(ConfigError) as err:
        check_run_inputs(cfg, 1)
    msg = str(err.value)
    assert "data.key_manifest_max_mb" in msg and "python -m trainer convert-manifest" in msg
    command = msg.split("python -m trainer ")[1].split(", then")[0].split()
    out = tmp_path / "per-shard"
    assert command[-2:] == ["--out", "DIR"]
    assert main([*command[:-1], str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["keys"] == len(keys) and report["kept"] == len(keys) - 1 and report["samples"] == 768
    m = D.read_manifest(str(out), D.expand_shards(str(demo_data / "train"), "k"))
    assert isinstance(m, D.ShardManifest) and len(m) == len(keys) - 1
    for tar in sorted((demo_data / "train").glob("*.tar")):
        with tarfile.open(tar) as tf:
            in_shard = [n.name.split(".")[0] for n in tf.getmembers()]
        assert m.keys_for(str(tar)) == set(in_shard) & set(keys)
        # and in the shard's order, one contiguous range per shard
        start, end = m.ranges[D.canonical_url(str(tar))]
        listed = (out / "manifest.txt").read_bytes()[start:end].decode().split()
        assert listed == sorted(set(listed), key=in_shard.index)
    cfg = _cfg(demo_data, tmp_path / "run", f"data.manifest={out}", "data.key_manifest_max_mb=0.001")
    check_run_inputs(cfg, 1)   # the per-shard form has no such limit
    assert main(["convert-manifest", "--manifest", str(tmp_path / "nope.txt"), "--shards", str(demo_data / "train"),
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: convert-manifest --manifest: file not found")


def test_a_small_key_manifest_is_read_whole_as_before(tmp_path):
    flat = tmp_path / "kept.txt"
    flat.write_text("a\nb\n")
    assert isinstance(D.read_manifest(str(flat)), D.KeyManifest)


# ------------------------------------------------------------------------- two ranks (full tier)

def _two_rank_main(rank: int, world: int, outdir: str, data: str, init: str) -> None:
    """One rank: the checks before the process group, then the run's expansions, rank-0 decisions,
    and checkpoint.init, counting what each rank reads."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    result: dict = {}
    try:
        import deepspeed.utils.zero_to_fp32 as z2f

        from trainer import dist as TD
        from trainer import methods
        from trainer.methods.selection import Selection, score_of, source_id
        from trainer.model import build_model
        from trainer.preflight import check_run_inputs
        from trainer.train import TrainData

        globs, consolidations = [], [0]
        real_glob, real_z2f = glob.glob, z2f.get_fp32_state_dict_from_zero_checkpoint
        glob.glob = lambda *a, **k: globs.append(a[0]) or real_glob(*a, **k)

        def counted(*a, **k):
            consolidations[0] += 1
            return real_z2f(*a, **k)
        z2f.get_fp32_state_dict_from_zero_checkpoint = counted
        out = Path(outdir) / "run"
        cfg = _cfg(Path(data), out, "data.workers=0")
        check_run_inputs(cfg, world)                                   # the CLI's checks, before the group
        dist.init_process_group("gloo", init_method=f"file://{outdir}/store", rank=rank, world_size=world)
        train = TrainData(cfg, _decoder(Path(data)), rank, world, None)   # the run's stream
        val = [D.shard_list(cfg.data.val_shards, "data.val_shards") for _ in range(2)]   # two evaluations
        result.update(globs=list(globs), train_urls=train.urls, val_urls=val)

        # A decision with a stale view on rank 1: rank 0's answer holds everywhere.
        result["decided"] = TD.from_rank0(lambda: f"rank {rank}")
        def bad_input():
            raise ConfigError(f"bad input on rank {rank}")
        try:
            TD.from_rank0(bad_input)
        except ConfigError as err:
            result["error"] = str(err)
        # "Round already done": rank 1's file system does not show the summary yet.
        sel = Selection(_cfg(Path(data), out, "select.enabled=true", "select.every_steps=2"), rank, world)
        round_dir = sel.round_dir(1)
        source = source_id("train", 2, None, "None", score_of(sel.cfg).describe())
        if rank == 0:
            round_dir.mkdir(parents=True)
            (round_dir / "summary.json").write_text(json.dumps({"source": source, "kept": 7, "total": 10}))
        TD.barrier()
        if rank == 1:
            real_is_file = Path.is_file
            Path.is_file = lambda p: False if p.name == "summary.json" else real_is_file(p)
        manifest, summary = sel.round(None, 2, None, torch.device("cpu"))   # no model: a round to run would fail
        result["round"] = (manifest, summary)
        if rank == 1:
            Path.is_file = real_is_file

        # checkpoint.init from a ZeRO-1 checkpoint: consolidated by rank 0 alone.
        icfg = _cfg(Path(data), Path(outdir) / "init-run", f"checkpoint.init={init}")
        tok = D.load_tokenizer(icfg.tokenizer.path)
        model = build_model(icfg.model, tok, seed=123)
        methods.attach(model, icfg)
        assert methods.load_init(model, icfg) is not None
        result["init"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result["consolidations"] = consolidations[0]
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        import traceback
        traceback.print_exc()
        os._exit(1)
    from trainer.dist import exit_process, shutdown
    shutdown()
    exit_process(0)


@pytest.fixture(scope="module")
def two_ranks(demo_data, tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    from test_eval import tiny_run

    init = tiny_run(demo_data, tmp_path_factory)   # a 2-rank ZeRO-1 run (shared with test_eval)
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_two_rank_main, args=(2, outdir, str(demo_data), str(init)), nprocs=2,
                           start_method="spawn")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(2)] + [init]


@pytest.mark.full   # spawns two ranks (~30 s); the fast tier's 2-rank evaluation (test_eval) runs shard_list
def test_shard_lists_are_globbed_once_on_rank_0(two_ranks, demo_data):
    r0, r1, _ = two_ranks
    assert sorted(r0["globs"]) == sorted([f"{demo_data}/train/*.tar", f"{demo_data}/val/*.tar"])
    assert r1["globs"] == []
    train = D.expand_shards(str(demo_data / "train"), "k")
    val = D.expand_shards(str(demo_data / "val"), "k")
    for r in (r0, r1):
        assert r["train_urls"] == train and r["val_urls"] == [val, val]


@pytest.mark.full   # with the spawned pair above
def test_file_system_decisions_are_rank_0s(two_ranks):
    r0, r1, _ = two_ranks
    assert r0["decided"] == r1["decided"] == "rank 0"
    assert r0["error"] == r1["error"] == "bad input on rank 0"
    assert r0["round"] == r1["round"]
    assert r1["round"][1] == {"source": r1["round"][1]["source"], "kept": 7, "total": 10}


@pytest.mark.full   # with the spawned pair above
def test_checkpoint_init_is_consolidated_once_and_every_rank_gets_the_weights(two_ranks, demo_data, tmp_path):
    from trainer import methods
    from trainer.sources import init_source

    r0, r1, init = two_ranks
    assert (r0["consolidations"], r1["consolidations"]) == (1, 0)
    src, root, tag = init_source(str(init))
    ref = methods.growth_weights(src, root, tag)   # one process, DeepSpeed's own reader
    for r in (r0, r1):
        for k, v in ref.items():   # (ZeRO stores the scalar logit scale as shape [1])
            assert torch.equal(r["init"][k].float(), v.detach().reshape(r["init"][k].shape)), k
