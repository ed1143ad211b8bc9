"""Compile every Triton loss kernel for A100 / H100 without a GPU, and read what ptxas reports.

    python -m kernels.compile_check --arch sm_80 sm_90 [--dtypes bf16 fp16 fp32] [--tiles all|default]
                                    [--families psd@teacher ...] [--b 4096 --n 32768 --dim 512]
                                    [--jobs 2] [--out FILE.md]

Each variant is one kernel (forward, backward) x loss family (``clip``, ``psd`` = + self-distillation,
``ecl`` = + momentum teacher, ``psd+ecl``; ``psd@teacher`` = self-distillation from teacher embeddings,
one more dot per tile, alone or ``+ecl``; ``psd@ecl+ecl`` = self-distillation reusing the momentum
teacher's logits) x input dtype x tile config of the tuner x target. Its
arguments come from the launcher's own builders (``triton_launch.forward_args`` /
``grad_panel_args``) applied to stand-in tensors of the given shapes, so the signature and the
specialisations (16-divisible sizes, strides and pointers, i32 offsets, constexpr 1s) are the ones a
real launch on that GPU gets. Triton compiles to PTX and runs the ``ptxas`` of its wheel with
``-v``; the table reports registers per thread, spill stores/loads, dynamic shared memory and the
occupancy those imply (resident blocks and warps per SM).

Exit status 1 when a variant fails to compile or needs more shared memory than one block may have
on its target; 0 otherwise (spills are reported, not fatal: the tuner's defaults are kept spill-free
by tests/test_kernels_compile.py).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from .spec import GPU_WORKSPACE_BYTES, LossSpec

# Per target: SMs of the usual part (A100 SXM, H100 SXM), registers per SM, shared memory per SM and
# the most one block may opt into (CUDA C Programming Guide, compute capability table), max warps.
ARCHS = {
    "sm_80": {"capability": 80, "sms": 108, "regs_per_sm": 65536, "smem_per_sm": 164 * 1024,
              "smem_per_block": 163 * 1024, "max_warps": 64, "max_blocks": 32},
    "sm_90": {"capability": 90, "sms": 132, "regs_per_sm": 65536, "smem_per_sm": 228 * 1024,
              "smem_per_block": 227 * 1024, "max_warps": 64, "max_blocks": 32},
}
# name: (psd, ecl, LossSpec.psd_source)
FAMILIES = {"clip": (False, False, "self"), "psd": (True, False, "self"), "ecl": (False, True, "self"),
            "psd+ecl": (True, True, "self"), "psd@teacher": (True, False, "teacher"),
            "psd@teacher+ecl": (True, True, "teacher"), "psd@ecl+ecl": (True, True, "ecl")}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = ("forward", "backward")


@dataclass(frozen=True)
class Variant:
    kernel: str
    family: str
    dtype: str
    arch: str
    tile: tuple           # TileConfig fields (block_m, block_n, block_k, num_warps, num_stages)
    default: bool         # the tuner's first candidate for this family (what runs untuned)
    b: int = 4096
    n: int = 32768
    dim: int = 512


@dataclass
class Result:
    variant: Variant
    ok: bool = False
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    blocks_per_sm: int = 0
    occupancy: float = 0.0
    error: str = ""
    problems: list = field(default_factory=list)


class _Stand:
    """A tensor stand-in: shape, dtype, row-major strides and a 256-byte aligned address (what the
    CUDA caching allocator hands out), enough for the launcher's builders and Triton's binder."""

    def __init__(self, dtype: torch.dtype, *shape: int):
        self.dtype, self.shape = dtype, tuple(shape)

    def stride(self, dim: int | None = None):
        strides = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return strides if dim is None else strides[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    @staticmethod
    def data_ptr() -> int:
        return 1 << 20

    @staticmethod
    def ptr_range() -> int:
        return 0


def _tile(variant: Variant):
    from .triton_launch import TileConfig   # imports triton: only when compiling
    return TileConfig(*variant.tile)


def _spec(variant: Variant):
    psd, ecl, source = FAMILIES[variant.family]
    # ECLIPSE's default (text stop-gradient, weight 1) is the variant with the second G_y panel
    return LossSpec(psd=psd, inv_tau=0.5, ecl=ecl, teacher_weight=1.0, psd_source=source)


def kernel_args(variant: Variant):
    """``(jit function, args, meta)`` of the variant's first launch, from the launcher's builders."""
    from .triton_clip import _clip_bwd_kernel, _clip_fwd_kernel   # triton: only when compiling
    from .triton_launch import _forward_row_blocks, _split_columns, forward_args, grad_panel_args, panel_width

    spec, cfg, dt = _spec(variant), _tile(variant), DTYPES[variant.dtype]
    b, N, D = variant.b, variant.n, variant.dim
    X, Y, XT = _Stand(dt, b, D), _Stand(dt, N, D), (_Stand(dt, b, D) if spec.ecl else None)
    xt = XT if XT is not None else X
    # the teacher's own texts (the shared text tower passes Y: the same compiled kernel)
    xp, yp = (_Stand(dt, b, D), _Stand(dt, N, D)) if spec.psd_teacher else (None, None)
    s32 = _Stand(torch.float32, 1)
    F = spec.families
    if variant.kernel == "forward":
        per, splits = _split_columns(b, N, cfg, None, sms=ARCHS[variant.arch]["sms"])
        rb = _forward_row_blocks(b, N, F, splits, cfg, GPU_WORKSPACE_BYTES)
        bufs = (_Stand(torch.float32, F, splits, b), _Stand(torch.float32, F, 2, splits, b),
                _Stand(torch.float32, F, rb, N), _Stand(torch.float32, F, 2, rb, N))
        args, meta = forward_args(X, Y, xt, s32, bufs, 0, min(b, rb * cfg.block_m), per, splits, rb, spec, cfg,
                                  xp, yp)
        return _clip_fwd_kernel, args, meta
    width = panel_width(b, N, dt, spec, cfg)
    lse_row, lse_col = _Stand(torch.float32, F * b), _Stand(torch.float32, F * N)
    a_row, a_col = (_Stand(torch.float32, b), _Stand(torch.float32, N)) if spec.psd else (lse_row, lse_col)
    gx = _Stand(dt, b, width)
    gy = _Stand(dt, b, width) if spec.split_gy else None
    args, meta = grad_panel_args(X, Y, xt, s32, lse_row, lse_col, a_row, a_col, gx, gy, b, 0, min(N, width),
                                 spec, cfg, xp, yp)
    return _clip_bwd_kernel, args, meta


_PTXAS = {"registers": r"Used (\d+) registers", "stack": r"(\d+) bytes stack frame",
          "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads"}


def compile_variant(variant: Variant) -> Result:
    """Compile one variant for its target and read registers, spills and shared memory."""
    os.environ.pop("TRITON_INTERPRET", None)
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    res = Result(variant)
    arch = ARCHS[variant.arch]
    try:
        fn, args, meta = kernel_args(variant)
        target = GPUTarget("cuda", arch["capability"], 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **meta)
        options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, specialization, options)
        log = io.StringIO()
        # ptxas -v's report is printed only when it runs: compile afresh, never from the cache
        with knobs.nvidia.scope(), knobs.compilation.scope():
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            with contextlib.redirect_stdout(log):
                kernel = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                        options=options.__dict__)
        text = log.getvalue()
        for key, pattern in _PTXAS.items():
            m = re.search(pattern, text)
            if m is None and key == "registers":
                raise RuntimeError(f"no ptxas report in the compile log:\n{text[-2000:]}")
            setattr(res, key, int(m.group(1)) if m else 0)
        res.shared = int(kernel.metadata.shared)
        res.ok = True
    except Exception as err:   # reported per variant; the command's exit status says it failed
        res.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
        return res
    warps = variant.tile[3]
    res.blocks_per_sm, res.occupancy = occupancy(variant.arch, res.registers, res.shared, warps)
    if res.shared > arch["smem_per_block"]:
        res.problems.append(f"shared memory {res.shared} B > {arch['smem_per_block']} B per block on {variant.arch}")
    return res


def occupancy(arch: str, registers: int, shared: int, warps: int) -> tuple[int, float]:
    """Resident blocks per SM and the fraction of the SM's warp slots they fill: registers are
    allocated per warp in units of 256, shared memory per block, up to 64 warps per SM."""
    a = ARCHS[arch]
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = (a["regs_per_sm"] // per_warp) // warps if per_warp else a["max_blocks"]
    by_smem = a["smem_per_sm"] // shared if shared else a["max_blocks"]
    blocks = max(0, min(by_regs, by_smem, a["max_warps"] // warps, a["max_blocks"]))
    return blocks, blocks * warps / a["max_warps"]


def variants(archs, dtypes, tiles: str = "all", b: int = 4096, n: int = 32768, dim: int = 512,
             families=None) -> list[Variant]:
    """Every kernel x family x dtype x target x tile candidate (``tiles="default"``: the first
    candidate of each family only; ``families``: names of FAMILIES, default all)."""
    from .triton_launch import candidates

    out = []
    for arch in archs:
        for family in families or FAMILIES:
            psd, ecl, source = FAMILIES[family]
            for dtype in dtypes:
                spec_tiles = candidates(psd=psd, ecl=ecl, dtype=DTYPES[dtype], psd_source=source)
                for kernel in KERNELS:
                    for i, cfg in enumerate(spec_tiles if tiles == "all" else spec_tiles[:1]):
                        out.append(Variant(kernel, family, dtype, arch,
                                           (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages),
                                           i == 0, b, n, dim))
    return out


def run(vs: list[Variant], jobs: int = 1) -> list[Result]:
    if jobs <= 1:
        return [compile_variant(v) for v in vs]
    import multiprocessing as mp
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(compile_variant, vs))


def _tile_name(tile) -> str:
    m, n, k, w, s = tile
    return f"{m}x{n}x{k} w{w} s{s}"


def table(results: list[Result]) -> str:
    rows = ["| kernel | family | dtype | arch | tile (M x N x K, warps, stages) | default | registers | "
            "spill stores B | spill loads B | shared KiB | blocks/SM | occupancy | status |",
            "|---|---|---|---|---|:-:|--:|--:|--:|--:|--:|--:|---|"]
    for r in results:
        v = r.variant
        status = "ok" if r.ok and not r.problems else (r.error or "; ".join(r.problems))
        rows.append(f"| {v.kernel} | {v.family} | {v.dtype} | {v.arch} | {_tile_name(v.tile)} | "
                    f"{'yes' if v.default else ''} | {r.registers} | {r.spill_stores} | {r.spill_loads} | "
                    f"{r.shared / 1024:.0f} | {r.blocks_per_sm} | {r.occupancy:.0%} | {status} |")
    return "\n".join(rows)


def summary(results: list[Result]) -> dict:
    failed = [r for r in results if not r.ok or r.problems]
    spilling_defaults = [r for r in results if r.ok and r.variant.default and r.spill_stores]
    return {"variants": len(results), "failed": len(failed), "spilling": sum(1 for r in results if r.spill_stores),
            "spilling_defaults": len(spilling_defaults)}


def header(argv: list[str], info: dict) -> str:
    """Where the table comes from: command, date, commit, Triton and ptxas versions."""
    import datetime
    import subprocess

    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    try:
        version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except (OSError, IndexError):
        version = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "*.py"], capture_output=True, text=True,
                               cwd=os.path.dirname(__file__)).stdout.strip()
        commit += " + uncommitted kernels/*.py changes" if dirty else ""
    except OSError:
        commit = "unknown"
    return (f"# Triton kernel compile check (no GPU: ptxas -v per variant)\n\n"
            f"Command: `python -m kernels.compile_check {' '.join(argv)}`  \n"
            f"Date: {datetime.date.today().isoformat()}; commit {commit}; Triton {triton.__version__}; {version}  \n"
            f"Summary: {info['variants']} variants, {info['failed']} failed, {info['spilling']} spill, "
            f"{info['spilling_defaults']} of them defaults. Occupancy: resident warps / 64 per SM.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], choices=sorted(ARCHS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--tiles", choices=("all", "default"), default="all")
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), help="default: all")
    p.add_argument("--b", type=int, default=4096, help="rows per rank of the launch the variants stand for")
    p.add_argument("--n", type=int, default=32768, help="gathered columns (global batch)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--out", help="write the table (markdown) here, and the rows as JSON lines beside it")
    args = p.parse_args(argv)
    results = run(variants(args.arch, args.dtypes, args.tiles, args.b, args.n, args.dim, args.families), args.jobs)
    text = table(results)
    info = summary(results)
    print(text)
    print(json.dumps(info))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(header(argv if argv is not None else sys.argv[1:], info) + "\n\n" + text + "\n")
        with open(os.path.splitext(args.out)[0] + ".jsonl", "w") as fh:
            for r in results:
                fh.write(json.dumps({**asdict(r.variant), **{k: v for k, v in asdict(r).items() if k != "variant"}}) + "\n")
    return 1 if info["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
