"""Collect the staged all-four runs (scripts/efficient_staged.sh) of one regime into
bench/results/staged/NAME/ and tabulate them per seed and stage, with cumulative training FLOPs.

    .venv/bin/python bench/staged_report.py --name clean --runs runs/efficient-staged-clean-s0 \\
        runs/efficient-staged-clean-s1 runs/efficient-staged-clean-s2 --command "..."

Each RUNS directory is one seed's pipeline (s1, s2, s3). What is copied (no checkpoints): every
stage's config.yaml, eval.json, eval.jsonl, metrics.jsonl, tensorboard/ and the ECL rounds'
summary.json, and each stage's flops.json, so bench/efficient_report.py can draw the curves from
the committed files. FLOPs are the trainer's analytic count (``train_flops`` of each stage's config at its max_steps on 2 ranks,
summed over the stages so far), the count ``sweep --budget-flops`` uses. Nothing is trained here.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.methods import train_flops  # noqa: E402

STAGES = ("s1", "s2", "s3")
KEEP = ("config.yaml", "eval.json", "eval.jsonl", "metrics.jsonl")
WORLD = 2   # ranks per stage, as scripts/efficient_staged.sh runs them


def collect(run: Path, dest: Path) -> None:
    """Copy one seed's small outputs (everything but checkpoints and the scores) to ``dest``."""
    for st in STAGES:
        src, out = run / st, dest / st
        if not (src / "eval.json").is_file():
            raise SystemExit(f"error: {src} has no eval.json (the stage has not finished)")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for name in KEEP:
            shutil.copy2(src / name, out / name)
        shutil.copytree(src / "tensorboard", out / "tensorboard")
        for summ in sorted((src / "select").glob("round_*/summary.json")):
            (out / "select" / summ.parent.name).mkdir(parents=True)
            shutil.copy2(summ, out / "select" / summ.parent.name / "summary.json")
        # counted here, where the run's data (its tokenizer: the text stream's head) is at hand
        cfg = load_config(str(src / "config.yaml"), [])
        (out / "flops.json").write_text(json.dumps({"train_flops": train_flops(cfg, cfg.max_steps, WORLD),
                                                    "world": WORLD, "max_steps": cfg.max_steps}) + "\n")


def stages(seed_dir: Path) -> list[dict]:
    """Per stage: its config, eval.json, training FLOPs of the stage and cumulative up to its end."""
    rows, total = [], 0.0
    for st in STAGES:
        d = seed_dir / st
        cfg = load_config(str(d / "config.yaml"), [])
        flops = json.loads((d / "flops.json").read_text())["train_flops"]
        rows.append({"stage": st, "dir": d, "cfg": cfg, "eval": json.loads((d / "eval.json").read_text()),
                     "flops0": total, "flops": total + flops,
                     "rounds": [json.loads(p.read_text()) for p in sorted((d / "select").glob("round_*/summary.json"))]})
        total += flops
    return rows


def final(seed_dir: Path) -> dict:
    """The pipeline's end: the last stage's eval.json with the total FLOPs and steps."""
    rows = stages(seed_dir)
    return {**rows[-1]["eval"], "train_flops": rows[-1]["flops"], "steps": sum(r["cfg"].max_steps for r in rows)}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def table(name: str, seeds: list[Path], command: str) -> str:
    L = [f"# Staged all-four runs, regime `{name}` (scripts/efficient_staged.sh)", "",
         f"Collected by `.venv/bin/python bench/staged_report.py` on {datetime.date.today():%Y-%m-%d}; machine: "
         "2 CPU cores shared with other work, 2 ranks per stage, fp32. Command per seed K (from the "
         "repository root):", "", "```bash", command, "```", "",
         "| seed | stage | layers x width | steps | cumulative training FLOPs | zero-shot top-1 % | I→T R@1 % | "
         "T→I R@1 % | val loss | teacher zero-shot % | ECL rounds of the stage |",
         "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for sd in seeds:
        for r in stages(sd):
            m, e = r["cfg"].model, r["eval"]
            rounds = "; ".join(f"step {s['step']}: kept {s['kept']} of {s['total']}, precision "
                               f"{'—' if s.get('precision') is None else format(s['precision'], '.3f')}, recall "
                               f"{'—' if s.get('recall') is None else format(s['recall'], '.3f')}"
                               for s in r["rounds"]) or "—"
            L.append(f"| {sd.name} | {r['stage']} | {m.vision_layers}+{m.text_layers} x {m.vision_width} | "
                     f"{r['cfg'].max_steps} | {r['flops']:.3g} | {_pct(e.get('zeroshot_top1'))} | "
                     f"{_pct(e.get('i2t_r1'))} | {_pct(e.get('t2i_r1'))} | {e.get('val_loss', float('nan')):.2f} | "
                     f"{_pct(e.get('teacher/zeroshot_top1'))} | {rounds} |")
    ends = [final(sd) for sd in seeds]
    zs = [100 * e["zeroshot_top1"] for e in ends]
    sd_ = statistics.stdev(zs) if len(zs) > 1 else 0.0
    L += ["", f"End of the pipeline, {len(ends)} seed(s): zero-shot top-1 {statistics.mean(zs):.1f} ± {sd_:.1f} % "
          f"({min(zs):.1f}–{max(zs):.1f}) at {ends[0]['train_flops']:.3g} training FLOPs, {ends[0]['steps']} steps."]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="the regime: noisy, memorise, clean, or a control's name")
    ap.add_argument("--runs", nargs="+", required=True, type=Path, help="one pipeline directory per seed")
    ap.add_argument("--command", default="", help="the command that made the runs, for the table's header")
    args = ap.parse_args()
    dest = ROOT / "bench" / "results" / "staged" / args.name
    seeds = []
    for run in args.runs:
        cfg = load_config(str(run / "s1" / "config.yaml"), [])
        seeds.append(dest / f"seed{cfg.seed}")
        collect(run, seeds[-1])
    (dest.parent / f"{args.name}.md").write_text(table(args.name, seeds, args.command))
    print(dest.parent / f"{args.name}.md")


if __name__ == "__main__":
    main()
