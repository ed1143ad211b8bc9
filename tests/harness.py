"""What ``trainer.train.run`` builds before its loop, for the probes that drive ``train_step``
themselves (tests/teacher_probe.py, tests/fp16_probe.py, tests/flops_probe.py).

    tokenizer, engine, method = build_engine_and_method(cfg, le)          # or ds_config=...
    data, terms = build_stream(cfg, tokenizer, le)                         # or data_state=...
    T.train_step(engine, data.next, terms, cfg, step, fresh_state(), GradGuard(engine), ...)
"""
from trainer import data as D
from trainer import methods
from trainer import train as T
from trainer.train import fresh_state  # noqa: F401 - the probes' state at step 0
from trainer.engine import build_ds_config, build_engine
from trainer.losses import build_terms
from trainer.model import build_model, preset_shape


def build_engine_and_method(cfg, le, ds_config: dict | None = None):
    """The model with its methods attached, its DeepSpeed engine and the method runtime."""
    tokenizer = D.load_tokenizer(cfg.tokenizer.path)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    methods.attach(model, cfg)
    engine, _ = build_engine(cfg, model, ds_config or build_ds_config(cfg, le.world_size))
    return tokenizer, engine, methods.build_method(cfg, engine)


def build_stream(cfg, tokenizer, le, data_state: dict | None = None):
    """The training stream (from ``data_state`` when resuming) and the loss terms."""
    shape = preset_shape(cfg.model)
    decoder = D.SampleDecoder(tokenizer, shape["context_length"], D.build_transforms(
        shape["image_size"], cfg.data.image_mean, cfg.data.image_std, cfg.data.crop_scale_min, train=True))
    return (T.TrainData(cfg, decoder, le.rank, le.world_size, data_state),
            build_terms(cfg.loss, methods.loss_terms(cfg)))
