"""Run under torchrun (or plain python for one rank): resume a checkpoint the way the trainer does
(rank 0's plan, the global-batch rule, ``resume_state``) and write, from rank 0, what the engine
holds right after the load: every trainable parameter's full fp32 master and Adam moments, the
learning rate, DeepSpeed's step counters and the trainer's step; and every frozen weight (a
method's teacher, a locked tower), gathered.

    torchrun --nproc_per_node 1 tests/elastic_probe.py OUT.pt CONFIG [key=value ...]

Launched at the world size that wrote the checkpoint it is DeepSpeed's own (rigid) load, the
reference; at another world size it is the elastic path (universal checkpoint). The full
tensors are read with DeepSpeed's ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``
(collectives under ZeRO-3: every rank calls them).
"""
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from harness import build_engine_and_method
from trainer import train as T
from trainer.checkpoint import CheckpointManager, apply_plan
from trainer.config import load_config
from trainer.dist import exit_process, init_distributed, launch_env, shutdown
from trainer.engine import build_ds_config


def main(out: str, config: str, overrides: list[str]) -> int:
    cfg = load_config(config, overrides)
    le = launch_env()
    init_distributed(le, cfg.dist.backend, cfg.dist.timeout_s)
    plan = T.decided_plan(cfg, le.world_size)
    apply_plan(cfg, plan)
    _, engine, method = build_engine_and_method(cfg, le, build_ds_config(cfg, le.world_size))
    ckpt = CheckpointManager(f"{cfg.output_dir}/checkpoints")
    T.seed_rank(cfg.seed, le.rank)
    state = T.resume_state(cfg, ckpt, engine, method, None, plan, le.world_size)
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):   # ZeRO 1/2 link the moments at the first step
        opt._lazy_init_hp_params_optimizer_state()
    rows, frozen = {}, {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:   # a teacher's or a locked tower's weights (no optimizer state)
            with deepspeed.zero.GatheredParameters([p]):
                frozen[name] = p.detach().float().cpu().clone()
            continue
        rows[name] = {"fp32": safe_get_full_fp32_param(p).detach().cpu().clone(),
                      "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu().clone(),
                      "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu().clone()}
    if le.rank == 0:
        torch.save({"params": rows, "frozen": frozen, "lr": engine.get_lr(), "global_steps": engine.global_steps,
                    "step": state["step"], "accum": cfg.train.grad_accum_steps,
                    "world": le.world_size}, out)
    method.close()
    shutdown()
    return 0


if __name__ == "__main__":
    exit_process(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
