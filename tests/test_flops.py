"""Training FLOPs (trainer/flops.py and each method's ``MethodSpec.step_flops``, summed by
``trainer.methods.step_flops``) against torch's ``FlopCounterMode`` on real training steps
(tests/flops_probe.py: the engine, ``train.train_step``, one process), and the cumulative ``flops``
of metrics.jsonl.

The count is exact for every matrix product but one estimate: the text stream's LM head is
charged at every position a text could predict (texts are padded to the context; the demo's
captions fill about half of it), so ``text_lm`` is an upper bound, here within 1 % of the step."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import ROOT, check, data_overrides, read_metrics, run_child, run_trainer, trainer_env

PROBE_COMMON = ["data.val_shards=", "eval.zeroshot=", "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=16",
                "max_steps=10", "optim.warmup_steps=2", "loss.impl=torch", "log.progress=false"]
# name: (config, overrides, optimizer step, an ECL round instead of a step)
CASES = {
    "clip": ("demo", [], 1, False),
    # step 6 of 10 after a 2-step warm-up: EViT's keep rate is on its cosine, between 1 and 0.5
    "eclipse-evit": ("eclipse", ["eclipse.keep_rate=0.5"], 6, False),
    "eclipse-flip": ("eclipse", ["eclipse.expedite=random", "eclipse.keep_rate=0.5"], 6, False),
    "psd-momentum": ("psd", ["psd.teacher=momentum"], 3, False),
    "eclipse+psd-momentum": ("eclipse", ["psd.enabled=true", "psd.teacher=momentum"], 3, False),
    "text_lm-clm": ("efficientclip", ["select.enabled=false", "text_lm.batch_size=8"], 1, False),
    "text_lm-mlm": ("efficientclip", ["select.enabled=false", "text_lm.batch_size=8", "text_lm.objective=mlm"], 1,
                    False),
    # the round due after step 1, over one shard (128 pairs of the test data)
    "select-round": ("demo", ["select.enabled=true", "select.every_steps=1", "data.train_num_samples=128",
                              "select.batch_size=64"], 2, True),
}


def _case_overrides(name: str, data) -> list[str]:
    config, extra, _, _ = CASES[name]
    shards = f"{data}/train/train-000000.tar" if name == "select-round" else f"{data}/train"
    more = [f"text_lm.shards={data}/text"] if config == "efficientclip" else []
    return [f"data.train_shards={shards}", f"tokenizer.path={data}/tokenizer", *PROBE_COMMON, *more, *extra]


def _probe(names: list[str], demo_data, tmp_path) -> dict:
    cases = [{"name": n, "config": f"trainer/configs/{CASES[n][0]}.yaml", "overrides": _case_overrides(n, demo_data),
              "step": CASES[n][2], "round": CASES[n][3], "out": str(tmp_path / "runs")} for n in names]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = run_child([sys.executable, str(ROOT / "tests" / "flops_probe.py"), str(tmp_path / "out.json"),
                      str(tmp_path / "cases.json")], timeout=600, cwd=ROOT, env=trainer_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads((tmp_path / "out.json").read_text())


def _analytic(name: str, demo_data) -> float:
    from trainer import methods
    from trainer.config import load_config
    from trainer.flops import clip_step_flops
    config, _, step, is_round = CASES[name]
    cfg = load_config(f"trainer/configs/{config}.yaml", _case_overrides(name, demo_data))
    total = methods.step_flops(cfg, step, 1)
    return total - clip_step_flops(cfg, 1) if is_round else total   # a round: the scoring pass alone


def _compare(names, demo_data, tmp_path):
    counted = _probe(names, demo_data, tmp_path)
    report = os.environ.get("FLOPS_REPORT")   # a path: the table of bench/results/flops_vs_flop_counter.md
    if report:
        rows = ["| case | config + overrides | step | FlopCounterMode GFLOPs | analytic GFLOPs | analytic / counted - 1 |",
                "|---|---|--:|--:|--:|--:|"]
        for name in names:
            got, want = counted[name]["counted"], _analytic(name, demo_data)
            config, extra, step, is_round = CASES[name]
            what = f"`{config}.yaml` {' '.join(extra)}" + (" (the ECL round's scoring pass)" if is_round else "")
            rows.append(f"| {name} | {what} | {step} | {got / 1e9:.6f} | {want / 1e9:.6f} | {want / got - 1:+.2e} |")
        Path(report).write_text("\n".join(rows) + "\n")
    for name in names:
        got, want = counted[name]["counted"], _analytic(name, demo_data)
        assert got > 0, name
        if name.startswith("text_lm"):   # the LM head at every position a text could predict: an upper bound
            assert got <= want <= 1.01 * got, (name, want, got, counted[name]["by_op"])
        else:                            # every product counted, exactly (up to float summation)
            assert want == pytest.approx(got, rel=1e-9), (name, want, got, counted[name]["by_op"])


@pytest.mark.full   # one engine per case in one process: about 40 s on 2 shared cores
def test_every_methods_step_flops_equal_the_flop_counter(demo_data, tmp_path):
    _compare(list(CASES), demo_data, tmp_path)


def test_expedited_student_and_teacher_change_the_count_as_the_tokens_say():
    """Hand-counted EViT on the tiny preset: 65 tokens, drop layers 1-3, keep 0.5, fused."""
    from trainer import methods
    from trainer.config import load_config
    from trainer.flops import block_flops, clip_step_flops, similarity_flops, vision_flops
    from trainer.model import preset_shape
    cfg = load_config("trainer/configs/eclipse.yaml", ["eclipse.keep_schedule=constant", "eclipse.keep_rate=0.5",
                                                        "data.batch_size=4"])
    s = preset_shape(cfg.model)
    # layer 0 keeps 65; 1: 65 -> 1 + 32 + 1 = 34; 2: 34 -> 1 + 17 + 1 = 19; 3: 19 -> 1 + 9 + 1 = 11
    tokens = [(65, 65), (65, 34), (34, 19), (19, 11)]
    d, m = 128, 512
    assert sum(block_flops(a, d, m, b) for a, b in tokens) == sum(
        8 * a * d * d + 4 * a * a * d + 4 * b * d * m for a, b in tokens)
    full, fast = vision_flops(s), vision_flops(s, tokens)
    rows = 2 * d * (65 + 34 + 19)   # the class token's attention row in each drop layer
    batch = 4 * 2
    want = batch * (full + 3 * (fast - full) + 3 * rows) + 7 * similarity_flops(batch, 64)
    assert methods.step_flops(cfg, 1, 2) - clip_step_flops(cfg, 2) == pytest.approx(want, rel=1e-12)


@pytest.mark.full   # a training run, about 20 s; test_train_e2e checks plain CLIP's cumulative FLOPs in the fast tier
def test_metrics_log_the_cumulative_training_flops(demo_data, tmp_path):
    """metrics.jsonl's ``flops`` after step s is the sum of the steps' FLOPs up to s (ECLIPSE: the
    keep rate, so the FLOPs, changes from step to step)."""
    from trainer import methods
    from trainer.config import load_config
    out = tmp_path / "run"
    args = [*data_overrides(demo_data, out), "max_steps=4", "optim.warmup_steps=1", "data.batch_size=8",
            "data.workers=0", "log.every_steps=1", "log.progress=false", "data.val_shards=", "eval.zeroshot=",
            "eclipse.keep_rate=0.5"]
    check(run_trainer(["train", "--config", "trainer/configs/eclipse.yaml", *args]))
    cfg = load_config("trainer/configs/eclipse.yaml", args)
    got = [(m["step"], m["flops"]) for m in read_metrics(out)]
    steps = [methods.step_flops(cfg, s, 1) for s in range(1, 5)]
    assert len(set(steps)) > 1
    assert got == [(s, pytest.approx(sum(steps[:s]), rel=1e-12)) for s in range(1, 5)]
