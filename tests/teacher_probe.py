"""Run under torchrun: train a few steps with a teacher (ECLIPSE's, or PSD's own) and record, at
every step, the weights the teacher's forward *actually uses* against the closed-form teacher.

    torchrun --nproc_per_node 2 tests/teacher_probe.py OUT.json CONFIG [key=value ...]

The closed form is computed here from the student's full fp32 masters (DeepSpeed's
``safe_get_full_fp32_param``) after every optimizer step: ``theta_bar_t = m theta_bar_{t-1} +
(1 - m) theta_t`` from ``theta_bar_0 = theta_0`` (ECLIPSE, PSD momentum), or the snapshot taken at
the last refresh (PSD previous). Forward pre-hooks, registered after DeepSpeed's own (so ZeRO-3
has gathered the submodule's parameters), copy what each teacher submodule computes with. No
checkpoint is written: a save re-gathers parameters and would hide a stale copy.
"""
import json
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param

from trainer import data as D
from trainer import methods
from trainer import train as T
from trainer.config import load_config
from trainer.dist import init_distributed, launch_env
from trainer.engine import build_ds_config, build_engine
from trainer.faults import GradGuard, NanInjector
from trainer.losses import build_terms
from trainer.model import build_model, preset_shape


def main(out: str, config: str, *overrides: str) -> None:
    cfg = load_config(config, list(overrides))
    le = launch_env()
    device = init_distributed(le, cfg.dist.backend, cfg.dist.timeout_s)
    tokenizer = D.load_tokenizer(cfg.tokenizer.path)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    methods.attach(model, cfg)
    engine, _ = build_engine(cfg, model, build_ds_config(cfg, le.world_size))
    method = methods.build_method(cfg, engine)
    prefix = "teacher." if cfg.eclipse.enabled else "psd_teacher."
    module = engine.module
    teacher_root = module.get_submodule(prefix[:-1])

    seen: dict[str, torch.Tensor] = {}

    def record(sub_name):
        def hook(mod, _inputs):
            for n, p in mod.named_parameters(recurse=False):
                seen[f"{sub_name}.{n}" if sub_name else n] = p.data.detach().float().clone()
        return hook
    for sub_name, sub in teacher_root.named_modules():
        if any(True for _ in sub.parameters(recurse=False)):
            sub.register_forward_pre_hook(record(sub_name))

    names = [n[len(prefix):] for n, _ in module.named_parameters() if n.startswith(prefix)]

    def masters() -> dict[str, torch.Tensor]:
        return {n: safe_get_full_fp32_param(module.get_parameter(n)).detach().double().cpu().clone() for n in names}

    if cfg.eclipse.enabled:
        m_at = lambda step: methods.eclipse.momentum_at(cfg, step)   # noqa: E731
    elif cfg.psd.teacher == "momentum":
        m_at = lambda step: cfg.psd.momentum   # noqa: E731
    else:   # previous: a copy at every refresh, frozen between
        every = methods.psd.refresh_every(cfg, le.world_size)
        m_at = lambda step: 0.0 if step % every == 0 else 1.0   # noqa: E731
    expected = masters()
    shape = preset_shape(cfg.model)
    decoder = D.SampleDecoder(tokenizer, shape["context_length"], D.build_transforms(
        shape["image_size"], cfg.data.image_mean, cfg.data.image_std, cfg.data.crop_scale_min, train=True))
    data = T.TrainData(cfg, decoder, le.rank, le.world_size, None)
    terms = build_terms(cfg.loss, methods.loss_terms(cfg))
    guard = GradGuard(module)
    inject = NanInjector([], "loss", le.rank, [])
    state = {"step": 0, "data": None, "bad_total": 0, "bad_streak": 0, "injected": []}
    rows = []
    for step in range(1, cfg.max_steps + 1):
        seen.clear()
        T.train_step(engine, data.next, terms, cfg, step, state, guard, inject, lambda: 0.0, method)
        state["step"] = step
        used = {k: v.double().cpu() for k, v in seen.items()}
        # what the forward of this step used vs the teacher after the previous step
        diff = {k: float((used[k].flatten() - expected[k].flatten()).abs().max()) for k in used if k in expected}
        worst = max(diff, key=diff.get)
        rows.append({"step": step, "max_abs": diff[worst], "worst": worst, "params_seen": len(used),
                     "params": len(expected)})
        m = m_at(step)
        now = masters()
        expected = {k: m * expected[k] + (1 - m) * now[k] for k in expected}
    data.close()
    method.close()
    if le.rank == 0:
        Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
