"""Config validation and the command line's handling of user mistakes (exit 2, one line, no traceback)."""
from __future__ import annotations

import pytest
import torch

from conftest import data_overrides, run_trainer
from trainer.config import ConfigError, check_world, describe, load_config

DEMO = "trainer/configs/demo.yaml"
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")


def test_overrides_are_typed_and_nested():
    cfg = load_config(DEMO, ["max_steps=7", "optim.lr=3e-4", "data.train_shards=[a, b]", "deepspeed.zero_stage=3",
                             "loss.terms={clip: 0.5}", "model.image_size=null"])
    assert cfg.max_steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.train_shards == ["a", "b"] and cfg.deepspeed.zero_stage == 3
    assert cfg.loss.terms == {"clip": 0.5} and cfg.model.image_size is None
    assert cfg.deepspeed.precision == "fp32" and cfg.model.preset == "tiny"  # from the YAML


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr' in optim; allowed: betas, eps, grad_clip, impl, lr,"),
    (["bogus=1"], "unknown config key 'bogus' in top level"),
    (["max_steps=ten"], "config key 'max_steps' must be int; got 'ten'"),
    (["max_steps=0"], "config key 'max_steps' must be >= 1; got 0"),
    (["deepspeed.zero_stage=4"], "config key 'deepspeed.zero_stage' must be <= 3; got 4"),
    (["deepspeed.precision=fp8"], "config key 'deepspeed.precision' must be one of bf16, fp16, fp32; got 'fp8'"),
    (["loss.impl=cuda"], "config key 'loss.impl' must be one of torch, triton, chunked, auto; got 'cuda'"),
    (["optim.betas=[0.9]"], "config key 'optim.betas' must be two numbers in [0, 1)"),
    (["deepspeed.offload=true"], "config key 'deepspeed.offload' needs deepspeed.zero_stage=3"),
    (["data=3"], "config section 'data' must be a mapping"),
    (["novalue"], "override 'novalue' must look like key.sub=value"),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, override)
    assert message in str(err.value)


def test_world_size_arithmetic_is_spelled_out():
    cfg = load_config(DEMO, ["train.global_batch_size=256", "data.batch_size=64"])
    check_world(cfg, 4)
    with pytest.raises(ConfigError, match=r"train.global_batch_size\(256\) != data.batch_size\(64\) \* "
                                          r"train.grad_accum_steps\(1\) \* world size\(2\) = 128; launch 4 ranks"):
        check_world(cfg, 2)


def test_every_key_is_documented():
    lines = describe()
    assert any(line.startswith("deepspeed.zero_stage = 1  # ZeRO stage") for line in lines)
    assert all("#" in line and line.split("# ", 1)[1].strip() for line in lines)


@pytest.mark.parametrize("args, message", [
    (["--config", "nope.yaml"], "error: config file not found: nope.yaml"),
    (["--config", DEMO, "optim.lrr=1"], "error: unknown config key 'optim.lrr'"),
    (["--config", DEMO, "data.train_shards=/nonexistent/shards-{000..003}.tar"],
     "error: config key 'data.train_shards': no shard matches '/nonexistent/shards-000.tar'"),
    (["--config", DEMO, "train.global_batch_size=512"], "error: train.global_batch_size(512) != data.batch_size(64)"),
    (["--config", DEMO, "tokenizer.path=/nonexistent/tok"], "error: config key 'tokenizer.path': directory not found"),
    (["--config", DEMO, "model.preset=vit-h-14"], "error: config key 'model.preset' must be one of tiny, vit-b-32"),
    pytest.param(["--config", DEMO, "deepspeed.precision=fp16"],
                 "error: config key 'deepspeed.precision' is fp16, which DeepSpeed's cpu", marks=CPU_ONLY),
    pytest.param(["--config", DEMO, "loss.impl=triton"], "error: config key 'loss.impl' is 'triton' but there is no GPU",
                 marks=CPU_ONLY),
])
def test_cli_rejects_bad_input_with_exit_2_and_no_traceback(demo_data, tmp_path, capsys, monkeypatch, args, message):
    """In-process through trainer.cli.main (the code `python -m trainer` runs); see the subprocess test below."""
    from trainer.cli import main

    if "deepspeed.precision=fp16" in args:
        # DeepSpeed's CPU accelerator supports fp16 where oneDNN does (CPUs with AVX512-FP16/AMX-FP16,
        # recent Xeons), so the refusal is checked as DeepSpeed answers on the CPUs without it.
        from deepspeed.accelerator import get_accelerator
        monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: False)
    good = data_overrides(demo_data, tmp_path / "out")
    argv = ["train", *args[:2], *good, *args[2:]] if len(args) > 2 else ["train", *args, *good]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_real_process_exits_2_with_one_line(demo_data, tmp_path):
    proc = run_trainer(["train", "--config", DEMO, *data_overrides(demo_data, tmp_path / "out"), "optim.lrr=1"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: unknown config key 'optim.lrr' in optim; allowed: betas, eps, grad_clip, impl, lr, min_lr_ratio, "
        "warmup_steps, weight_decay"]


def test_demo_data_bad_arguments_exit_2(tmp_path):
    proc = run_trainer(["make-demo-data", "--out", str(tmp_path), "--noise-rate", "1.5"])
    assert proc.returncode == 2 and "noise_rate" in proc.stderr and "Traceback" not in proc.stderr
