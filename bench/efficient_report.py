"""The headline of "All four together" (docs/methods.md): plain CLIP against all four methods at
equal training FLOPs in each regime, and the curves that say why a gap is what it is.

    .venv/bin/python bench/efficient_report.py                  # every regime whose sweep exists
    .venv/bin/python bench/efficient_report.py --out bench/results/efficient_headline

Reads the sweeps bench/efficient.sh writes (results.jsonl, each run's TensorBoard events with
TensorBoard's own reader, metrics.jsonl's cumulative `flops`, each ECL round's summary.json) and
writes OUT.md (the headline table and the diagnostics tables), OUT.png (accuracy and validation
loss against training FLOPs, one column per regime) and OUT_why.png (teacher against student
zero-shot, PSD's a_t against the student's zero-shot, over steps). Nothing is trained here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.methods.psd import alpha_at  # noqa: E402
from trainer.methods.base import schedule_view  # noqa: E402

REGIMES = [  # (name, sweep directory, what it is)
    ("(a) noisy", "bench/results/sweep-efficient", "30 % caption noise, 10,000 pairs, budget = plain CLIP's 260 steps"),
    ("(a) noisy 4x", "bench/results/sweep-efficient-4x", "as (a) at 4x the budget (1,040 plain steps)"),
    ("(b) memorise", "bench/results/sweep-efficient-memorise",
     "30 % caption noise, 1,000 pairs, budget = plain CLIP's 300 steps (38 epochs)"),
    ("(c) clean", "bench/results/sweep-efficient-clean", "no caption noise, 10,000 pairs, budget = 260 plain steps"),
]
# The staged pipelines (scripts/efficient_staged.sh) of each regime, collected by bench/staged_report.py:
# (label in the tables, directory under bench/results/staged/ per regime name)
STAGED = [("staged all four", {"(a) noisy": "noisy", "(b) memorise": "memorise", "(c) clean": "clean"}),
          ("staged, growth only", {"(a) noisy": "growth-only-noisy"}),
          ("staged, no ECLIPSE", {"(a) noisy": "noeclipse-noisy"})]
# Sweeps at the staged runs' budget (1.18e13 FLOPs): {regime: [(sweep, {variant: label in the tables})]}
CONTROLS = {"(a) noisy": [("bench/results/sweep-efficient-staged-controls",
                           {"plain": "plain @ 1.18e13", "no-growth-two-rounds": "no growth, two rounds @ 1.18e13"})],
            "(c) clean": [("bench/results/sweep-plain-clean-1.18e13", {"plain": "plain @ 1.18e13"})]}
# The ablation sweeps (bench/sweeps/efficient-ablation.yaml) of the regimes at 1x; (a) at 4x keeps its
# ablation variants in its headline sweep (bench/sweeps/efficient-4x-ablation.yaml).
ABLATIONS = {"(a) noisy": "bench/results/sweep-efficient-ablation",
             "(b) memorise": "bench/results/sweep-efficient-memorise-ablation"}
COLORS = {"plain @ 1.18e13": "black", "no growth, two rounds @ 1.18e13": "tab:cyan", "staged all four": "tab:purple",
          "staged, growth only": "tab:olive", "staged, no ECLIPSE": "tab:green"}
BASE = "plain"
# The one-stage variant: all-but-growth (bench/sweeps/efficient.yaml); the first (a) sweep named it all-four.
ONE_STAGE = ("all-but-growth", "all-four")


def other(by: dict) -> str:
    return next((v for v in ONE_STAGE if v in by), ONE_STAGE[0])
METRICS = [("zeroshot_top1", "zero-shot top-1 %", 100), ("i2t_r1", "I→T R@1 %", 100), ("t2i_r1", "T→I R@1 %", 100),
           ("val_loss", "val loss (end)", 1)]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every eval/* scalar of a run, read back with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t.startswith("eval/")}


def flops_at(run_dir: Path):
    """step -> cumulative training FLOPs, interpolated between metrics.jsonl's logged steps."""
    pts = [(0, 0.0)] + [(r["step"], r["flops"]) for r in map(json.loads, open(run_dir / "metrics.jsonl"))
                        if "flops" in r]
    s, f = np.array(pts).T
    return lambda step: float(np.interp(step, s, f))


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def load(sweep: Path):
    rows = [json.loads(line) for line in open(sweep / "results.jsonl")]
    by = {}
    for r in rows:
        run = ROOT / r["run_dir"]
        if not (run / "tensorboard").is_dir():   # a row of a variant the sweep no longer has
            continue
        r["curves"] = scalars(run)
        r["flops_at"] = flops_at(run)
        vl = r["curves"].get("eval/val_loss", [])
        r["best_val_loss"], r["best_val_step"] = min(((v, s) for s, v in vl), default=(float("nan"), None))
        by.setdefault(r["variant"], []).append(r)
    return by


