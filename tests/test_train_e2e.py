"""End to end through the real command line: torchrun with 2 gloo ranks, DeepSpeed engines, the
demo data set. Kept to a few steps of a tiny model; every test asserts on values."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import unreadable
from conftest import (check, data_overrides, kill_group, read_metrics, run_trainer, start_trainer, wait_for_step)

CONFIG = "trainer/configs/demo.yaml"
# Small and fast, but with 2 loader workers per rank so the resume path rotates workers.
FAST = ["model.context_length=24", "data.batch_size=16", "data.workers=2", "data.shuffle_buffer=64",
        "data.train_num_samples=192", "optim.warmup_steps=3", "optim.lr=2e-3", "log.every_steps=1",
        "log.progress=false", "eval.batch_size=32"]
STEPS = 12


def train_args(data, out, *extra):
    return ["train", "--config", CONFIG, *data_overrides(data, out), *FAST, f"max_steps={STEPS}",
            "checkpoint.every_steps=4", *extra]


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out)}


@pytest.fixture(scope="module")
def baseline(demo_data, tmp_path_factory):
    """One uninterrupted 2-rank run (ZeRO-1, fp32): the reference for the other tests."""
    out = tmp_path_factory.mktemp("baseline")
    check(run_trainer(train_args(demo_data, out), nproc=2))
    return out


def test_run_writes_contract_outputs(baseline):
    metrics = read_metrics(baseline)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        for key in ("loss", "clip", "lr", "samples_per_s", "data_wait_frac", "logit_scale", "data/skipped"):
            assert key in m and math.isfinite(m[key]), (key, m)
        assert m["loss"] == pytest.approx(m["clip"])  # one term, weight 1
        assert m["samples_per_s"] > 0 and 0 <= m["data_wait_frac"] <= 1
    # Warm-up then cosine: lr after step s is peak * lambda(s) (closed form).
    peak, warm = 2e-3, 3
    for m in metrics:
        s = m["step"]
        want = peak * ((s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (STEPS - warm))))
        assert m["lr"] == pytest.approx(want, rel=1e-6), s
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # it learns something even in 12 steps
    # cumulative training FLOPs (trainer/flops.py; tests/test_flops.py checks them against torch's
    # counter): plain CLIP's step costs the same every step, on both ranks' global batch
    from trainer.config import load_config
    from trainer.flops import clip_step_flops
    per_step = clip_step_flops(load_config(baseline / "config.yaml"), 2)
    assert [m["flops"] for m in metrics] == pytest.approx([s * per_step for s in range(1, STEPS + 1)], rel=1e-12)
    # what a cluster user reads: model FLOPs per sample, achieved TFLOP/s per device; no MFU on a CPU
    gb = load_config(baseline / "config.yaml").data.batch_size * 2
    for m in metrics:
        assert m["flops_per_sample"] == pytest.approx(per_step / gb, rel=1e-12)
        # one window, one clock: TFLOP/s per device = samples/s x FLOPs per sample / world
        assert m["tflops_per_s"] == pytest.approx(m["samples_per_s"] * m["flops_per_sample"] / 2 / 1e12, rel=1e-9)
        assert "mfu" not in m
    assert (baseline / "config.yaml").is_file()
    ds = json.loads((baseline / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_clipping"] == 1.0 and ds["zero_optimization"]["stage"] == 1
    ckpts = baseline / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS}"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_12", "step_8"]  # keep_last=2
    ev = json.loads((baseline / "eval.json").read_text())
    assert ev["step"] == STEPS and ev["num_samples"] == 96
    # the values of eval.json: test_in_training_eval_equals_a_plain_reference_on_the_exported_model
    # each rank draws its own randomness (dropout, FLIP masks): their saved generators differ, and
    # the same seed gives the same rank's generator (train.seed_rank, independently recomputed here)
    import numpy as np
    rngs = [torch.load(ckpts / f"step_{STEPS}" / "trainer_state" / f"rank_{r}.pt", weights_only=False)["rng"]
            for r in (0, 1)]
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    assert rngs[0]["numpy"][1].tolist() != rngs[1]["numpy"][1].tolist()
    for r in (0, 1):
        gen = torch.Generator()
        gen.set_state(rngs[r]["torch"])
        assert gen.initial_seed() == int(np.random.SeedSequence([0, r]).generate_state(1)[0])


def test_tensorboard_events_match_metrics(baseline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(baseline / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/clip", "train/lr", "train/samples_per_s", "train/logit_scale",
                "eval/zeroshot_top1", "eval/i2t_r1"):
        assert tag in tags, tags
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_loss == pytest.approx(losses(baseline), rel=1e-6)
    ev = json.loads((baseline / "eval.json").read_text())
    (zs,) = acc.Scalars("eval/zeroshot_top1")
    assert zs.step == STEPS and zs.value == pytest.approx(ev["zeroshot_top1"], abs=1e-6)


def test_eval_verb_matches_in_training_eval(baseline, tmp_path):
    """`eval --checkpoint` (1 process, consolidated fp32 weights) == the 2-rank eval during training."""
    out = tmp_path / "eval.json"
    check(run_trainer(["eval", "--checkpoint", str(baseline / "checkpoints"), "--out", str(out)]))
    single, during = json.loads(out.read_text()), json.loads((baseline / "eval.json").read_text())
    for key in ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert single[key] == pytest.approx(during[key], abs=1e-6), key


def test_export_hf_loads_in_transformers_and_matches(baseline, demo_data, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from trainer.data import load_tokenizer
    from trainer.methods import load_trained_model
    from trainer.sources import checkpoint_config

    hf_dir = tmp_path / "hf"
    check(run_trainer(["export-hf", "--checkpoint", str(baseline / "checkpoints" / f"step_{STEPS}"),
                       "--out", str(hf_dir)]))
    hf = CLIPModel.from_pretrained(hf_dir).eval()
    processor = CLIPProcessor.from_pretrained(hf_dir)
    cfg, root, tag = checkpoint_config(str(baseline / "checkpoints"))
    ours = load_trained_model(cfg, root, tag, load_tokenizer(cfg.tokenizer.path))
    from PIL import Image
    images = [Image.new("RGB", (80, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (20, 30, 220))]
    inputs = processor(text=["a red circle", "a small blue star in the corner"], images=images,
                       return_tensors="pt", padding="max_length", max_length=24)
    with torch.no_grad():
        img_hf = hf.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt_hf = hf.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
        img, txt, scale = ours(**inputs)
    torch.testing.assert_close(torch.nn.functional.normalize(img_hf, dim=-1), img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.nn.functional.normalize(txt_hf, dim=-1), txt, rtol=1e-5, atol=1e-5)
    assert hf.logit_scale.exp().item() == pytest.approx(scale.item(), rel=1e-6)
    # The processor's image transform is the trainer's eval transform.
    from trainer.data import build_transforms
    t = build_transforms(64, cfg.data.image_mean, cfg.data.image_std, 1.0, train=False)
    torch.testing.assert_close(inputs["pixel_values"][1], t(images[1]), rtol=0, atol=2e-2)


def _hit_bounds(scores: torch.Tensor, target: torch.Tensor, k: int, eps: float) -> tuple[float, float]:
    """Fraction of rows whose target is in the top k (another column scoring >= it counts against
    it), as an interval: scores within ``eps`` of the target's may fall either way in another
    summation order, so the lower bound counts them against, the upper bound for."""
    own = scores.gather(1, target[:, None])
    others = torch.ones_like(scores, dtype=torch.bool).scatter_(1, target[:, None], False)
    rank_hi = ((scores >= own - eps) & others).sum(1)
    rank_lo = ((scores > own + eps) & others).sum(1)
    return (rank_hi < k).double().mean().item(), (rank_lo < k).double().mean().item()


def test_in_training_eval_equals_a_plain_reference_on_the_exported_model(baseline, demo_data, tmp_path):
    """eval.json of the 2-rank run against numbers computed here: the exported model in stock
    transformers embeds every validation pair (read with tarfile), then recall@k, zero-shot top-k
    (CLIP's prompt-ensemble classifier) and the full-set contrastive loss in plain torch.
    Scores within 2e-5 of a tie (the two models agree to ~1e-6) may rank either way in another
    summation order, so each count is checked against an interval."""
    import io
    import tarfile

    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    from trainer.config import load_config
    from trainer.data import build_transforms

    hf_dir = tmp_path / "hf"
    check(run_trainer(["export-hf", "--checkpoint", str(baseline / "checkpoints" / f"step_{STEPS}"),
                       "--out", str(hf_dir)]))
    hf = CLIPModel.from_pretrained(hf_dir).eval()
    tok = CLIPProcessor.from_pretrained(hf_dir).tokenizer
    cfg = load_config(str(baseline / "config.yaml"), [])
    transform = build_transforms(64, cfg.data.image_mean, cfg.data.image_std, 1.0, train=False)
    samples: dict[str, dict] = {}
    for shard in sorted((demo_data / "val").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, ext = m.name.rsplit(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    images = torch.stack([transform(Image.open(io.BytesIO(v["jpg"])).convert("RGB")) for v in samples.values()])
    captions = [v["txt"].decode() for v in samples.values()]
    labels = torch.tensor([json.loads(v["json"])["label"] for v in samples.values()])
    zs = json.loads((demo_data / "zeroshot.json").read_text())

    def text(prompts):
        t = tok(prompts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
        return torch.nn.functional.normalize(hf.get_text_features(**t).pooler_output, dim=-1)
    with torch.no_grad():
        img = torch.nn.functional.normalize(hf.get_image_features(pixel_values=images).pooler_output, dim=-1)
        txt = text(captions)
        classifier = torch.stack([torch.nn.functional.normalize(text([t.format(c) for t in zs["templates"]]).mean(0),
                                                                dim=-1) for c in zs["classnames"]])
        scale = hf.logit_scale.exp()
    ev = json.loads((baseline / "eval.json").read_text())
    n = len(samples)
    assert ev["num_samples"] == n == 96
    diag = torch.arange(n)
    sim = img.double() @ txt.double().T
    checks = {f"i2t_r{k}": (sim, diag, k) for k in (1, 5, 10)} | {f"t2i_r{k}": (sim.T, diag, k) for k in (1, 5, 10)}
    checks |= {"zeroshot_top1": (img.double() @ classifier.double().T, labels, 1),
               "zeroshot_top5": (img.double() @ classifier.double().T, labels, 5)}
    for key, (scores, target, k) in checks.items():
        lo, hi = _hit_bounds(scores, target, k, eps=2e-5)
        assert hi - lo <= 4 / n, (key, lo, hi)               # a few near-ties at most: the check has teeth
        assert lo - 1e-9 <= ev[key] <= hi + 1e-9, (key, ev[key], lo, hi)
    logits = scale.double() * sim
    loss = (torch.nn.functional.cross_entropy(logits, diag) + torch.nn.functional.cross_entropy(logits.T, diag)) / 2
    assert ev["val_loss"] == pytest.approx(loss.item(), rel=1e-4)


def test_sigkill_and_rerun_continues_with_identical_losses(baseline, demo_data, tmp_path):
    out = tmp_path / "killed"
    proc = start_trainer(train_args(demo_data, out), nproc=2)
    wait_for_step(proc, out, 6, timeout=400)
    kill_group(proc)
    assert (out / "checkpoints" / "latest").read_text().strip() in ("step_4", "step_8")
    text = check(run_trainer(train_args(demo_data, out), nproc=2))
    assert "resumed from" in text
    assert sorted(losses(out)) == list(range(1, STEPS + 1))  # each step logged once
    assert losses(out) == pytest.approx(losses(baseline), rel=1e-5, abs=1e-6)


@pytest.mark.full   # a second real kill; test_data counts what a resume reads and checks the batches in-process
def test_sigkill_deep_into_the_epoch_continues_with_identical_losses(demo_data, tmp_path):
    """An epoch of 48 steps (1536 pairs, 2 ranks of 16), killed after its step-40 checkpoint (5/6
    into the epoch, each loader worker 2.5 shards in): the rerun, whose workers re-read only their
    current shards and buffers' samples, logs the uninterrupted run's losses for steps 41-44."""
    def args(out):
        return train_args(demo_data, out, "data.train_num_samples=1536", "max_steps=44", "checkpoint.every_steps=20",
                          "eval.every_steps=0")
    whole = tmp_path / "whole"
    check(run_trainer(args(whole), nproc=2))
    out = tmp_path / "killed"
    proc = start_trainer(args(out), nproc=2)
    wait_for_step(proc, out, 41, timeout=500)
    kill_group(proc)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_40"
    state = torch.load(out / "checkpoints" / "step_40" / "trainer_state" / "rank_1.pt", weights_only=False)
    assert state["data"]["in_epoch"] == 40 and set(state["data"]["stream"]["reader"]) == {"0", "1"}
    text = check(run_trainer(args(out), nproc=2))
    assert "resumed from" in text and "(step 40)" in text
    assert sorted(losses(out)) == list(range(1, 45))
    assert losses(out) == pytest.approx(losses(whole), rel=1e-5, abs=1e-6)


@pytest.mark.full   # a second kill; trainer state durability before 'latest' is in-process in test_checkpoint
def test_kill_during_save_leaves_previous_checkpoint_as_latest(baseline, demo_data, tmp_path):
    out = tmp_path / "save-killed"
    proc = run_trainer(train_args(demo_data, out, "debug.kill_during_save_step=8"), nproc=2)
    assert proc.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert (out / "checkpoints" / "step_8").is_dir()  # written but never marked complete
    text = check(run_trainer(train_args(demo_data, out), nproc=2))
    assert "step_4 (step 4)" in text
    assert losses(out) == pytest.approx(losses(baseline), rel=1e-5, abs=1e-6)


@pytest.mark.full   # a 4-step 2-rank rerun; the fallback itself is in-process in test_checkpoint
def test_unreadable_newest_checkpoint_resumes_from_the_previous_one(baseline, demo_data, tmp_path):
    """Rank 1's optimizer shard of the newest checkpoint (step_12) cut in half: the rerun warns,
    naming both checkpoints, resumes from step_8 and trains steps 9-12 to the uninterrupted run's
    losses."""
    import shutil
    out = tmp_path / "corrupt"
    shutil.copytree(baseline, out)
    shard = out / "checkpoints" / "step_12" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    text = check(run_trainer(train_args(demo_data, out), nproc=2))
    assert f"checkpoint {out / 'checkpoints' / 'step_12'} is unreadable: {shard}" in text
    assert (f"newest checkpoint {out / 'checkpoints' / 'step_12'} is unreadable (see above); resuming from the "
            f"previous complete checkpoint {out / 'checkpoints' / 'step_8'}") in text
    assert f"resumed from {out / 'checkpoints' / 'step_8'} (step 8)" in text
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    assert losses(out) == pytest.approx(losses(baseline), rel=1e-5, abs=1e-6)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_12"
    assert unreadable(shard) is None   # step 12 saved afresh


@pytest.mark.full   # two 2-rank runs
def test_stop_signal_during_evaluation_checkpoints_and_resumes(baseline, demo_data, tmp_path):
    """SIGUSR1 reaches rank 0 at the first forward of step 6's evaluation: both ranks abandon the
    evaluation at that forward, write step_6 and exit 75; the same command then finishes the run
    with the uninterrupted run's losses."""
    out = tmp_path / "stop-in-eval"
    args = train_args(demo_data, out, "eval.every_steps=6", "debug.signal_during_eval_step=6")
    proc = run_trainer(args, nproc=2)
    text = proc.stdout + proc.stderr
    # torchrun exits 1 for a rank's 75; the ranks' own statuses are in its report
    assert proc.returncode != 0 and "(exitcode: 75)" in text and "(exitcode: 1)" not in text, text[-3000:]
    assert "stop requested by signal: evaluation at step 6 abandoned" in text
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_6"
    assert sorted(losses(out)) == list(range(1, 7)) and not (out / "eval.json").exists()
    text = check(run_trainer(args, nproc=2))
    assert f"resumed from {out / 'checkpoints' / 'step_6'} (step 6)" in text
    assert losses(out) == pytest.approx(losses(baseline), rel=1e-5, abs=1e-6)
    assert json.loads((out / "eval.json").read_text())["step"] == STEPS


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.full), 3])
def test_zero_stages_give_the_same_losses(baseline, demo_data, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    check(run_trainer(train_args(demo_data, out, f"deepspeed.zero_stage={stage}", "max_steps=4",
                                 "checkpoint.every_steps=100"), nproc=2))
    got = losses(out)
    want = {s: v for s, v in losses(baseline).items() if s <= 4}
    # Same global batch and initial weights; ZeRO only changes where optimizer state lives.
    # Note: max_steps=4 changes the cosine horizon, but steps 1..3 are in warm-up, and step 4's
    # loss is computed before the 4th update.
    assert got == pytest.approx(want, rel=2e-4)


def test_resume_none_refuses_an_output_dir_with_checkpoints(baseline, demo_data):
    proc = run_trainer(train_args(demo_data, baseline, "--resume", "none"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "checkpoint.resume is 'none' but" in proc.stderr and "already holds checkpoints" in proc.stderr


def test_branching_from_a_checkpoint_path_continues_its_losses(baseline, demo_data, tmp_path):
    out = tmp_path / "branch"
    start = baseline / "checkpoints" / "step_8"
    text = check(run_trainer(train_args(demo_data, out, f"checkpoint.resume={start}"), nproc=2))
    assert f"resumed from {start} (step 8)" in text
    assert sorted(losses(out)) == [9, 10, 11, 12]
    assert losses(out) == pytest.approx({s: v for s, v in losses(baseline).items() if s > 8}, rel=1e-5, abs=1e-6)


@pytest.mark.full   # a second real kill; test_sigkill_and_rerun_continues_with_identical_losses is the fast tier's
def test_killed_branch_reruns_from_its_own_latest_checkpoint(baseline, demo_data, tmp_path):
    """A run branched with checkpoint.resume=PATH and killed after writing its own step_12 must come
    back from its own step_12 (the old rule reloaded the branch point at every restart, redoing its
    steps and rewriting its newer checkpoints), with the uninterrupted branch's losses."""
    start = baseline / "checkpoints" / "step_8"

    def branch(out):
        return train_args(demo_data, out, f"checkpoint.resume={start}", "max_steps=20")
    out = tmp_path / "branch-killed"
    proc = start_trainer(branch(out), nproc=2)
    wait_for_step(proc, out, 14, timeout=400)
    kill_group(proc)
    assert (out / "checkpoints" / "latest").read_text().strip() in ("step_12", "step_16")
    resumed_at = (out / "checkpoints" / "latest").read_text().strip()
    text = check(run_trainer(branch(out), nproc=2))
    assert f"resumed from {out / 'checkpoints' / resumed_at} (step {resumed_at[5:]})" in text, \
        [line for line in text.splitlines() if "resumed" in line]
    assert f"resumed from {start}" not in text
    assert sorted(losses(out)) == list(range(9, 21))  # each step once
    whole = tmp_path / "branch-whole"
    check(run_trainer(branch(whole), nproc=2))
    assert losses(out) == pytest.approx(losses(whole), rel=1e-5, abs=1e-6)


def test_resume_at_a_world_size_that_cannot_keep_the_global_batch_is_a_clear_error(baseline, demo_data, tmp_path):
    """An elastic resume keeps the checkpoint's global batch (2 ranks x 16 = 32) by accumulation;
    3 ranks x 16 cannot make 32: each rank says so and exits 2 before any process group starts
    (torchrun reports that exit code). tests/test_elastic.py trains the cases that can."""
    start = baseline / "checkpoints" / "step_8"
    proc = run_trainer(train_args(demo_data, tmp_path / "w3", f"checkpoint.resume={start}"), nproc=3)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (f"error: cannot resume from {start} with its global batch 32: data.batch_size 16 x world size 3 = 48 "
            "does not divide it (world sizes that do: 1, 2); launch one of those, or set "
            "checkpoint.elastic_batch=change to resume with global batch 48") in text, text[-3000:]
    assert "(exitcode: 2)" in text and "rank 0/3 on" not in text, text[-3000:]   # no rank got started
    assert not (tmp_path / "w3" / "checkpoints").exists()


def test_logged_loss_is_the_global_batch_loss(baseline, demo_data):
    """Step 9's logged loss == the symmetric contrastive loss of the whole global batch (both
    ranks' micro-batches, 32 pairs), computed in one process with plain torch from the step_8
    weights and the data position each rank saved there."""
    import torch.nn.functional as F

    from trainer import data as D
    from trainer.methods import load_trained_model
    from trainer.sources import checkpoint_config
    from trainer.train import TrainData

    cfg, root, tag = checkpoint_config(str(baseline / "checkpoints" / "step_8"))
    tokenizer = D.load_tokenizer(cfg.tokenizer.path)
    model = load_trained_model(cfg, root, tag, tokenizer)
    decoder = D.SampleDecoder(tokenizer, 24, D.build_transforms(64, cfg.data.image_mean, cfg.data.image_std,
                                                                 cfg.data.crop_scale_min, train=True))
    batches = []
    for rank in (0, 1):
        state = torch.load(root / tag / "trainer_state" / f"rank_{rank}.pt", weights_only=False)
        batches.append(TrainData(cfg, decoder, rank, 2, state["data"]).next())
    with torch.no_grad():
        img, txt, scale = model(pixel_values=torch.cat([b["image"] for b in batches]),
                                input_ids=torch.cat([b["input_ids"] for b in batches]),
                                attention_mask=torch.cat([b["attention_mask"] for b in batches]))
        logits = scale * img @ txt.T
        target = torch.arange(logits.shape[0])
        want = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)).item()
    got = losses(baseline)[9]
    assert got == pytest.approx(want, rel=1e-5)
    assert read_metrics(baseline)[8]["clip"] == pytest.approx(want, rel=1e-5)
