"""A performance model of the fused loss on A100 and H100, to hold the first GPU run against.

    python -m kernels.perf_model [--b 32768 65536] [--dim 512 1024] [--out kernels/PERF_MODEL_TABLE.md]

For one GPU holding the whole batch (b = N) in bf16, it counts what each kernel must do and turns
each count into a time at the part's peak rate (vendor data sheets; no efficiency factor):

- tensor-core FLOPs: ``2 b N D`` per ``b x N x D`` product (S, the teacher's T, dX = G Y, dY = G^T X);
- exponentials: the online softmax evaluates ``exp`` twice per element and family in the forward
  (once against the running row max, once against the tile's column max) and twice in the
  backward (P and Q); they run on the SFU (MUFU.EX2: 16 per SM per clock on sm_80 and sm_90);
- other FP32 work: about 12 instructions per element and family in each pass (scale, masks,
  max, subtract, add, the value products), on the FP32 pipes (64 lanes per SM on A100, 128 on H100);
- HBM bytes: the compulsory reads of X and Y, the G panel written once (bf16) and read by the two
  GEMMs, and, as an upper bound for the forward, Y re-read by every row block when it does not fit
  in L2 (the tiles of concurrent row blocks usually hit L2, so the truth lies between).

Arithmetic intensity: tensor FLOPs per compulsory HBM byte (and per byte without L2 reuse). A
kernel is bound by the largest of its times (the pipes overlap at best); the table gives each
time, the bound and the ratio to one same-shape GEMM (``2 b N D`` at peak), which is what
``python -m kernels.bench`` measures as ``vs_gemm`` on a GPU.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

# Data sheets: NVIDIA A100 Tensor Core GPU (SXM4 80 GB) and H100 Tensor Core GPU (SXM5).
GPUS = {
    "A100-SXM4-80GB": dict(bf16_tflops=312.0, hbm_tbs=2.039, sms=108, clock_ghz=1.41, fp32_lanes=64, l2_mib=40),
    "H100-SXM5": dict(bf16_tflops=989.4, hbm_tbs=3.35, sms=132, clock_ghz=1.83, fp32_lanes=128, l2_mib=50),
}
SFU_PER_SM_CLK = 16        # MUFU throughput per SM per clock (CUDA C Programming Guide, cc 8.0 and 9.0)
FP32_OPS_PER_ELEM = 12     # per element and family and pass (counted from triton_clip.py, rounded)
BLOCK_M = 128              # rows per forward program (the default tile)


@dataclass
class Kernel:
    name: str
    gemm_flops: float      # tensor-core FLOPs
    exps: float            # SFU exponentials
    fp32_ops: float        # other FP32 instructions
    hbm_bytes: float       # compulsory HBM traffic
    hbm_bytes_max: float   # without L2 reuse of Y (forward only; = hbm_bytes elsewhere)


def kernels(b: int, N: int, D: int, psd: bool = False, ecl: bool = False, elem: int = 2) -> list[Kernel]:
    """What the forward and backward of the fused loss do: the contrastive loss, with the
    self-distillation family (``psd``: no extra GEMM, its logits are S / tau) and the momentum
    teacher (``ecl``: T = s Xbar Y^T, one more GEMM per pass, and with ECLIPSE's text stop-gradient
    a second G panel for dY)."""
    E, fam = b * N, 1 + int(psd) + int(ecl)
    gemm = 2.0 * b * N * D * (2 if ecl else 1)
    xy = (b * (2 if ecl else 1) + N) * D * elem
    fwd = Kernel("forward (stats)", gemm, 2.0 * E * fam, FP32_OPS_PER_ELEM * E * fam,
                 xy, xy + (b // BLOCK_M) * N * D * elem)
    panels = 2 if ecl else 1
    grad = Kernel("backward (G panels)", gemm, 2.0 * E * fam, FP32_OPS_PER_ELEM * E * fam,
                  xy + panels * E * elem, xy + panels * E * elem)
    gemms = Kernel("backward (dX, dY GEMMs)", 2 * 2.0 * b * N * D, 0.0, 0.0,
                   2 * E * elem + 2 * (b + N) * D * elem, 2 * E * elem + 2 * (b + N) * D * elem)
    return [fwd, grad, gemms]


def open_clip_kernels(b: int, N: int, D: int, elem: int = 2) -> list[Kernel]:
    """open_clip's ``ClipLoss`` on one GPU, as a reference: both logit matrices materialised
    (``logits_per_image`` and ``logits_per_text``, one GEMM each), cross-entropy over each, and
    two GEMMs per matrix in the backward. HBM: per matrix, logits written and read by the
    softmax, the softmax/gradient written and read by each of the two backward GEMMs (about 5
    passes of ``b x N`` half floats); these are separate kernels, so their times add up."""
    E = b * N
    fwd = Kernel("forward (2 logit GEMMs + softmax)", 2 * 2.0 * b * N * D, 2.0 * E, 8.0 * E, 2 * 3 * E * elem,
                 2 * 3 * E * elem)
    bwd = Kernel("backward (4 GEMMs)", 4 * 2.0 * b * N * D, 0.0, 2.0 * E, 2 * 2 * E * elem, 2 * 2 * E * elem)
    return [fwd, bwd]


def times_ms(k: Kernel, gpu: dict) -> dict:
    """Each pipe's time at peak; ``overlap``: the largest (all pipes busy at once, the best case),
    ``serial``: their sum (nothing overlaps, the worst case)."""
    sfu = gpu["sms"] * SFU_PER_SM_CLK * gpu["clock_ghz"] * 1e9
    fp32 = gpu["sms"] * gpu["fp32_lanes"] * gpu["clock_ghz"] * 1e9
    t = {"tensor": k.gemm_flops / (gpu["bf16_tflops"] * 1e12) * 1e3, "sfu": k.exps / sfu * 1e3,
         "fp32": k.fp32_ops / fp32 * 1e3, "hbm": k.hbm_bytes / (gpu["hbm_tbs"] * 1e12) * 1e3,
         "hbm_no_l2": k.hbm_bytes_max / (gpu["hbm_tbs"] * 1e12) * 1e3}
    pipes = ("tensor", "sfu", "fp32", "hbm")
    t["overlap"] = max(t[p] for p in pipes)
    t["serial"] = sum(t[p] for p in pipes)
    t["bound_by"] = max(pipes, key=lambda key: t[key])
    return t


LOSSES = {"contrastive": (False, False), "+ self-distillation": (True, False), "+ momentum teacher": (False, True),
          "+ both": (True, True)}


def table(bs=(32768, 65536), dims=(512, 1024), losses=("contrastive", "+ self-distillation", "+ both")) -> str:
    lines = []
    for gname, gpu in GPUS.items():
        lines += [f"### {gname} (bf16 {gpu['bf16_tflops']:g} TFLOP/s dense, HBM {gpu['hbm_tbs']:g} TB/s, "
                  f"L2 {gpu['l2_mib']} MiB)", "",
                  "| b = N | D | loss | kernel | FLOP/B (no L2 reuse) | tensor ms | SFU ms | FP32 ms | HBM ms (no L2 reuse) | "
                  "bound by | ms: overlap - serial | x one GEMM |", "|--:|--:|---|---|--:|--:|--:|--:|--:|---|--:|--:|"]
        for b in bs:
            for D in dims:
                gemm = 2.0 * b * b * D / (gpu["bf16_tflops"] * 1e12) * 1e3
                groups = [(name, kernels(b, b, D, *LOSSES[name]), False) for name in losses]
                groups.append(("open_clip ClipLoss", open_clip_kernels(b, b, D), True))
                for name, ks, separate in groups:
                    lo = hi = 0.0
                    for k in ks:
                        t = times_ms(k, gpu)
                        # separate kernels cannot overlap one another's pipes
                        lo += t["serial"] if separate else t["overlap"]
                        hi += t["serial"]
                        lines.append(f"| {b} | {D} | {name} | {k.name} | {k.gemm_flops / k.hbm_bytes:.0f} "
                                     f"({k.gemm_flops / k.hbm_bytes_max:.0f}) | {t['tensor']:.2f} | {t['sfu']:.2f} | "
                                     f"{t['fp32']:.2f} | {t['hbm']:.2f} ({t['hbm_no_l2']:.2f}) | {t['bound_by']} | "
                                     f"{t['overlap']:.2f} - {t['serial']:.2f} | {t['overlap'] / gemm:.2f} |")
                    lines.append(f"| {b} | {D} | {name} | **fwd + bwd** | | | | | | | **{lo:.2f} - {hi:.2f}** | "
                                 f"**{lo / gemm:.1f} - {hi / gemm:.1f}** |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.perf_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--b", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--dim", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--out")
    args = p.parse_args(argv)
    text = table(args.b, args.dim)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
