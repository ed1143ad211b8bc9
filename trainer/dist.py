"""Rank and world from whichever launcher started us, and process-group set-up.

Launchers: a plain ``python`` (world 1), ``torchrun`` / ``deepspeed`` (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), and SLURM's ``srun`` (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``; master = first host of the allocation). ``launch_env()`` only
reads the environment, so the config can be checked against the world before any collective.
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .config import ConfigError
from .ports import derive_port

T = TypeVar("T")


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
                         int(env.get("MASTER_PORT") or derive_port(job)), "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 29500)), "single")


_STORE_DIR: str | None = None   # a single process's rendezvous file (removed by shutdown)


def select_device(local_rank: int) -> torch.device:
    """The accelerator this rank drives, chosen from the devices it can see.

    With one GPU bound per task (``srun --gpus-per-task=1``) every task sees one device, so
    ``LOCAL_RANK`` (0..tasks per node - 1) is not a valid ordinal; the ordinal is taken modulo the
    visible count, i.e. 0 there and ``LOCAL_RANK`` when every task sees every GPU of the node.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(le: LaunchEnv, backend: str = "auto", timeout_s: int = 1800) -> torch.device:
    """Export the torch.distributed variables DeepSpeed expects and start the process group.

    DeepSpeed takes its device ordinal from ``LOCAL_RANK`` (``set_device(LOCAL_RANK)`` in the
    engine, ``device_id`` for NCCL), so ``LOCAL_RANK`` is exported as the ordinal chosen by
    :func:`select_device`; the launcher's value stays in ``TRAINER_LAUNCH_LOCAL_RANK``.
    """
    import deepspeed

    device = select_device(le.local_rank)
    os.environ.update(RANK=str(le.rank), WORLD_SIZE=str(le.world_size),
                      LOCAL_RANK=str(device.index if device.type == "cuda" else le.local_rank),
                      TRAINER_LAUNCH_LOCAL_RANK=str(le.local_rank), MASTER_ADDR=le.master_addr)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    init_method = None
    if le.launcher == "single" and "MASTER_PORT" not in os.environ:
        # One process, no launcher: rendezvous through a private file instead of a TCP port, so
        # concurrent single-process runs (eval, select, small tests) cannot collide on a port.
        global _STORE_DIR
        _STORE_DIR = tempfile.mkdtemp(prefix="trainer-pg-")
        init_method = f"file://{_STORE_DIR}/store?rank=0&world_size=1"
    os.environ.update(MASTER_PORT=str(le.master_port))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, init_method=init_method,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


# Every collective of the trainer goes through the helpers below (tests/test_dist.py fails on a
# direct torch.distributed collective anywhere else in trainer/ or kernels/, the kernels' own
# gather and statistics excepted: their tensors are the loss inputs, already on the device).
# NCCL only moves tensors that live on the current CUDA device; gloo takes CPU tensors. Tensors
# are moved to the backend's communication device and the result comes back where it came from.
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce ``t`` (``op``: sum | max | min) across the world; returns a new tensor on
    ``t``'s device. Without a process group it returns a copy of ``t``."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t.clone()
    buf = t.detach().to(comm_device(), copy=True).contiguous()
    dist.all_reduce(buf, op=_OPS[op])
    return buf.to(t.device)


