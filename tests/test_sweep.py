"""``python -m trainer sweep`` end to end, through the real command line on the demo data set.

One 2-variant x 2-seed sweep (tiny runs: 4 steps, one process each) is shared by the tests that
read its outputs; the interrupted run, the bad key and the SLURM sweep have small sweeps of their
own. Every test asserts on values: the rows against each run's eval.json and metrics.jsonl, the
table's numbers recomputed from the rows, the PNGs decoded, files left untouched on a re-run.
"""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, capture_figures, check, kill_group, read_metrics, run_trainer, start_trainer

CONFIG = "trainer/configs/demo.yaml"
# FAST of tests/test_train_e2e.py without loader workers: small and quick.
FAST = ["model.context_length=24", "data.batch_size=16", "data.workers=0", "data.shuffle_buffer=64",
        "data.train_num_samples=192", "optim.warmup_steps=3", "optim.lr=2e-3", "log.every_steps=1",
        "log.progress=false", "eval.batch_size=32"]
STEPS = 4
SEEDS = [0, 1]
# `lowlr` names its override as a nested section: it must change optim.lr only, not the whole
# optim section (warmup_steps=3 from the sweep's arguments must survive).
VARIANTS = {"seeds": SEEDS, "baseline": {}, "lowlr": {"optim": {"lr": 2.0e-4}}}
PNGS = ("loss.png", "zeroshot_top1.png", "top1_vs_time.png", "vs_flops.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ACC_KEYS = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1")


def data_args(data: Path) -> list[str]:
    return [f"data.train_shards={data}/train", f"data.val_shards={data}/val", f"tokenizer.path={data}/tokenizer",
            f"eval.zeroshot={data}/zeroshot.json"]


def sweep_args(variants: Path, out: Path, data: Path, *extra, nproc: int = 1, slurm: bool = False,
               throughput: bool = False) -> list[str]:
    """The sweep's command line; without the throughput measurement (its own tests ask for it)."""
    launch = ["--slurm"] if slurm else ["--nproc", str(nproc)]
    return ["sweep", "--config", CONFIG, "--variants", str(variants), "--out", str(out), *launch,
            *([] if throughput else ["--no-throughput"]), *data_args(data), *FAST, f"max_steps={STEPS}",
            "eval.every_steps=2", "checkpoint.every_steps=2", *extra]


def write_variants(path: Path, variants: dict) -> Path:
    path.write_text(yaml.safe_dump(variants, sort_keys=False))
    return path


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def run_dirs(out: Path) -> list[Path]:
    return [out / "runs" / v / f"seed{s}" for v in ("baseline", "lowlr") for s in SEEDS]


@pytest.fixture(scope="module")
def sweep(demo_data, tmp_path_factory):
    """The shared sweep: baseline and lowlr, seeds 0 and 1, 4 steps each, evaluated every 2 steps."""
    tmp = tmp_path_factory.mktemp("sweep")
    variants = write_variants(tmp / "variants.yaml", VARIANTS)
    out = tmp / "out"
    t0 = time.monotonic()
    text = check(run_trainer(sweep_args(variants, out, demo_data)))
    return {"out": out, "variants": variants, "log": text, "seconds": time.monotonic() - t0, "data": demo_data}


# ------------------------------------------------------------------------- the shared sweep

