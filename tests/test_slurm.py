"""slurm/*.sbatch and slurm/pipeline.sh against a real SLURM cluster on this machine.

The module starts munged, slurmctld and two slurmd "nodes" on loopback (tests/slurm_cluster.py),
submits real jobs to them and tears everything down afterwards. Skipped, with the command that
installs them, where the SLURM/munge binaries are missing (``apt-get install slurm-wlm munge``)
or where we are not root; `make test` then says so in its summary (tests/conftest.py), and under
``TRAINER_REQUIRE_SLURM=1`` (CI) those tests fail instead.

Training jobs use the demo config on a tiny demo data set (512 train / 64 val samples, batch 16
per rank, a few steps) on 2 CPU "nodes" with one task each.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_cluster as sc  # noqa: E402

from trainer import ports  # noqa: E402
from trainer.cli import build_parser  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.methods.growth import check_growth  # noqa: E402
from trainer.model import preset_shape  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = REPO / "slurm"
TRAIN = "slurm/train.sbatch"
RUN = "slurm/run.sbatch"
CONFIG = "trainer/configs/demo.yaml"
MAX_STEPS = 6
# A first job may build DeepSpeed's CPU comm op (cached afterwards); machines may be shared.
JOB_TIMEOUT = 900

# One task per node, one CPU each, no GPUs: the CPU form of the documented submission.
CPU_NODE_ARGS = ["--ntasks-per-node", "1", "--gpus-per-node", "0", "--cpus-per-task", "1"]


# --------------------------------------------------------------------- without a cluster
def test_scripts_parse_and_header_defaults():
    """bash -n on every script, and the #SBATCH defaults the issue asks for."""
    for script in ("train.sbatch", "run.sbatch", "pipeline.sh", "growclip_demo.sh"):
        subprocess.run(["bash", "-n", str(SLURM_DIR / script)], check=True)
        assert os.access(SLURM_DIR / script, os.X_OK), f"{script} is not executable"
    header = [line for line in (SLURM_DIR / "train.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    opts = dict((line.split(None, 1)[1].split("=", 1) + [""])[:2] for line in header)
    assert opts["--signal"].startswith("B:USR1@")
    assert int(opts["--signal"].split("@")[1]) >= 60
    assert "--requeue" in opts
    assert opts["--open-mode"] == "append"
    assert "%j" in opts["--output"]
    assert opts["--ntasks-per-node"] == opts["--gpus-per-node"]
    assert "--time" in opts


@pytest.mark.parametrize("tasks_env", [{"SLURM_NTASKS_PER_NODE": "4"}, {"SLURM_TASKS_PER_NODE": "4(x2)"}],
                         ids=["ntasks-per-node", "tasks-per-node-only"])
def test_tasks_per_node_unlike_gpus_per_node_is_exit_2_naming_both(tasks_env, tmp_path):
    """No cluster needed: the check runs before anything else asks SLURM (the environment below
    is what sbatch gives a job of -N 2 --ntasks-per-node 4 --gpus-per-node 8)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="42", SLURM_GPUS_ON_NODE="8", PATH="/usr/bin:/bin", **tasks_env)
    proc = subprocess.run(["bash", str(SLURM_DIR / "train.sbatch"), CONFIG], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "train.sbatch[42]: error: 4 tasks per node but 8 GPUs per node: one task per GPU is needed; submit "
        "with --ntasks-per-node 8 --gpus-per-node 8 (or --gpus-per-node 0 for CPU nodes)"]


def test_missing_binaries_skip_with_install_hint(monkeypatch):
    monkeypatch.setattr(sc, "_which", lambda name: None if name in ("slurmd", "munged") else "/bin/true")
    reason = sc.missing_requirements()
    assert "slurmd" in reason and "munged" in reason and "apt-get install -y slurm-wlm munge" in reason


def test_pipeline_dry_run_chains_with_afterok():
    out = subprocess.run(
        [str(SLURM_DIR / "pipeline.sh"), "--dry-run", "--after", "41",
         "-N", "2", TRAIN, "a.yaml", "output_dir=runs/s1", "::",
         "-N", "1", RUN, "python", "-m", "trainer", "eval", "::",
         "-N", "2", TRAIN, "b.yaml"],
        capture_output=True, text=True, check=True, cwd=REPO).stdout.splitlines()
    assert len(out) == 3
    assert "--dependency=afterok:41" in out[0]
    assert "--dependency=afterok:STAGE1" in out[1] and "--kill-on-invalid-dep=yes" in out[1]
    assert "--dependency=afterok:STAGE2" in out[2]
    assert out[2].rstrip().endswith("b.yaml")


def _split_stages(argv: list[str]) -> list[list[str]]:
    stages, cur = [], []
    for a in argv:
        if a == "::":
            stages.append(cur)
            cur = []
        else:
            cur.append(a)
    return stages + [cur]


def _example_stages(text: str) -> list[list[str]]:
    """The stages of the first multi-line `slurm/pipeline.sh \\` example in ``text`` (comment or
    Markdown), split into words by bash itself, as the reader's shell would (an unquoted brace
    pattern becomes several words here too)."""
    lines = [re.sub(r"^#\s?", "", line).strip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("slurm/pipeline.sh") and line.endswith("\\"))
    cmd = []
    for line in lines[start:]:
        cmd.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    words = " ".join(cmd).split(None, 1)[1]
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {words}"], capture_output=True, text=True, check=True).stdout
    argv = out.split("\0")[:-1]
    # what the example says is what the shell passes: no unquoted brace pattern or glob expanded
    assert argv == shlex.split(words), "the shell expands this example's words: quote brace patterns and globs"
    return _split_stages(argv)


def _check_stages(where: str, stages: list[list[str]]) -> list[tuple[str, object]]:
    """Every stage's script exists and its command is valid: a training stage's config (a file of
    the repository, or the config.yaml of an earlier grow stage's --out, which is the source run's
    config with the grown shape) loads with its key=value arguments; a grow stage grows an earlier
    training stage's output_dir into a shape the operators reach; other commands parse.
    Returns ``(verb, Config of a training stage or None)`` per stage."""
    runs, grown, out = {}, {}, []
    for stage in stages:
        script = next(a for a in stage if a.startswith("slurm/"))
        assert (REPO / script).is_file(), (where, script)
        rest = stage[stage.index(script) + 1:]
        cfg = None
        if script == TRAIN:
            config, kv = rest[0], rest[1:]
            if config in grown:
                config, kv = grown[config][0], [*grown[config][1], *kv]
            else:
                assert (REPO / config).is_file(), (where, config)
            cfg = load_config(REPO / config, kv)  # ConfigError on an unknown key or a bad value
            runs[os.path.normpath(cfg.output_dir)] = (config, kv)
            args = ["train", "--config", *rest]
        else:
            assert rest[:3] == ["python", "-m", "trainer"], (where, rest)
            args = rest[3:]
        ns = build_parser().parse_args(args)  # SystemExit on an unknown verb/option
        if ns.verb == "grow":
            source = os.path.normpath(ns.checkpoint)
            assert source in runs, (where, f"grow --checkpoint {ns.checkpoint} is no earlier stage's output_dir")
            config, kv = runs[source]
            old, new = load_config(REPO / config, kv), load_config(REPO / config, [*kv, *ns.overrides])
            check_growth(preset_shape(old.model), preset_shape(new.model))  # ConfigError on an unreachable shape
            grown[os.path.join(ns.out, "config.yaml")] = (config, [*kv, *ns.overrides, f"checkpoint.init={ns.out}"])
        out.append((ns.verb, cfg))
    return out


def _dry_run(stages: list[list[str]]) -> list[str]:
    argv = [a for stage in stages for a in (*stage, "::")][:-1]
    return subprocess.run([str(SLURM_DIR / "pipeline.sh"), "--dry-run", *argv],
                          capture_output=True, text=True, check=True, cwd=REPO).stdout.splitlines()


def _check_example(where: str, text: str) -> list[str]:
    """The first pipeline example of ``text``: valid stages (``_check_stages``), and
    ``pipeline.sh --dry-run`` submits one job per stage. Returns the verbs."""
    stages = _example_stages(text)
    assert len(stages) >= 2, where
    verbs = [verb for verb, _ in _check_stages(where, stages)]
    assert len(_dry_run(stages)) == len(stages)
    return verbs


def _check_growth_stages(where: str, checked: list[tuple[str, object]], stages: list[list[str]]) -> None:
    """train -> grow -> train -> grow -> train: each grow by slurm/run.sbatch from the training
    stage before it, each training stage after a grow from its config.yaml, in its own output_dir,
    on a share of the data that contains the previous stage's and more."""
    assert [verb for verb, _ in checked] == ["train", "grow", "train", "grow", "train"], (where, checked)
    from braceexpand import braceexpand
    shares, dirs = [], []
    for i, ((verb, cfg), stage) in enumerate(zip(checked, stages)):
        if verb == "grow":
            assert RUN in stage, (where, stage)
            ns = build_parser().parse_args(stage[stage.index("trainer") + 1:])
            assert os.path.normpath(ns.checkpoint) == dirs[-1], (where, ns.checkpoint)
            assert stages[i + 1][stages[i + 1].index(TRAIN) + 1] == os.path.join(ns.out, "config.yaml"), where
            continue
        spec = cfg.data.train_shards
        shares.append([u for s in (spec if isinstance(spec, list) else [spec]) for u in braceexpand(str(s))])
        dirs.append(os.path.normpath(cfg.output_dir))
    assert len(set(dirs)) == 3, (where, dirs)
    for before, after in zip(shares, shares[1:]):
        # a directory holds all of its shards: the last share may be the whole directory
        assert after != before and (set(before) <= set(after) or any(b.startswith(a + "/") for a in after for b in before)), (where, shares)


def test_documented_pipeline_examples_are_runnable():
    """The examples in pipeline.sh's header and slurm/README.md, and slurm/growclip_demo.sh's
    pipeline, use only verbs, files, keys and shapes that exist, and dry-run into one job each."""
    readme = (SLURM_DIR / "README.md").read_text()
    section = readme.split("## Pipelines", 1)[1].split("\n## ", 1)[0]
    header = (SLURM_DIR / "pipeline.sh").read_text().split("\nset -u", 1)[0]
    for where, text in (("slurm/README.md", section), ("slurm/pipeline.sh", header)):
        assert _check_example(where, text) == ["train", "eval", "train"], where
        assert "grow" in text and "Model growth as stages" in text, where  # points at the growth recipe
    assert "Model growth as stages" in (SLURM_DIR / "run.sbatch").read_text()
    selection = readme.split("## Data selection as stages", 1)[1].split("\n## ", 1)[0]
    assert _check_example("slurm/README.md (selection)", selection) == ["train", "select", "train"]
    assert "--array=" in selection
    # the growth recipe: train -> grow -> train -> grow -> train on growing shares of the data
    growth = readme.split("## Model growth as stages", 1)[1].split("\n## ", 1)[0]
    stages = _example_stages(growth)
    _check_growth_stages("slurm/README.md (growth)", _check_stages("slurm/README.md (growth)", stages), stages)
    assert len(_dry_run(stages)) == 5
    assert "growclip_demo.sh" in growth and "--pim-beta" in growth
    # the demo script: the same five stages on the demo data, as pipeline.sh --dry-run prints them
    # (without the data set, with make-demo-data's default layout of 10 shards)
    env = {**os.environ, "DEMO_DATA": "runs/no-such-demo-data", "RUNS": "runs/growclip-demo-test"}
    p = subprocess.run([str(SLURM_DIR / "growclip_demo.sh"), "--dry-run", "--after", "41"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 5 and "--dependency=afterok:41" in lines[0], p.stdout
    assert all(f"--dependency=afterok:STAGE{i}" in line for i, line in enumerate(lines[1:], 1)), p.stdout
    assert not (REPO / "runs/growclip-demo-test").exists()   # a dry run creates nothing
    demo = [[a for a in shlex.split(line)[1:] if a != "--parsable" and not a.startswith(("--dependency=", "--kill-on"))]
            for line in lines]
    checked = _check_stages("slurm/growclip_demo.sh", demo)
    _check_growth_stages("slurm/growclip_demo.sh", checked, demo)
    from braceexpand import braceexpand
    trains = [cfg for _, cfg in checked if cfg is not None]
    assert [len(list(braceexpand(str(cfg.data.train_shards)))) for cfg in trains] == [4, 7, 10]
    assert [cfg.data.train_num_samples for cfg in trains] == [4000, 7000, 10000]
    # without --dry-run and without the data set it says how to make it, and submits nothing
    p = subprocess.run([str(SLURM_DIR / "growclip_demo.sh")], capture_output=True, text=True, cwd=REPO,
                       env={**env, "SBATCH": "/bin/false"})
    assert p.returncode == 2 and "make-demo-data --out runs/no-such-demo-data" in p.stderr, p.stderr


@pytest.mark.parametrize("required", [False, True], ids=["default", "TRAINER_REQUIRE_SLURM=1"])
def test_missing_slurm_is_reported_or_fails_when_required(tmp_path, required):
    """Without slurm on PATH: a loud summary and a skip; with TRAINER_REQUIRE_SLURM=1, an error."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "no_slurm_here.py").write_text(  # sbin is searched after PATH: hide it too
        "import slurm_cluster\nslurm_cluster.SBIN_DIRS = ()\n")
    env = {k: v for k, v in os.environ.items() if k != sc.REQUIRE_ENV}
    env.update(PATH=str(tmp_path / "bin"), PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO / 'tests'}")
    if required:
        env[sc.REQUIRE_ENV] = "1"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no_slurm_here",
                        "tests/test_slurm.py::test_array_job_runs_every_index"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    out = p.stdout + p.stderr
    assert "SLURM/munge binaries not found" in out, out
    if required:
        assert p.returncode == 1, out
        assert "1 error" in out and "skipped" not in out, out
        assert f"{sc.REQUIRE_ENV}=1 is set" in out, out
    else:
        assert p.returncode == 0, out
        assert "1 skipped" in out, out
        assert "SLURM TESTS SKIPPED" in out and "apt-get install -y slurm-wlm munge" in out, out


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    sc.skip_or_fail_without_cluster()
    c = sc.SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=1, cred_expire_s=10)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm-demo-data")
    subprocess.run([sys.executable, "-m", "trainer", "make-demo-data", "--out", str(out),
                    "--num-train", "512", "--num-val", "64"], check=True, cwd=REPO, capture_output=True)
    return out


@pytest.fixture(scope="module")
def deepspeed_ops():
    """Load DeepSpeed's CPU shared-memory comm op once, here, before the jobs need it.

    `make` installs it precompiled (instant); a DeepSpeed installed without DS_BUILD_SHM_COMM=1
    would otherwise JIT-compile it inside the first job's ranks (minutes on a busy machine) while
    the other ranks wait at the rendezvous.
    """
    subprocess.run([sys.executable, "-c", "import importlib; importlib.import_module('deepspeed.comm.torch').build_shm_op()"],
                   check=True, cwd=REPO, capture_output=True, timeout=JOB_TIMEOUT)


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm-jobs")


def overrides(data: Path, output_dir: Path, **extra) -> list[str]:
    kv = {
        "output_dir": output_dir, "max_steps": MAX_STEPS, "data.train_shards": data / "train",
        "data.val_shards": data / "val", "tokenizer.path": data / "tokenizer",
        "eval.zeroshot": data / "zeroshot.json", "data.batch_size": 16, "data.workers": 1,
        "data.train_num_samples": 512, "data.shuffle_buffer": 64, "checkpoint.every_steps": 4,
        "log.every_steps": 1, "log.progress": False, "eval.every_steps": 0, "eval.batch_size": 64,
        "dist.timeout_s": 300,
    }
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


def submit(cluster, jobs_dir, args, name) -> tuple[int, Path]:
    """sbatch from the repository root, with this interpreter as the job's Python."""
    out = jobs_dir / f"{name}-%j.out"
    job = cluster.sbatch(["--job-name", name, "--output", str(out), *args], cwd=REPO,
                         env={"PYTHON": sys.executable})
    return job, jobs_dir / f"{name}-{job}.out"


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def metrics(output_dir: Path) -> dict[int, dict]:
    """Last record per step of metrics.jsonl."""
    path = output_dir / "metrics.jsonl"
    recs = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            recs[rec["step"]] = rec
    return recs


def wait_for(cond, timeout: float, what: str, cluster=None, job=None, poll: float = 0.5):
    timeout = sc._budget(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if cluster is not None and job is not None and cluster.state(job) in sc.FINAL_STATES:
            raise AssertionError(f"job {job} ended ({cluster.job(job)}) while waiting for {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def runtime_s(rec: dict) -> int:
    h, m, s = (rec.get("RunTime", "0:0:0").split("-")[-1]).split(":")
    return int(h) * 3600 + int(m) * 60 + int(s)


@pytest.fixture(scope="module")
def reference_run(cluster, demo_data, jobs_dir, deepspeed_ops):
    """An uninterrupted 2-node run: the one the preempted run must reproduce."""
    out_dir = jobs_dir / "run-ref"
    job, log = submit(cluster, jobs_dir, ["-N", "2", *CPU_NODE_ARGS, TRAIN, CONFIG,
                                          *overrides(demo_data, out_dir)], "ref")
    rec = cluster.wait_done(job, JOB_TIMEOUT)
    return {"job": job, "rec": rec, "log": read(log), "out": out_dir}


# --------------------------------------------------------------------------- tests
@pytest.mark.timeout(JOB_TIMEOUT + 120)
def test_two_node_training_run(reference_run):
    rec, log, out = reference_run["rec"], reference_run["log"], reference_run["out"]
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log[-3000:]
    assert rec["NumNodes"] == "2" and rec["NodeList"] == "node[1-2]"
    # one rank per node, world size 2, rendezvous on the first node's address
    assert "train-task: rank 0/2 local_rank 0 on node node1" in log
    assert "train-task: rank 1/2 local_rank 0 on node node2" in log
    # kernel caches on each node, per job, unless set at submission
    for rank in (0, 1):
        cache = re.search(rf"train-task: rank {rank} TRITON_CACHE_DIR=(\S+) TORCH_EXTENSIONS_DIR=(\S+)", log)
        assert cache and cache.group(1).endswith(f"-{reference_run['job']}/triton"), log[-3000:]
        assert cache.group(2).endswith(f"-{reference_run['job']}/torch_extensions")
    assert re.search(r"world_size=2 rank=0\b", log)
    assert re.search(r"rank 1/2 on ", log)
    assert "MASTER_ADDR=127.0.0.1" in log
    # the rendezvous port: derived from the job id, outside the ephemeral range
    port = int(re.search(r"MASTER_PORT=(\d+)", log).group(1))
    assert port in [ports.derive_port(reference_run["job"], a) for a in range(ports.MAX_ATTEMPTS)]
    lo, hi = ports.ephemeral_range()
    assert 1024 < port and not lo <= port <= hi
    assert "training finished" in log
    # metrics for every step, checkpoints, TensorBoard events, eval
    m = metrics(out)
    assert sorted(m) == list(range(1, MAX_STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in m.values())
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{MAX_STEPS}"
    assert (ckpts / "step_4").is_dir() and (ckpts / f"step_{MAX_STEPS}").is_dir()
    assert sorted(p.name for p in (ckpts / f"step_{MAX_STEPS}" / "trainer_state").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, MAX_STEPS + 1))
    assert json.loads((out / "eval.json").read_text())["step"] == MAX_STEPS
    assert json.loads((out / "ds_config.json").read_text())["train_batch_size"] == 32


@pytest.mark.timeout(2 * JOB_TIMEOUT)
def test_preempted_job_requeues_and_resumes_identically(cluster, demo_data, jobs_dir, reference_run):
    """USR1 to the batch shell (what --signal=B:USR1@N does): checkpoint, exit 75, requeue, resume."""
    ref = metrics(reference_run["out"])
    assert sorted(ref) == list(range(1, MAX_STEPS + 1))
    out = jobs_dir / "run-preempt"
    job, log = submit(cluster, jobs_dir, ["-N", "2", *CPU_NODE_ARGS, TRAIN, CONFIG,
                                          *overrides(demo_data, out)], "preempt")
    wait_for(lambda: max(metrics(out), default=0) >= 2, JOB_TIMEOUT, "step 2 of the run to be preempted",
             cluster, job)
    cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])
    rec = wait_for(lambda: (r := cluster.job(job)) and int(r.get("Restarts", 0)) >= 1 and r, 300,
                   "the job to requeue itself", poll=0.3)
    rec = cluster.wait_done(job, JOB_TIMEOUT)
    text = read(log)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", text[-4000:]
    assert rec["Restarts"] == "1"
    assert "got SIGUSR1" in text and f"requeueing job {job}" in text
    stopped = re.search(r"stop requested by signal: checkpoint (\S+)/step_(\d+) written", text)
    assert stopped, text[-4000:]
    k = int(stopped.group(2))
    assert 2 <= k < MAX_STEPS
    resumed = re.search(r"resumed from (\S+)/step_(\d+) \(step (\d+)\)", text)
    assert resumed and int(resumed.group(2)) == k == int(resumed.group(3))
    assert text.count("restart 1") == 1 and "training finished" in text
    # same steps, same losses as the uninterrupted run
    m = metrics(out)
    assert sorted(m) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        assert m[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-6), step
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS}"


@pytest.mark.timeout(JOB_TIMEOUT + 120)
def test_busy_rendezvous_port_is_skipped(cluster, demo_data, jobs_dir, deepspeed_ops):
    """A listening socket holds the job's attempt-0 port on the master node: the job takes the next one."""
    out = jobs_dir / "run-busy-port"
    job, log = submit(cluster, jobs_dir, ["--hold", "-N", "2", *CPU_NODE_ARGS, TRAIN, CONFIG,
                                          *overrides(demo_data, out, max_steps=2)], "busyport")
    busy = ports.derive_port(job, 0)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))  # MASTER_ADDR of the test cluster
        holder.listen(1)
        assert not ports.port_is_free(busy)
        cluster.run(["scontrol", "release", str(job)])
        rec = cluster.wait_done(job, JOB_TIMEOUT)
    text = read(log)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", text[-3000:]
    assert f"trainer.ports: port {busy} (job {job}, attempt 0) is in use" in text, text[-3000:]
    used = int(re.search(r"MASTER_PORT=(\d+)", text).group(1))
    assert used != busy and used in [ports.derive_port(job, a) for a in range(1, ports.MAX_ATTEMPTS)]
    lo, hi = ports.ephemeral_range()
    assert 1024 < used and not lo <= used <= hi
    assert f"MASTER_PORT {used}: free on " in text
    assert "training finished" in text and sorted(metrics(out)) == [1, 2]


