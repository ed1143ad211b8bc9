"""ECLIPSE's training FLOPs per step against plain CLIP's, by keep rate and preset, in closed form.

The ratio the step time can at best reach: the trainer's own FLOP counts (``trainer.flops``, the
ones ``metrics.jsonl`` and ``bench train`` report), the student's keep rate held at each value
(``eclipse.keep_schedule=constant``), every other setting from the preset's shipped config
(``trainer/configs/eclipse.yaml`` for tiny, ``vit-b-32.yaml`` and ``vit-b-16.yaml`` with ECLIPSE's
defaults switched on).
The break-even keep rate is where the student's saving (forward and backward of the dropped
tokens) equals the teacher's forward of every token.

    .venv/bin/python bench/eclipse_flops.py bench/results/eclipse_flops_by_keep.md
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import load_config  # noqa: E402
from trainer.flops import clip_step_flops  # noqa: E402
from trainer.methods.eclipse import step_flops  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "configs"
# the preset's shipped config (its batch, context length), ECLIPSE on with its defaults
RUNS = {"tiny": ("eclipse.yaml", []), "vit-b-32": ("vit-b-32.yaml", ["eclipse.enabled=true"]),
        "vit-b-16": ("vit-b-16.yaml", ["eclipse.enabled=true"])}
KEEPS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
WORLD = 2


def ratio(preset: str, keep: float) -> float:
    config, flags = RUNS[preset]
    cfg = load_config(str(CONFIGS / config), [*flags, "eclipse.keep_schedule=constant", f"eclipse.keep_rate={keep}"])
    plain = clip_step_flops(cfg, WORLD)
    return (plain + step_flops(cfg, 1, WORLD)) / plain


def break_even(preset: str) -> float | None:
    """The highest keep rate (to 0.001) whose step has no more FLOPs than plain CLIP's."""
    lo, hi = 0.05, 0.99
    if ratio(preset, lo) > 1.0:
        return None
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(preset, mid) <= 1.0 else (lo, mid)
    return round(lo, 3)


def main(out: str) -> None:
    how = (f"`.venv/bin/python bench/eclipse_flops.py {out}` (the trainer's FLOP counts, `trainer/flops.py` and "
           "`trainer/methods/eclipse.py: step_flops`; each preset's shipped config, ECLIPSE's defaults, "
           f"the keep rate held from the first step; {WORLD} ranks). A step time at or under 1.0x plain CLIP's "
           "needs a ratio under 1.0 here: the rest is how fast each FLOP runs.")
    lines = ["# ECLIPSE's training FLOPs per step / plain CLIP's, by keep rate (closed form)", "", how, "",
             "| preset | " + " | ".join(f"keep {k}" for k in KEEPS) + " | break-even keep rate |",
             "|---|" + "--:|" * (len(KEEPS) + 1)]
    for preset in RUNS:
        cells = " | ".join(f"{ratio(preset, k):.3f}" for k in KEEPS)
        lines.append(f"| {preset} | {cells} | {break_even(preset)} |")
    Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