def test_results_rows_match_each_runs_outputs(sweep):
    out, rows = sweep["out"], read_rows(sweep["out"])
    assert [(r["variant"], r["seed"]) for r in rows] == [("baseline", 0), ("baseline", 1), ("lowlr", 0), ("lowlr", 1)]
    from trainer.config import load_config
    from trainer.data import load_tokenizer
    from trainer.model import build_model

    for row, run_dir in zip(rows, run_dirs(out)):
        assert Path(row["run_dir"]) == run_dir
        ev = json.loads((run_dir / "eval.json").read_text())
        assert ev["step"] == STEPS
        for key, value in ev.items():  # every figure of the final eval.json, unchanged
            assert row[key] == value, key
        metrics = read_metrics(run_dir)
        assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
        assert row["samples_per_s"] == pytest.approx(statistics.median(m["samples_per_s"] for m in metrics))
        assert row["steps"] == STEPS and row["final_loss"] == pytest.approx(metrics[-1]["loss"])
        meta = json.loads((run_dir / "sweep.json").read_text())
        assert meta["status"] == "finished" and len(meta["attempts"]) == 1 and meta["attempts"][0]["rc"] == 0
        assert row["wall_s"] == meta["wall_s"] == pytest.approx(sum(a["wall_s"] for a in meta["attempts"]))
        assert 0 < row["wall_s"] < sweep["seconds"]
        assert row["attempts"] == 1 and row["config_hash"] == meta["config_hash"]
        # The run is the ordinary train command with the variant's overrides, its seed and run dir.
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["seed"] == row["seed"] and Path(cfg["output_dir"]) == run_dir and cfg["max_steps"] == STEPS
        assert cfg["optim"]["lr"] == (2e-4 if row["variant"] == "lowlr" else 2e-3)
        assert cfg["optim"]["warmup_steps"] == 3 and cfg["optim"]["weight_decay"] == 0.1  # rest of optim kept
        assert row["overrides"] == ({"optim.lr": 2e-4} if row["variant"] == "lowlr" else {})
        log = (run_dir / "train.log").read_text()
        assert "-m trainer train --config trainer/configs/demo.yaml" in log and f"seed={row['seed']}" in log
        # Exact parameter count, and the trainer's own log line agrees.
        c = load_config(run_dir / "config.yaml")
        want = sum(p.numel() for p in build_model(c.model, load_tokenizer(c.tokenizer.path), 0).parameters())
        assert row["params"] == want
        logged = float(re.search(r"params=([\d.]+)M", log).group(1))
        assert abs(row["params"] / 1e6 - logged) < 0.006
    # The variants really differ, and seeds differ within a variant.
    losses = {(r["variant"], r["seed"]): r["final_loss"] for r in rows}
    assert len(set(losses.values())) == 4


def _main_table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variant | n |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    body = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        body[cells[0].strip("`")] = cells
    return header, body


def test_table_numbers_recomputed_from_rows(sweep):
    text = (sweep["out"] / "table.md").read_text()
    rows = read_rows(sweep["out"])
    header, body = _main_table(text)
    assert list(body) == ["baseline", "lowlr"]
    assert "mean ± sample standard deviation" in text and "percentage points" in text and "ratio" in text
    col = {name: i for i, name in enumerate(header)}

    def stats(variant, key):
        values = [r[key] for r in rows if r["variant"] == variant]
        return statistics.fmean(values), statistics.stdev(values)

    labels = {"zeroshot_top1": "zero-shot top-1", "zeroshot_top5": "zero-shot top-5", "i2t_r1": "I→T R@1",
              "t2i_r1": "T→I R@1"}
    for variant in body:
        assert body[variant][col["n"]] == "2"
        for key in ACC_KEYS:
            mean, sd = stats(variant, key)
            assert body[variant][col[f"{labels[key]} %"]] == f"{100 * mean:.1f} ± {100 * sd:.1f}", (variant, key)
        # --no-throughput: no controlled measurement, so no throughput cells (never the runs' own)
        for head in ("samples/s", "samples/s ÷ baseline", "step ms", "train FLOP/s", "s/run at that speed"):
            assert body[variant][col[head]] == "—", (variant, head)
    # The relative columns: differences of the means in points, throughput as a ratio.
    for key in ACC_KEYS:
        cell = body["lowlr"][col[f"Δ {labels[key]} (pt)"]]
        want = 100 * (stats("lowlr", key)[0] - stats("baseline", key)[0])
        assert re.fullmatch(r"[+-]\d+\.\d", cell), cell
        assert float(cell) == pytest.approx(want, abs=0.05 + 1e-9), key
        assert body["baseline"][col[f"Δ {labels[key]} (pt)"]] == "—"
    assert "**Throughput** columns: not measured (`--no-throughput`)" in text
    params = rows[0]["params"]
    assert body["baseline"][col["params"]] == f"{params / 1e6:.2f}M"
    # Every run has its line, and the verdict names the best variant by mean zero-shot top-1.
    # Every run has its line, with its own samples/s and wall time, labelled uncontrolled.
    assert "| samples/s (median, uncontrolled) | wall s (uncontrolled) |" in text
    for r in rows:
        assert f"| `{r['variant']}` | {r['seed']} | {100 * r['zeroshot_top1']:.1f} |" in text
        assert f" | {r['samples_per_s']:.1f} | {r['wall_s']:.0f} | 1 | {STEPS} | " in text
    best = max(("baseline", "lowlr"), key=lambda v: stats(v, "zeroshot_top1")[0])
    assert f"Highest mean zero-shot top-1: `{best}`" in text
    for png in PNGS:
        assert f"]({png})" in text


