"""Benchmark of the gathered contrastive loss: forward + backward time and peak memory.

    python -m kernels.bench --b 4096 --dim 512 --dtype fp32 --out bench/results
    python -m kernels.bench --b 32768 65536 --dim 512 1024 --dtype bf16      # on a GPU
    torchrun --nproc_per_node 8 -m kernels.bench --b 8192 --dim 512           # b per rank

Implementations: ``torch`` (materialised-logits reference), ``open_clip`` (open_clip's
``ClipLoss(local_loss=True, gather_with_grad=True)``, the baseline users know), ``chunked`` and
``triton`` (the fused paths; triton only on CUDA). A ``cublas_gemm`` row times ``X @ Y^T`` of the
same shape and dtype on the same device: the roofline the Triton row's ``vs_gemm`` is read
against. ``tflops`` counts the fused algorithm's work, 8 b N D (forward GEMM, backward
recompute, dX and dY GEMMs), for every loss row, so rows compare as time. The ``triton`` row
names the tile the tuner picked for its shape (``tile``); ``--tiles 128x128x64:8:3,...`` adds a
row ``triton@TILE`` per fixed tile (any tile, not only the tuner's candidates: e.g. the old
128 x 128 default, to see whether the tuner's choice is faster on this GPU).

Peak memory of one forward + backward: on CUDA ``max_memory_allocated`` above what was
allocated before the call; on CPU, in a fresh process per implementation, VmHWM above the RSS
before the call, after resetting the mark through /proc/self/clear_refs, with glibc's mmap
threshold pinned to 1 MiB so that RSS tracks live memory rather than heap caching. Rows are long format (one per shape x impl), written as
CSV and JSON lines, each with device, date, git commit and the command.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import gathered_clip_loss

IMPLS = ("torch", "open_clip", "chunked", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("--b", type=int, nargs="+", default=[2048], help="local batch per rank")
    p.add_argument("--dim", type=int, nargs="+", default=[512], help="embedding dim D")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--tiles", type=_tiles, default=(), metavar="BMxBNxBK[:WARPS[:STAGES]],...",
                   help="fixed Triton tiles to time beside the tuned 'triton' row (rows 'triton@TILE')")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workspace-bytes", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="bench/results", help="directory for the CSV and JSONL files")
    p.add_argument("--tag", default="loss", help="file name prefix")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)   # internal, see _Memory
    return p.parse_args(argv)


def parse_tile(text: str):
    """``"128x128x64:8:3"`` -> ``TileConfig(128, 128, 64, num_warps=8, num_stages=3)`` (warps 8 and
    stages 3 when left out)."""
    from .triton_launch import TileConfig   # the tile type only; Triton's launchers load on first use
    dims, _, opts = text.partition(":")
    try:
        bm, bn, bk = (int(v) for v in dims.split("x"))
        opt = [int(v) for v in opts.split(":")] if opts else []
        if len(opt) > 2:
            raise ValueError
        warps, stages = opt + [8, 3][len(opt):]
    except ValueError:
        raise ValueError(f"a tile is BMxBNxBK[:WARPS[:STAGES]], e.g. 128x128x64:8:3. Got: {text!r}") from None
    return TileConfig(bm, bn, bk, warps, stages)


def tile_name(cfg) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}:{cfg.num_warps}:{cfg.num_stages}"


def _tiles(text: str) -> tuple:
    try:
        return tuple(parse_tile(t) for t in text.split(",") if t)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tuned_tile(b: int, n: int, dim: int, dtype, device) -> str | None:
    """The tile the tuner chose for the plain contrastive loss at this shape (None: not tuned)."""
    from .triton_launch import TritonBackend
    cfg = TritonBackend._tuned.get((b, n, dim, dtype, False, False, 0, device))
    return tile_name(cfg) if cfg is not None else None


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}x{torch.get_num_threads()}threads"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss_fn(impl: str, workspace_bytes, world: int, rank: int):
    """``fn(x, y, s) -> loss`` for one implementation (None where it cannot run here);
    ``triton@TILE``: the Triton loss at that fixed tile."""
    if impl.startswith("triton@"):
        from .triton_launch import clip_loss_triton
        cfg = parse_tile(impl.partition("@")[2])
        return lambda x, y, s: clip_loss_triton(x, y, s, workspace_bytes=workspace_bytes, config=cfg)
    if impl == "open_clip":
        try:
            from open_clip.loss import ClipLoss
        except ImportError:
            return None
        return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    kw = {} if impl == "torch" or workspace_bytes is None else {"workspace_bytes": workspace_bytes}
    return lambda x, y, s: gathered_clip_loss(x, y, s, impl=impl, **kw)


class _Memory:
    """Peak bytes above the level before ``start()`` (see module docstring)."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def _kib(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return self._kib("VmHWM") * 1024 - self.base


