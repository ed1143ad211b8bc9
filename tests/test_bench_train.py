"""``python -m trainer bench train`` end to end: open_clip's step, the bare loop and ours on 2 CPU
ranks, a few steps of the tiny preset on the session's demo data set.

One benchmark run (2 warm-up + 6 timed steps, 16 pairs per rank) is shared by the tests that read
its rows; a short ``--profile timers`` run checks that each suspected overhead is booked where it
happens, and bad arguments are refused before any rank starts.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from conftest import capture_figures, check, run_trainer

CONFIG = "trainer/configs/demo.yaml"
STEPS, WARMUP, BATCH, WORLD = 6, 2, 16, 2
# A gentle lr: the loss falls from the initial logit scale's over-confident start without the
# spike a 2e-3 peak gives in the first steps.
FAST = [f"data.batch_size={BATCH}", "data.workers=1", "data.shuffle_buffer=64", "optim.warmup_steps=3",
        "optim.lr=5e-4", "model.context_length=24"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def data_args(data: Path) -> list[str]:
    return [f"data.train_shards={data}/train", f"tokenizer.path={data}/tokenizer", "data.val_shards=null"]


def bench_args(out: Path, data: Path, *extra: str, steps: int = STEPS, warmup: int = WARMUP) -> list[str]:
    return ["bench", "train", "--config", CONFIG, "--steps", str(steps), "--warmup", str(warmup), "--nproc",
            str(WORLD), "--out", str(out), "--tag", "t", *extra, *data_args(data), *FAST]


def read_rows(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["impl"]: r for r in rows}


@pytest.fixture(scope="module")
def bench(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_train")
    text = check(run_trainer(bench_args(out, demo_data), timeout=300))
    return {"out": out, "rows": read_rows(out / "train_t.jsonl"), "log": text, "data": demo_data}


@pytest.mark.full   # the shared 3-implementation benchmark run; the fast tier's bench smoke is the --profile test
def test_every_implementation_runs_and_learns(bench):
    rows = bench["rows"]
    assert list(rows) == ["openclip", "bare", "ours"]
    for impl, r in rows.items():
        losses = r["losses"]
        assert len(losses) == WARMUP + STEPS, impl
        assert r["loss_first"] == losses[0] and r["loss_last"] == losses[-1]
        assert statistics.mean(losses[-3:]) < statistics.mean(losses[:3]) - 0.05, (impl, losses)
        assert r["loss_last"] < r["loss_first"], (impl, losses)
        for key in ("device", "date", "command", "commit", "peak_mem_mb"):
            assert r[key], (impl, key)
        assert r["peak_mem_mb"] > 0 and len(r["peak_mem_mb_per_rank"]) == WORLD


@pytest.mark.full   # the shared 3-implementation benchmark run; the fast tier's bench smoke is the --profile test
def test_measured_window_lies_inside_the_run_the_launcher_timed(bench):
    """Against clocks the benchmark does not own: the parent's wall time of each torchrun launch
    (``wall_s``, start-up included) bounds the timed window, so samples/s can only be higher than
    steps x global batch over that wall time; the phases are booked inside the timed window (a
    generous 1.25x covers the ranks' barrier skew on a loaded machine)."""
    for impl, r in bench["rows"].items():
        assert (r["world"], r["global_batch"], r["steps"]) == (WORLD, BATCH * WORLD, STEPS)
        assert 0 < r["measured_s"] < r["wall_s"], impl
        assert r["samples_per_s"] > STEPS * BATCH * WORLD / r["wall_s"], impl
        split = sum(r[f"{p}_ms"] for p in ("data", "forward", "backward", "optimizer", "other"))
        assert split <= 1.25 * 1e3 * r["measured_s"] / STEPS, impl
        assert min(r[f"{p}_ms"] for p in ("forward", "backward", "optimizer")) > 0, impl


@pytest.mark.full   # the shared 3-implementation benchmark run; the fast tier's bench smoke is the --profile test
def test_openclip_model_has_our_parameter_count(bench):
    from trainer.experiments.openclip_step import build_openclip_model
    from trainer.config import load_config
    from trainer.data import load_tokenizer
    from trainer.model import build_model, preset_shape

    data = bench["data"]
    cfg = load_config(CONFIG, data_args(data) + FAST)
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    ours = sum(p.numel() for p in build_model(cfg.model, tokenizer, 0).parameters())
    theirs = sum(p.numel() for p in build_openclip_model(preset_shape(cfg.model), tokenizer).parameters())
    assert theirs == ours
    assert {r["params"] for r in bench["rows"].values()} == {ours}


@pytest.mark.full   # the shared 3-implementation benchmark run; the fast tier's bench smoke is the --profile test
def test_bare_loop_is_our_step_without_the_engine(bench):
    """Same weights, data, loss, AdamW, schedule and clip in fp32: the bare loop's losses are ours."""
    rows = bench["rows"]
    assert rows["bare"]["losses"] == pytest.approx(rows["ours"]["losses"], rel=1e-4)
    assert rows["openclip"]["losses"][0] != pytest.approx(rows["ours"]["losses"][0], rel=1e-4)  # its own init


@pytest.mark.full   # the shared 3-implementation benchmark run; the fast tier's bench smoke is the --profile test
def test_markdown_table_and_plot(bench):
    out, rows = bench["out"], bench["rows"]
    md = (out / "train_t.md").read_text()
    for impl, r in rows.items():
        assert f"| {impl} | {r['samples_per_s']:.1f} | {r['step_ms']:.1f} |" in md
    for other in ("openclip", "bare"):
        ratio = rows["ours"]["samples_per_s"] / rows[other]["samples_per_s"]
        assert f"ours / {other}: **{ratio:.2f}x** samples/s" in md
    assert "load average" in md and rows["ours"]["command"] in md
    assert (out / "train_t.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "](train_t.png)" in md


@pytest.mark.full   # the shared 3-implementation benchmark run; the fast tier's bench smoke is the --profile test
def test_plot_shows_each_implementations_throughput_and_phase_split(bench, tmp_path, monkeypatch):
    """The plot drawn from the rows (in process, the same function the run used): one bar per
    implementation at its samples/s, and stacked phase bars labelled with the phase names whose
    heights are the rows' per-phase ms."""
    from trainer.experiments.bare_loop import PHASES
    from trainer.experiments.bench_report import plot as _plot

    rows = list(bench["rows"].values())
    figures = capture_figures(monkeypatch)
    _plot(rows, tmp_path / "p.png", "t")
    ((fig, _),) = figures
    ax1, ax2 = fig.axes
    names = [r["impl"] for r in rows]
    assert [t.get_text() for t in ax1.get_xticklabels()] == names
    assert ax1.get_ylabel() == "samples/s (global)"
    assert [p.get_height() for p in ax1.patches] == pytest.approx([r["samples_per_s"] for r in rows])
    assert [t.get_text() for t in ax2.get_legend().get_texts()] == list(PHASES)
    assert ax2.get_ylabel().startswith("ms per step")
    heights = [p.get_height() for p in ax2.patches]        # phase by phase, one bar per impl
    assert heights == pytest.approx([r[f"{ph}_ms"] for ph in PHASES for r in rows])
    assert f"{rows[0]['world']} ranks" in fig._suptitle.get_text()


@pytest.mark.full   # a profiled bench run; the fast tier runs bench train itself
def test_profile_timers_book_each_suspect_where_it_happens(demo_data, tmp_path):
    """ours: no finite-loss check per micro-batch, one boundary flag all-reduce per step (the loss
    flags of its 2 micro-batches ride along), one gradient check per step (GradGuard, on the reduced
    partitions at the boundary, whatever the number of parameters and micro-batches); the
    bare loop has none of them; both call gathered_layout once per loss. The host-sync count books
    each tensor read by the host to its caller: ours reads once per step at the boundary, and the
    window metrics at log steps."""
    check(run_trainer(bench_args(tmp_path, demo_data, "--impls", "bare,ours", "--profile", "timers",
                                 "train.grad_accum_steps=2", steps=2, warmup=1), timeout=300))
    rows = read_rows(tmp_path / "train_t.jsonl")
    ours, bare = rows["ours"]["suspects"], rows["bare"]["suspects"]
    for key in ("finite_item", "finite_flag"):
        assert ours[key]["calls_per_step"] == 0, key
    assert ours["guard_flag"]["calls_per_step"] == 1
    assert ours["layout"]["calls_per_step"] == 2 and bare["layout"]["calls_per_step"] == 2   # one per micro-batch
    assert ours["guard_check"]["calls_per_step"] == 1   # was 2 x 142: a hook per parameter tensor and micro-batch
    assert all(bare[k]["calls_per_step"] == 0 for k in bare if k not in ("layout", "flag_latency_ms"))
    assert ours["flag_latency_ms"] > 0
    syncs = rows["ours"]["host_syncs"]["by_caller"]
    trainer = {k: v for k, v in syncs.items() if k.startswith("trainer/")}
    # the boundary's flags once per step, whatever the accumulation; the window metrics only at log
    # steps (here the last step alone, max_steps = 3: once in the two timed steps)
    assert trainer == {"trainer/train.py:train_step tolist": 1.0, "trainer/train.py:_window_metrics tolist": 0.5,
                       "trainer/train.py:_logit_scale __float__": 0.5}, syncs
    md = (tmp_path / "train_t.md").read_text()
    assert "Suspected overheads" in md and "Host syncs per step" in md


def test_bad_arguments_exit_2_before_any_rank(demo_data, tmp_path):
    proc = run_trainer(bench_args(tmp_path, demo_data, "--impls", "ours,nope"), timeout=120)
    assert proc.returncode == 2 and "error: --impls" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())
    # the other checks in-process (the real process above shows a ConfigError becomes exit 2)
    from trainer.config import ConfigError
    from trainer.experiments.bench_train import main
    with pytest.raises(ConfigError, match="--rounds must be >= 1"):
        main(bench_args(tmp_path, demo_data, "--rounds", "0")[2:])
    with pytest.raises(ConfigError, match="model.nope"):
        main(bench_args(tmp_path, demo_data, "model.nope=1")[2:])
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="--variants and --impls exclude each other"):
        main(["--variants", str(tmp_path / "v.yaml"), "--impls", "ours"])
    with pytest.raises(ConfigError, match="variants file not found"):
        main(["--variants", str(tmp_path / "v.yaml")])


