"""Run under torchrun: train a few steps with a teacher (ECLIPSE's, or PSD's own) and record, at
every step, the weights the teacher's forward *actually uses* against the closed-form teacher.

    torchrun --nproc_per_node 2 tests/teacher_probe.py OUT.json CONFIG [--save-at=N] [key=value ...]

The closed form is computed here from the student's full fp32 masters after every optimizer step:
``theta_bar_t = m theta_bar_{t-1} + (1 - m) theta_t`` from ``theta_bar_0 = theta_0`` (ECLIPSE, PSD
momentum), or the snapshot taken at the last refresh (PSD previous), in float64. The masters are
read with DeepSpeed's ``safe_get_full_fp32_param`` (ZeRO-1/2/3, the bf16 optimizer); under ZeRO-0
in fp16, where that has none, from the FP16 optimizer's own fp32 copies (unflattened with
DeepSpeed's helper). Forward pre-hooks, registered after DeepSpeed's own (so ZeRO-3 has gathered
the submodule's parameters), copy what each teacher submodule computes with. No checkpoint is
written unless ``--save-at=N``: a save re-gathers parameters and would hide a stale copy.

``--save-at=N`` writes a checkpoint after step N (as the trainer does) with the closed form next to
it, and exits: the same command without it then resumes in fresh processes (the trainer's own
``resume_state``), and its rows start at step N + 1, the first step after the resume.

Each row: ``max_abs`` (|used - closed form|, the worst parameter), ``max_ulps`` (the same in units
of the teacher dtype's spacing at the closed form's value), ``mismatch`` (the fraction of elements
where the used weight is not the closed form rounded to the teacher's dtype), ``shadow_max_abs``
(rank 0's fp32 EMA shadows against the closed form: the EMA itself, before any rounding).

fp16 on a CPU: DeepSpeed's CPU accelerator declares no fp16 support and refuses the engine; the
probe lifts that check (the optimizer and the casts run fine on CPU). ``TEACHER_PROBE_FUSED=1``
makes the engine take torch's AdamW for a fused Adam, so ZeRO-0 fp16 uses ``FP16_Optimizer`` (flat
fp32 masters, as with FusedAdam on a GPU) instead of ``FP16_UnfusedOptimizer``.
"""
import json
import os
import sys
from pathlib import Path

import deepspeed.runtime.engine as ds_engine
import torch
import yaml
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param
from torch._utils import _unflatten_dense_tensors

from harness import build_engine_and_method, build_stream
from trainer import methods
from trainer import train as T
from trainer.checkpoint import CheckpointManager
from trainer.config import load_config, to_dict
from trainer.dist import exit_process, init_distributed, launch_env, shutdown
from trainer.faults import GradGuard, NanInjector
from trainer.methods.ema import ShadowTeacher

MANTISSA = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


def optimizer_masters(optimizer) -> dict[int, torch.Tensor]:
    """ZeRO-0 fp16: id(module weight) -> its fp32 master, as DeepSpeed's FP16 optimizers hold them."""
    out = {}
    for i, group in enumerate(optimizer.fp16_groups):
        if hasattr(optimizer, "fp32_groups_flat"):
            fp32 = _unflatten_dense_tensors(optimizer.fp32_groups_flat[i], group)
        else:
            fp32 = optimizer.fp32_groups[i]
        out.update({id(p): q for p, q in zip(group, fp32)})
    return out


def spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The distance between neighbouring ``dtype`` values at ``x`` (normal range)."""
    _, e = torch.frexp(x)
    floor = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return torch.clamp(torch.ldexp(torch.ones_like(x), e - MANTISSA[dtype]), min=floor)


def main(out: str, config: str, *args: str) -> None:
    save_at = next((int(a.split("=", 1)[1]) for a in args if a.startswith("--save-at=")), None)
    overrides = [a for a in args if not a.startswith("--")]
    cfg = load_config(config, overrides)
    if cfg.deepspeed.precision == "fp16" and not get_accelerator().is_fp16_supported():
        get_accelerator().is_fp16_supported = lambda: True
    if os.environ.get("TEACHER_PROBE_FUSED") == "1":
        ds_engine.FusedAdam = torch.optim.AdamW
    le = launch_env()
    init_distributed(le, cfg.dist.backend, cfg.dist.timeout_s)
    tokenizer, engine, method = build_engine_and_method(cfg, le)
    prefix = "teacher." if cfg.eclipse.enabled else "psd_teacher."
    module = engine.module
    teacher_root = module.get_submodule(prefix[:-1])
    shadow_teacher = next(m.teacher for m in getattr(method, "methods", [method])
                          if isinstance(getattr(m, "teacher", None), ShadowTeacher))

    seen: dict[str, torch.Tensor] = {}

    def record(sub_name):
        def hook(mod, _inputs):
            for n, p in mod.named_parameters(recurse=False):
                seen[f"{sub_name}.{n}" if sub_name else n] = p.data.detach().clone()
        return hook
    for sub_name, sub in teacher_root.named_modules():
        if any(True for _ in sub.parameters(recurse=False)):
            sub.register_forward_pre_hook(record(sub_name))

    names = [n[len(prefix):] for n, _ in module.named_parameters() if n.startswith(prefix)]

    def masters() -> dict[str, torch.Tensor]:
        got = {n: safe_get_full_fp32_param(module.get_parameter(n)) for n in names}
        if any(v is None for v in got.values()):   # ZeRO-0 fp16: not linked to the weights
            fp32 = optimizer_masters(engine.optimizer)
            got = {n: fp32[id(module.get_parameter(n))] for n in names}
        return {n: v.detach().double().cpu().clone() for n, v in got.items()}

    if cfg.eclipse.enabled:
        m_at = lambda step: methods.eclipse.momentum_at(cfg, step)   # noqa: E731
    elif cfg.psd.teacher == "momentum":
        m_at = lambda step: cfg.psd.momentum   # noqa: E731
    else:   # previous: a copy at every refresh, frozen between
        every = methods.psd.refresh_every(cfg, le.world_size)
        m_at = lambda step: 0.0 if step % every == 0 else 1.0   # noqa: E731
    ckpt = CheckpointManager(Path(cfg.output_dir) / "checkpoints", cfg.checkpoint.keep_last)
    closed_form = Path(cfg.output_dir) / "probe_closed_form.pt"
    state = T.resume_state(cfg, ckpt, engine, method, None, T.decided_plan(cfg, le.world_size))
    expected = torch.load(closed_form) if state["step"] else masters()
    data, terms = build_stream(cfg, tokenizer, le, state["data"])
    guard = GradGuard(engine)
    inject = NanInjector([], "loss", le.rank, [])
    rows = []
    for step in range(state["step"] + 1, cfg.max_steps + 1):
        seen.clear()
        T.train_step(engine, data.next, terms, cfg, step, state, guard, inject, lambda: 0.0, method)
        state["step"] = step
        # what the forward of this step used vs the teacher after the previous step
        row = {"step": step, "params_seen": len(seen), "params": len(expected), "max_abs": 0.0, "max_ulps": 0.0,
               "mismatch": 0.0, "elements": 0, "dtype": str(next(iter(seen.values())).dtype),
               "optimizer": type(engine.optimizer).__name__}
        mismatched = 0
        for k, used in seen.items():
            want = expected[k].flatten()
            err = (used.double().cpu().flatten() - want).abs()
            if float(err.max()) >= row["max_abs"]:
                row["max_abs"], row["worst"] = float(err.max()), k
            row["max_ulps"] = max(row["max_ulps"], float((err / spacing(want, used.dtype)).max()))
            mismatched += int((used.cpu().flatten() != want.to(used.dtype)).sum())
            row["elements"] += want.numel()
        row["mismatch"] = mismatched / row["elements"]
        m = m_at(step)
        now = masters()
        expected = {k: m * expected[k] + (1 - m) * now[k] for k in expected}
        # after this step's update: the EMA itself (fp32), before any rounding to the teacher's dtype
        row["shadow_max_abs"] = max(
            float((s.shadow.double().cpu() - expected[s.name[len(prefix):]].flatten()[s.start: s.start + s.n])
                  .abs().max()) for s in shadow_teacher.slots if s.n)
        rows.append(row)
        if step == save_at:
            state["data"] = data.position
            ckpt.save(engine, step, {**state, "rng": T._rng_state(), "world_size": le.world_size,
                                     **method.checkpoint_state()}, yaml.safe_dump(to_dict(cfg), sort_keys=False))
            if le.rank == 0:
                torch.save(expected, closed_form)
            break
    data.close()
    method.close()
    if le.rank == 0:
        Path(out).write_text(json.dumps(rows, indent=1))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)   # gloo's threads can abort a finalizing interpreter (trainer.dist.exit_process)
