"""Run under ``torchrun --nproc_per_node 2``: GradGuard on DeepSpeed's real reduced gradients, at
every ZeRO stage, against an independent reference (every full gradient, gathered by DeepSpeed's
own ``safe_get_full_grad`` and checked element by element with ``torch.isfinite``).

    torchrun --standalone --nproc_per_node 2 tests/grad_guard_probe.py OUT.json CONFIG.yaml

Three optimizer steps of two micro-batches each, per (stage, precision): clean; poisoned (rank 1
alone writes a NaN into element 0 of the first weight's gradient in its second micro-batch, an
element that only rank 0's partition holds once ZeRO 1-3 reduce it), skipped as the trainer skips
it; clean again (a NaN left in a flat buffer would show here). Writes rank 0's rows as JSON.
"""
import json
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from trainer.config import load_config
from trainer.dist import all_gather_object, all_reduce, exit_process, init_distributed, launch_env, shutdown
from trainer.engine import build_ds_config, build_engine
from trainer.faults import GradGuard, skip_update

CASES = [(0, "fp32"), (0, "bf16"), (1, "bf16"), (2, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16")]


def master(p: torch.nn.Parameter) -> torch.Tensor:
    full = safe_get_full_fp32_param(p)   # ZeRO 1-3 (a collective at ZeRO-3); None at ZeRO-0
    return (p.detach() if full is None else full).float()


def run_case(config: str, stage: int, precision: str, le) -> list[dict]:
    cfg = load_config(config, [f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                               "train.grad_accum_steps=2", "data.batch_size=4"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    engine, _ = build_engine(cfg, model, build_ds_config(cfg, le.world_size))
    first = engine.module[0].weight
    guard, rows = GradGuard(engine), []
    gen = torch.Generator().manual_seed(1 + le.rank)
    dtype = next(engine.module.parameters()).dtype
    for step in range(3):
        for micro in range(2):
            x = torch.randn(4, 8, generator=gen).to(dtype)
            out = engine(x).float().pow(2).mean()
            hook = None
            if step == 1 and micro == 1 and le.rank == 1:
                def poison(g):
                    g = g.clone()
                    g.view(-1)[0] = float("nan")
                    return g
                hook = first.register_hook(poison)
            engine.backward(out)
            if hook is not None:
                hook.remove()
            if micro == 0:
                engine.step()
        local = float(guard.flag())
        agreed = float(all_reduce(guard.flag(), "max"))
        full = [safe_get_full_grad(p) for p in engine.module.parameters()]
        reference = float(any(not torch.isfinite(g).all() for g in full if g is not None))
        locals_ = all_gather_object(local)
        tensors = len(guard.reduced_grads())
        if agreed:
            with skip_update(engine):
                engine.step()
        else:
            engine.step()
        rows.append({"stage": stage, "precision": precision, "step": step, "local": locals_,
                     "agreed": agreed, "reference": reference,
                     "tensors": tensors,
                     "weight_finite": bool(torch.isfinite(master(first)).all())})
    return rows


def main(out: str, config: str) -> None:
    le = launch_env()
    init_distributed(le, "gloo", 120)
    rows = [row for stage, precision in CASES for row in run_case(config, stage, precision, le)]
    if le.rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)   # gloo's threads can abort a finalizing interpreter (trainer.dist.exit_process)