def test_plots_show_each_variants_mean_over_seeds(sweep, tmp_path, monkeypatch):
    """The three plots, drawn in process from the sweep's rows by the function the sweep used:
    their axes and legends, and the plotted means recomputed here from each run's metrics.jsonl
    and eval.json (read with json, not the sweep's readers)."""
    from trainer.cli import build_parser
    from trainer.experiments.sweep import plan, write_plots

    out = sweep["out"]
    for name in PNGS:   # the sweep itself wrote them
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    monkeypatch.chdir(ROOT)
    planned = plan(build_parser().parse_args(sweep_args(sweep["variants"], out, sweep["data"])))
    planned.out = tmp_path
    figures = capture_figures(monkeypatch)
    write_plots(planned, read_rows(out))
    assert [path.name for _, path in figures] == [f"{n}.tmp.png" for n in PNGS]
    (loss_fig, _), (top1_fig, _), (time_fig, _), (flops_fig, _) = figures
    loss_ax, top1_ax, time_ax = loss_fig.axes[0], top1_fig.axes[0], time_fig.axes[0]

    def bold(ax, label):
        (line,) = [l for l in ax.get_lines() if l.get_label() == label]
        return list(line.get_xdata()), list(line.get_ydata())

    def own_losses(d: Path) -> dict:
        return {m["step"]: m["loss"] for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}

    assert (loss_ax.get_xlabel(), loss_ax.get_ylabel()) == ("step", "loss")
    assert (top1_ax.get_xlabel(), top1_ax.get_ylabel()) == ("step", "zero-shot top-1 (%)")
    assert time_ax.get_ylabel() == "zero-shot top-1 (%)" and time_ax.get_xlabel().startswith("wall time")
    legend = lambda ax: [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend(loss_ax) == ["baseline (n=2)", "lowlr (n=2)"]
    assert legend(top1_ax)[:2] == ["baseline (n=2)", "lowlr (n=2)"] and legend(top1_ax)[2].startswith("chance (")
    for variant in ("baseline", "lowlr"):
        dirs = [out / "runs" / variant / f"seed{s}" for s in SEEDS]
        per_seed = [own_losses(d) for d in dirs]
        xs, ys = bold(loss_ax, f"{variant} (n=2)")
        assert xs == list(range(1, STEPS + 1))
        assert ys == pytest.approx([statistics.fmean(m[s] for m in per_seed) for s in xs], rel=1e-12)
        final = statistics.fmean(100 * json.loads((d / "eval.json").read_text())["zeroshot_top1"] for d in dirs)
        xs, ys = bold(top1_ax, f"{variant} (n=2)")
        assert xs == [2, STEPS] and ys[-1] == pytest.approx(final, abs=1e-4)
        (mark,) = [t for t in legend(time_ax) if t.startswith(f"{variant}: ")]
        assert mark.startswith(f"{variant}: {final:.1f} % in ") and mark.endswith("(n=2)")
        # against FLOPs: each evaluation at the training FLOPs metrics.jsonl logged at its step
        flops = [{m["step"]: m["flops"] for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}
                 for d in dirs]
        xs, ys = bold(flops_fig.axes[0], f"{variant} (n=2)")
        assert xs == pytest.approx([statistics.fmean(f[s] for f in flops) for s in (2, STEPS)], rel=1e-12)
        assert ys[-1] == pytest.approx(final, abs=1e-4)
    assert [ax.get_xlabel() for ax in flops_fig.axes] == ["training FLOPs"] * 3
    assert [ax.get_ylabel() for ax in flops_fig.axes] == ["zero-shot top-1 (%)", "image→text R@1 (%)",
                                                          "validation contrastive loss"]


def test_throughput_columns_come_from_the_controlled_measurement(sweep, tmp_path, monkeypatch):
    """The table's throughput cells are the stored ``bench train --variants`` rows (a made-up
    measurement here, its hash the one the sweep computes): samples/s, the ratio to the first
    variant, step ms, FLOP/s and each run's steps x step ms; a variant measured at another
    parameter count than its runs gets "—"; a measurement of other settings is not used."""
    from trainer.cli import build_parser
    from trainer.experiments import sweep_speed
    from trainer.experiments.sweep import plan, write_table

    monkeypatch.chdir(ROOT)
    planned = plan(build_parser().parse_args(sweep_args(sweep["variants"], sweep["out"], sweep["data"],
                                                        "--throughput-rounds", "2", throughput=True)))
    assert planned.throughput == sweep_speed.Settings(steps=20, warmup=5, rounds=2)
    assert sweep_speed.bench_variants(planned) == {"baseline": {}, "lowlr": {"optim.lr": 2e-4}}
    planned.out = tmp_path
    rows = read_rows(sweep["out"])
    params = rows[0]["params"]

    def bench_row(variant, samples_per_s, step_ms, flops_per_s, n_params=params):
        return {"variant": variant, "impl": variant, "samples_per_s": samples_per_s, "step_ms": step_ms,
                "flops_per_s": flops_per_s, "params": n_params, "held": [], "samples_per_s_rounds": [1.0, 2.0],
                "device": "cpu:test", "world": 1, "rounds": 2, "warmup": 5, "steps": 20, "global_batch": 16}
    measured = {"hash": sweep_speed.measurement_hash(planned, planned.throughput), "command": "python -m trainer bench "
                "train --variants X", "date": "2026-01-01", "rows": [bench_row("baseline", 80.0, 200.0, 4.0e10),
                                                                      bench_row("lowlr", 100.0, 160.0, 5.0e10)]}
    (tmp_path / "throughput").mkdir()
    stored = tmp_path / "throughput" / "throughput.json"
    stored.write_text(json.dumps(measured))
    write_table(planned, rows, tmp_path / "table.md")
    text = (tmp_path / "table.md").read_text()
    header, body = _main_table(text)
    col = {name: i for i, name in enumerate(header)}
    want = {"baseline": ["80.0", "1.00×", "200", "4e+10", f"{STEPS * 0.2:.0f}"],
            "lowlr": ["100.0", f"{100 / 80:.2f}×", "160", "5e+10", f"{STEPS * 0.16:.0f}"]}
    heads = ["samples/s", "samples/s ÷ baseline", "step ms", "train FLOP/s", "s/run at that speed"]
    for variant, cells in want.items():
        assert [body[variant][col[h]] for h in heads] == cells, variant
    assert "come from one controlled measurement, `python -m trainer bench train --variants X`" in text
    assert "2 rounds of 5 + 20 steps" in text and "`baseline` 1.0, 2.0; `lowlr` 1.0, 2.0" in text
    assert "Step throughput 1.25× `baseline` (the controlled measurement above)" in text
    # Another parameter count than the runs trained: not this variant's model.
    measured["rows"][1]["params"] = params + 1
    stored.write_text(json.dumps(measured))
    write_table(planned, rows, tmp_path / "table.md")
    _, body = _main_table((tmp_path / "table.md").read_text())
    assert [body["lowlr"][col[h]] for h in heads] == ["—"] * 5 and body["baseline"][col["samples/s"]] == "80.0"
    # Other settings (3 rounds, the default): the stored measurement is not this one.
    planned.throughput = sweep_speed.Settings()
    write_table(planned, rows, tmp_path / "table.md")
    _, body = _main_table((tmp_path / "table.md").read_text())
    assert body["baseline"][col["samples/s"]] == "—"


def test_zeroshot_curve_read_from_tensorboard(sweep):
    """The zero-shot plot's data: eval/zeroshot_top1 at every eval.every_steps and at the end."""
    from trainer.experiments.sweep import eval_curve

    for run_dir in run_dirs(sweep["out"]):
        curve = eval_curve(run_dir)
        assert [step for step, _, _ in curve] == [2, STEPS]
        ev = json.loads((run_dir / "eval.json").read_text())
        assert curve[-1][2] == pytest.approx(ev["zeroshot_top1"], abs=1e-6)
        assert curve[0][1] < curve[1][1]  # wall times, in order


def test_rerun_skips_finished_runs_and_regenerates_reports(sweep):
    out = sweep["out"]
    watched = [p for d in run_dirs(out) for p in (d / "sweep.json", d / "eval.json", d / "metrics.jsonl",
                                                  d / "checkpoints" / "latest", d / "train.log")]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched}
    rows_before = read_rows(out)
    for name in ("table.md", "results.jsonl", *PNGS):
        (out / name).unlink()
    text = check(run_trainer(sweep_args(sweep["variants"], out, sweep["data"])))
    for d in run_dirs(out):
        name = f"{d.parent.name}/{d.name}"
        assert re.search(rf"{name}: finished earlier .*; skipped", text), text[-3000:]
    assert "starting" not in text and "resuming" not in text
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched} == before  # nothing touched
    assert read_rows(out) == rows_before  # same rows, wall times included
    for name in ("table.md", *PNGS):
        assert (out / name).stat().st_size > 0
    # no training happened: the counts above (no run started or resumed, every file untouched),
    # not a wall-clock ratio that a loaded machine can break


