"""trainer/configs/efficient.yaml: all four methods in one run (ECLIPSE's teacher and expedited
student, PSD's soft targets from that teacher, an ECL round, the text stream), on 2 ranks under
ZeRO-3: every loss term logged, the round selects and the stream follows it, a SIGKILL + rerun
continues with the uninterrupted run's losses, the FLOPs count charges every method, and the
exported student and teacher reproduce the trainer's embeddings.
"""
import json
import math

import pytest
import torch

from conftest import check, data_overrides, kill_group, read_metrics, run_trainer, start_trainer, wait_for_step

CONFIG = "trainer/configs/efficient.yaml"
STEPS = 8
TERMS = ("clip", "teacher_kl", "self_distill", "text_lm")


def _args(data, out, *extra) -> list[str]:
    return ["train", "--config", CONFIG, *data_overrides(data, out), f"max_steps={STEPS}", "deepspeed.zero_stage=3",
            "data.batch_size=16", "data.train_num_samples=768", "data.workers=1", "data.shuffle_buffer=64",
            "optim.warmup_steps=2", "log.every_steps=1", "log.progress=false", "checkpoint.every_steps=2",
            "eval.batch_size=48", "select.every_steps=4", "select.batch_size=64", f"text_lm.shards={data}/text",
            "text_lm.batch_size=4", "text_lm.num_samples=40", *extra]


@pytest.fixture(scope="module")
def whole(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("efficient") / "whole"
    check(run_trainer(_args(demo_data, out), nproc=2))
    return out


@pytest.mark.full   # four methods under ZeRO-3 on 2 ranks, twice; each method's own tests stay in the fast tier
def test_all_four_log_every_term_and_select_once(whole):
    logged = read_metrics(whole)
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
    for m in logged:
        for term in TERMS:
            assert math.isfinite(m[term]) and m[term] >= 0, (m["step"], term)
    # at step 1 the teacher is the student (the EMA starts from it) and the keep-rate warm-up keeps
    # every token, so the KL is exactly 0; the other terms are positive from the first step
    assert logged[0]["teacher_kl"] == 0 and logged[-1]["teacher_kl"] > 0
    assert all(m[t] > 0 for m in logged for t in ("clip", "self_distill", "text_lm"))
    # total = contrastive + teacher_kl + text_lm, where PSD's contrastive term mixes each subset
    # row's one-hot CE with its soft-target CE by a_t = 0.5 t / T, so it lies in
    # [(1 - a_t) clip, clip + a_t self_distill]
    for m in logged:
        a = 0.5 * m["step"] / STEPS
        contrastive = m["loss"] - m["teacher_kl"] - m["text_lm"]
        assert (1 - a) * m["clip"] - 1e-5 <= contrastive <= m["clip"] + a * m["self_distill"] + 1e-5, m
    summary = json.loads((whole / "select" / "round_001" / "summary.json").read_text())
    assert summary["kept"] == round(0.7 * 768)
    assert not (whole / "select" / "round_002").exists()   # max_rounds: 1
    # every step charged; the step after the round also pays its scoring pass
    flops = [m["flops"] for m in logged]
    steps = [b - a for a, b in zip(flops, flops[1:])]
    assert all(s > 0 for s in steps) and steps[3] > 1.5 * steps[2]
    ev = json.loads((whole / "eval.json").read_text())
    assert {"zeroshot_top1", "fast/zeroshot_top1", "teacher/zeroshot_top1"} <= set(ev)


@pytest.mark.full
def test_sigkill_and_rerun_match_the_uninterrupted_run(whole, demo_data, tmp_path):
    out = tmp_path / "killed"
    proc = start_trainer(_args(demo_data, out), nproc=2)
    wait_for_step(proc, out, 5, timeout=500)
    kill_group(proc)
    text = check(run_trainer(_args(demo_data, out), nproc=2))
    assert "resumed from" in text
    a = {m["step"]: m for m in read_metrics(whole)}
    b = {m["step"]: m for m in read_metrics(out)}
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for term in (*TERMS, "loss", "flops"):
            assert b[step][term] == pytest.approx(a[step][term], rel=1e-5, abs=1e-6), (step, term)
    assert (out / "select" / "round_001" / "manifest.txt").read_text() == \
        (whole / "select" / "round_001" / "manifest.txt").read_text()


@pytest.mark.full
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_export_reproduces_the_trainers_embeddings(whole, tmp_path, which):
    from transformers import CLIPModel

    from trainer.data import load_tokenizer
    from trainer.methods import load_trained_model
    from trainer.sources import checkpoint_config

    check(run_trainer(["export-hf", "--checkpoint", str(whole / "checkpoints"), "--out", str(tmp_path / which),
                       "--which", which]))
    hf = CLIPModel.from_pretrained(tmp_path / which).eval()
    cfg, root, tag = checkpoint_config(str(whole / "checkpoints"))
    ours = load_trained_model(cfg, root, tag, load_tokenizer(cfg.tokenizer.path))
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(5, 40, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img = torch.nn.functional.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = torch.nn.functional.normalize(hf.get_text_features(input_ids=ids).pooler_output, dim=-1)
        student, text, _, teacher, *_ = ours(pixel_values=pixels, input_ids=ids, with_teacher=True)
    torch.testing.assert_close(img, teacher if which == "teacher" else student, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt, text, rtol=1e-5, atol=1e-5)
