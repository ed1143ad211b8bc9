"""`make gpu-check` (scripts/gpu_check.sh) on a CPU: the dry run prints the plan and resolves every
command; a broken command fails it, named; the summary is made from the steps' rows; a real run on a
CPU records what it cannot run as skipped and a failing step as failed, and goes on."""
import importlib.util
import json
import os
import subprocess

import pytest

from conftest import PY, ROOT, budget

STEPS = ("env", "kernels", "bench-loss", "demo-data", "bench-train", "host-syncs", "nccl-train", "nccl-export")
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _helper():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script, tmp_path, **env):
    env = {**os.environ, "PY": PY, "GPU_CHECK_ROOT": str(ROOT), "GPU_CHECK_OUT": str(tmp_path / "out"),
           "GPU_CHECK_RUNS": str(tmp_path / "runs"), **env}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=budget(300))


def test_dry_run_prints_the_plan_and_resolves_every_command(tmp_path):
    r = _run(SCRIPT, tmp_path, DRY_RUN="1")
    assert r.returncode == 0, r.stdout + r.stderr
    plan = r.stdout
    total = int(plan.split("plan (")[1].split(" s estimated")[0])
    estimates = {line.split()[0]: int(line.split("~")[1].split()[0]) for line in plan.splitlines()
                 if line[:1] not in (" ", "=") and "~" in line}
    assert tuple(estimates) == STEPS and sum(estimates.values()) == total < 600, plan
    for step in STEPS:
        assert f"  resolved  {step}: " in plan, plan
    assert "--impls openclip,bare,ours,eclipse" in plan and "model.preset=vit-b-32" in plan
    assert "dry run: every command resolves" in plan
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()    # nothing ran
    # under `make test` this is a sub-make: without the parent's flags and directory lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    make = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "DRY_RUN=1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert make.stdout.splitlines()[-1] == "DRY_RUN=1 PY=.venv/bin/python bash scripts/gpu_check.sh", make.stdout


@pytest.mark.full   # the fast tier resolves the whole plan in test_dry_run_prints_the_plan_...
def test_broken_commands_are_named(tmp_path, capsys):
    """The resolver (what the dry run calls) on a plan with one good and four broken commands."""
    gc = _helper()
    plan = tmp_path / "plan"
    plan.write_text("\n".join([
        "good\t.venv/bin/python -m kernels.bench --b 32768 --dim 512 1024 --tiles 128x128x64:8:3",
        "flag\t.venv/bin/python -m trainer bench train --config trainer/configs/demo.yaml --warmpu 5",
        "key\tenv A=1 .venv/bin/python -m torch.distributed.run --nproc_per_node 2 -m trainer train "
        "--config trainer/configs/demo.yaml deepspeed.zero_stag=3",
        "file\t.venv/bin/python -m trainer train --config trainer/configs/nope.yaml",
        "tile\t.venv/bin/python -m kernels.bench --tiles 128x128",
    ]).replace(".venv/bin/python", PY))
    assert gc.resolve(plan) == 1
    out = capsys.readouterr().out
    lines = {l.split()[1].rstrip(":"): l for l in out.splitlines() if l.startswith("  ")}
    assert lines["good"].startswith("  resolved  good: kernels.bench parses"), out
    assert "BROKEN    flag: trainer bench train: " in lines["flag"] and "--warmpu" in lines["flag"], out
    assert "BROKEN    key: " in lines["key"] and "deepspeed.zero_stag" in lines["key"], out
    assert "BROKEN    file: " in lines["file"] and "trainer/configs/nope.yaml" in lines["file"], out
    assert "BROKEN    tile: kernels.bench: " in lines["tile"] and "'128x128'" in lines["tile"], out
    assert "4 command(s) do not resolve: flag, key, file, tile" in out