@pytest.mark.full   # the fast tier keeps the preemption (signal, checkpoint, requeue, identical resume)
@pytest.mark.timeout(JOB_TIMEOUT + 200)
def test_scancel_saves_a_checkpoint_and_does_not_requeue(cluster, demo_data, jobs_dir, deepspeed_ops):
    """Plain scancel: SIGTERM to every process of the job (as at a time limit or preemption).

    The trainer checkpoints within KillWait and exits 75; the script must not requeue a job the
    user cancelled.
    """
    out = jobs_dir / "run-scancel"
    job, log = submit(cluster, jobs_dir, ["-N", "2", *CPU_NODE_ARGS, TRAIN, CONFIG,
                                          *overrides(demo_data, out, max_steps=500)], "scancel")
    wait_for(lambda: max(metrics(out), default=0) >= 2, JOB_TIMEOUT, "step 2", cluster, job)
    cluster.run(["scancel", str(job)])
    rec = cluster.wait_done(job, 120)
    time.sleep(2)  # let the batch script's last lines reach the log
    text = read(log)
    assert rec["JobState"] == "CANCELLED" and rec["Restarts"] == "0", text[-3000:]
    assert "got SIGTERM" in text
    stopped = re.search(r"stop requested by signal: checkpoint (\S+)/step_(\d+) written", text)
    assert stopped, text[-4000:]
    k = int(stopped.group(2))
    assert k >= 2 and (out / "checkpoints" / "latest").read_text().strip() == f"step_{k}"
    assert "not requeueing" in text and "requeueing job" not in text
    time.sleep(cluster.cred_expire_s + 2)
    assert cluster.state(job) == "CANCELLED"