def load_staged(d: Path) -> list[dict]:
    """One row per seed of a collected staged pipeline, shaped like a sweep's row: the end's
    metrics, total FLOPs and steps, and curves over the pipeline's global steps (eval.jsonl of
    every stage, steps offset by the stages before) with a step -> cumulative FLOPs map."""
    rows = []
    for seed_dir in sorted(d.glob("seed*")):
        curves, knots, step0, flops0, ev = {}, [(0, 0.0)], 0, 0.0, {}
        for st in ("s1", "s2", "s3"):
            sd = seed_dir / st
            total = json.loads((sd / "flops.json").read_text())["train_flops"]
            steps = load_config(str(sd / "config.yaml"), []).max_steps
            knots += [(step0 + r["step"], flops0 + r["flops"]) for r in map(json.loads, open(sd / "metrics.jsonl"))
                      if "flops" in r]
            knots.append((step0 + steps, flops0 + total))
            for e in map(json.loads, open(sd / "eval.jsonl")):
                for k, v in e.items():
                    if k not in ("step", "num_samples") and isinstance(v, (int, float)):
                        curves.setdefault(f"eval/{k}", []).append((step0 + e["step"], v))
            ev = json.loads((sd / "eval.json").read_text())
            step0, flops0 = step0 + steps, flops0 + total
        s_, f_ = np.array(sorted(set(knots))).T
        vl = curves.get("eval/val_loss", [])
        best, best_step = min(((v, s) for s, v in vl), default=(float("nan"), None))
        rows.append({"seed": int(seed_dir.name[4:]), "steps": step0, "train_flops": flops0, "curves": curves,
                     "flops_at": lambda step, s_=s_, f_=f_: float(np.interp(step, s_, f_)),
                     "best_val_loss": best, "best_val_step": best_step,
                     **{k: ev[k] for k, _, _ in METRICS}})
    return rows


def variants(by: dict) -> list[str]:
    """The rows a regime shows: plain, the one-stage run, and the staged pipelines it has."""
    extra = [label for sweeps in CONTROLS.values() for _, names in sweeps for label in names.values()]
    return [BASE, other(by)] + [v for v in dict.fromkeys(extra + [label for label, _ in STAGED]) if by.get(v)]


def reference(by: dict, v: str) -> str:
    """What a row is compared with: plain CLIP at the same budget where the regime has it."""
    return "plain @ 1.18e13" if v.startswith("staged") and by.get("plain @ 1.18e13") else BASE


