"""kernels.bench runs on CPU and writes long-format rows (the GPU rows come from a GPU session)."""
import csv
import json

from kernels.bench import main


def test_bench_writes_long_format_rows(tmp_path, capsys):
    assert main(["--b", "48", "--dim", "16", "--impls", "torch,chunked,triton", "--reps", "2",
                 "--warmup", "1", "--out", str(tmp_path), "--tag", "t"]) == 0
    (csv_path,) = tmp_path.glob("t_cpu_fp32_*.csv")
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["impl"] for r in rows] == ["torch_gemm", "torch", "chunked", "triton"]
    for r in rows[1:3]:
        assert r["status"] == "ok"
        assert float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"])
        assert int(r["peak_mem_bytes"]) > 0
        assert r["device"].startswith("cpu") and r["commit"] and r["date"] and r["command"]
        assert (r["b"], r["n"], r["dim"], r["dtype"]) == ("48", "48", "16", "fp32")
    assert rows[3]["status"].startswith("skipped")          # no CUDA here: said, not faked
    lines = [json.loads(l) for l in open(csv_path.with_suffix(".jsonl"))]
    assert len(lines) == 4 and lines[1]["impl"] == "torch"