@pytest.mark.timeout(300)
def test_pipeline_runs_stages_in_order_and_stops_after_a_failure(cluster, jobs_dir):
    stamp = jobs_dir / "chain.txt"
    py = ("import sys, time; time.sleep(float(sys.argv[2])); "
          "open(sys.argv[1], 'a').write(sys.argv[3] + ' ' + repr(time.time()) + '\\n')")
    common = ["-N", "1", "--cpus-per-task", "1", "--output", str(jobs_dir / "chain-%j.out")]
    p = cluster.run([str(SLURM_DIR / "pipeline.sh"),
                     *common, RUN, "python", "-c", py, str(stamp), "3", "first", "::",
                     *common, RUN, "python", "-c", py, str(stamp), "0", "second"],
                    cwd=REPO, env={"PYTHON": sys.executable})
    first, second = map(int, p.stdout.split())
    assert cluster.job(second)["Dependency"].startswith(f"afterok:{first}")
    r2 = cluster.wait_done(second, 240)
    r1 = cluster.job(first)
    assert r1["JobState"] == r2["JobState"] == "COMPLETED"
    lines = stamp.read_text().split()
    assert lines[0::2] == ["first", "second"]
    assert float(lines[3]) > float(lines[1])
    assert r2["StartTime"] >= r1["EndTime"]  # ISO timestamps compare as strings
    # a failing stage cancels what depends on it
    p = cluster.run([str(SLURM_DIR / "pipeline.sh"),
                     *common, RUN, "python", "-c", "raise SystemExit(3)", "::",
                     *common, RUN, "python", "-c", py, str(stamp), "0", "never"],
                    cwd=REPO, env={"PYTHON": sys.executable})
    bad, dependent = map(int, p.stdout.split())
    assert cluster.wait_done(bad, 120)["ExitCode"] == "3:0"
    assert cluster.wait_done(dependent, 60)["JobState"] == "CANCELLED"
    assert "never" not in stamp.read_text()