def test_summary_from_the_steps_rows(tmp_path):
    """summary.md: the step table and each benchmark's rows, with the ratios computed from them."""
    gc = _helper()
    (tmp_path / "env.json").write_text(json.dumps({"date": "2026-12-07T04:00:00+00:00", "commit": "abc1234",
                                                   "nvidia_smi": ["NVIDIA H100 80GB HBM3, 580.1, 81559 MiB"]}))
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in [
        {"step": "bench-loss", "status": "ok", "rc": 0, "seconds": 80, "estimate_s": 90, "timeout_s": 150,
         "reason": "", "log": "logs/bench-loss.log", "command": "python -m kernels.bench --b 32768"},
        {"step": "nccl-train", "status": "skipped", "rc": None, "seconds": 0, "estimate_s": 90, "timeout_s": 150,
         "reason": "needs 2 GPUs, 1 visible", "log": "", "command": "python -m torch.distributed.run"}]))
    base = {"n": 32768, "dim": 512, "status": "ok"}
    (tmp_path / "loss_cuda_bf16_x.jsonl").write_text("".join(json.dumps({**base, **r}) + "\n" for r in [
        {"impl": "triton", "tile": "128x64x64:8:3", "ms_p50": 6.0, "peak_mem_bytes": 2**20, "tflops": 300.0,
         "vs_gemm": 0.5},
        {"impl": "triton@128x128x64:8:3", "tile": "128x128x64:8:3", "ms_p50": 8.0, "peak_mem_bytes": 2**20},
        {"impl": "open_clip", "ms_p50": 24.0, "peak_mem_bytes": 40 * 2**20},
        {"impl": "torch", "status": "oom"}]))
    (tmp_path / "train_vitb32.jsonl").write_text(json.dumps(
        {"impl": "ours", "samples_per_s": 2500.0, "step_ms": 102.4, "peak_mem_mb": 9000, "loss_first": 5.5,
         "loss_last": 5.1}) + "\n")
    gc.summary(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "- device: NVIDIA H100 80GB HBM3, 580.1, 81559 MiB" in text
    assert "commit abc1234" in text and "1 ok, 1 skipped" in text
    assert "| nccl-train | skipped | 0 (90) | `python -m torch.distributed.run` | needs 2 GPUs, 1 visible |" in text
    assert "| 32768 | 512 | triton | 128x64x64:8:3 | 6.00 | 1 | 300.0 | 0.50 | ok |" in text
    assert "the tuner's 128x64x64:8:3 takes 0.75x the time of fixed 128x128x64:8:3" in text
    assert "triton is 4.00x faster than open_clip's ClipLoss with 0.025x its peak memory" in text
    assert "| 32768 | 512 | torch |  |  |  |  |  | oom |" in text
    assert "| ours | 2500.0 | 102.4 | 9000 | 5.500 -> 5.100 |  |" in text


@pytest.mark.full
def test_cpu_run_records_skips_and_failures_and_goes_on(tmp_path):
    """A real run on a CPU: the GPU steps are skipped with their reason, a failing step (a copy of
    the script whose data step asks for a negative sample count) is recorded as failed, the steps
    after it still run or are skipped with why, summary.md is written, and the exit status is 1."""
    script = tmp_path / "gpu_check.sh"
    script.write_text(SCRIPT.read_text().replace("--num-train 4096", "--num-train -5"))
    r = _run(script, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {s["step"]: s for s in map(json.loads, open(tmp_path / "out" / "steps.jsonl"))}
    assert tuple(rows) == STEPS
    assert rows["env"]["status"] == "ok" and (tmp_path / "out" / "env.json").is_file()
    assert rows["demo-data"]["status"] == "failed" and rows["demo-data"]["reason"] == "exit 2", rows["demo-data"]
    for step in ("kernels", "bench-loss", "bench-train"):
        assert (rows[step]["status"], rows[step]["reason"]) == ("skipped", "no GPU visible")
    assert rows["nccl-train"]["reason"] == "needs 2 GPUs, 0 visible"
    assert rows["nccl-export"]["reason"] == "step nccl-train did not succeed"
    assert "| demo-data | failed |" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.full
def test_a_misspelt_flag_fails_the_scripts_dry_run(tmp_path):
    """End to end: a copy of the script with one flag misspelt; the dry run exits 1 naming the step."""
    script = tmp_path / "gpu_check.sh"
    script.write_text(SCRIPT.read_text().replace("--warmup 5", "--warmpu 5"))
    r = _run(script, tmp_path, DRY_RUN="1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "BROKEN    bench-train: trainer bench train: " in r.stdout and "--warmpu" in r.stdout, r.stdout
    assert "1 command(s) do not resolve: bench-train" in r.stdout
