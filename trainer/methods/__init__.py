"""The methods beyond plain CLIP, one module each, each a config switch (../shared/METHODS.md).

- ``eclipse``: ECLIPSE's momentum image teacher (EMA under every ZeRO stage) and its KL term
- ``evit``: EViT token dropping / FLIP patch dropout inside the ``transformers`` vision tower

``trainer/train.py`` only calls what these expose: a teacher object the step updates, named loss
terms, and runtime switches on the model.
"""


class Method:
    """What the train step calls on the enabled method (the no-op here is plain CLIP).

    ``prepare(step)`` before the forward; ``engine(..., **forward_kwargs)``; ``extras(*more)``
    turns the forward's outputs beyond ``(image, text, scale)`` into ``LossContext.extras``;
    ``update(step)`` after each applied optimizer step; ``checkpoint_state()`` (``{name: state}``
    or ``{}``) goes into every checkpoint's per-rank trainer state and ``restore`` takes it back.
    """
    name = "none"
    forward_kwargs: dict = {}

    def prepare(self, step: int) -> None:
        pass

    def extras(self, *more) -> dict:
        return {}

    def update(self, step: int) -> None:
        pass

    def describe(self) -> str | None:
        """One log line about the method at start-up (None: nothing to say)."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def checkpoint_state(self) -> dict:
        return {self.name: self.state_dict()} if self.name != "none" else {}

    def restore(self, trainer_state: dict, where) -> None:
        """Take this method's entry out of a resumed checkpoint's trainer state and load it."""
        if self.name == "none":
            return
        if self.name not in trainer_state:
            raise RuntimeError(f"checkpoint {where} has no '{self.name}' state: it was written with the method off")
        self.load_state_dict(trainer_state.pop(self.name))


def build_method(cfg, engine) -> Method:
    """The method object for ``cfg`` around a built engine (after ``attach`` on the model)."""
    if cfg.eclipse.enabled:
        from .eclipse import Eclipse
        return Eclipse(cfg, engine)
    return Method()


def attach(model, cfg) -> None:
    """Add what the enabled method needs to the model, before DeepSpeed wraps it."""
    from . import eclipse
    eclipse.attach(model, cfg)
