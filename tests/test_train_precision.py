"""Mixed precision and gradient accumulation end to end, through the real CLI and DeepSpeed.

bf16 is the default on GPUs, and gradient accumulation is how large global batches fit; each is
checked here against an independent reference: the fp32 run, and a plain-torch training loop.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import check, data_overrides, read_metrics, run_trainer

CONFIG = "trainer/configs/demo.yaml"
FAST = ["model.context_length=24", "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=32",
        "data.train_num_samples=100000", "optim.warmup_steps=2", "optim.lr=2e-3", "log.every_steps=1",
        "log.progress=false", "checkpoint.every_steps=2"]


def args(demo_data, out, *extra):
    # No validation shards: evaluation is not what these tests are about (and bf16 is slow on CPU).
    return ["train", "--config", CONFIG, *data_overrides(demo_data, out), "data.val_shards=", *FAST, *extra]


def losses(out):
    return {m["step"]: m["loss"] for m in read_metrics(out)}


def test_bf16_trains_checkpoints_resumes_and_exports_fp32(demo_data, tmp_path):
    fp32, bf16, resumed = tmp_path / "fp32", tmp_path / "bf16", tmp_path / "bf16-resumed"
    check(run_trainer(args(demo_data, fp32, "max_steps=4"), nproc=2))
    check(run_trainer(args(demo_data, bf16, "max_steps=4", "deepspeed.precision=bf16"), nproc=2))
    got, want = losses(bf16), losses(fp32)
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(v) for v in got.values())
    # bf16 activations/weights (8 bits of mantissa) against fp32: close, not equal.
    assert got == pytest.approx(want, rel=2e-2)
    assert got != pytest.approx(want, rel=1e-7)  # it really ran in bf16
    # Resume from the bf16 checkpoint at step 2 (weights, fp32 master, moments): exact.
    check(run_trainer(args(demo_data, resumed, "max_steps=4", "deepspeed.precision=bf16",
                           f"checkpoint.resume={bf16 / 'checkpoints' / 'step_2'}"), nproc=2))
    assert losses(resumed) == pytest.approx({s: v for s, v in got.items() if s > 2}, rel=1e-6, abs=1e-7)
    # export-hf: fp32 weights = DeepSpeed's fp32 master copy; rounding them gives the bf16 module.
    from transformers import CLIPModel

    from trainer.sources import fp32_state_dict
    hf_dir = tmp_path / "hf"
    check(run_trainer(["export-hf", "--checkpoint", str(bf16 / "checkpoints" / "step_4"), "--out", str(hf_dir)]))
    hf = CLIPModel.from_pretrained(hf_dir).state_dict()
    master = fp32_state_dict(bf16 / "checkpoints", "step_4")
    module = torch.load(bf16 / "checkpoints" / "step_4" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    assert {v.dtype for v in hf.values() if v.is_floating_point()} == {torch.float32}
    checked = 0
    for name, value in module.items():
        if not value.is_floating_point() or name.endswith("position_ids"):
            continue
        assert value.dtype == torch.bfloat16, name
        exported = hf[name].reshape(value.shape)
        torch.testing.assert_close(exported, master[name].reshape(value.shape), rtol=0, atol=0)
        assert torch.equal(exported.to(torch.bfloat16), value), name
        checked += 1
    assert checked > 50
    # and the master copy is not just the bf16 weights widened: it carries the low bits
    assert any(not torch.equal(master[k], master[k].to(torch.bfloat16).float()) for k in master)


def reference_losses(cfg, steps: int, drops: dict[int, int | tuple[int, int]]) -> dict[int, float]:
    """The trainer's semantics in a plain torch loop, one process: per optimizer step
    ``grad_accum_steps`` micro-batches, each loss / accum back-propagated, global-norm clip,
    AdamW with the trainer's parameter groups, lr = peak * lambda(step - 1). ``drops[s] = n``
    micro-batches are consumed and discarded at the start of step s (the faulty ones); ``(n, k)``
    discards them after the step's first k good micro-batches."""
    from trainer import data as D
    from trainer.engine import lr_lambda
    from trainer.model import build_model, param_groups, preset_shape
    from trainer.train import TrainData

    tok = D.load_tokenizer(cfg.tokenizer.path)
    model = build_model(cfg.model, tok, cfg.seed).train()
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    fn = lr_lambda(cfg)
    shape = preset_shape(cfg.model)
    decoder = D.SampleDecoder(tok, shape["context_length"], D.build_transforms(
        shape["image_size"], cfg.data.image_mean, cfg.data.image_std, cfg.data.crop_scale_min, train=True))
    data = TrainData(cfg, decoder, 0, 1, None)
    accum = cfg.train.grad_accum_steps
    out = {}
    for step in range(1, steps + 1):
        n_drop, at = drops.get(step, 0), 0
        if isinstance(n_drop, tuple):
            n_drop, at = n_drop
        for group in opt.param_groups:
            group["lr"] = o.lr * fn(step - 1)
        opt.zero_grad()
        seen = []
        for i in range(accum):
            if i == at:
                for _ in range(n_drop):
                    data.next()
            mb = data.next()
            img, txt, scale = model(pixel_values=mb["image"], input_ids=mb["input_ids"],
                                    attention_mask=mb["attention_mask"])
            logits = scale * img @ txt.T
            target = torch.arange(logits.shape[0])
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            (loss / accum).backward()
            seen.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        out[step] = sum(seen) / accum
    return out


