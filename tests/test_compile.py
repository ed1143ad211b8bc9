"""``model.compile``: the compiled layers train to the same losses as eager ones (2 gloo ranks,
ZeRO 1 and 2, plain CLIP and ECLIPSE with its teacher and EViT's changing keep rate), and ZeRO-3
is refused with one ``error:`` line (exit 2). The compiled runs are the full tier: inductor's
one-off compile takes a minute or more per run on a shared CPU core."""
from __future__ import annotations

import pytest

from conftest import check, data_overrides, read_metrics, run_trainer

STEPS = 4
FAST = ["data.batch_size=16", "data.workers=1", "data.shuffle_buffer=64", "data.train_num_samples=192",
        "optim.warmup_steps=2", "optim.lr=2e-3", "log.every_steps=1", "log.progress=false",
        "checkpoint.every_steps=100", f"max_steps={STEPS}"]
# ECLIPSE: keep rate 1 at step 1, a cosine down to 0.7 over steps 2-3, 0.7 at step 4, so the
# layers after EViT's drop layers see three sequence lengths (a recompile with a dynamic length).
ECLIPSE = ["eclipse.enabled=true", "eclipse.keep_rate=0.7", "eclipse.momentum=0.8", "eclipse.keep_warmup_steps=1",
           "eclipse.keep_shrink_steps=2"]
# Inductor's fused kernels reorder fp32 sums: measured differences are ~1e-7 relative after 5 steps.
RTOL, ATOL = 1e-5, 1e-5


def _train(demo_data, out, extra, compiled):
    check(run_trainer(["train", "--config", "trainer/configs/demo.yaml", *data_overrides(demo_data, out), *FAST, *extra,
                       f"model.compile={str(compiled).lower()}"], nproc=2, timeout=900))
    return read_metrics(out)


@pytest.mark.full
@pytest.mark.parametrize("name,extra", [
    ("zero1", ["deepspeed.zero_stage=1"]),
    ("zero2", ["deepspeed.zero_stage=2"]),
    ("eclipse-evit-zero1", [*ECLIPSE, "deepspeed.zero_stage=1"]),
])
def test_compiled_layers_train_to_the_eager_losses(demo_data, tmp_path, name, extra):
    eager = _train(demo_data, tmp_path / "eager", extra, False)
    compiled = _train(demo_data, tmp_path / "compiled", extra, True)
    keys = [k for k in ("loss", "clip", "teacher_kl") if k in eager[0]]
    assert [m["step"] for m in compiled] == [m["step"] for m in eager] == list(range(1, STEPS + 1))
    for e, c in zip(eager, compiled):
        for k in keys:
            assert c[k] == pytest.approx(e[k], rel=RTOL, abs=ATOL), (name, e["step"], k, e[k], c[k])
    assert eager[-1]["loss"] != pytest.approx(eager[0]["loss"], rel=1e-3)   # the steps did train


@pytest.mark.full   # a trainer process (~10 s of imports), though it stops at the config check
def test_zero3_is_refused_with_one_error_line(demo_data, tmp_path):
    proc = run_trainer(["train", "--config", "trainer/configs/demo.yaml", *data_overrides(demo_data, tmp_path),
                        "deepspeed.zero_stage=3", "model.compile=true"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'model.compile'" in errors[0] and "zero_stage=3" in errors[0], proc.stderr[-2000:]


@pytest.mark.full   # importing dynamo and inductor: ~30 s on a shared core
def test_compile_layers_compiles_stock_layers_and_leaves_evit_eager():
    """In process, nothing compiled yet (torch.compile is lazy): which layers get a compiled call,
    and that the state dict keeps CLIPModel's names."""
    from trainer.config import load_config
    from trainer.methods import attach
    from trainer.methods.evit import EViTEncoderLayer
    from trainer.model import ClipTrainModel, build_clip_config, compile_layers

    class Tok:
        eos_token_id, pad_token_id, bos_token_id = 2, 0, 1

        def __len__(self):
            return 50

    cfg = load_config("trainer/configs/eclipse.yaml", ["model.vision_layers=2", "model.text_layers=1",
                                                       "eclipse.drop_layers=[1]"])
    model = ClipTrainModel(build_clip_config(cfg.model, Tok()))
    attach(model, cfg)
    keys = list(model.state_dict())
    n = compile_layers(model)
    student = list(model.vision_model.encoder.layers)
    assert isinstance(student[1], EViTEncoderLayer) and student[1]._compiled_call_impl is None
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    # student vision layer 0, the text layer, the teacher's two (stock) vision layers
    assert n == len(compiled) == 4
    assert {id(m) for m in compiled} == {id(student[0]), id(model.text_model.encoder.layers[0]),
                                         *(id(m) for m in model.teacher.vision_model.encoder.layers)}
    assert list(model.state_dict()) == keys


def test_zero3_refusal_is_a_config_error_naming_both_keys():
    """The same refusal, in process (fast tier): the config check alone, before any process starts."""
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"'model.compile' is not supported with deepspeed.zero_stage=3"):
        load_config("trainer/configs/demo.yaml", ["deepspeed.zero_stage=3", "model.compile=true"])
    assert load_config("trainer/configs/demo.yaml", ["deepspeed.zero_stage=2", "model.compile=true"]).model.compile
