"""Run as a child process: train steps in fp16 with DeepSpeed's dynamic loss scaling starting far
too high, so the first steps overflow as fp16 runs do at their start, and record what the trainer
counted.

    python tests/fp16_probe.py OUT.json STAGE INITIAL_SCALE_POWER MIN_LOSS_SCALE STEPS [key=value ...]

DeepSpeed's CPU accelerator reports fp16 as unsupported (oneDNN has no fp16 kernels here), so the
CLI refuses ``precision=fp16`` on CPU; torch's CPU half kernels compute it all the same, slowly.
The probe says fp16 is supported and drives the trainer's own ``train_step`` through DeepSpeed's
real fp16 optimizers (FP16_UnfusedOptimizer at ZeRO-0, the ZeRO optimizers' DynamicLossScaler),
so the overflow path is DeepSpeed's, not a stand-in.
"""
import json
import sys
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param

from harness import build_engine_and_method, build_stream, fresh_state
from trainer import train as T
from trainer.config import load_config
from trainer.dist import exit_process, init_distributed, launch_env, shutdown
from trainer.engine import build_ds_config
from trainer.faults import GradGuard, NanInjector, fp16_loss_scale

get_accelerator().is_fp16_supported = lambda: True


def main(out: str, stage: str, scale_power: str, min_scale: str, steps: str, *overrides: str) -> None:
    cfg = load_config("trainer/configs/demo.yaml", ["deepspeed.precision=fp16", f"deepspeed.zero_stage={stage}",
                                                    f"max_steps={steps}", *overrides])
    le = launch_env()
    init_distributed(le, cfg.dist.backend, cfg.dist.timeout_s)
    ds = build_ds_config(cfg, le.world_size)
    ds["fp16"].update(initial_scale_power=int(scale_power), min_loss_scale=float(min_scale), hysteresis=1)
    tokenizer, engine, method = build_engine_and_method(cfg, le, ds)
    data, terms = build_stream(cfg, tokenizer, le)
    guard = GradGuard(engine)
    state = fresh_state()
    probe = engine.module.text_projection.weight

    def master() -> torch.Tensor:   # ZeRO-0's fp16 optimizer has no per-parameter master to ask for
        full = safe_get_full_fp32_param(probe)
        return (probe.data if full is None else full).detach().float().clone()

    rows, stopped = [], None
    before = master()
    for step in range(1, cfg.max_steps + 1):
        scale_before = fp16_loss_scale(engine)[0]
        try:
            metrics, _, _ = T.train_step(engine, data.next, terms, cfg, step, state, guard,
                                         NanInjector([], "loss", le.rank, []), lambda: 0.0, method)
        except T.TooManyBadSteps as err:
            stopped = str(err)
            break
        after = master()
        rows.append({"step": step, "loss": float(metrics["loss"]), "scale_before": scale_before,
                     "scale_after": fp16_loss_scale(engine)[0], "moved": float((after - before).abs().max()),
                     "bad_total": state["bad_total"], "fp16_overflows": state.get("fp16_overflows", 0)})
        before = after
    data.close()
    if le.rank == 0:
        Path(out).write_text(json.dumps({"rows": rows, "stopped": stopped, "bad_total": state["bad_total"],
                                         "fp16_overflows": state.get("fp16_overflows", 0),
                                         "scale": fp16_loss_scale(engine)}, indent=1))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)   # gloo's threads can abort a finalizing interpreter (trainer.dist.exit_process)