def headline(regimes) -> list[str]:
    L = ["| regime | variant | n | steps | train FLOPs | " + " | ".join(h for _, h, _ in METRICS)
         + " | best val loss (step) |", "|---|---|--:|--:|--:|" + "--:|" * (len(METRICS) + 1)]
    verdicts = []
    for name, _, _, by in regimes:
        for v in variants(by):
            rs = by.get(v, [])
            if not rs:
                continue
            cells = []
            for key, _, scale in METRICS:
                m, s = mean_std([r[key] * scale for r in rs])
                cells.append(f"{m:.1f} ± {s:.1f}" if scale != 1 else f"{m:.2f} ± {s:.2f}")
            bm, bs = mean_std([r["best_val_loss"] for r in rs])
            steps = sorted({r["best_val_step"] for r in rs})
            L.append(f"| {name} | `{v}` | {len(rs)} | {rs[0]['steps']} | {rs[0]['train_flops']:.3g} | "
                     + " | ".join(cells) + f" | {bm:.2f} ± {bs:.2f} ({', '.join(map(str, steps))}) |")
        for v in variants(by)[1:]:
            ref = reference(by, v)
            if v == ref or not (by.get(ref) and by.get(v)):
                continue
            for key, label, scale in METRICS:
                a = [r[key] * scale for r in by[v]]
                b = [r[key] * scale for r in by[ref]]
                d = statistics.mean(a) - statistics.mean(b)
                apart = min(a) > max(b) or max(a) < min(b)
                better = (d < 0) if key == "val_loss" else (d > 0)
                verdicts.append(f"- {name}, {label}: `{v}` {'+' if d >= 0 else ''}{d:.2f} vs `{ref}`; seed ranges "
                                f"{min(a):.2f}–{max(a):.2f} and {min(b):.2f}–{max(b):.2f} "
                                + (f"are apart: `{v}` is {'better' if better else 'worse'}." if apart
                                   else "overlap: not distinguishable from seed noise."))
    return L + ["", "Differences (each variant minus plain CLIP, means over seeds; the staged runs against plain CLIP "
                 "at their own 1.18e13 FLOPs where the regime has that run, else against plain at the regime's "
                 "larger budget):", ""] + verdicts