@pytest.mark.timeout(300)
def test_pipeline_eval_stage_after_training(cluster, jobs_dir, reference_run):
    """The documented pipeline's second stage: run.sbatch `python -m trainer eval --checkpoint RUN_DIR`."""
    result = jobs_dir / "ref-eval.json"
    stage = ["-N", "1", "--cpus-per-task", "1", "--output", str(jobs_dir / "eval-%j.out"), RUN,
             "python", "-m", "trainer", "eval", "--checkpoint", str(reference_run["out"]), "--out", str(result)]
    p = cluster.run([str(SLURM_DIR / "pipeline.sh"), "--after", str(reference_run["job"]), *stage],
                    cwd=REPO, env={"PYTHON": sys.executable})
    job = int(p.stdout)
    rec = cluster.wait_done(job, 240)
    text = read(jobs_dir / f"eval-{job}.out")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", text[-3000:]
    assert json.loads(result.read_text())["step"] == MAX_STEPS


@pytest.mark.full   # array jobs (test_array_job_runs_every_index) and select are fast-tier tested separately
@pytest.mark.timeout(JOB_TIMEOUT + 120)
def test_pipeline_select_array_then_train_on_its_manifest(cluster, demo_data, jobs_dir, reference_run):
    """The documented selection pipeline after a training run: `select` as a 3-task array over the
    one shard of 512 pairs (so each task scores an interleaved third of it; the last task merges),
    then a 2-node training stage that reads the manifest."""
    sel, out2 = jobs_dir / "select", jobs_dir / "run-selected"
    stages = ["--array=0-2", "--cpus-per-task", "1", "--output", str(jobs_dir / "select-%A_%a.out"), RUN,
              "python", "-m", "trainer", "select", "--checkpoints", str(reference_run["out"]),
              "--shards", str(demo_data / "train"), "--out", str(sel), "--keep", "0.7", "--batch-size", "64", "::",
              "-N", "2", *CPU_NODE_ARGS, "--output", str(jobs_dir / "selected-%j.out"), TRAIN, CONFIG,
              *overrides(demo_data, out2, **{"data.manifest": sel, "max_steps": 2})]
    p = cluster.run([str(SLURM_DIR / "pipeline.sh"), "--after", str(reference_run["job"]), *stages],
                    cwd=REPO, env={"PYTHON": sys.executable})
    array_job, train_job = map(int, p.stdout.split())
    rec = cluster.wait_done(train_job, JOB_TIMEOUT)
    tasks = cluster.jobs(array_job)
    logs = "".join(read(f) for f in jobs_dir.glob(f"select-{array_job}_*.out"))
    assert sorted(r.get("ArrayTaskId") for r in tasks) == ["0", "1", "2"], logs[-3000:]
    assert all(r["JobState"] == "COMPLETED" for r in tasks), (tasks, logs[-3000:])
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", read(jobs_dir / f"selected-{train_job}.out")[-3000:]
    assert sorted(p.name for p in (sel / "parts").iterdir()) == [f"000000-{j}of3.jsonl" for j in range(3)]
    summary = json.loads((sel / "summary.json").read_text())
    assert summary["world"] == 3 and summary["total"] == 512 and summary["kept"] == round(0.7 * 512)
    keys = [json.loads(line)["key"] for line in (sel / "scores.jsonl").read_text().splitlines()]
    assert keys == sorted(keys) and len(set(keys)) == 512      # every sample once, in shard order
    assert yaml.safe_load((out2 / "config.yaml").read_text())["data"]["manifest"] == str(sel)
    assert max(metrics(out2)) == 2