def all_reduce_flags(*flags: float, op: str = "max") -> list[float]:
    """One small all-reduce for several per-step numbers (MAX by default)."""
    return all_reduce(torch.tensor(flags, dtype=torch.float64), op).tolist()


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (a collective); ``[obj]`` without a group.

        per_rank = all_gather_object({"syncs": counter})
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_rank0(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 alone, its result on every rank (a collective: every rank calls it).

        urls = from_rank0(lambda: expand_shards(spec, key))       # one glob per name, not one per rank
        done = from_rank0(lambda: (out / "summary.json").is_file())

    For what ranks would otherwise each read from a shared file system: one read instead of one
    per rank, and every rank acts on the same answer, so a rank whose NFS attribute cache is stale
    cannot take another branch than its peers and leave them waiting in a collective. An exception
    on rank 0 is raised on every rank (a ConfigError as a ConfigError, so bad input is still exit 2;
    anything else as a RuntimeError naming rank 0). The result must pickle. Without a process group
    (or with one rank) it is ``decide()``.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decide()
    box: list = [None]
    err = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except Exception as e:  # noqa: BLE001 - every rank raises it below, none waits alone
            err = e
            box[0] = ("config", str(e)) if isinstance(e, ConfigError) else ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    kind, value = box[0]
    if kind == "ok":
        return value
    raise ConfigError(value) if kind == "config" else RuntimeError(f"rank 0: {value}")


def broadcast_state_dict(load: Callable[[], dict[str, torch.Tensor]],
                         chunk_bytes: int = 256 << 20) -> dict[str, torch.Tensor]:
    """``load()`` run on rank 0 alone; its tensors (CPU) on every rank (a collective).

        sd = broadcast_state_dict(lambda: fp32_state_dict(root, tag))

    For weights every rank needs whole (``checkpoint.init``): consolidating a ZeRO checkpoint
    reads every rank's optimizer partition (fp32 master weights and both Adam moments), so one
    reader instead of one per rank divides that file-system traffic by the world size. The
    tensors travel as raw bytes in chunks of at most ``chunk_bytes`` (any dtype; NCCL through the
    current device, gloo on the CPU); rank 0 keeps ``load()``'s own tensors, the others get
    copies (tensors that shared storage arrive as separate ones).
    An error in ``load()`` is raised on every rank (see :func:`from_rank0`).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return load()
    held: dict[str, torch.Tensor] = {}

    def layout():
        held.update(load())
        return [(k, tuple(v.shape), v.dtype) for k, v in held.items()]
    entries = from_rank0(layout)
    out: dict[str, torch.Tensor] = {}
    device = comm_device()
    i = 0
    while i < len(entries):
        group, size = [], 0
        while i < len(entries) and (not group or size + _nbytes(entries[i]) <= chunk_bytes):
            group.append(entries[i])
            size += _nbytes(entries[i])
            i += 1
        if dist.get_rank() == 0:
            buf = torch.cat([held[k].detach().contiguous().reshape(-1).view(torch.uint8) for k, _, _ in group]
                            ).to(device) if size else torch.empty(0, dtype=torch.uint8, device=device)
        else:
            buf = torch.empty(size, dtype=torch.uint8, device=device)
        dist.broadcast(buf, src=0)
        if dist.get_rank() == 0:
            continue
        buf = buf.cpu()
        at = 0
        for name, shape, dtype in group:
            n = _nbytes((name, shape, dtype))
            out[name] = buf[at:at + n].clone().view(dtype).reshape(shape)
            at += n
    return held if dist.get_rank() == 0 else out


def _nbytes(entry) -> int:
    _, shape, dtype = entry
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def barrier() -> None:
    if dist.is_initialized():
        if "nccl" in str(dist.get_backend()).lower():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shutdown() -> None:
    """End the process group once every rank is done with it (call on the success paths only).

    Without it gloo's worker threads outlive the interpreter's finalization and the process can
    abort at exit ("terminate called without an active exception", SIGABRT: pytorch#190489),
    turning a finished run into a failed SLURM step; NCCL warns and may block its peers. After an
    exception it is not called: a rank that raised would wait here for peers that never come.
    """
    global _STORE_DIR
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    if _STORE_DIR is not None:
        shutil.rmtree(_STORE_DIR, ignore_errors=True)
        _STORE_DIR = None


def exit_process(status: int):
    """Leave a process that ran collectives with ``status``, skipping interpreter finalization.

    ``shutdown()`` is not always enough: gloo's worker threads can still hold objects whose
    release takes the GIL, and a thread that asks for the GIL while the interpreter finalizes is
    ended inside a ``noexcept`` frame: "terminate called without an active exception", SIGABRT,
    after the work was done (seen in CI on the 2-rank eval test, and as a failed SLURM step).
    Everything the trainer writes is closed before this point (metrics, TensorBoard, checkpoints,
    loader workers); logging and the standard streams are flushed here.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def hostname() -> str:
    return socket.gethostname()
