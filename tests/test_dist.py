"""Distributed plumbing that gloo on CPU would forgive: where collectives are called from, and
which GPU a rank drives under SLURM's per-task GPU binding."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
               "reduce_scatter", "reduce_scatter_tensor", "reduce", "broadcast", "broadcast_object_list",
               "barrier", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv", "isend",
               "irecv", "monitored_barrier"}
COMM_MODULES = {"torch.distributed", "deepspeed.comm"}
# Where a direct collective is allowed: the trainer's one helper module, and the kernels' gather
# and statistics, whose tensors are the loss inputs and are put on the backend's device there, and
# the Triton tuner's one broadcast of its pick (kernels/triton_launch.py agree_on_tile, on
# comm_device; the kernels may not import trainer.dist).
ALLOWED = {"trainer/dist.py", "kernels/gather.py", "kernels/stats.py", "kernels/triton_launch.py"}


def direct_collectives(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every call of a torch.distributed / deepspeed.comm collective."""
    tree = ast.parse(source)
    modules: set[str] = set()   # local names bound to a communication module
    functions: set[str] = set()  # local names bound to a collective function itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in COMM_MODULES and a.asname:
                    modules.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in COMM_MODULES:
                    modules.add(a.asname or a.name)
                elif node.module in COMM_MODULES and a.name in COLLECTIVES:
                    functions.add(a.asname or a.name)

    def dotted(expr) -> str:
        parts = []
        while isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        if isinstance(expr, ast.Name):
            parts.append(expr.id)
        return ".".join(reversed(parts))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in functions:
            found.append((node.lineno, f.id))
        elif isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            owner = dotted(f.value)
            if owner in modules or owner in COMM_MODULES:
                found.append((node.lineno, f"{owner}.{f.attr}"))
    return found


def test_the_scanner_finds_direct_collectives():
    """The check below can fail: the evaluation code that broke under NCCL is flagged."""
    old_eval = ("import torch.distributed as dist\n"
                "hits = torch.tensor([1.0])\n"
                "if world > 1:\n    dist.all_reduce(hits)\n")
    assert direct_collectives(old_eval) == [(4, "dist.all_reduce")]
    assert direct_collectives("import torch\ntorch.distributed.barrier()\n") == [(2, "torch.distributed.barrier")]
    assert direct_collectives("from torch.distributed import all_reduce as ar\nar(x)\n") == [(2, "ar")]
    assert direct_collectives("from torch import distributed\ndistributed.broadcast(x, 0)\n") == \
        [(2, "distributed.broadcast")]
    assert direct_collectives("import deepspeed.comm as dc\ndc.all_reduce(x)\n") == [(2, "dc.all_reduce")]
    assert direct_collectives("from trainer.dist import all_reduce\nall_reduce(x)\nmodel.reduce(1)\n") == []