# Stage 1 of the growth pipeline: enough steps at this learning rate that the loss leaves the fresh
# model's (3.78 at step 1 for global batch 32; ln 32 = 3.47 is the uniform-logits plateau) well behind.
GROW_S1 = {"max_steps": 40, "optim.lr": 5e-4, "optim.warmup_steps": 4, "checkpoint.every_steps": 100}


@pytest.mark.full   # the longest SLURM test; the grow verb and the pipeline helper are fast-tier tested separately
@pytest.mark.timeout(2 * JOB_TIMEOUT)
def test_pipeline_train_grow_train(cluster, demo_data, jobs_dir, deepspeed_ops):
    """The growth recipe (slurm/README.md, "Model growth as stages") on the loopback cluster:
    train the tiny model 40 steps on 2 nodes -> `grow` it to 5+5 layers with --pim-beta 1
    (run.sbatch, one node) -> train the grown config.yaml 2 steps. With exact inheritance the grown
    stage's first loss is the one the stage-1 model itself has on the same first batch, which a
    fourth job measures (the ungrown config with checkpoint.init=stage 1, one step; both runs
    start their data stream at the beginning with the same seed). Then the same pipeline is
    submitted again: every stage finishes at once without changing anything."""
    s1, grown, s2, ref = (jobs_dir / name for name in ("grow-s1", "grow-s1-grown", "grow-s2", "grow-ref"))
    two, one = ["-N", "2", *CPU_NODE_ARGS], ["-N", "1", "--cpus-per-task", "1"]
    env = {"PYTHON": sys.executable}

    def pipeline() -> list[int]:
        stages = [*two, "--output", str(jobs_dir / "grow-s1-%j.out"), TRAIN, CONFIG,
                  *overrides(demo_data, s1, **GROW_S1), "::",
                  *one, "--output", str(jobs_dir / "grow-op-%j.out"), RUN, "python", "-m", "trainer", "grow",
                  "--checkpoint", str(s1), "--out", str(grown), "model.vision_layers=5", "model.text_layers=5",
                  "--pim-beta", "1", "::",
                  *two, "--output", str(jobs_dir / "grow-s2-%j.out"), TRAIN, str(grown / "config.yaml"),
                  f"output_dir={s2}", "max_steps=2", f"data.train_shards={demo_data / 'train'}"]
        return [int(j) for j in cluster.run([str(SLURM_DIR / "pipeline.sh"), *stages], cwd=REPO, env=env).stdout.split()]

    def logs(jobs: list[int]) -> list[str]:
        return [read(jobs_dir / f"grow-{kind}-{job}.out") for kind, job in zip(("s1", "op", "s2"), jobs)]

    def check_completed(jobs: list[int]) -> list[dict]:
        recs = [cluster.wait_done(job, JOB_TIMEOUT) for job in jobs]
        for rec, text in zip(recs, logs(jobs)):
            assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", (rec, text[-3000:])
        return recs

    t0 = time.monotonic()
    jobs = pipeline()
    p = cluster.run([str(SLURM_DIR / "pipeline.sh"), "--after", str(jobs[0]), *two, "--output",
                     str(jobs_dir / "grow-ref-%j.out"), TRAIN, CONFIG,
                     *overrides(demo_data, ref, **{**GROW_S1, "max_steps": 1, "checkpoint.init": s1})], cwd=REPO, env=env)
    ref_job = int(p.stdout)
    recs = check_completed([*jobs, ref_job])
    first_s = time.monotonic() - t0
    log1, log_grow, log2 = logs(jobs)
    ref_log = read(jobs_dir / f"grow-ref-{ref_job}.out")

    # the grown directory: complete, exact, and a config for the next stage
    info = json.loads((grown / "grow.json").read_text())
    assert (grown / "weights.pt").is_file() and not list(jobs_dir.glob(".grow-s1-grown.tmp-*"))
    assert info["source_step"] == GROW_S1["max_steps"] and info["request"]["pim_beta"] == 1.0
    assert info["params"]["new"] > info["params"]["old"]
    assert all(abs(e) <= 1e-5 for e in info["function_error"].values()), info["function_error"]
    gcfg = yaml.safe_load((grown / "config.yaml").read_text())
    assert gcfg["model"]["vision_layers"] == gcfg["model"]["text_layers"] == 5
    assert gcfg["checkpoint"]["init"] == str(grown) and gcfg["output_dir"] == str(grown / "train")
    assert gcfg["data"]["train_shards"] == str(demo_data / "train") and gcfg["optim"]["lr"] == GROW_S1["optim.lr"]
    # stage 2 ran in its own output_dir, from the grown weights, with the grown shape
    assert not (grown / "train").exists()
    assert f"started from the weights of {grown} (checkpoint.init" in log2, log2[-3000:]
    cfg2 = yaml.safe_load((s2 / "config.yaml").read_text())
    assert cfg2["model"]["vision_layers"] == 5 and cfg2["output_dir"] == str(s2)
    assert f"started from the weights of {s1}/checkpoints/step_{GROW_S1['max_steps']}" in ref_log, ref_log[-3000:]

    m1, m2, mref = metrics(s1), metrics(s2), metrics(ref)
    assert sorted(m1) == list(range(1, GROW_S1["max_steps"] + 1)) and sorted(m2) == [1, 2] and sorted(mref) == [1]
    fresh, trained = m1[1]["loss"], sum(m1[s]["loss"] for s in range(36, 41)) / 5
    grown_first = m2[1]["loss"]
    print(f"\ngrowth pipeline: fresh first loss {fresh:.4f}, stage-1 mean of steps 36-40 {trained:.4f}, "
          f"grown first loss {grown_first!r}, ungrown init first loss {mref[1]['loss']!r}, {first_s:.0f} s")
    # exact: the grown model's first loss is the small model's on the same batch
    assert grown_first == pytest.approx(mref[1]["loss"], abs=1e-5)
    # and in the trained regime, far from where a fresh model starts
    assert fresh - trained > 0.3, (fresh, trained)
    assert abs(grown_first - trained) < 0.25, (grown_first, trained)
    assert fresh - grown_first > 0.4, (fresh, grown_first)

    # the same pipeline again: every stage finds its work done
    before = {d: ((d / "metrics.jsonl").read_text(), (d / "checkpoints" / "latest").read_text(), (d / "eval.json").read_text())
              for d in (s1, s2)}
    weights = (grown / "weights.pt").stat().st_mtime_ns
    t0 = time.monotonic()
    again = pipeline()
    recs = check_completed(again)
    print(f"resubmitted: {time.monotonic() - t0:.0f} s (" + ", ".join(r["RunTime"] for r in recs) + ")")
    log1, log_grow, log2 = logs(again)
    assert f"resumed from {s1}/checkpoints/step_{GROW_S1['max_steps']} (step {GROW_S1['max_steps']})" in log1, log1[-3000:]
    assert "already holds this growth; nothing to do" in log_grow, log_grow[-3000:]
    assert f"resumed from {s2}/checkpoints/step_2 (step 2)" in log2 and "started from the weights" not in log2, log2[-3000:]
    assert (grown / "weights.pt").stat().st_mtime_ns == weights
    after = {d: ((d / "metrics.jsonl").read_text(), (d / "checkpoints" / "latest").read_text(), (d / "eval.json").read_text())
             for d in (s1, s2)}
    assert after == before


