"""Elastic resume (docs/running.md, "Elastic resume"): a checkpoint continues at another world size
or worker count. The fast test is the data-position rule on the raw stream; the full tests train
2 ranks -> 1 and 1 -> 3 (gloo), ZeRO 1 and 3."""
from __future__ import annotations

import copy
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import ROOT, check, data_overrides, read_metrics, run_child, run_trainer, torchrun, trainer_env
from trainer import data as D

CONFIG = "trainer/configs/demo.yaml"


class KeyDecoder:
    """A decoder that keeps each sample's key (no image decoding: the test is about positions)."""

    def __call__(self, sample: dict, seed=None) -> str:
        return sample["__key__"]

    def collate(self, items: list) -> dict:
        return {"n": len(items)}


def stream(urls, rank, world, position=None, batch=4, buffer=8):
    return D.ResumableStream(urls, KeyDecoder(), batch_size=batch, num_samples=768, seed=0, rank=rank, world=world,
                             workers=0, shuffle_buffer=buffer, position=position)


def take(s, batches: int) -> list[str]:
    return [k for _ in range(batches) for k in s.next()["keys"]]


def shard_keys(url: str) -> list[str]:
    """A shard's sample keys in order, read with tarfile (not the trainer's reader)."""
    with tarfile.open(url) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    return list(dict.fromkeys(n.split(".", 1)[0] for n in names))


def test_elastic_position_carries_buffers_and_open_shards_then_resumes_exactly(demo_data):
    """2 ranks -> 1: the new stream first delivers exactly what the old readers had read and not
    delivered (their shuffle buffers) and the rest of the shards they were reading (listed here
    with tarfile), never a sample they delivered; the epoch's sample count carries over; and
    the new stream itself resumes exactly from a position taken inside and after that carried part."""
    urls = D.expand_shards(str(demo_data / "train"), "t")
    old = [stream(urls, r, 2) for r in range(2)]
    delivered = [take(s, 5) for s in old]   # 20 of a shard's 128 samples per rank, 8 more in its buffer
    positions = [copy.deepcopy(s.position) for s in old]
    for s in old:
        s.close()
    carried = Counter()
    for r in range(2):
        buffered = positions[r]["stream"]["reader"]["0"]["buffer_keys"].split("\n")
        (shard,) = [u for u in urls if set(delivered[r]) <= set(shard_keys(u))]   # the one shard it was reading
        rest = [k for k in shard_keys(shard) if k not in set(delivered[r]) | set(buffered)]
        carried.update(buffered + rest)
    assert sum(carried.values()) == 2 * (128 - 20)

    pos = D.elastic_position(positions, 0, rank=0, world=1, workers=0, urls=urls, seed=0, key=5)
    assert pos["epoch"] == 0 and pos["in_epoch"] == 10   # 2 ranks x 5 micro-batches of the same size
    new = stream(urls, 0, 1, copy.deepcopy(pos))
    first = take(new, 110)    # 440 samples: the 216 carried, then fresh draws
    n = sum(carried.values())
    # Until the carried shards end, the buffer holds carried samples only; then fresh ones mix in,
    # and each carried sample left in the buffer (8) leaves it at a draw with probability 1/8.
    assert Counter(first[: n - 8]) <= carried
    assert Counter(first) >= carried                     # every carried sample is delivered
    assert not set(first[: n - 8]) & (set(delivered[0]) | set(delivered[1]))

    # Exact resume of the continued stream, from inside the carried part and from after it.
    for at in (3, 56):
        s = stream(urls, 0, 1, copy.deepcopy(pos))
        take(s, at)
        saved = copy.deepcopy(s.position)
        want = take(s, 6)
        s.close()
        again = stream(urls, 0, 1, saved)
        assert take(again, 6) == want, at
        again.close()
    new.close()

    # Again, from a position inside the carried part (1 -> 2): what it had not delivered of the
    # carried samples (its buffer, the shard it read, a carried shard not reached yet) goes on.
    s = stream(urls, 0, 1, copy.deepcopy(pos))
    done = take(s, 3)
    mid = copy.deepcopy(s.position)
    s.close()
    left = carried - Counter(done)
    again = [D.elastic_position([mid], 0, rank=r, world=2, workers=0, urls=urls, seed=0, key=8) for r in range(2)]
    # the shard it was reading and the other old rank's, not reached yet
    assert [len(p["stream"]["carry"].get("0", [])) for p in again] == [2, 0]
    s = stream(urls, 0, 2, again[0])
    first = take(s, 110)
    s.close()
    m = sum(left.values())
    assert Counter(first[: m - 8]) <= left and Counter(first) >= left
    assert not set(first[: m - 8]) & (set(done) | set(delivered[0]) | set(delivered[1]))

    # 1 -> 3: the old reader goes to rank 0; ranks 1 and 2 start fresh streams of their own.
    grown = [D.elastic_position(positions[:1], 0, rank=r, world=3, workers=0, urls=urls, seed=0, key=5)
             for r in range(3)]
    assert [len(p["stream"]["carry"].get("0", [])) for p in grown] == [1, 0, 0]
    assert [p["in_epoch"] for p in grown] == [1, 1, 1]   # 5 micro-batches of 1 rank = 5/3 of 3 ranks, floored