def test_changed_variant_refuses_existing_run_dir(sweep, tmp_path, capsys):
    """A variant whose config changed would mix two configs in one directory: exit 2, nothing touched.
    In process through trainer.cli.main (the code `python -m trainer` runs; test_config_cli shows
    a real process turns the same ConfigError into exit 2 and one line)."""
    from trainer.cli import main

    out = sweep["out"]
    variants = write_variants(tmp_path / "changed.yaml", {**VARIANTS, "lowlr": {"optim.lr": 3.0e-4}})
    meta = out / "runs" / "lowlr" / "seed0" / "sweep.json"
    before = meta.stat().st_mtime_ns
    capsys.readouterr()
    assert main(sweep_args(variants, out, sweep["data"])) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: run directory ") and str(out / "runs" / "lowlr" / "seed0") in line, err[-2000:]
    assert "optim.lr" in line and "0.0002" in line and "0.0003" in line
    assert meta.stat().st_mtime_ns == before
    # The launch is part of the config: other ranks per run, other global batch.
    assert main(sweep_args(sweep["variants"], out, sweep["data"], nproc=2)) == 2
    assert "launch.nproc: 1 there, 2 now" in capsys.readouterr().err


# ------------------------------------------------------------------------- sweeps of their own

def test_bad_key_fails_before_anything_runs(demo_data, tmp_path, capsys):
    """In process through trainer.cli.main, like test_changed_variant_refuses_existing_run_dir."""
    from trainer.cli import main

    variants = write_variants(tmp_path / "bad.yaml", {"baseline": {}, "typo": {"optim.lrr": 1.0e-4}})
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(sweep_args(variants, out, demo_data)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: variant 'typo': unknown config key 'optim.lrr'"), errors
    assert not out.exists()  # no sweep directory, so no run directory either
    # A key of the right name but a bad value names the variant too, and nothing is created.
    variants = write_variants(tmp_path / "bad2.yaml", {"baseline": {}, "big": {"model": {"preset": "huge"}}})
    assert main(sweep_args(variants, out, demo_data)) == 2
    assert "error: variant 'big': config key 'model.preset' must be one of" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.full   # a second kill test; test_train_e2e keeps the real SIGKILL
def test_interrupted_run_is_resumed_not_restarted(demo_data, tmp_path):
    """SIGKILL the sweep and its trainer (2 ranks under torchrun) mid-run; the same command continues
    that run from its latest checkpoint, and its wall time adds up over both attempts."""
    long_steps = 20
    variants = write_variants(tmp_path / "long.yaml", {"long": {"max_steps": long_steps}})
    out = tmp_path / "out"
    args = sweep_args(variants, out, demo_data, "eval.every_steps=10", nproc=2)
    run_dir = out / "runs" / "long" / "seed0"
    latest = run_dir / "checkpoints" / "latest"
    proc = start_trainer(args, TRAINER_SWEEP_HEARTBEAT_S="0.5")
    deadline = time.time() + 300
    while not latest.is_file():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)
    kill_group(proc)
    killed_at = int(latest.read_text().strip().removeprefix("step_"))
    assert 2 <= killed_at < long_steps
    assert not (run_dir / "eval.json").exists() or \
        json.loads((run_dir / "eval.json").read_text())["step"] < long_steps
    first = json.loads((run_dir / "sweep.json").read_text())
    assert first["status"] == "running" and len(first["attempts"]) == 1 and first["attempts"][0]["wall_s"] > 0

    text = check(run_trainer(args))
    assert f"long/seed0: resuming from checkpoints/step_{killed_at}" in text, text[-3000:]
    log = (run_dir / "train.log").read_text()
    second = log.split("===== sweep attempt 2")[1]
    assert re.search(rf"resumed from \S+/checkpoints/step_{killed_at} \(step {killed_at}\)", second), second[-3000:]
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, long_steps + 1))  # each step once
    meta = json.loads((run_dir / "sweep.json").read_text())
    assert meta["status"] == "finished" and [a["rc"] for a in meta["attempts"]][1:] == [0]
    assert meta["attempts"][0]["wall_s"] == first["attempts"][0]["wall_s"]
    assert meta["wall_s"] == pytest.approx(sum(a["wall_s"] for a in meta["attempts"]))
    (row,) = read_rows(out)
    assert row["attempts"] == 2 and row["wall_s"] == meta["wall_s"] and row["step"] == long_steps
    assert row["zeroshot_top1"] == json.loads((run_dir / "eval.json").read_text())["zeroshot_top1"]