@pytest.mark.timeout(300)
def test_array_job_runs_every_index(cluster, jobs_dir):
    outdir = jobs_dir / "array"
    outdir.mkdir()
    py = ("import os, sys; open(os.path.join(sys.argv[1], 'part-' + sys.argv[2]), 'w')"
          ".write(sys.argv[3] + ' ' + os.environ['TASK_ID'] + ' ' + os.environ['TASK_COUNT'])")
    job = cluster.sbatch(["--array=0-3", "--cpus-per-task", "1", "--output", str(jobs_dir / "array-%A_%a.out"),
                          RUN, "python", "-c", py, str(outdir), "{task_id}", "{task_count}"],
                         cwd=REPO, env={"PYTHON": sys.executable})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        recs = cluster.jobs(job)
        if len(recs) == 4 and all(r.get("JobState") in sc.FINAL_STATES for r in recs):
            break
        time.sleep(0.5)
    recs = cluster.jobs(job)
    assert sorted(r.get("ArrayTaskId") for r in recs) == ["0", "1", "2", "3"]
    assert all(r["JobState"] == "COMPLETED" for r in recs), recs
    parts = {p.name: p.read_text() for p in outdir.iterdir()}
    assert parts == {f"part-{i}": f"4 {i} 4" for i in range(4)}