# ----------------------------------------------------------------------------- training runs

TINY = ["model.context_length=24", "data.batch_size=8", "data.workers=1", "data.shuffle_buffer=32",
        "data.train_num_samples=768", "optim.warmup_steps=2", "optim.lr=2e-3", "log.every_steps=1",
        "log.progress=false", "data.val_shards=", "eval.zeroshot=", "checkpoint.every_steps=4",
        "train.accum_negatives=true", "max_steps=10"]


def train_args(data: Path, out: Path, *extra) -> list[str]:
    return ["train", "--config", CONFIG, *data_overrides(data, out), *TINY, *extra]


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out)}


def probe(data: Path, out: Path, source: Path, nproc: int, stage: int, dump: Path, *extra) -> dict:
    cmd = [*torchrun(nproc), str(ROOT / "tests" / "elastic_probe.py"), str(dump), CONFIG,
           *data_overrides(data, out), *TINY, f"deepspeed.zero_stage={stage}", f"checkpoint.resume={source}", *extra]
    check(run_child(cmd, timeout=400, cwd=ROOT, env=trainer_env(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")))
    return torch.load(dump, weights_only=False)


@pytest.mark.full
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("before,after,accum", [(2, 1, 2), (1, 3, 6)])
def test_elastic_resume_continues_with_the_source_optimizer_state(demo_data, tmp_path, stage, before, after, accum):
    """A run on ``before`` ranks is killed while saving step 8 (so step 4 is its latest) and rerun
    on ``after`` ranks: it converts, resumes and finishes. Right after the load, every parameter's
    fp32 master and Adam moments, the step and the learning rate equal DeepSpeed's own rigid load
    of the same checkpoint at the source world size (bit for bit: the universal checkpoint copies
    them). The global batch is kept (the accumulation is rescaled), and each step's loss after the
    switch is close to an uninterrupted run's at the source world size."""
    stage_key = f"deepspeed.zero_stage={stage}"
    base = [stage_key, f"train.grad_accum_steps={accum}"]
    whole = tmp_path / "whole"
    check(run_trainer(train_args(demo_data, whole, *base), nproc=before, timeout=500))

    out = tmp_path / "elastic"
    proc = run_trainer(train_args(demo_data, out, *base, "debug.kill_during_save_step=8"), nproc=before,
                       timeout=500)
    assert proc.returncode != 0 and (out / "checkpoints" / "latest").read_text().strip() == "step_4"
    source = out / "checkpoints" / "step_4"

    # Optimizer state after the conversion == the source's (its own world size, DeepSpeed's rigid load).
    ref = probe(demo_data, tmp_path / "p-ref", source, before, stage, tmp_path / "ref.pt", *base)
    got = probe(demo_data, tmp_path / "p-new", source, after, stage, tmp_path / "new.pt", *base)
    assert got["world"] == after and got["accum"] == accum * before // after
    assert (got["step"], got["global_steps"], got["lr"]) == (ref["step"], ref["global_steps"], ref["lr"]) \
        and ref["step"] == 4
    assert set(got["params"]) == set(ref["params"]) and len(ref["params"]) > 100
    for name, row in ref["params"].items():
        for key, value in row.items():
            assert torch.equal(got["params"][name][key], value), (name, key)
    assert any(row["exp_avg_sq"].abs().sum() > 0 for row in ref["params"].values())

    text = check(run_trainer(train_args(demo_data, out, *base), nproc=after, timeout=500))
    assert "resumed elastically from" in text and f"train.grad_accum_steps {accum} -> {accum * before // after}" in text
    assert not (out / "checkpoints" / "elastic" / "step_4").exists()   # the converted copy is removed
    got_losses, want = losses(out), losses(whole)
    assert sorted(got_losses) == list(range(1, 11))
    assert {s: got_losses[s] for s in range(1, 5)} == pytest.approx({s: want[s] for s in range(1, 5)}, rel=1e-5)
    # After the switch the samples differ (fresh streams, another order and augmentation), so the
    # losses agree only as two draws of the same global-batch loss, not bit for bit. Ten steps of
    # this tiny model end near chance level, ln(global batch) (3.47 for 32 pairs, 3.87 for 48),
    # where measured differences are below 0.2 %; 5 % still tells a resume into another
    # contrastive batch (ln 16 = 2.77 against ln 32) or a state that sends the loss off chance
    # (steps 2-3 of the 2-rank runs are 40-70 % above it). That the state itself is the source's
    # is the bit-for-bit check above.
    for s in range(5, 11):
        assert got_losses[s] == pytest.approx(want[s], rel=0.05), (s, got_losses[s], want[s])


@pytest.mark.full
@pytest.mark.timeout(1200)
def test_elastic_resume_with_a_teacher_and_the_text_stream(demo_data, tmp_path):
    """ECLIPSE's momentum teacher and EfficientCLIP's text stream, ZeRO-3, 2 ranks -> 1: right
    after the load the teacher (assembled from the two ranks' shadow slices, resliced for one)
    equals DeepSpeed's rigid load at 2 ranks, bit for bit, like the student's masters and moments;
    the run then finishes on one rank with finite losses."""
    methods = ["eclipse.enabled=true", "text_lm.enabled=true", f"text_lm.shards={demo_data}/text",
               "text_lm.batch_size=4", "text_lm.num_samples=40", "text_lm.shuffle_buffer=8",
               "train.accum_negatives=false", "deepspeed.zero_stage=3", "train.grad_accum_steps=1"]
    out = tmp_path / "run"
    proc = run_trainer(train_args(demo_data, out, *methods, "debug.kill_during_save_step=8"), nproc=2, timeout=500)
    assert proc.returncode != 0 and (out / "checkpoints" / "latest").read_text().strip() == "step_4"
    source = out / "checkpoints" / "step_4"
    ref = probe(demo_data, tmp_path / "p-ref", source, 2, 3, tmp_path / "ref.pt", *methods)
    got = probe(demo_data, tmp_path / "p-new", source, 1, 3, tmp_path / "new.pt", *methods)
    teacher = [n for n in ref["frozen"] if n.startswith("teacher.")]
    assert len(teacher) > 20 and set(got["frozen"]) == set(ref["frozen"])
    for name in ref["frozen"]:
        assert torch.equal(got["frozen"][name], ref["frozen"][name]), name
    for name, row in ref["params"].items():
        for key, value in row.items():
            assert torch.equal(got["params"][name][key], value), (name, key)
    # the teacher is an EMA, not a copy of the student, by step 4
    student = ref["params"]["vision_model.post_layernorm.weight"]["fp32"]
    assert not torch.equal(ref["frozen"]["teacher.vision_model.post_layernorm.weight"], student)

    text = check(run_trainer(train_args(demo_data, out, *methods), nproc=1, timeout=500))
    assert "resumed elastically from" in text and "train.grad_accum_steps 1 -> 2" in text
    got_losses = {m["step"]: m for m in read_metrics(out)}
    assert sorted(got_losses) == list(range(1, 11))
    assert all(torch.isfinite(torch.tensor([got_losses[s]["loss"], got_losses[s]["text_lm"]])).all()
               for s in range(5, 11))