def _inputs(b, dim, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = F.normalize(torch.randn(b, dim, device=device, generator=g), dim=1).to(dtype)
    y = F.normalize(torch.randn(b, dim, device=device, generator=g), dim=1).to(dtype)
    return x.requires_grad_(), y.requires_grad_(), torch.tensor(14.0, device=device, requires_grad=True)


def _percentiles(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return {"ms_p20": q[1], "ms_p50": statistics.median(ms), "ms_p80": q[7]}


def _time(step, device, reps, warmup) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def _cpu_peak(impl, b, dim, args) -> int:
    """Peak RSS above the inputs of one forward + backward, in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), WORLD_SIZE="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "kernels.bench", "--memory-probe", impl, "--b", str(b), "--dim",
           str(dim), "--device", "cpu", "--dtype", args.dtype or "fp32"]
    if args.workspace_bytes is not None:
        cmd += ["--workspace-bytes", str(args.workspace_bytes)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mem_bytes"]


def _probe(args) -> int:
    """``--memory-probe IMPL``: print this process's peak for one step (CPU, see _cpu_peak)."""
    device, dtype = torch.device("cpu"), DTYPES[args.dtype or "fp32"]
    fn = _loss_fn(args.memory_probe, args.workspace_bytes, 1, 0)
    x, y, s = _inputs(args.b[0], args.dim[0], dtype, device, seed=0)
    mem = _Memory(device)
    mem.start()
    fn(x, y, s).backward()
    print(json.dumps({"peak_mem_bytes": mem.peak()}))
    return 0


def bench_impl(impl, b, dim, dtype, device, args, world, rank) -> dict:
    """One row: forward + backward of ``impl`` (or a status saying why it did not run)."""
    if impl.partition("@")[0] == "triton" and device.type != "cuda":
        return {"status": "skipped: triton needs a CUDA device"}
    fn = _loss_fn(impl, args.workspace_bytes, world, rank)
    if fn is None:
        return {"status": f"skipped: {impl} is not installed"}
    x, y, s = _inputs(b, dim, dtype, device, seed=rank)

    def step():
        x.grad = y.grad = s.grad = None
        fn(x, y, s).backward()
    try:
        if device.type == "cuda" or world > 1:
            mem = _Memory(device)
            mem.start()
            step()                   # also the first warm-up (compiles / tunes Triton)
            peak = mem.peak()
        else:
            peak = _cpu_peak(impl, b, dim, args)
        ms = _time(step, device, args.reps, args.warmup)
    except torch.OutOfMemoryError:
        return {"status": "oom"}
    n = b * world
    row = {"status": "ok", "peak_mem_bytes": peak, **_percentiles(ms)}
    if impl == "triton":
        row["tile"] = _tuned_tile(b, n, dim, dtype, device)
    elif impl.startswith("triton@"):
        row["tile"] = impl.partition("@")[2]
    row["tflops"] = 8 * b * n * dim / (row["ms_p50"] * 1e-3) / 1e12
    return row


def bench_gemm(b, dim, dtype, device, args, world) -> dict:
    """The roofline: ``X @ Y^T`` for X [b, D], Y [N, D] in the same dtype on the same device."""
    x = torch.randn(b, dim, device=device, dtype=dtype)
    y = torch.randn(b * world, dim, device=device, dtype=dtype)
    ms = _time(lambda: x @ y.T, device, args.reps, args.warmup)
    row = {"status": "ok", **_percentiles(ms)}
    row["tflops"] = 2 * b * b * world * dim / (row["ms_p50"] * 1e-3) / 1e12
    return row


def _init_dist(device) -> tuple[int, int]:
    """Start the process group: NCCL for CUDA (each rank on its own GPU, chosen before the
    group starts, so that every collective's tensors are on the device NCCL drives), gloo for
    CPU. The loss's collectives put their tensors on ``kernels.gather.comm_device``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if device.type == "cuda":
        # one GPU per task (srun --gpus-per-task=1) sees a single device: ordinal modulo visible
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def write_rows(rows: list[dict], out: Path, stem: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.jsonl"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(json_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return csv_path, json_path


def plot_scaling(rows: list[dict], path: Path) -> Path:
    """Time (p50) and peak memory against N per impl, log-log: O(N) vs O(N^2) at a glance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, impl in enumerate(dict.fromkeys(r["impl"] for r in ok)):
        pts = sorted(((r["n"], r) for r in ok if r["impl"] == impl), key=lambda t: t[0])
        style = dict(color=f"C{i}", marker="o", label=impl)  # one colour per impl in both panels
        ax_t.plot([n for n, _ in pts], [r["ms_p50"] for _, r in pts], **style)
        mem = [(n, r["peak_mem_bytes"] / 2**20) for n, r in pts if r.get("peak_mem_bytes")]
        if mem:
            ax_m.plot(*zip(*mem), **style)
    dims = sorted({r["dim"] for r in ok})
    for ax, title, unit in ((ax_t, "fwd+bwd time (p50)", "ms"), (ax_m, "peak extra memory", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch N")
        ax.set_ylabel(unit)
        ax.set_title(f"{title}, D={','.join(map(str, dims))}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = _args(argv)
    if args.memory_probe:
        return _probe(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    impls = [i for i in args.impls.split(",") if i]
    bad = sorted(set(impls) - set(IMPLS))
    if bad:
        raise SystemExit(f"--impls: unknown {bad}; choose from {IMPLS}")
    rank, world = _init_dist(device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    common = {"device": _device_name(device), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "commit": _commit(), "dtype": next(k for k, v in DTYPES.items() if v == dtype),
              "world": world, "torch": torch.__version__,
              "command": " ".join(["python -m kernels.bench", *(argv if argv is not None else sys.argv[1:])])}
    rows = []
    for b in args.b:
        for dim in args.dim:
            shape = {"b": b, "n": b * world, "dim": dim}
            gemm = bench_gemm(b, dim, dtype, device, args, world)
            rows.append({**common, **shape, "impl": "cublas_gemm" if device.type == "cuda" else "torch_gemm", **gemm})
            for impl in impls + [f"triton@{tile_name(t)}" for t in args.tiles]:
                row = {**common, **shape, "impl": impl, **bench_impl(impl, b, dim, dtype, device, args, world, rank)}
                if row.get("status") == "ok":
                    row["vs_gemm"] = row["tflops"] / gemm["tflops"]
                rows.append(row)
                if rank == 0:
                    print(json.dumps({k: row.get(k) for k in ("b", "n", "dim", "impl", "status", "ms_p50", "peak_mem_bytes", "tflops", "vs_gemm", "tile")}), flush=True)
    if rank == 0:
        stem = f"{args.tag}_{device.type}_{common['dtype']}_{_dt.date.today().isoformat()}"
        for p in write_rows(rows, Path(args.out), stem):
            print(f"wrote {p}")
        if len({r["n"] for r in rows}) > 1:
            print(f"wrote {plot_scaling(rows, Path(args.out) / f'{stem}.png')}")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # No interpreter finalization after gloo/NCCL: a communicator thread that wants the GIL then
        # aborts the process (SIGABRT) after the rows are written (trainer.dist.exit_process says more).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)
