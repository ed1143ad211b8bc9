"""Bytes each rank reads of a validation shard when the ranks outnumber the shards.

    .venv/bin/python bench/val_read_bytes.py --out bench/results/val_read_bytes_cpu.md

Writes a shard of ``--samples`` pairs with 224 px noise JPEGs (~33 KB, a web image's size) and
reads it as rank ``r`` of ``world`` does in evaluation (``trainer.data._eval_samples``), counting
the bytes that come through the file (seeks are free). Before the split by seeking, every rank
read the whole shard (fraction 1.00 at every world size) and decoded its share.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer import data as D  # noqa: E402


class _Counting:
    def __init__(self, fh, tally):
        self.fh, self.tally = fh, tally

    def read(self, n=-1):
        data = self.fh.read(n)
        self.tally[0] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def write_shard(path: Path, samples: int) -> None:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tf:
        for i in range(samples):
            buf = io.BytesIO()
            Image.fromarray((rng.random((224, 224, 3)) * 255).astype("uint8")).save(buf, "JPEG", quality=75)
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"a photo {i}".encode()),
                              ("json", json.dumps({"label": i % 10}).encode())):
                info = tarfile.TarInfo(f"val_{i:08d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8, 32])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "val-000000.tar")
        write_shard(Path(url), args.samples)
        size, tally, real_open = os.path.getsize(url), [0], open
        D.open = lambda p, m="r", *a, **k: (_Counting(real_open(p, m, *a, **k), tally) if p == url
                                            else real_open(p, m, *a, **k))
        rows = []
        for world in args.worlds:
            most_bytes = most_samples = 0
            for rank in range(world):
                tally[0] = 0
                n = sum(1 for _ in D._eval_samples([url], rank, world, D._Counter()))
                most_bytes, most_samples = max(most_bytes, tally[0]), max(most_samples, n)
            rows.append(f"| {world} | {most_samples} | {most_bytes:,} | {most_bytes / size:.2f} | 1.00 |")
    text = "\n".join([
        f"# Bytes read per rank of one validation shard ({args.samples} pairs, {size:,} bytes, 224 px JPEGs)", "",
        "`.venv/bin/python bench/val_read_bytes.py --out bench/results/val_read_bytes_cpu.md`", "",
        "| ranks | samples per rank (most) | bytes read per rank (most) | of the shard | before |",
        "|---|---|---|---|---|", *rows, "",
        "A rank reads every member's 512-byte header and its own samples' data, seeking over the rest;",
        "with small images the headers dominate (the demo data's 1.5 KB images: 0.57 of the shard at",
        "2 ranks, 0.36 at 32). A `pipe:` shard cannot seek and is still read through by every rank.", ""])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
