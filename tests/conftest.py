"""Shared fixtures: a small demo data set (made once per session) and a trainer launcher."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))

# ------------------------------------------------------------------ hypothesis: no "now and then"
# "ci" (the default, what `make test` and CI run): derandomized, so a property test draws the same
# examples on every run and a green run stays green; no example database, no deadline (a loaded
# 2-core machine is not a bug). "explore" draws fresh random examples, for hunting new failures:
#   .venv/bin/python -m pytest --hypothesis-profile=explore tests/test_kernels_chunked.py
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, print_blob=True, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ------------------------------------------------------------------ child timeouts < test timeout
# pytest-timeout kills a test after `timeout` seconds (pytest.ini, or @pytest.mark.timeout) counted
# over setup, call and teardown; a child process killed by that loses its output. So every child
# a test waits on gets at most what is left of the test's budget minus a margin: a hung child is
# killed by its own timeout first, and its output is in the failure message.
_MARGIN_S = 45
_deadline: float | None = None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    global _deadline
    marker = item.get_closest_marker("timeout")
    limit = (marker.args[0] if marker and marker.args else marker.kwargs.get("timeout") if marker else None)
    if limit is None:
        limit = float(item.config.getini("timeout") or 0) or None
    _deadline = time.monotonic() + float(limit) if limit else None
    try:
        yield
    finally:
        _deadline = None


def budget(seconds: float) -> float:
    """``seconds``, or less: what is left of the running test's timeout minus a margin (>= 10 s)."""
    if _deadline is None:
        return seconds
    return max(10.0, min(seconds, _deadline - time.monotonic() - _MARGIN_S))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from trainer.demo_data import make_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    make_demo_data(out, num_train=768, num_val=96, num_text=40, seed=0, shard_size=128)
    return out


def data_overrides(data: Path, out: Path) -> list[str]:
    return [f"output_dir={out}", f"data.train_shards={data}/train", f"data.val_shards={data}/val",
            f"tokenizer.path={data}/tokenizer", f"eval.zeroshot={data}/zeroshot.json"]


def trainer_env(**extra) -> dict:
    # No MASTER_PORT: a single-process run rendezvouses through a private file (trainer/dist.py),
    # so concurrent runs share no port; under torchrun the launcher sets each rank's MASTER_PORT.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for launcher_var in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(launcher_var, None)
    return {**env, **extra}


def run_child(cmd: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` with the timeout clipped to the
    test's budget; a child that times out fails the test with the tail of what it printed."""
    timeout = budget(timeout)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as err:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        raise AssertionError(f"timed out after {timeout:.0f}s: {' '.join(map(str, cmd))}\n"
                             f"{text(err.stdout)[-6000:]}{text(err.stderr)[-3000:]}") from None


def torchrun(nproc: int) -> list[str]:
    """torchrun on this host without a port number handed in: ``--standalone`` makes the launcher
    bind its rendezvous store to port 0 and hold it, and the ranks join that store (torch's
    agent store), so no port is picked, closed and raced for by a concurrent run."""
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def trainer_cmd(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [PY, "-m", "trainer", *args]
    return [*torchrun(nproc), "-m", "trainer", *args]


def run_trainer(args: list[str], nproc: int = 1, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """Run ``python -m trainer ARGS`` (under torchrun when nproc > 1) and capture its output.
    On a timeout the launcher and every rank under it are killed (no orphans left training)."""
    cmd = trainer_cmd(args, nproc)
    timeout = budget(timeout)
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


class LazyRuns(dict):
    """``runs[key]``: the output directory of ``make(key)``, made on first use and kept.

    A module's ZeRO-stage matrix is one fixture of these, so the fast tier (``-m "not full"``)
    only trains the stages its tests read (1 and 3), and the full tier adds 0 and 2."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, key):
        self[key] = value = self._make(key)
        return value


def first_fast(cases: list, keep: int = 1) -> list:
    """Parametrize cases with the first ``keep`` in the fast tier and the rest in the full tier:
    for bad-input families where every case is a process start of its own, and one shows the path.

        @pytest.mark.parametrize("override,message", first_fast([("a=1", "..."), ("b=2", "...")]))
    """
    return [c if i < keep else pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.full)
            for i, c in enumerate(cases)]


FULL_STAGES = [pytest.param(0, marks=pytest.mark.full), 1, pytest.param(2, marks=pytest.mark.full), 3]


def capture_figures(monkeypatch) -> list:
    """Record ``(figure, path)`` for every matplotlib figure saved from now on in this process (the
    file is still written), so a test can check what a plot shows: its axes, labels, series."""
    from matplotlib.figure import Figure

    saved, real = [], Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        saved.append((self, Path(fname)))
        return real(self, fname, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def wait_for_step(proc, out: Path, step: int, timeout: float = 300) -> None:
    """Poll a running trainer's metrics.jsonl until it logs ``step`` (fails if the process exits)."""
    timeout = budget(timeout)
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
