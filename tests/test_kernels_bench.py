"""kernels.bench runs on CPU and writes long-format rows (the GPU rows come from a GPU session).

Timing is checked against a clock the test controls (a fake ``perf_counter`` and loss functions
that "take" a known time per call), so every number in a row has a closed-form expected value;
the scaling plot is checked for what it must show (axes, one series per impl, the plotted points).
"""
import csv
import json

import numpy as np
import pytest

import kernels.bench as KB
from conftest import capture_figures

TICK_MS = 0.5                                # every perf_counter() call moves the fake clock on by this
COST_MS = {"torch": 3.0, "chunked": 2.0}     # + this per forward+backward, rising by 10 % per call


def test_bench_rows_hold_the_measured_times_and_their_closed_form_statistics(tmp_path, monkeypatch):
    clock = {"now": 0.0}
    calls = {impl: 0 for impl in COST_MS}

    class FakeTime:
        @staticmethod
        def perf_counter():
            now = clock["now"]
            clock["now"] += TICK_MS * 1e-3
            return now

    real_loss_fn = KB._loss_fn

    def timed_loss_fn(impl, *args):
        fn = real_loss_fn(impl, *args)
        if impl not in COST_MS or fn is None:
            return fn

        def costly(*a):
            calls[impl] += 1
            clock["now"] += COST_MS[impl] * (1 + 0.1 * calls[impl]) * 1e-3
            return fn(*a)
        return costly

    monkeypatch.setattr(KB, "time", FakeTime)
    monkeypatch.setattr(KB, "_loss_fn", timed_loss_fn)
    reps, warmup, b, dim = 5, 2, 48, 16
    assert KB.main(["--b", str(b), "--dim", str(dim), "--impls", "torch,chunked,triton", "--reps", str(reps),
                    "--warmup", str(warmup), "--out", str(tmp_path), "--tag", "t"]) == 0
    (csv_path,) = tmp_path.glob("t_cpu_fp32_*.csv")
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["impl"] for r in rows] == ["torch_gemm", "torch", "chunked", "triton"]
    # The GEMM row: only the clock's own tick between the two reads of each rep.
    gemm = rows[0]
    for q in ("ms_p20", "ms_p50", "ms_p80"):
        assert float(gemm[q]) == pytest.approx(TICK_MS, rel=1e-9)
    assert float(gemm["tflops"]) == pytest.approx(2 * b * b * dim / (TICK_MS * 1e-3) / 1e12, rel=1e-9)
    for r in rows[1:3]:
        impl = r["impl"]
        assert r["status"] == "ok"
        # on CPU the peak is taken in a fresh process, so the calls here are the warm-ups, then the reps
        timed = [TICK_MS + COST_MS[impl] * (1 + 0.1 * k) for k in range(warmup + 1, warmup + reps + 1)]
        want = {"ms_p20": np.percentile(timed, 20), "ms_p50": np.percentile(timed, 50),
                "ms_p80": np.percentile(timed, 80)}
        for q, v in want.items():
            assert float(r[q]) == pytest.approx(v, rel=1e-9), (impl, q)
        tflops = 8 * b * b * dim / (want["ms_p50"] * 1e-3) / 1e12
        assert float(r["tflops"]) == pytest.approx(tflops, rel=1e-9)
        assert float(r["vs_gemm"]) == pytest.approx(tflops / float(gemm["tflops"]), rel=1e-9)
        assert r["device"].startswith("cpu") and r["commit"] and r["date"]
        assert r["command"] == ("python -m kernels.bench --b 48 --dim 16 --impls torch,chunked,triton --reps 5 "
                                "--warmup 2 --out " + str(tmp_path) + " --tag t")
        assert (r["b"], r["n"], r["dim"], r["dtype"]) == ("48", "48", "16", "fp32")
    assert calls == {"torch": warmup + reps, "chunked": warmup + reps}
    # The materialised reference holds the 48 x 48 fp32 logits (and their gradient) at its peak.
    assert int(rows[1]["peak_mem_bytes"]) >= 2 * b * b * 4
    assert rows[3]["status"] == "skipped: triton needs a CUDA device"   # said, not faked
    lines = [json.loads(l) for l in open(csv_path.with_suffix(".jsonl"))]
    assert [l["impl"] for l in lines] == [r["impl"] for r in rows]
    assert lines[1]["ms_p50"] == pytest.approx(float(rows[1]["ms_p50"]), rel=1e-12)