@pytest.mark.full   # three more SLURM jobs; bad input's exit 2 is fast-tier tested through the CLI (test_config_cli)
@pytest.mark.timeout(600)
def test_bad_input_fails_fast_with_a_clear_message(cluster, demo_data, jobs_dir, deepspeed_ops):
    one_node = ["-N", "1", *CPU_NODE_ARGS]
    two_nodes = ["-N", "2", *CPU_NODE_ARGS]
    cases = {
        "missing-config": ([*one_node, TRAIN, "configs/no-such-config.yaml"],
                           "config file 'configs/no-such-config.yaml' not found"),
        "missing-data": ([*two_nodes, TRAIN, CONFIG, *overrides(demo_data, jobs_dir / "run-bad-data",
                                                              **{"data.train_shards": "/nonexistent/shards"})],
                         "'data.train_shards': no shard matches '/nonexistent/shards'"),
        # the config demands 4 ranks (global batch 64 = 16 per rank x 4); the job has 2 tasks
        "too-few-tasks": ([*two_nodes, TRAIN, CONFIG, *overrides(demo_data, jobs_dir / "run-bad-world",
                                                               **{"train.global_batch_size": 64})],
                          "train.global_batch_size(64) != data.batch_size(16)"),
    }
    jobs = {name: submit(cluster, jobs_dir, args, name) for name, (args, _) in cases.items()}
    for name, (job, log) in jobs.items():
        rec = cluster.wait_done(job, 300)
        text = read(log)
        assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "2:0", (name, text[-2000:])
        assert cases[name][1] in text, (name, text[-2000:])
        assert "Traceback" not in text, (name, text[-2000:])
        assert "rejected its input" in text or name == "missing-config", (name, text[-2000:])
        assert "requeue" not in rec.get("Reason", "").lower() and rec["Restarts"] == "0"
        # rejected before any training: no step was logged (a count, not a wall-clock bound)
        assert not list(jobs_dir.glob(f"run-bad-*/metrics.jsonl")), name
        if name == "missing-config":
            assert "train-task" not in text  # failed before srun started a task


