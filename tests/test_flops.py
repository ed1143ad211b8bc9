"""Training FLOPs (trainer/flops.py and each method's ``MethodSpec.step_flops``, summed by
``trainer.methods.step_flops``) against torch's ``FlopCounterMode`` on real training steps
(tests/flops_probe.py: the engine, ``train.train_step``, one process), the cumulative ``flops``
of metrics.jsonl, and the growth search's equal-FLOP budget with each candidate's own schedule.

The count is exact for every matrix product but one estimate: the text stream's LM head is
charged at every position a text could predict (texts are padded to the context; the demo's
captions fill about half of it), so ``text_lm`` is an upper bound, here within 1 % of the step."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, check, data_overrides, read_metrics, run_child, run_trainer, trainer_env

PROBE_COMMON = ["data.val_shards=", "eval.zeroshot=", "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=16",
                "max_steps=10", "optim.warmup_steps=2", "loss.impl=torch", "log.progress=false"]
# name: (config, overrides, optimizer step, an ECL round instead of a step)
CASES = {
    "clip": ("demo", [], 1, False),
    # two micro-batches: each loss over its own pairs, and (GradCache) one loss over all, forwards twice
    "clip-accum2": ("demo", ["train.grad_accum_steps=2"], 1, False),
    "clip-accum2-negatives": ("demo", ["train.grad_accum_steps=2", "train.accum_negatives=true"], 1, False),
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
    # the self-confidence (the default) against a smaller pool, and the plain cosine
    "select-round-pool": ("demo", ["select.enabled=true", "select.every_steps=1", "data.train_num_samples=128",
                                   "select.batch_size=64", "select.pool=48"], 2, True),
    "select-round-cosine": ("demo", ["select.enabled=true", "select.every_steps=1", "data.train_num_samples=128",
                                     "select.batch_size=64", "select.score=cosine"], 2, True),
}


def _case_overrides(name: str, data) -> list[str]:
    config, extra, _, _ = CASES[name]
    shards = f"{data}/train/train-000000.tar" if name.startswith("select-round") else f"{data}/train"
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


# ------------------------------------------------------------------ the growth search's budget

def _search_until_the_sweep(monkeypatch, tmp_path, config: str, overrides: list[str], steps: int, world: int = 2):
    """Run ``grow --search`` up to the sweep (the grow verb and the sweep are stubbed): what it
    wrote in candidates.yaml, and each candidate's resolved config."""
    import argparse

    from trainer.config import load_config, to_dict
    from trainer.experiments import growth_search as G
    src = tmp_path / "src" / "step_4"
    src.mkdir(parents=True)
    cfg = load_config(config, overrides)
    (src / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    monkeypatch.setattr(G, "checkpoint_config", lambda path: (cfg, src.parent, src.name))
    monkeypatch.setattr(G, "grow", lambda source, out, *a, **k: out)
    monkeypatch.setattr(G, "run_sweep", lambda args: 3)   # stop after candidates.yaml
    out = tmp_path / "search"
    args = argparse.Namespace(checkpoint=str(src), out=str(out), search=True, search_steps=steps, nproc=world,
                              slurm=False, pim_beta=0.9, split="equal", split_noise=0.1, optimizer="reset")
    assert G.search(args, []) == 3
    variants = yaml.safe_load((out / "candidates.yaml").read_text())
    configs = {name: load_config(src / "config.yaml", [f"{k}={G.yaml_arg(v)}" for k, v in body.items()])
               for name, body in variants.items() if name != "seeds"}
    return cfg, configs


@pytest.mark.parametrize("config,overrides", [
    ("demo", []),
    ("eclipse", ["eclipse.keep_warmup_steps=40", "model.context_length=24"]),
])
def test_search_candidates_get_their_own_warmup_and_equal_flops(monkeypatch, tmp_path, demo_data, config, overrides):
    """The demo config (260 steps, warm-up 25) at --search-steps 50: width x2 costs about 3.4x per
    step and gets 15 steps; it used to get the source's 25 warm-up steps, so it stopped before
    its peak learning rate. Each candidate's warm-up is now its share of its own steps, and the
    candidates' training FLOPs (methods included) are equal up to one step's rounding."""
    from trainer import methods
    source = [f"data.train_shards={demo_data}/train", f"data.val_shards={demo_data}/val",
              f"tokenizer.path={demo_data}/tokenizer", f"eval.zeroshot={demo_data}/zeroshot.json", *overrides]
    cfg, configs = _search_until_the_sweep(monkeypatch, tmp_path, f"trainer/configs/{config}.yaml", source, 50)
    assert cfg.max_steps == 260 and cfg.optim.warmup_steps == 25
    steps = {n: c.max_steps for n, c in configs.items()}
    assert max(steps.values()) == 50 and steps["wider-x2"] < cfg.optim.warmup_steps   # the case that failed
    for name, c in configs.items():
        assert 0 < c.optim.warmup_steps < c.max_steps, name
        assert c.optim.warmup_steps == round(25 * c.max_steps / 260), name
        if cfg.eclipse.keep_warmup_steps is not None:
            assert c.eclipse.keep_warmup_steps == round(40 * c.max_steps / 260) < c.max_steps, name
    spent = {n: methods.train_flops(c, c.max_steps, 2) for n, c in configs.items()}
    per_step = {n: spent[n] / c.max_steps for n, c in configs.items()}
    cheapest = min(spent, key=lambda n: per_step[n])
    assert steps[cheapest] == 50
    for name in configs:
        assert abs(spent[name] - spent[cheapest]) <= 0.55 * per_step[name], name   # the nearest step count


def test_peak_table_picks_the_most_specific_part_and_knows_no_cpu():
    """MFU's denominator: the dense peak by CUDA's device name; none for CPUs or unknown parts."""
    from trainer.flops import peak_tflops
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0     # not the SXM part's peak
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert peak_tflops("NVIDIA V100-SXM2-32GB", "bf16") is None  # no bf16 tensor cores
    assert peak_tflops(None, "fp32") is None and peak_tflops("Some Future GPU", "bf16") is None
