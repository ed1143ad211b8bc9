"""Run metrics: ``metrics.jsonl`` (one object per logged step), ``eval.jsonl`` (one object per
evaluation, the run's history; ``eval.json`` is the last one) and TensorBoard scalars.

    logger = MetricsLogger(output_dir, tensorboard=True, enabled=is_rank0, resume_step=step)
    logger.log({"loss": 1.2, "lr": 3e-4}, step=10)              # -> train/loss, train/lr
    logger.log({"zeroshot_top1": 0.41}, step=10, prefix="eval")  # -> eval/zeroshot_top1
    logger.close()

On resume, lines and events past the resumed step (written by the run that was killed) are
dropped, so each step appears once.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.paths = {"train": self.path, "eval": Path(output_dir) / "eval.jsonl"}
        self.writer = None
        if not enabled:
            return
        self._fh = {}
        for prefix, path in self.paths.items():
            _truncate_after(path, resume_step)
            self._fh[prefix] = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, values: dict, step: int, prefix: str = "train") -> None:
        if not self.enabled:
            return
        fh = self._fh.get(prefix)
        if fh is not None:
            fh.write(json.dumps({"step": step, **values}, default=float) + "\n")
            fh.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        for fh in self._fh.values():
            fh.close()
        if self.writer is not None:
            self.writer.close()


def _truncate_after(path: Path, step: int) -> None:
    """Drop the lines of steps after ``step`` (a killed run's, to be written again on resume)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