def test_with_rounds_a_row_is_the_median_round():
    """--rounds N: each impl's row is its median round by samples/s, with every round's value kept."""
    from trainer.experiments.bare_loop import PHASES
    from trainer.experiments.bench_report import summary_row as _row

    def result(measured_s, rnd):
        return {"impl": "ours", "steps": 10, "global_batch": 128, "measured_s": measured_s, "round": rnd,
                "phase_ms": dict.fromkeys(PHASES, 1.0), "peak_mem_mb_per_rank": [1.0, 2.0], "losses": [5.0, 4.0],
                "loadavg_before": f"{rnd}.00"}
    meta = {"date": "d", "commit": "c", "tag": "t", "command": "x"}
    row = _row([result(4.0, 1), result(2.0, 2), result(8.0, 3)], meta)
    assert row["round"] == 1 and row["rounds"] == 3
    assert row["samples_per_s"] == pytest.approx(10 * 128 / 4.0)
    assert row["samples_per_s_rounds"] == pytest.approx([320.0, 640.0, 160.0])
    assert row["loadavg_rounds"] == ["1.00", "2.00", "3.00"] and row["peak_mem_mb"] == 2.0


def test_eclipse_run_holds_the_mean_keep_rate_of_the_configs_own_run():
    """``--impls eclipse-run`` trains the student at the keep rate the config's run averages over
    its own ``max_steps`` (EViT's window: 1 for the warm-up, the cosine, then the target), not
    over the benchmark's few steps (which would be all warm-up: keep rate 1)."""
    import argparse

    from trainer.experiments.bench_train import _impl_overrides

    args = argparse.Namespace(config="trainer/configs/demo.yaml", overrides=["max_steps=100", "optim.warmup_steps=10"])
    # warm-up 10 steps at 1, a 33-step cosine from 1 to 0.7 (its mean: 0.85), then 57 steps at 0.7
    want = (10 * 1.0 + sum(0.7 + 0.3 * 0.5 * (1 + math.cos(math.pi * min(1.0, i / 33))) for i in range(1, 34))
            + 57 * 0.7) / 100
    schedule, rate = _impl_overrides("eclipse-run", args)
    assert schedule == "eclipse.keep_schedule=constant"
    assert float(rate.split("=")[1]) == pytest.approx(want, rel=1e-12)
    assert _impl_overrides("eclipse", args) == [] and _impl_overrides("ours", args) == []
    # A sweep variant (--variants) with ECLIPSE on is held the same way (trainer.methods.steady_overrides);
    # one with ECL has its round moved past the benchmark's steps (the scoring pass runs between steps).
    from trainer.experiments.bench_train import _variant_overrides

    args.steps, args.warmup = 20, 5
    assert _variant_overrides(args, ["eclipse.enabled=true"]) == [schedule, rate]
    assert _variant_overrides(args, ["select.enabled=true", "select.every_steps=10"]) == ["select.every_steps=25"]
    assert _variant_overrides(args, []) == []
