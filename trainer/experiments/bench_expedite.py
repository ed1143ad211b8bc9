"""Inference speed of an expedited image tower against the same tower at full capacity.

    python -m trainer bench expedite --presets tiny vit-b-16 --batch 64 8 --keep-rates 0.7 0.5 \
        --rounds 5 --out bench/results/expedite_inference_cpu.json

For each preset (shapes from ``trainer.model.PRESETS``; random weights, which do not change the
cost), one tower with EViT installed at the default drop layers runs ``torch.inference_mode``
forwards of the same batch at keep rate 1 (the stock tower) and at each keep rate (EViT, fused
token; and FLIP's random patch dropout at 0.5), interleaved round by round; images/s is the median
over rounds. fp32 on CPU; ``--bf16`` autocasts on a GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..methods import evit
from ..model import PRESETS


def _tower(preset: str, device):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    s = PRESETS[preset]
    cfg = CLIPVisionConfig(image_size=s["image_size"], patch_size=s["patch_size"], hidden_size=s["vision_width"],
                           intermediate_size=4 * s["vision_width"], num_hidden_layers=s["vision_layers"],
                           num_attention_heads=s["vision_heads"])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return CLIPVisionModel(cfg).to(device).eval(), s


def measure(preset: str, batch: int, keep_rates: list[float], rounds: int, device, bf16: bool) -> dict:

    evit_tower, s = _tower(preset, device)
    evit.install(evit_tower, evit.default_drop_layers(s["vision_layers"]))
    flip_tower, _ = _tower(preset, device)
    evit.install(flip_tower, [], mode="random")
    x = torch.randn(batch, 3, s["image_size"], s["image_size"], device=device)
    cases = {"full": (evit_tower, 1.0), **{f"evit@{k}": (evit_tower, k) for k in keep_rates},
             "flip@0.5": (flip_tower, 0.5)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)
    with torch.inference_mode(), autocast:
        for name, (tower, k) in cases.items():      # warm-up
            evit.set_keep_rate(tower, k)
            tower(pixel_values=x)
        for r in range(rounds):
            for name, (tower, k) in (cases.items() if r % 2 == 0 else reversed(cases.items())):
                evit.set_keep_rate(tower, k)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                tower(pixel_values=x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    ips = {name: batch / statistics.median(t) for name, t in times.items()}
    return {"preset": preset, "batch": batch, "rounds": rounds, "drop_layers": evit.default_drop_layers(s["vision_layers"]),
            "images_per_s": ips, "speedup_vs_full": {n: v / ips["full"] for n, v in ips.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer bench expedite", description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "vit-b-16"])
    p.add_argument("--batch", nargs="+", type=int, default=[64, 8], help="one per preset")
    p.add_argument("--keep-rates", nargs="+", type=float, default=[0.7, 0.5])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [measure(pr, b, args.keep_rates, args.rounds, device, args.bf16)
            for pr, b in zip(args.presets, args.batch)]
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": "python -m trainer bench expedite " + " ".join(sys.argv[1:] if argv is None else argv)}
    for r in rows:
        print(f"{r['preset']} batch {r['batch']}: " + ", ".join(
            f"{n} {v:.1f} img/s ({r['speedup_vs_full'][n]:.2f}x)" for n, v in r["images_per_s"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
