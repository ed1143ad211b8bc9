"""The sweep's throughput columns: every variant's training step in one controlled ``bench train``.

Each run's own samples/s was measured when that run happened to train, under whatever else the
machine was doing then (a variant added later ran hours after the others), so the sweep does not
compare variants by it. Once every run has finished, the sweep runs

    python -m trainer bench train --config BASE --variants DIR/throughput/variants.yaml --nproc N \\
        --steps 20 --warmup 5 --rounds 3 --out DIR/throughput --tag sweep <the sweep's key=value arguments>

where ``variants.yaml`` holds each variant's own arguments of its first run (its overrides, with
``--budget-flops`` also its ``max_steps`` and scaled schedule; ``{seed}`` as the first seed): each
variant is one implementation of ``bench train``, our step on the same shards, seed, global batch
and ranks, alternated over the rounds, each held at the per-step cost of its whole run
(``trainer.methods.steady_overrides``). ``DIR/throughput/throughput.json`` keeps the rows with a
hash of what they measured (the base config's text, the variants' arguments, the sweep's
arguments, the ranks and the benchmark's steps and rounds): a rerun of the sweep with the same hash
reuses it, so rerunning a finished sweep costs no training and no measurement.

A variant that starts from ``checkpoint.init`` (a growth stage) is measured from fresh weights at
the shape its config names (a step's cost does not depend on the weights). A variant whose measured
model is not the one its runs trained (parameter counts differ: a shape that ``bench train`` does
not build from the config, e.g. one taken from a ``transformers`` source) shows "—".
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import ConfigError

SUBDIR, RESULT, TAG = "throughput", "throughput.json", "sweep"
NOT_OURS = ("seed", "output_dir")   # set per run by the sweep


@dataclass(frozen=True)
class Settings:
    """The benchmark's size: timed steps, untimed steps first, rounds."""
    steps: int = 20
    warmup: int = 5
    rounds: int = 3


def settings_from(args) -> Settings | None:
    """The command line's settings (None: ``--no-throughput``)."""
    if getattr(args, "no_throughput", False):
        return None
    s = Settings(getattr(args, "throughput_steps", 20), getattr(args, "throughput_warmup", 5),
                 getattr(args, "throughput_rounds", 3))
    if s.steps < 1 or s.warmup < 0 or s.rounds < 1:
        raise ConfigError(f"--throughput-steps and --throughput-rounds must be >= 1, --throughput-warmup >= 0; "
                         f"got {s.steps}, {s.rounds}, {s.warmup}")
    return s


def flags(s: Settings | None) -> list[str]:
    """The sweep's command-line flags that give ``s`` (none for the defaults)."""
    if s is None:
        return ["--no-throughput"]
    d = Settings()
    return [*(["--throughput-steps", str(s.steps)] if s.steps != d.steps else []),
            *(["--throughput-warmup", str(s.warmup)] if s.warmup != d.warmup else []),
            *(["--throughput-rounds", str(s.rounds)] if s.rounds != d.rounds else [])]


def _parse(item: str):
    key, text = item.split("=", 1)
    return key, (yaml.safe_load(text) if text != "" else None)   # as the trainer's override parser reads it


def bench_variants(sweep) -> dict[str, dict]:
    """``{variant: {dotted key: value}}``: the arguments of each variant's first run beyond the sweep's
    own ``key=value`` arguments, less ``seed`` and ``output_dir``."""
    out = {}
    for name, (_, seeds) in sweep.variants.items():
        run = next(r for r in sweep.runs if r.variant == name and r.seed == seeds[0])
        own = dict(_parse(a) for a in run.args[len(sweep.overrides):])
        out[name] = {k: v for k, v in own.items() if k not in NOT_OURS}
    return out


def measurement_hash(sweep, s: Settings) -> str:
    base = Path(sweep.base)
    what = {"base": sweep.base, "base_text": base.read_text() if base.is_file() else None,
            "variants": bench_variants(sweep), "overrides": sweep.overrides, "nproc": sweep.nproc,
            "steps": s.steps, "warmup": s.warmup, "rounds": s.rounds}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def command(sweep, s: Settings) -> list[str]:
    d = sweep.out / SUBDIR
    return ["python", "-m", "trainer", "bench", "train", "--config", sweep.base, "--variants",
            str(d / "variants.yaml"), "--nproc", str(sweep.nproc), "--steps", str(s.steps), "--warmup",
            str(s.warmup), "--rounds", str(s.rounds), "--out", str(d), "--tag", TAG, *sweep.overrides]


def load(sweep, s: Settings | None) -> dict | None:
    """The stored measurement, if it measured this sweep's variants (with ``--no-throughput``: any
    stored one of the same variants, config and ranks, whatever its steps and rounds)."""
    path = sweep.out / SUBDIR / RESULT
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if s is None:
        st = result.get("settings") or {}
        s = Settings(st.get("steps", 0), st.get("warmup", 0), st.get("rounds", 0))
    return result if result.get("hash") == measurement_hash(sweep, s) else None


class _Group(subprocess.Popen):
    """A child in a session of its own whose signals reach its whole process group (bench train's
    torchrun and ranks too), so a stopped sweep leaves no benchmark running."""

    def send_signal(self, sig) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


