"""Shared fixtures: a small demo data set (made once per session) and a trainer launcher."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from trainer.demo_data import make_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    make_demo_data(out, num_train=768, num_val=96, num_text=40, seed=0, shard_size=128)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_overrides(data: Path, out: Path) -> list[str]:
    return [f"output_dir={out}", f"data.train_shards={data}/train", f"data.val_shards={data}/val",
            f"tokenizer.path={data}/tokenizer", f"eval.zeroshot={data}/zeroshot.json"]


def trainer_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **extra}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def trainer_cmd(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [PY, "-m", "trainer", *args]
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
            "-m", "trainer", *args]


def run_trainer(args: list[str], nproc: int = 1, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """Run ``python -m trainer ARGS`` (under torchrun when nproc > 1) and capture its output.
    On a timeout the launcher and every rank under it are killed (no orphans left training)."""
    cmd = trainer_cmd(args, nproc)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=trainer_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{(out + err)[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def start_trainer(args: list[str], nproc: int = 1, **env) -> subprocess.Popen:
    """Start the trainer in its own process group (so a test can SIGKILL all of it)."""
    return subprocess.Popen(trainer_cmd(args, nproc), cwd=ROOT, env=trainer_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it, as a node failure would.

    torchrun starts its ranks in sessions of their own, so killing the launcher's process group
    alone leaves the ranks training on as orphans (an earlier version of this helper did that)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=60)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def wait_for_step(proc, out: Path, step: int, timeout: float = 300) -> None:
    """Poll a running trainer's metrics.jsonl until it logs ``step`` (fails if the process exits)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        if (out / "metrics.jsonl").exists() and any(m["step"] >= step for m in read_metrics(out)):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def check(proc: subprocess.CompletedProcess, code: int = 0) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode} (wanted {code})\n{text[-6000:]}"
    return text


# ------------------------------------------------------------- SLURM tests that did not run
# tests/test_slurm.py skips its cluster tests where slurm-wlm/munge (or root) are missing; a "12
# skipped" at the end of `make test` is easy to miss, so say it in the summary. CI sets
# TRAINER_REQUIRE_SLURM=1 (.ci/run), under which those tests fail instead (tests/slurm_cluster.py).
SLURM_INSTALL = "apt-get install -y slurm-wlm munge"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "SLURM" in _skip_reason(r)]
    if not skipped:
        return
    tr = terminalreporter
    tr.section("SLURM TESTS SKIPPED", sep="!", red=True, bold=True)
    tr.line(f"{len(skipped)} SLURM test(s) did not run, so slurm/*.sbatch and slurm/pipeline.sh are untested "
            "on this machine:", red=True, bold=True)
    for reason in sorted({_skip_reason(r) for r in skipped}):
        tr.line(f"  {reason}", red=True)
    tr.line(f"To run them: as root, `{SLURM_INSTALL}`, then `make test` (or "
            "`.venv/bin/python -m pytest -q tests/test_slurm.py`) again.", bold=True)
    tr.line("CI sets TRAINER_REQUIRE_SLURM=1, under which they fail instead of skipping.")