@pytest.mark.full   # fast tier: test_train_faults' NaN cases
def test_grad_accumulation_with_faulty_micro_batches_matches_a_plain_torch_loop(demo_data, tmp_path):
    """grad_accum_steps=3, one process, ZeRO-1 and ZeRO-3. Step 3's first micro-batch has a NaN
    loss (dropped, replaced by the next), or its last one (at the accumulation boundary, after two
    backward passes); step 5's accumulated gradients are NaN at the boundary
    (the whole step is redone with new micro-batches). Losses equal the plain torch loop's.

    Note: accumulating a contrastive loss over micro-batches is not the loss of one micro-batch
    3x as large (each micro-batch only sees its own negatives); the reference is the same
    accumulation written independently, not the larger batch."""
    from trainer.config import load_config

    extra = ["train.grad_accum_steps=3", "max_steps=6", "debug.inject_nan_steps=[3]"]
    runs = {}
    for name, more in {"loss-nan": ["debug.inject_nan_where=loss"],
                       "loss-nan-boundary": ["debug.inject_nan_where=loss", "debug.inject_nan_microbatch=2"],
                       "grad-nan-z3": ["debug.inject_nan_steps=[5]", "debug.inject_nan_where=grad",
                                       "deepspeed.zero_stage=3"]}.items():
        out = tmp_path / name
        text = check(run_trainer(args(demo_data, out, *extra, *more), nproc=1))
        runs[name] = (out, text)
    cfg = load_config(CONFIG, [*data_overrides(demo_data, tmp_path / "ref"), *FAST, *extra])
    want_loss_nan = reference_losses(cfg, 6, {3: 1})
    want_grad_nan = reference_losses(cfg, 6, {5: 3})
    out, text = runs["loss-nan"]
    assert losses(out) == pytest.approx(want_loss_nan, rel=1e-4)
    assert [m["bad_microbatches"] for m in read_metrics(out)] == [0, 0, 1, 1, 1, 1]
    # the NaN loss on the accumulation's last micro-batch: two gradients are already accumulated;
    # it is dropped before backward and the next micro-batch completes the step
    out, text = runs["loss-nan-boundary"]
    want_boundary = reference_losses(cfg, 6, {3: (1, 2)})
    assert losses(out) == pytest.approx(want_boundary, rel=1e-4)
    assert [m["bad_microbatches"] for m in read_metrics(out)] == [0, 0, 1, 1, 1, 1]
    assert want_boundary[3] != pytest.approx(want_loss_nan[3], rel=1e-6)   # another micro-batch was lost
    out, text = runs["grad-nan-z3"]
    assert losses(out) == pytest.approx(want_grad_nan, rel=1e-4)
    assert [m["bad_microbatches"] for m in read_metrics(out)] == [0, 0, 0, 0, 3, 3]
    assert "step 5: non-finite gradients, update skipped and its 3 micro-batch(es) dropped" in text
    # The two faults consumed different micro-batches, so the runs really differ after step 3.
    assert want_loss_nan[4] != pytest.approx(want_grad_nan[4], rel=1e-6)