def measure(sweep, s: Settings, env: dict, sig) -> tuple[dict | None, str]:
    """Run the benchmark (its output in ``DIR/throughput/bench.log``); ``(result, '')`` or ``(None, why)``."""
    d = sweep.out / SUBDIR
    d.mkdir(parents=True, exist_ok=True)
    (d / "variants.yaml").write_text(
        "# Written by `python -m trainer sweep` for its throughput measurement: each variant's own arguments\n"
        "# of its first run (the sweep's key=value arguments are on the bench command line).\n"
        + yaml.safe_dump(bench_variants(sweep), sort_keys=False, allow_unicode=True))
    cmd = command(sweep, s)
    with open(d / "bench.log", "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        proc = _Group([sys.executable, *cmd[1:]], stdout=log, stderr=subprocess.STDOUT, env=env,
                      start_new_session=True)
        sig.child = proc   # the sweep's SIGTERM handler passes it on
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
        finally:
            sig.child = None
    rows_path = d / f"train_{TAG}.jsonl"
    if rc != 0 or not rows_path.is_file():
        return None, f"bench train exited {rc}; its output: {d / 'bench.log'}"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    result = {"hash": measurement_hash(sweep, s), "command": shlex.join(cmd),
              "settings": {"steps": s.steps, "warmup": s.warmup, "rounds": s.rounds},
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    tmp = d / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, d / RESULT)
    return result, ""


# ------------------------------------------------------------------ the table's columns

HEAD = ["samples/s", "samples/s ÷ {ref}", "step ms", "train FLOP/s", "s/run at that speed"]


def per_variant(result: dict | None, params: dict[str, int | None]) -> dict[str, dict]:
    """``{variant: row}`` of the measurement, for the variants measured at their runs' parameter count."""
    if result is None:
        return {}
    return {r["variant"]: r for r in result["rows"]
            if r.get("variant") in params and (params[r["variant"]] in (None, 0) or r["params"] == params[r["variant"]])}


def cells(by: dict[str, dict], name: str, ref_name: str, steps: float | None) -> list[str]:
    """The five throughput cells of one variant ("—": not measured)."""
    r, ref = by.get(name), by.get(ref_name)
    if r is None:
        return ["—"] * len(HEAD)
    ratio = "1.00×" if name == ref_name else (f"{r['samples_per_s'] / ref['samples_per_s']:.2f}×" if ref else "n/a")
    run_s = f"{steps * r['step_ms'] / 1e3:.0f}" if steps else "n/a"
    return [f"{r['samples_per_s']:.1f}", ratio, f"{r['step_ms']:.0f}", f"{r['flops_per_s']:.3g}", run_s]


def ratio(by: dict[str, dict], name: str, ref_name: str) -> float | None:
    if name in by and ref_name in by:
        return by[name]["samples_per_s"] / by[ref_name]["samples_per_s"]
    return None


def paragraph(result: dict | None, by: dict[str, dict], names: list[str], settings: Settings | None,
              slurm: bool) -> list[str]:
    """How the throughput columns were measured, or why they are empty."""
    if result is None:
        why = ("the sweep ran under SLURM (it would run on the submitting host): run the `bench train` command "
               "below on a compute node" if slurm and settings is not None else
               "`--no-throughput`" if settings is None else "not every run has finished, or the measurement failed "
               "(`throughput/bench.log`)")
        return [f"**Throughput** columns: not measured ({why}). A run's own samples/s (uncontrolled) is in "
                "the per-run table below."]
    r0 = result["rows"][0]
    rounds = "; ".join(f"`{r['variant']}` " + ", ".join(f"{v:.1f}" for v in r["samples_per_s_rounds"])
                       for r in result["rows"])
    held = "; ".join(f"`{r['variant']}`: " + " ".join(f"`{h}`" for h in r["held"]) for r in result["rows"] if r["held"])
    missing = [n for n in names if n not in by]
    out = [f"**Throughput** columns come from one controlled measurement, `{result['command']}` "
           f"({result['date']}, {r0['device']}, {r0['world']} ranks, {r0['rounds']} rounds of {r0['warmup']} + "
           f"{r0['steps']} steps, the order reversed every other round; load before: {r0.get('loadavg_before')}): "
           "each variant's training step (the base config, the sweep's `key=value` arguments and the variant's "
           "overrides, with `--budget-flops` its own schedule) on the same shards, seed, global batch "
           f"({r0['global_batch']}) and ranks; each cell is the variant's median round "
           f"([report](throughput/train_{TAG}.md)). samples/s of every round: {rounds}. "
           "Train FLOP/s: the analytic training FLOPs of the measured step per second; s/run at that speed: the "
           "runs' steps × step ms (training steps only: no start-up, evaluation or checkpoints)."]
    if held:
        out[0] += f" Held at the run's average per-step cost: {held}."
    if missing:
        out[0] += (f" Not measured: {', '.join(f'`{n}`' for n in missing)} (its measured model is not the one its "
                   "runs trained, or it is not in the measurement).")
    return out