@pytest.mark.full   # SLURM requeue is fast-tier tested in test_slurm; the sweep in test_sweep
@pytest.mark.timeout(600)
def test_slurm_sweep_waits_through_a_requeue(demo_data, tmp_path):
    """--slurm on a real SLURM cluster (tests/slurm_cluster.py): the job is preempted (USR1 to the
    batch shell: checkpoint, exit 75, requeue) and the sweep keeps waiting for the same job id."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import slurm_cluster as sc

    sc.skip_or_fail_without_cluster()
    variants = write_variants(tmp_path / "one.yaml", {"baseline": {"max_steps": 30}})
    out = tmp_path / "out"
    run_dir = out / "runs" / "baseline" / "seed0"
    args = sweep_args(variants, out, demo_data, "eval.every_steps=10", "dist.timeout_s=300", slurm=True)
    with sc.SlurmCluster(tmp_path / "slurm", nodes=1, cpus_per_node=2, cred_expire_s=10) as cluster:
        env = {**cluster.env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRAINER_SWEEP_POLL_S": "1",
               "TRAINER_SWEEP_SBATCH_ARGS": "-N 1 --ntasks-per-node 1 --gpus-per-node 0 --cpus-per-task 1"}
        proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 400
            while not (run_dir / "checkpoints" / "latest").is_file():
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                assert time.time() < deadline, "no checkpoint within 400 s"
                time.sleep(0.2)
            job = json.loads((run_dir / "sweep.json").read_text())["slurm_job"]
            cluster.run(["scancel", "--batch", "--signal=USR1", job])
            text, _ = proc.communicate(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, text[-4000:]
        assert cluster.job(job)["Restarts"] == "1"
    assert f"baseline/seed0: submitted SLURM job {job}" in text
    assert f"baseline/seed0: finished (SLURM job {job} COMPLETED" in text
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert f"requeueing job {job}" in log and "resumed from" in log and "training finished" in log
    meta = json.loads((run_dir / "sweep.json").read_text())
    assert meta["slurm_jobs"] == [job] and meta["status"] == "finished"
    assert len(meta["attempts"]) == 2 and all(a["job"] == job and a["wall_s"] >= 0 for a in meta["attempts"])
    (row,) = read_rows(out)
    assert row["step"] == 30 and row["attempts"] == 2
    assert row["zeroshot_top1"] == json.loads((run_dir / "eval.json").read_text())["zeroshot_top1"]


def test_a_run_made_before_a_config_key_existed_still_counts(tmp_path):
    """Keys the trainer gains later (a new method's section, off by default) do not orphan the
    evidence measured before them; a changed value still does."""
    from trainer.experiments.sweep import Run, _only_new_default_keys

    run = Run.__new__(Run)
    run.resolved = {"seed": 0, "optim": {"lr": 1e-3}, "eclipse": {"enabled": False, "momentum": 0.995}}
    run.launch = {"nproc": 2}
    before = {"config": {"seed": 0, "optim": {"lr": 1e-3}}, "launch": {"nproc": 2}}
    assert _only_new_default_keys(before, run)
    run.resolved["eclipse"]["enabled"] = True            # the new key at a non-default value: a different run
    assert not _only_new_default_keys(before, run)
    run.resolved["eclipse"]["enabled"] = False
    changed = {"config": {"seed": 0, "optim": {"lr": 2e-3}}, "launch": {"nproc": 2}}
    assert not _only_new_default_keys(changed, run)
    removed = {"config": {"seed": 0, "optim": {"lr": 1e-3}, "gone": 1}, "launch": {"nproc": 2}}
    assert not _only_new_default_keys(removed, run)
    # A new key at the value that does what the trainer did before it existed (ECL's cosine score,
    # config.BEFORE_KEY) keeps the run too; any other non-default value does not.
    before["config"]["select"] = {"enabled": True}
    run.resolved["select"] = {"enabled": True, "score": "cosine"}
    assert _only_new_default_keys(before, run)
    run.resolved["select"]["score"] = "other"
    assert not _only_new_default_keys(before, run)


def test_budget_flops_gives_each_run_the_steps_its_budget_buys(demo_data, tmp_path):
    """``--budget-flops``: plain CLIP costs the same every step, so its step count is the budget
    over one step's FLOPs (trainer/flops.py's closed form); ECLIPSE costs more per step (its
    teacher's forward), so it gets fewer steps, the most whose count stays within the budget;
    each run's warm-up keeps its share of the variant's own ``max_steps``."""
    import argparse

    from trainer.config import ConfigError, load_config
    from trainer.experiments.sweep import plan
    from trainer.flops import clip_step_flops
    from trainer.methods import train_flops

    variants = write_variants(tmp_path / "v.yaml", {"baseline": {}, "eclipse": {"eclipse.enabled": True}})
    common = [*data_args(demo_data), *FAST, "max_steps=40", "optim.warmup_steps=10"]
    one_step = clip_step_flops(load_config(CONFIG, common), 2)
    args = argparse.Namespace(config=CONFIG, variants=str(variants), out=str(tmp_path / "out"), nproc=2,
                              slurm=False, overrides=common, budget_flops=100.5 * one_step)
    planned = plan(args)
    runs = {r.variant: r for r in planned.runs}
    base, ecl = runs["baseline"].cfg, runs["eclipse"].cfg
    assert base.max_steps == 100 and base.optim.warmup_steps == 25          # 10 of 40 -> 25 of 100
    n = ecl.max_steps
    assert 50 < n < 100 and ecl.optim.warmup_steps == round(10 * n / 40)
    assert train_flops(ecl, n, 2) <= args.budget_flops
    more = load_config(CONFIG, [*common, "eclipse.enabled=true", f"max_steps={n + 1}",
                                f"optim.warmup_steps={round(10 * (n + 1) / 40)}"])
    assert train_flops(more, n + 1, 2) > args.budget_flops
    # The throughput measurement times each variant as its runs trained: their step count and schedule.
    from trainer.experiments.sweep_speed import bench_variants
    assert bench_variants(planned) == {
        "baseline": {"max_steps": 100, "optim.warmup_steps": 25},
        "eclipse": {"eclipse.enabled": True, "max_steps": n, "optim.warmup_steps": round(10 * n / 40)}}
    args.budget_flops = 0.5 * one_step
    with pytest.raises(ConfigError, match="less than one training step"):
        plan(args)
    args.throughput_rounds = 0
    with pytest.raises(ConfigError, match="--throughput-rounds must be >= 1"):
        plan(args)


def test_seed_placeholder_gives_each_seed_its_own_value(demo_data, tmp_path):
    """``{seed}`` in a variant's value is the run's seed (a stage-2 sweep continuing each seed's
    own stage-1 run, as bench/growclip.sh does)."""
    import argparse

    from trainer.config import ConfigError
    from trainer.experiments.sweep import plan
    variants = write_variants(tmp_path / "v.yaml", {"seeds": [0, 3], "s2": {"data.manifest": f"{tmp_path}/seed{{seed}}.txt"}})
    args = argparse.Namespace(config=CONFIG, variants=str(variants), out=str(tmp_path / "out"), nproc=1, slurm=False,
                              overrides=data_args(demo_data))
    with pytest.raises(ConfigError, match="seed0.txt"):   # checked at plan time, seed by seed
        plan(args)
    for seed in (0, 3):
        (tmp_path / f"seed{seed}.txt").write_text("x\n")
    runs = plan(args).runs
    assert {r.seed: r.cfg.data.manifest for r in runs} == {0: f"{tmp_path}/seed0.txt", 3: f"{tmp_path}/seed3.txt"}


@pytest.mark.full   # two tiny training runs and a 2-implementation bench train: about a minute
def test_sweep_measures_throughput_in_one_bench_train_and_reuses_it(demo_data, tmp_path):
    """A finished sweep runs ``bench train --variants`` once over its variants; the table's cells are
    its rows, each row's FLOPs those of the measured step (plain CLIP: the closed form), and a rerun
    reuses the stored measurement instead of measuring again."""
    from trainer.config import load_config
    from trainer.flops import clip_step_flops

    variants = write_variants(tmp_path / "v.yaml", {"seeds": [0], "baseline": {}, "lowlr": {"optim.lr": 2.0e-4}})
    out = tmp_path / "out"
    args = sweep_args(variants, out, demo_data, "--throughput-steps", "2", "--throughput-warmup", "1",
                      "--throughput-rounds", "1", throughput=True)
    args[args.index(f"max_steps={STEPS}")] = "max_steps=2"
    check(run_trainer(args))
    measured = json.loads((out / "throughput" / "throughput.json").read_text())
    bench_rows = [json.loads(line) for line in (out / "throughput" / "train_sweep.jsonl").read_text().splitlines()]
    assert measured["rows"] == bench_rows and [r["variant"] for r in bench_rows] == ["baseline", "lowlr"]
    assert "bench train --config trainer/configs/demo.yaml --variants" in measured["command"]
    cfg = load_config(CONFIG, [*data_args(demo_data), *FAST, "max_steps=3"])
    runs = {r["variant"]: r for r in read_rows(out)}
    for r in bench_rows:
        assert (r["steps"], r["warmup"], r["rounds"], r["world"], r["global_batch"]) == (2, 1, 1, 1, 16)
        assert r["samples_per_s"] == pytest.approx(2 * 16 / r["measured_s"], rel=1e-9)
        assert r["params"] == runs[r["variant"]]["params"]
        assert r["flops_per_step"] == pytest.approx(clip_step_flops(cfg, 1), rel=1e-12)
        assert r["flops_per_s"] == pytest.approx(r["flops_per_step"] * r["samples_per_s"] / 16, rel=1e-9)
    assert bench_rows[1]["overrides"] == ["optim.lr=0.0002"]
    header, body = _main_table((out / "table.md").read_text())
    col = {name: i for i, name in enumerate(header)}
    base, low = bench_rows
    assert body["baseline"][col["samples/s"]] == f"{base['samples_per_s']:.1f}"
    assert body["lowlr"][col["samples/s ÷ baseline"]] == f"{low['samples_per_s'] / base['samples_per_s']:.2f}×"
    assert body["lowlr"][col["step ms"]] == f"{low['step_ms']:.0f}"
    stamp = {p: p.stat().st_mtime_ns for p in (out / "throughput").iterdir()}
    text = check(run_trainer(args))
    assert "throughput: measured earlier" in text and "reused" in text
    assert {p: p.stat().st_mtime_ns for p in (out / "throughput").iterdir()} == stamp
