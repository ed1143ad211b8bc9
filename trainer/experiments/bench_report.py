"""The report of ``bench train``: one row per implementation (mean over rounds), the ratios
between them, ``train_<tag>.md`` and ``train_<tag>.png``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .bare_loop import PHASES

SUSPECTS = {
    "layout": "gathered_layout: all-reduce + .tolist() of batch sizes (per loss call)",
    "finite_item": "finite-loss check: isfinite(loss).item() (per micro-batch before the boundary flags)",
    "finite_flag": "finite-loss check: all_reduce (per micro-batch before the boundary flags)",
    "term_item": ".item() per loss term after backward",
    "guard_check": "GradGuard.flag(): one multi-tensor check of the reduced gradient partitions",
    "guard_flag": "boundary all_reduce: loss flags + GradGuard flag + stop signal (one call)",
    "window": "run(): window metrics at log steps (all-reduce, logit scale)",
}


def summary_row(rounds: list[dict], meta: dict) -> dict:
    """An impl's row: its median round by samples/s (the upper median for an even count)."""
    speed = [r["steps"] * r["global_batch"] / r["measured_s"] for r in rounds]
    r = rounds[sorted(range(len(rounds)), key=speed.__getitem__)[len(rounds) // 2]]
    ph = r["phase_ms"]
    row = {"impl": r["impl"], "samples_per_s": r["steps"] * r["global_batch"] / r["measured_s"],
           "step_ms": 1e3 * r["measured_s"] / r["steps"], **{f"{k}_ms": ph[k] for k in PHASES},
           "peak_mem_mb": max(r["peak_mem_mb_per_rank"]), "loss_first": r["losses"][0], "loss_last": r["losses"][-1]}
    keep = ("params", "measured_s", "steps", "warmup", "global_batch", "batch_per_rank", "grad_accum", "world",
            "precision", "preset", "optimizer", "loss_impl", "peak_mem_mb_per_rank", "losses", "cpu_ms_per_step",
            "loader_cpu_ms_per_step", "threads_per_rank", "loadavg_before", "loadavg_after", "wall_s", "profile",
            "suspects", "host_syncs", "device", "torch", "round")
    row.update({k: r[k] for k in keep if k in r})
    row.update(rounds=len(rounds), samples_per_s_rounds=speed, loadavg_rounds=[x["loadavg_before"] for x in rounds])
    row.update(date=meta["date"], commit=meta["commit"], tag=meta["tag"], command=meta["command"])
    return row


def write_report(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    stem = out / f"train_{meta['tag']}"
    jsonl, md, png = stem.with_suffix(".jsonl"), stem.with_suffix(".md"), stem.with_suffix(".png")
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot(rows, png, meta["tag"])
    md.write_text(markdown(rows, meta, png.name))
    return [jsonl, md, png]


def ratios(rows: list[dict]) -> list[str]:
    if rows and "variant" in rows[0]:
        return variant_lines(rows)
    by = {r["impl"]: r for r in rows}
    if "ours" not in by:
        return []
    lines = [f"ours / {other}: **{by['ours']['samples_per_s'] / by[other]['samples_per_s']:.2f}x** samples/s "
             f"(step time {by['ours']['step_ms'] / by[other]['step_ms']:.2f}x)"
             for other in ("openclip", "bare") if other in by]
    for name, what in (("eclipse", "ECLIPSE's"), ("psd-self", "PSD's self teacher"),
                       ("psd-momentum", "PSD's momentum teacher"), ("psd-previous", "PSD's previous teacher")):
        if name in by:
            lines.append(f"{name} / ours ({what} cost over plain CLIP): step time "
                         f"**{by[name]['step_ms'] / by['ours']['step_ms']:.2f}x**")
    return lines


def variant_lines(rows: list[dict]) -> list[str]:
    """``--variants``: each variant against the first, its overrides, what was held, its FLOPs."""
    ref = rows[0]
    out = []
    for r in rows:
        what = " ".join(f"`{o}`" for o in r["overrides"]) or "(the config)"
        held = (", held: " + " ".join(f"`{o}`" for o in r["held"])) if r["held"] else ""
        out.append(f"`{r['impl']}` / `{ref['impl']}`: **{r['samples_per_s'] / ref['samples_per_s']:.2f}x** samples/s "
                   f"(step time {r['step_ms'] / ref['step_ms']:.2f}x); {r['flops_per_step']:.3g} training FLOPs per "
                   f"step, {r['flops_per_s']:.3g} FLOP/s; overrides {what}{held}")
    return out


INTRO = ("open_clip's training step, a bare torch loop (our model and loss, DDP, torch AdamW) and our trainer's step "
         "(DeepSpeed engine + `train_step`), one after the other on the same shards, global batch, precision and "
         "ranks (`python -m trainer bench train`).")
INTRO_VARIANTS = ("Our trainer's step (DeepSpeed engine + `train_step`) for each variant of a sweep (the config, the "
                  "`key=value` arguments and the variant's overrides), one after the other on the same shards, seed, "
                  "global batch, precision and ranks (`python -m trainer bench train --variants`); each held at the "
                  "per-step cost of its whole run (listed below).")


def markdown(rows: list[dict], meta: dict, png: str) -> str:
    r0 = rows[0]
    params = sorted({r["params"] for r in rows})
    lines = [f"# Training-step benchmark `{meta['tag']}`", "", INTRO_VARIANTS if "variant" in r0 else INTRO, "",
             f"- device: {r0['device']}; {r0['world']} ranks; {r0.get('threads_per_rank')} thread(s) per rank; "
             f"torch {r0.get('torch')}",
             f"- date: {meta['date']}; commit {meta['commit']}",
             f"- command: `{meta['command']}`",
             f"- shape: preset `{r0['preset']}`, parameters "
             + (f"{params[0]:,} (every implementation)" if len(params) == 1
                else ", ".join(f"{r['impl']} {r['params']:,}" for r in rows)),
             f"- batch: {r0['batch_per_rank']} per rank x {r0['grad_accum']} accumulation x {r0['world']} ranks = "
             f"global {r0['global_batch']}; precision {r0['precision']}",
             f"- steps: {r0['warmup']} warm-up + {r0['steps']} timed (lr schedule over those "
             f"{r0['warmup'] + r0['steps']})",
             f"- machine load (`uptime`): before `{meta['uptime_before']}`; after `{meta['uptime_after']}`",
             rounds_line(rows)]
    if r0.get("profile"):
        lines.append(f"- **profiled run (`--profile {r0['profile']}`): the instrumentation slows every step; "
                     "read the times relative to each other, not as throughput**")
    lines += ["", "| impl | samples/s | step ms | data | forward | backward | optimizer | other | peak MB/rank "
              "| loss first → last | load (1/5/15 min) at start | optimizer | loss |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['samples_per_s']:.1f} | {r['step_ms']:.1f} | "
                     + " | ".join(f"{r[k + '_ms']:.1f}" for k in PHASES)
                     + f" | {r['peak_mem_mb']:.0f} | {r['loss_first']:.3f} → {r['loss_last']:.3f} | "
                     f"{r.get('loadavg_before', '?')} | {r['optimizer']} | {r['loss_impl']} |")
    lines += ["", *[f"- {s}" for s in ratios(rows)], "",
              "samples/s = timed steps x global batch / wall time between two barriers around them. Phase "
              "columns: ms per step, mean over ranks (`data` waiting for the batch; `forward` copy to the "
              "device, forward and loss, and ours' finite-loss check; `backward`; `optimizer` clip, step, "
              "schedule, open_clip's clamp; `other` the rest: ours' per-term `.item()`, GradGuard flag, window "
              "metrics, stop flag). Peak memory: VmHWM above the RSS before the model was built (CPU), "
              "max_memory_allocated (GPU); loader workers not included. Loader workers used "
              + ", ".join(f"{r['impl']} {r.get('loader_cpu_ms_per_step', 0):.0f}" for r in rows)
              + " CPU ms per step per rank, the ranks themselves "
              + ", ".join(f"{r['impl']} {r.get('cpu_ms_per_step', 0):.0f}" for r in rows) + ".", ""]
    if any(r["impl"] == "openclip" for r in rows):
        lines += ["Known differences of the open_clip row (same shape and parameter count): open_clip's own "
                  "initialisation and fused-QKV `nn.MultiheadAttention` (transformers: separate q/k/v, SDPA); "
                  "causal mask only in the text tower (no padding mask; eos pooling makes the pooled embedding the "
                  "same function); weight decay also on token and positional embeddings (open_clip's rule); "
                  "logit scale clamped on the parameter after each step (ours: in the forward); `cosine_lr` to 0 "
                  "(ours: LambdaLR to `min_lr_ratio`); torch AdamW with default flags (single-tensor loop on CPU); "
                  "autocast for bf16/fp16 with fp32 weights (ours: DeepSpeed's bf16/fp16 weights + fp32 master); "
                  "ClipLoss materialises the local b x N logits; with accumulation, plain gradient accumulation "
                  "(open_clip's accum_freq re-runs the forward with cached features). Losses are global-batch "
                  "means (mean over ranks of each rank's share) in every row.", ""]
    if any(r.get("suspects") for r in rows):
        lines += suspect_table(rows)
    if any(r.get("host_syncs") for r in rows):
        lines += sync_table(rows)
    lines += [f"![samples/s and per-step split]({png})", ""]
    return "\n".join(lines)


def rounds_line(rows: list[dict]) -> str:
    if rows[0]["rounds"] == 1:
        return "- runs: one after the other, in the order of the table (load at each start in the table)"
    each = "; ".join(f"{r['impl']} " + ", ".join(f"{v:.1f}" for v in r["samples_per_s_rounds"]) for r in rows)
    return (f"- runs: {rows[0]['rounds']} rounds, the order reversed every other round; each row is that impl's "
            f"median round by samples/s. samples/s of every round: {each}")


def suspect_table(rows: list[dict]) -> list[str]:
    have = [r for r in rows if r.get("suspects")]
    lines = ["## Suspected overheads (ms per step, mean over ranks; max rank; calls per step)", "",
             "| suspect | " + " | ".join(r["impl"] for r in have) + " |", "|---|" + "---:|" * len(have)]
    for key, what in SUSPECTS.items():
        cells = [r["suspects"][key] for r in have]
        if not any(c["calls_per_step"] for c in cells):
            continue
        lines.append(f"| {what} | " + " | ".join(
            f"{c['ms_per_step']:.2f} ({c['ms_per_step_max_rank']:.2f}; {c['calls_per_step']:.1f})" for c in cells) + " |")
    lines.append("| reference: one all_reduce_flags with the ranks in step (ms per call) | " + " | ".join(
        f"{r['suspects']['flag_latency_ms']:.3f}" for r in have) + " |")
    return lines + ["", "A collective's booked time includes waiting for the slower rank; the reference row is "
                    "the cost of the call itself.", ""]


def sync_table(rows: list[dict]) -> list[str]:
    """Host syncs per timed step (trainer/experiments/host_syncs.py), by calling function."""
    have = [r for r in rows if r.get("host_syncs")]
    callers = sorted({k for r in have for k in r["host_syncs"]["by_caller"]})
    lines = ["## Host syncs per step (mean over ranks)", "",
             "| where | " + " | ".join(r["impl"] for r in have) + " |", "|---|" + "---:|" * len(have),
             "| **total: tensor reads by the host (`.item()`, `bool()`, `.tolist()`, `.cpu()`, mask index, ...)** | "
             + " | ".join(f"**{r['host_syncs']['per_step']:.1f}**" for r in have) + " |"]
    if any("cuda_per_step" in r["host_syncs"] for r in have):
        lines.append("| synchronizing CUDA calls (`torch.cuda.set_sync_debug_mode`) | " + " | ".join(
            f"{r['host_syncs'].get('cuda_per_step', float('nan')):.1f}" for r in have) + " |")
    for key in callers:
        lines.append(f"| `{key}` | " + " | ".join(f"{r['host_syncs']['by_caller'].get(key, 0.0):.1f}"
                                                   for r in have) + " |")
    return lines + ["", "Counted in each rank's main process over the timed steps. On CPU every tensor is on the "
                    "host, so the total counts what would wait for the GPU if the tensor lived there; a read of "
                    "a tensor that is on the host in a GPU run too (a loader batch) is counted as well; the "
                    "caller says which.", ""]


def plot(rows: list[dict], path: Path, tag: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["impl"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    bars = ax1.bar(names, [r["samples_per_s"] for r in rows], color=["#888888", "#4c72b0", "#dd8452"][:len(rows)])
    ax1.bar_label(bars, fmt="%.1f")
    ax1.set_ylabel("samples/s (global)")
    ax1.set_title("throughput")
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        vals = [r[f"{phase}_ms"] for r in rows]
        ax2.bar(names, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_ylabel("ms per step (mean over ranks)")
    ax2.set_title("per-step split")
    ax2.legend(fontsize=8)
    fig.suptitle(f"bench train {tag}: {rows[0]['preset']}, {rows[0]['world']} ranks, global batch "
                 f"{rows[0]['global_batch']}, {rows[0]['precision']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