def test_scaling_plot_shows_time_and_memory_per_impl_against_n(tmp_path, monkeypatch):
    """Both panels: log2 N on x, one labelled series per impl holding exactly the rows' points
    (time in ms, memory in MiB); rows that did not run are left out."""
    from kernels.bench import plot_scaling

    rows = [{"impl": impl, "n": n, "dim": 512, "status": "ok", "ms_p50": n * k,
             "peak_mem_bytes": (n * n * 4 if impl == "torch" else n * 2048)}
            for impl, k in (("torch", 1.0), ("chunked", 0.7)) for n in (4096, 1024, 2048)]
    rows.append({"impl": "triton", "n": 1024, "dim": 512, "status": "skipped: no CUDA"})
    figures = capture_figures(monkeypatch)
    path = plot_scaling(rows, tmp_path / "scaling.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ((fig, saved),) = figures
    assert saved == path
    ax_t, ax_m = fig.axes
    for ax, unit in ((ax_t, "ms"), (ax_m, "MiB")):
        assert ax.get_xlabel() == "global batch N" and ax.get_ylabel() == unit
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and "D=512" in ax.get_title()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["torch", "chunked"]
    for impl, k in (("torch", 1.0), ("chunked", 0.7)):
        (line_t,) = [l for l in ax_t.get_lines() if l.get_label() == impl]
        (line_m,) = [l for l in ax_m.get_lines() if l.get_label() == impl]
        assert list(line_t.get_xdata()) == [1024, 2048, 4096]
        assert list(line_t.get_ydata()) == pytest.approx([n * k for n in (1024, 2048, 4096)])
        mib = [(n * n * 4 if impl == "torch" else n * 2048) / 2**20 for n in (1024, 2048, 4096)]
        assert list(line_m.get_ydata()) == pytest.approx(mib)


def test_fixed_tiles_parse_and_add_a_row_each(tmp_path):
    """--tiles: each tile a row ``triton@TILE`` (skipped with the reason on a CPU, as the tuned
    row is); a malformed tile is refused by argparse, naming the form."""
    from kernels.triton_launch import TileConfig

    assert KB.parse_tile("128x128x64:8:3") == TileConfig(128, 128, 64, 8, 3)
    assert KB.parse_tile("64x32x16:4") == TileConfig(64, 32, 16, 4, 3)
    assert KB.tile_name(KB.parse_tile("128x64x32")) == "128x64x32:8:3"
    with pytest.raises(ValueError, match=r"BMxBNxBK\[:WARPS\[:STAGES\]\].*'128x128'"):
        KB.parse_tile("128x128")
    with pytest.raises(SystemExit) as e:
        KB._args(["--tiles", "128x128x64,big"])
    assert e.value.code == 2
    assert KB.main(["--b", "8", "--dim", "8", "--impls", "triton", "--tiles", "128x128x64:8:3,64x64x64",
                    "--reps", "1", "--warmup", "0", "--out", str(tmp_path), "--tag", "t"]) == 0
    (jsonl,) = tmp_path.glob("t_cpu_fp32_*.jsonl")
    rows = [json.loads(l) for l in open(jsonl)]
    assert [r["impl"] for r in rows] == ["torch_gemm", "triton", "triton@128x128x64:8:3", "triton@64x64x64:8:3"]
    assert all(r["status"] == "skipped: triton needs a CUDA device" for r in rows[1:])