def ablation(regimes) -> list[str]:
    """Every variant of each regime's ablation sweep (bench/sweeps/efficient-ablation.yaml), against
    plain CLIP of the same sweep: mean ± std, seed range, and whether the ranges are apart."""
    L = ["| regime | variant | n | steps | zero-shot top-1 % | (seed range) | Δ vs plain (pt) | I→T R@1 % | "
         "val loss (end) | best val loss (step) |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, _, _, by in regimes:
        by = {v: rs for v, rs in by.items() if v not in variants(by)[2:]}   # the sweep's own variants
        if len(by) <= 2:
            continue
        base = [r["zeroshot_top1"] * 100 for r in by.get(BASE, [])]
        for v, rs in by.items():
            zsv = [r["zeroshot_top1"] * 100 for r in rs]
            zs, r1 = mean_std(zsv), mean_std([r["i2t_r1"] * 100 for r in rs])
            vl, bv = mean_std([r["val_loss"] for r in rs]), mean_std([r["best_val_loss"] for r in rs])
            d = "—"
            if base and v != BASE:
                apart = min(zsv) > max(base) or max(zsv) < min(base)
                d = f"{zs[0] - statistics.mean(base):+.1f}" + (" (apart)" if apart and len(rs) > 1 else "")
            steps = ", ".join(str(s) for s in sorted({r["best_val_step"] for r in rs}))
            L.append(f"| {name} | `{v}` | {len(rs)} | {rs[0]['steps']} | {zs[0]:.1f} ± {zs[1]:.1f} | "
                     f"{min(zsv):.1f}–{max(zsv):.1f} | {d} | {r1[0]:.1f} ± {r1[1]:.1f} | {vl[0]:.2f} ± {vl[1]:.2f} | "
                     f"{bv[0]:.2f} ({steps}) |")
    return L if len(L) > 2 else []


def ecl_rounds(regimes) -> list[str]:
    L = ["| regime | seed | round at step | kept | dropped-set precision | dropped-set recall | noise left in kept set | AUC |",
         "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for name, _, _, by in regimes:
        for r in by.get(other(by), []):
            for summ in sorted((ROOT / r["run_dir"] / "select").glob("round_*/summary.json")):
                s = json.loads(summ.read_text())
                def f(key):   # None where it is undefined (clean data: no noisy pair to recall)
                    return "—" if s.get(key) is None else f"{s[key]:.3f}"
                L.append(f"| {name} | {r['seed']} | {s['step']} | {s['kept']} of {s['total']} | "
                         f"{f('precision')} | {f('recall')} | {f('kept_noise_rate')} | {f('auc')} |")
    return L


def teacher_table(regimes) -> list[str]:
    L = ["| regime | step | student zero-shot % | teacher zero-shot % | expedited student (`fast/`) % | PSD a_t |",
         "|---|--:|--:|--:|--:|--:|"]
    for name, _, _, by in regimes:
        rs = by.get(other(by), [])
        if not rs:
            continue
        cfg = load_config(str(ROOT / rs[0]["run_dir"] / "config.yaml"), [])
        steps = [s for s, _ in rs[0]["curves"].get("eval/zeroshot_top1", [])]
        for step in steps:
            def at(tag):
                vals = [dict(r["curves"].get(tag, [])).get(step) for r in rs]
                vals = [v for v in vals if v is not None]
                return f"{100 * statistics.mean(vals):.1f}" if vals else "—"
            a = alpha_at(*schedule_view(cfg, step)) if cfg.psd.enabled else 0.0
            L.append(f"| {name} | {step} | {at('eval/zeroshot_top1')} | {at('eval/teacher/zeroshot_top1')} | "
                     f"{at('eval/fast/zeroshot_top1')} | {a:.2f} |")
    return L


def plot(regimes, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval/zeroshot_top1", "zero-shot top-1 %", 100), ("eval/i2t_r1", "I→T R@1 %", 100),
              ("eval/val_loss", "validation contrastive loss", 1)]
    fig, axes = plt.subplots(len(panels), len(regimes), figsize=(4.2 * len(regimes), 9), squeeze=False)
    for j, (name, _, _, by) in enumerate(regimes):
        for i, (tag, label, scale) in enumerate(panels):
            ax = axes[i][j]
            colors = {BASE: "tab:gray", other(by): "tab:red", **COLORS}
            for v in variants(by):
                color = colors[v]
                curves = []
                for r in by.get(v, []):
                    pts = r["curves"].get(tag, [])
                    x = [r["flops_at"](s) for s, _ in pts]
                    y = [scale * val for _, val in pts]
                    ax.plot(x, y, color=color, lw=0.7, alpha=0.5)
                    curves.append((x, y))
                if curves:
                    n = min(len(c[0]) for c in curves)
                    ax.plot(np.mean([c[0][:n] for c in curves], 0), np.mean([c[1][:n] for c in curves], 0),
                            color=color, lw=2, label=f"{v} (n={len(curves)})")
            ax.set_title(name if i == 0 else "", fontsize=10)
            ax.set_xlabel("training FLOPs" if i == len(panels) - 1 else "")
            ax.set_ylabel(label if j == 0 else "")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.legend(fontsize=8)
    fig.suptitle("The methods together vs plain CLIP at equal training FLOPs (thin: seeds, bold: mean)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(regimes), figsize=(4.2 * len(regimes), 3.6), squeeze=False)
    for j, (name, _, _, by) in enumerate(regimes):
        ax = axes[0][j]
        rs = by.get(other(by), [])
        for tag, color, label in (("eval/zeroshot_top1", "tab:red", "student"),
                                  ("eval/teacher/zeroshot_top1", "tab:blue", "EMA teacher"),
                                  ("eval/fast/zeroshot_top1", "tab:orange", "expedited student")):
            series = [r["curves"].get(tag, []) for r in rs]
            series = [s for s in series if s]
            if series:
                n = min(map(len, series))
                ax.plot([s for s, _ in series[0][:n]], np.mean([[100 * v for _, v in s[:n]] for s in series], 0),
                        color=color, label=label)
        base = [r["curves"].get("eval/zeroshot_top1", []) for r in by.get(BASE, [])]
        if base and all(base):
            n = min(map(len, base))
            ax.plot([s for s, _ in base[0][:n]], np.mean([[100 * v for _, v in s[:n]] for s in base], 0),
                    color="tab:gray", ls="--", label="plain CLIP")
        if rs:
            cfg = load_config(str(ROOT / rs[0]["run_dir"] / "config.yaml"), [])
            steps = np.arange(0, cfg.max_steps + 1)
            tw = ax.twinx()
            tw.plot(steps, [alpha_at(*schedule_view(cfg, int(s))) for s in steps], color="tab:green", lw=1, ls=":")
            tw.set_ylim(0, 1)
            tw.set_ylabel("PSD a_t (dotted)" if j == len(regimes) - 1 else "")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("zero-shot top-1 %" if j == 0 else "")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out.parent / (out.name + "_why.png"), dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/efficient_headline")
    args = ap.parse_args()
    out = ROOT / args.out
    regimes = [(n, d, what, load(ROOT / d)) for n, d, what in REGIMES if (ROOT / d / "results.jsonl").is_file()]
    for n, _, _, by in regimes:
        for label, dirs in STAGED:
            if n in dirs and (ROOT / "bench/results/staged" / dirs[n]).is_dir():
                by[label] = load_staged(ROOT / "bench/results/staged" / dirs[n])
        for sweep, names in CONTROLS.get(n, []):
            if (ROOT / sweep / "results.jsonl").is_file():
                rows = load(ROOT / sweep)
                by.update({label: rows[v] for v, label in names.items() if v in rows})
    if not regimes:
        sys.exit("error: no sweep of bench/efficient.sh found (run it first)")
    import datetime
    import os
    import platform

    seeds = sorted({r["seed"] for _, _, _, by in regimes for rs in by.values() for r in rs})
    L = ["# Plain CLIP against the methods together, at equal training FLOPs", "",
         "Made by `.venv/bin/python bench/efficient_report.py` on "
         f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} from the sweeps of `bench/efficient.sh` "
         f"(each regime's command: the header of its `table.md`); machine {platform.machine()}, "
         f"{os.cpu_count()} CPU cores shared with other work, 2 ranks per run, tiny preset, fp32; seeds "
         f"{', '.join(map(str, seeds))}. One stage: ECLIPSE, PSD and EfficientCLIP (ECL + the text stream) "
         "together (`all-but-growth`; the first (a) sweep, made before the self-confidence score became ECL's "
         "default, named it `all-four` and scored with cosine); GrowCLIP needs stages "
         "(bench/results/efficient_staged_cpu_2026-12-07.md).", "",
         "| regime | sweep | data and budget |", "|---|---|---|"]
    L += [f"| {n} | `{d}` | {what} |" for n, d, what, _ in regimes]
    L += ["", "## Headline (mean ± sample std over seeds)", ""] + headline(regimes)
    abl = ablation([(n, d, "", load(ROOT / d)) for n, d in ABLATIONS.items() if (ROOT / d / "results.jsonl").is_file()]
                   + regimes)
    if abl:
        L += ["", "## Ablation (each variant at the same budget; seeds as run so far)", "",
              "Sweeps: " + ", ".join(f"{n} `{d}`" for n, d in ABLATIONS.items()) + "; (a) at 4x: its headline sweep. "
              "Δ: zero-shot against plain CLIP of the same sweep, marked (apart) where the seed ranges do not "
              "overlap.", ""] + abl
    L += ["", "![against FLOPs](" + out.name + ".png)", "",
          "## Why: the teacher, the soft-target weight and the student", "",
          "Zero-shot top-1 of the student as trained, its EMA teacher and the expedited student at its "
          "training keep rate, mean over seeds at each evaluation, with PSD's soft-target weight a_t there.", ""]
    L += teacher_table(regimes)
    L += ["", "![why](" + out.name + "_why.png)", "", "## ECL rounds: who was dropped", "",
          "Precision: the share of dropped pairs that are noisy; recall: the share of noisy pairs dropped "
          "(the demo data knows which captions it corrupted).", ""] + ecl_rounds(regimes)
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    plot(regimes, out)
    print(out.with_suffix(".md"))


if __name__ == "__main__":
    main()