def test_collectives_go_through_trainer_dist():
    """Every collective in trainer/ and kernels/ is called through trainer.dist's helpers (which
    move tensors to the backend's communication device) or the kernels' gather/statistics."""
    offenders = []
    for path in sorted([*ROOT.glob("trainer/**/*.py"), *ROOT.glob("kernels/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        offenders += [f"{rel}:{line}: {name}" for line, name in direct_collectives(path.read_text())]
    assert not offenders, ("call trainer.dist.all_reduce / all_reduce_flags / barrier instead:\n"
                           + "\n".join(offenders))


@pytest.fixture
def fake_gpus(monkeypatch):
    """A node where this task sees ``n`` GPUs; records what DeepSpeed would be told."""
    import deepspeed

    from trainer import dist as D

    seen: dict = {}

    def setup(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set_device", torch.device(d)))

        def init(**kwargs):
            import os
            seen["LOCAL_RANK"] = os.environ["LOCAL_RANK"]
            seen["backend"] = kwargs["dist_backend"]
        monkeypatch.setattr(deepspeed, "init_distributed", init)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRAINER_LAUNCH_LOCAL_RANK"):
            monkeypatch.setenv(key, "0")
        return seen
    return D, setup


def test_one_gpu_per_task_uses_the_visible_gpu_and_deepspeed_agrees(fake_gpus):
    """srun --gpus-per-task=1: task with SLURM_LOCALID 3 sees one GPU, ordinal 0. DeepSpeed reads
    LOCAL_RANK for set_device and NCCL's device_id, so it must read 0, not 3."""
    D, setup = fake_gpus
    seen = setup(1)
    le = D.LaunchEnv(rank=7, world_size=8, local_rank=3, master_addr="10.0.0.1", master_port=20001, launcher="slurm")
    device = D.init_distributed(le, "auto")
    assert device == torch.device("cuda", 0)
    assert seen == {"set_device": torch.device("cuda", 0), "LOCAL_RANK": "0", "backend": "nccl"}
    import os
    assert os.environ["TRAINER_LAUNCH_LOCAL_RANK"] == "3" and os.environ["RANK"] == "7"


def test_all_gpus_visible_keeps_the_local_rank_as_ordinal(fake_gpus):
    D, setup = fake_gpus
    seen = setup(4)
    le = D.LaunchEnv(rank=3, world_size=4, local_rank=3, master_addr="127.0.0.1", master_port=20001, launcher="slurm")
    assert D.init_distributed(le, "auto") == torch.device("cuda", 3)
    assert seen["LOCAL_RANK"] == "3" and seen["set_device"] == torch.device("cuda", 3)


def test_comm_device_follows_the_backend(monkeypatch):
    from trainer import dist as D

    assert D.comm_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "nccl")
    assert D.comm_device() == torch.device("cuda", 2)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "cpu:gloo,cuda:nccl")
    assert D.comm_device() == torch.device("cuda", 2)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "gloo")
    assert D.comm_device() == torch.device("cpu")


WRAP = """import sys, torch.distributed as dist
from trainer.cli import main
rc = main(sys.argv[1:])
print(f"exit {rc}, process group alive after main: {dist.is_initialized()}")
"""


@pytest.mark.full   # 2 more 2-rank runs; the fast tier's test_ranks_of_a_multi_process_run_leave_without_finalization checks how ranks end
def test_train_and_eval_end_their_process_group(demo_data, tmp_path):
    """A finished run destroys its process group before the interpreter exits: left to
    finalization, gloo aborted now and then ("terminate called without an active exception",
    SIGABRT) after a successful run, which SLURM reports as a failed step (pytorch#190489)."""
    from conftest import ROOT, budget, check, data_overrides, torchrun, trainer_env
    import subprocess

    wrap = tmp_path / "wrap.py"
    wrap.write_text(WRAP)
    out = tmp_path / "run"

    def run2(*args):
        return check(subprocess.run([*torchrun(2), str(wrap), *args], cwd=ROOT, env=trainer_env(),
                                    capture_output=True, text=True, timeout=budget(600)))

    text = run2("train", "--config", "trainer/configs/demo.yaml", *data_overrides(demo_data, out),
                    "model.context_length=24", "data.batch_size=16", "data.workers=0", "log.progress=false",
                    "data.train_num_samples=64", "eval.every_steps=0", "max_steps=2")
    assert text.count("exit 0, process group alive after main: False") == 2, text[-3000:]
    text = run2("eval", "--checkpoint", str(out / "checkpoints"))
    assert text.count("exit 0, process group alive after main: False") == 2, text[-3000:]


def test_ranks_of_a_multi_process_run_leave_without_finalization(demo_data, tmp_path):
    """``python -m trainer`` under torchrun ends each rank with ``exit_process``: the exit status
    is the verb's, the output is flushed, and no interpreter finalization runs (an atexit hook
    registered at start-up never fires), where gloo aborted now and then after a finished run.
    A single process still exits normally (the hook fires)."""
    from conftest import PY, ROOT, budget, check, data_overrides, torchrun, trainer_env
    import subprocess

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, sys\natexit.register(lambda: print('FINALIZED', file=sys.stderr, flush=True))\n")
    env = trainer_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    out = tmp_path / "run"
    args = ["-m", "trainer", "train", "--config", "trainer/configs/demo.yaml", *data_overrides(demo_data, out),
            "model.context_length=24", "data.batch_size=16", "data.workers=0", "log.progress=false",
            "data.train_num_samples=64", "eval.every_steps=0", "max_steps=1"]
    text = check(subprocess.run([*torchrun(2), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=budget(600)))
    assert "eval step 1:" in text                      # rank 0's last log line was flushed
    assert text.count("FINALIZED") == 1, text[-3000:]  # torchrun's own process only, not the 2 ranks
    single = check(subprocess.run([PY, "-m", "trainer", "eval", "--checkpoint", str(out / "checkpoints")],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget(600)))
    assert "zeroshot_top1" in single and single.count("FINALIZED") == 1