def _trainer_pid(job: int, rank: int) -> int | None:
    """The trainer process of one rank (not its data loader workers, which are its children)."""
    found = {}
    for pid in sc.processes_with_env(SLURM_JOB_ID=str(job), SLURM_PROCID=str(rank)):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"trainer" in argv and b"train" in argv and b"python" in Path(argv[0].decode()).name.encode():
            found[pid] = ppid
    mains = [pid for pid, ppid in found.items() if ppid not in found]
    return mains[0] if len(mains) == 1 else None


@pytest.mark.timeout(JOB_TIMEOUT + 200)
def test_a_dead_rank_fails_the_whole_job_quickly(cluster, demo_data, jobs_dir, deepspeed_ops):
    out = jobs_dir / "run-kill"
    job, log = submit(cluster, jobs_dir, ["-N", "2", *CPU_NODE_ARGS, TRAIN, CONFIG,
                                          *overrides(demo_data, out, max_steps=500)], "rankdies")
    wait_for(lambda: max(metrics(out), default=0) >= 1, JOB_TIMEOUT, "training to start", cluster, job)
    pid = _trainer_pid(job, 1)
    assert pid, "rank 1's trainer process not found"
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    # "quickly": long before the surviving rank's collective would time out (dist.timeout_s, 1800 s
    # by default), with a bound generous enough for a loaded 2-core machine
    rec = cluster.wait_done(job, 600)
    text = read(log)
    assert rec["JobState"] == "FAILED", text[-3000:]
    assert rec["ExitCode"] != "0:0" and rec["Restarts"] == "0"
    assert "task 1" in text and "training failed" in text, text[-3000:]
    assert max(metrics(out)) < 500
    # nothing of the job is left running on either node
    wait_for(lambda: not sc.processes_with_env(SLURM_JOB_ID=str(job)), 30, "the job's processes to end")
