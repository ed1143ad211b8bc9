"""The methods' one protocol and registry (trainer/methods/base.py, __init__.py): what the rest of
the trainer asks goes through REGISTRY, so a fifth method is one module and one registry line."""
from pathlib import Path

import pytest
import torch

from trainer import methods, preflight
from trainer.config import ConfigError, load_config
from trainer.methods.base import Method, MethodSpec, Methods

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "trainer" / "configs" / "demo.yaml"


def _cfg(tmp_path, *overrides):
    d = tmp_path / "data"
    (d / "train").mkdir(parents=True, exist_ok=True)
    (d / "train" / "a.tar").write_bytes(b"")
    return load_config(CONFIG, [f"data.train_shards={d / 'train'}", "data.val_shards=", "eval.zeroshot=",
                                f"output_dir={tmp_path / 'run'}", *overrides])


def test_loss_terms_are_the_enabled_methods_terms_with_their_weights(tmp_path):
    cfg = _cfg(tmp_path, "eclipse.enabled=true", "eclipse.kl_weight=0.25", "psd.enabled=true",
               "text_lm.enabled=true", "text_lm.weight=0.5")
    assert methods.loss_terms(cfg) == {"teacher_kl": 0.25, "self_distill": 1.0, "text_lm": 0.5}
    assert methods.loss_terms(_cfg(tmp_path)) == {}


def test_registry_lists_every_method_module_once_in_forward_output_order():
    names = [spec.name for spec in methods.REGISTRY]
    assert names == ["eclipse", "psd", "text_lm", "select", "growth"]
    assert set(methods.prefixes()) == {"teacher.", "psd_teacher."}
    # PSD copies the stock towers before ECLIPSE reorganises the student's (attach order).
    ranks = {spec.name: spec.attach_rank for spec in methods.REGISTRY}
    assert ranks["psd"] < ranks["eclipse"]


class _Fifth(MethodSpec):
    """A method that is not in the package: one spec, registered by one line."""
    name = "fifth"
    prefixes = ("fifth_copy.",)

    def __init__(self):
        self.calls = []

    def enabled(self, cfg):
        return True

    def check(self, cfg):
        self.calls.append("check")
        if cfg.max_steps == 7:
            raise ConfigError("config key 'max_steps': the fifth method refuses 7")

    def attach(self, model, cfg):
        self.calls.append("attach")
        model.fifth_copy = torch.nn.Linear(2, 2)

    def build(self, cfg, engine):
        return _FifthRuntime()

    def loss_terms(self, cfg):
        return {"fifth_term": 0.5}

    def eval_views(self, model, cfg):
        return [("fifth/", model, 0.5)]


class _FifthRuntime(Method):
    name = "fifth"
    outputs = 2

    def extras(self, a, b):
        return {"fifth": (a, b)}

    def state_dict(self):
        return {"seen": 3}


class _Engine:
    module = torch.nn.Linear(1, 1)
    dp_world_size = 1


def test_a_fifth_method_plugs_in_through_the_registry_alone(tmp_path, monkeypatch):
    fifth = _Fifth()
    monkeypatch.setattr(methods, "REGISTRY", (*methods.REGISTRY, fifth))
    cfg = _cfg(tmp_path, "max_steps=7")
    with pytest.raises(ConfigError, match="fifth method refuses 7"):
        preflight.check_run_inputs(cfg, None)   # the run's checks reach it without naming it
    cfg = _cfg(tmp_path)
    assert methods.loss_terms(cfg) == {"fifth_term": 0.5}
    model = torch.nn.Module()
    methods.attach(model, cfg)
    assert isinstance(model.fifth_copy, torch.nn.Linear)
    built = methods.build_method(cfg, _Engine())
    assert isinstance(built, Methods) and [m.name for m in built.methods] == ["select", "fifth"]
    # forward outputs after (image, text, scale) go to the methods in registry order
    assert built.extras("x", "y") == {"fifth": ("x", "y")}
    state = built.checkpoint_state()
    assert state["fifth"] == {"seen": 3} and state["select"]["rounds"] == 0
    assert [v[0] for v in methods.eval_views(model, cfg)] == ["", "fifth/"]
    assert "fifth_copy." in methods.prefixes()
    assert fifth.calls == ["check", "attach"]


def test_plain_clip_runs_only_the_selection_state_carrier(tmp_path):
    """Without a method on, the runtime is ECL's round keeper (its state is in every checkpoint,
    so a run can switch select.enabled on when it resumes); it adds no forward input or output."""
    built = methods.build_method(_cfg(tmp_path), _Engine())
    assert built.name == "select" and built.outputs == 0 and built.forward_kwargs == {}
    assert built.data_manifest() is None and not built.wants_checkpoint(5)
