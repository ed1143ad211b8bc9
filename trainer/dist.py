"""Rank and world from whichever launcher started us, and process-group set-up.

Launchers: a plain ``python`` (world 1), ``torchrun`` / ``deepspeed`` (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), and SLURM's ``srun`` (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``; master = first host of the allocation). ``launch_env()`` only
reads the environment, so the config can be checked against the world before any collective.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, check=True).stdout


def _first_slurm_host() -> str:
    """Address of the allocation's first node (its NodeAddr: node names need not resolve)."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:
        first = _scontrol("show", "hostnames", nodelist).split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0]
    try:
        fields = dict(f.split("=", 1) for f in _scontrol("show", "node", "-o", first).split() if "=" in f)
        return fields.get("NodeAddr", first)
    except (OSError, subprocess.SubprocessError):
        return first


def launch_env() -> LaunchEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "slurm" if "SLURM_PROCID" in env else "torchrun/deepspeed"
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), launcher)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         env.get("MASTER_ADDR") or _first_slurm_host(),
                         int(env.get("MASTER_PORT") or 29500 + job % 10000), "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 29500)), "single")


def init_distributed(le: LaunchEnv, backend: str = "auto", timeout_s: int = 1800) -> torch.device:
    """Export the torch.distributed variables DeepSpeed expects and start the process group."""
    import deepspeed

    os.environ.update(RANK=str(le.rank), WORLD_SIZE=str(le.world_size), LOCAL_RANK=str(le.local_rank),
                      MASTER_ADDR=le.master_addr, MASTER_PORT=str(le.master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(le.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_flags(*flags: float, op=None) -> list[float]:
    """One small all-reduce for several per-step flags (MAX by default)."""
    t = torch.tensor(flags, dtype=torch.float64)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=op or dist.ReduceOp.MAX)
    return t.cpu().tolist()


def hostname() -> str:
    return socket.gethostname()
