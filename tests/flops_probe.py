"""Count the FLOPs of real training steps with ``torch.utils.flop_counter.FlopCounterMode``.

    python tests/flops_probe.py OUT.json CASES.json

CASES.json is a list of ``{"name", "config", "overrides": [...], "step": S, "round": bool, "out": DIR}``
(the run's output directory is ``DIR/<name>``). For
each case, in one process on one rank (gloo): the model with its methods attached, the DeepSpeed
engine and the method, then one ``train.train_step`` at optimizer step ``S`` (forward, loss,
backward, optimizer step; teachers forward under no_grad) counted by FlopCounterMode; with
``round``, ECL's round due after step ``S - 1`` (``method.between_steps``) is counted instead.
Writes ``{name: {"counted": FLOPs, "by_op": {op: FLOPs}}}``.

FlopCounterMode has no formula for the CPU flash-attention kernel that SDPA runs on a CPU (it
has them for the CUDA kernels). The ones registered here count what eager attention's matmuls
count: the forward as torch's ``sdpa_flop_count`` (scores and weighted sum), the backward as
twice that (the gradients' products). torch's ``sdpa_backward_flop_count`` for the CUDA flash
kernels adds the recomputed scores (2.5 x the forward), a kernel's choice that the analytic
count (trainer/flops.py) leaves out, as it leaves out activation checkpointing's recompute.
"""
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from harness import build_engine_and_method, build_stream, fresh_state
from trainer import train as T
from trainer.config import load_config
from trainer.dist import exit_process, init_distributed, launch_env, shutdown
from trainer.faults import GradGuard, NanInjector

aten = torch.ops.aten


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


def count(case: dict, started: list) -> dict:
    cfg = load_config(case["config"], [*case["overrides"], f"output_dir={Path(case['out']) / case['name']}"])
    le = launch_env()
    if not started:
        init_distributed(le, cfg.dist.backend, cfg.dist.timeout_s)
        started.append(True)
    tokenizer, engine, method = build_engine_and_method(cfg, le)
    data, terms = build_stream(cfg, tokenizer, le)
    state = fresh_state()
    args = (engine, data.next, terms, cfg, case["step"], state, GradGuard(engine),
            NanInjector([], "loss", le.rank, []), lambda: 0.0, method)
    counter = FlopCounterMode(display=False)
    try:
        if case.get("round"):
            with counter:
                assert method.between_steps(case["step"] - 1, engine, tokenizer, lambda *a: None) is not None
        else:
            with counter:
                T.train_step(*args)
    finally:
        data.close()
        method.close()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return {"counted": int(counter.get_total_flops()), "by_op": by_op}


def main(out: str, cases: str) -> None:
    started: list = []
    result = {case["name"]: count(case, started) for case in json.loads(Path(cases).read_text())}
    Path(out).write_text(json.dumps(result, indent=1))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)   # gloo's threads can abort a finalizing interpreter (trainer.dist.exit_process)
