"""``python -m trainer bench growth``: GrowCLIP's evidence at equal training compute.

    python -m trainer bench growth --stage1 bench/results/sweep-growclip \\
        --stage2 bench/results/sweep-growclip-stage2 --out bench/results/growclip_flops.md

Reads both sweeps' ``results.jsonl`` and run directories. A stage-2 run (one that started from a
``grow`` directory, ``checkpoint.init``) is charged its own training FLOPs plus those of the
stage-1 run it grew from (``grow.json`` names the checkpoint); FLOPs are the trainer's analytic
training FLOPs, ``trainer.methods.train_flops`` (trainer/flops.py: both towers forward and
backward, the loss, and what the run's methods add). Writes a table (mean and
sample std over seeds of zero-shot top-1, R@1 both ways, validation loss, total FLOPs) and
``<out>.png``: zero-shot top-1 and R@1 against cumulative FLOPs, from each run's periodic
evaluations (TensorBoard), a grown run's curve continuing its stage-1 run's.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ..config import ConfigError, load_config
from ..sources import INFO
from .growth_search import train_flops
from .sweep import ROOT, eval_curve


def _world(run_dir: Path, cfg) -> int:
    batch = json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"]
    return batch // (cfg.data.batch_size * cfg.train.grad_accum_steps)


def run_flops(run_dir: Path, steps: int) -> float:
    cfg = load_config(run_dir / "config.yaml")
    return train_flops(cfg, steps, _world(run_dir, cfg))


def _source_run(run_dir: Path) -> tuple[Path, int] | None:
    """The stage-1 run directory and step a stage-2 run grew from, or None for a run from scratch."""
    init = load_config(run_dir / "config.yaml").checkpoint.init
    if not init:
        return None
    if not (Path(init) / INFO).is_file():   # grow.json is enough: the weights are not committed
        raise ConfigError(f"{run_dir}: checkpoint.init {init} is not a grow directory (no {INFO})")
    info = json.loads((Path(init) / INFO).read_text())
    source = Path(info["request"]["source"])          # .../<run>/checkpoints/step_N
    return _here(source.parent.parent), int(info["source_step"])


def _here(run_dir: Path) -> Path:
    """A run directory ``grow.json`` recorded by absolute path, maybe in another checkout: this
    repository's copy when it has one (bench/results/... is committed), relative to the repository."""
    parts = run_dir.parts
    if run_dir.is_absolute() and "bench" in parts:
        tail = Path(*parts[parts.index("bench"):])
        if (ROOT / tail).is_dir():
            return tail if Path.cwd().resolve() == ROOT else ROOT / tail
    return run_dir


def curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(step, value) for step, _, value in eval_curve(run_dir, f"eval/{key}")]


def rows_of(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / "results.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} not found: run the sweep first (bench/growclip.sh)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(stage1: Path, stage2: Path) -> list[dict]:
    out = []
    for row in [*rows_of(stage1), *rows_of(stage2)]:
        run_dir = Path(row["run_dir"])
        own = run_flops(run_dir, row["steps"])
        src = _source_run(run_dir)
        before = run_flops(src[0], src[1]) if src else 0.0
        out.append({**row, "flops": own + before, "stage1_flops": before, "source": str(src[0]) if src else None,
                    "source_step": src[1] if src else None})
    return out


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    return f"{mean:.4g}" if len(values) == 1 else f"{mean:.4g} ± {statistics.stdev(values):.2g}"


def _pct(values: list[float]) -> str:
    values = [100 * v for v in values if isinstance(v, (int, float))]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def write_report(rows: list[dict], out: Path, command: str) -> None:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["# GrowCLIP at equal training compute", "", f"Command: `{command}`", "",
             "Training FLOPs: every matrix product of a training step, forward and backward, methods included "
             "(trainer/flops.py, `trainer.methods.train_flops`); "
             "a grown run is charged its stage-1 run too. Mean ± sample std over seeds.", "",
             "| variant | n | steps | total TFLOPs | zero-shot top-1 % | I→T R@1 % | T→I R@1 % | val loss | params |",
             "|---|--:|---|--:|--:|--:|--:|--:|--:|"]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        steps = (f"{mine[0]['source_step']} small + {mine[0]['steps']}" if mine[0]["source"] else str(mine[0]["steps"]))
        lines.append(f"| `{v}` | {len(mine)} | {steps} | {_mean_sd([r['flops'] / 1e12 for r in mine])} | "
                     f"{_pct([r.get('zeroshot_top1') for r in mine])} | {_pct([r.get('i2t_r1') for r in mine])} | "
                     f"{_pct([r.get('t2i_r1') for r in mine])} | {_mean_sd([r.get('val_loss') for r in mine])} | "
                     f"{mine[0]['params'] / 1e6:.2f}M |")
    lines += ["", "## Runs", "", "| variant | seed | run | grew from | TFLOPs | zero-shot top-1 % |", "|---|--:|---|---|--:|--:|"]
    for r in rows:
        lines.append(f"| `{r['variant']}` | {r['seed']} | `{r['run_dir']}` | {('`' + r['source'] + '`') if r['source'] else '—'} | "
                     f"{r['flops'] / 1e12:.2f} | {_pct([r.get('zeroshot_top1')])} |")
    lines += ["", f"![zero-shot and R@1 against training FLOPs]({out.with_suffix('.png').name})", ""]
    out.write_text("\n".join(lines))


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    keys = [("zeroshot_top1", "zero-shot top-1 %"), ("i2t_r1", "I→T R@1 %"), ("t2i_r1", "T→I R@1 %")]
    fig, axes = plt.subplots(1, len(keys), figsize=(15, 4.5))
    for i, v in enumerate(variants):
        color = plt.get_cmap("tab10")(i % 10)
        mine = [r for r in rows if r["variant"] == v]
        for ax, (key, label) in zip(axes, keys):
            series = []
            for r in mine:
                run_dir = Path(r["run_dir"])
                pts = [(run_flops(run_dir, s), val) for s, val in curve(run_dir, key)]
                if r["source"]:
                    src = Path(r["source"])
                    pts = [(run_flops(src, s), val) for s, val in curve(src, key) if s <= r["source_step"]] + \
                          [(r["stage1_flops"] + f, val) for f, val in pts]
                series.append(pts)
                ax.plot([p[0] / 1e12 for p in pts], [100 * p[1] for p in pts], color=color, lw=0.7, alpha=0.35)
            n = min(len(s) for s in series)
            if n:
                ax.plot([statistics.fmean(s[j][0] for s in series) / 1e12 for j in range(n)],
                        [100 * statistics.fmean(s[j][1] for s in series) for j in range(n)], color=color, lw=2,
                        marker="o", ms=3, label=f"{v} (n={len(series)})")
            ax.set_xlabel("training TFLOPs")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("GrowCLIP on the noisy demo data: accuracy against training compute (bold: mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer bench growth", description=__doc__.splitlines()[0])
    p.add_argument("--stage1", required=True, help="sweep directory with the runs from scratch (and stage 1)")
    p.add_argument("--stage2", required=True, help="sweep directory with the runs started from grow directories")
    p.add_argument("--out", required=True, help="markdown report; the plot goes next to it (.png)")
    args = p.parse_args(argv)
    rows = collect(Path(args.stage1), Path(args.stage2))
    out = Path(args.out)
    write_plot(rows, out.with_suffix(".png"))
    write_report(rows, out, "python -m trainer bench growth " + " ".join(argv))
    print(out.read_text())
    return 0
