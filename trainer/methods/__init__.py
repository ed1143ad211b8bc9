"""The methods beyond plain CLIP, one module each, each a config switch (../shared/METHODS.md).

- ``eclipse``: ECLIPSE's momentum image teacher (EMA under every ZeRO stage) and its KL term
- ``evit``: EViT token dropping / FLIP patch dropout inside the ``transformers`` vision tower
- ``psd``: progressive self-distillation's soft targets (self, momentum or previous teacher)
- ``ema``: teacher weights that follow the student's fp32 masters under every ZeRO stage
- ``text_lm``: EfficientCLIP's text-only stream and its language-modelling term (clm or mlm)

``trainer/train.py`` only calls what these expose: a teacher object the step updates, named loss
terms, and runtime switches on the model.
"""


class Method:
    """What the train step calls on the enabled method (the no-op here is plain CLIP).

    ``prepare(step)`` before the forward; ``engine(..., **micro_kwargs(device))`` once per
    micro-batch (default: the constant ``forward_kwargs``; a method with a data stream of its own
    hands its next batch there); ``extras(*more)`` turns the forward's outputs beyond
    ``(image, text, scale)`` into ``LossContext.extras``; ``update(step)`` after each applied
    optimizer step; ``checkpoint_state()`` (``{name: state}`` or ``{}``) goes into every
    checkpoint's per-rank trainer state and ``restore`` takes it back; ``close()`` when the run
    ends (on every path): shut down loader workers the method started.
    """
    name = "none"
    forward_kwargs: dict = {}
    outputs = 0   # forward outputs after (image, text, scale) that ``extras`` takes

    def prepare(self, step: int) -> None:
        pass

    def micro_kwargs(self, device) -> dict:
        """The forward's keyword inputs for the next micro-batch (called once per micro-batch)."""
        return self.forward_kwargs

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

    def inherit(self, weights: dict) -> None:
        """A run started from a grown or trained model (``checkpoint.init``): ``weights`` holds
        what a method's own copies start from (``{"teacher": state dict}``: ECLIPSE's teacher)."""

    def close(self) -> None:
        pass


class Methods(Method):
    """Several enabled methods at once (ECLIPSE + PSD): each gets its own forward outputs, in
    the order the model returns them, and its own entry in the checkpoint."""

    def __init__(self, methods: list[Method]):
        self.methods = methods
        self.name = "+".join(m.name for m in methods)
        self.forward_kwargs = {k: v for m in methods for k, v in m.forward_kwargs.items()}
        self.outputs = sum(m.outputs for m in methods)

    def prepare(self, step: int) -> None:
        for m in self.methods:
            m.prepare(step)

    def micro_kwargs(self, device) -> dict:
        return {k: v for m in self.methods for k, v in m.micro_kwargs(device).items()}

    def extras(self, *more) -> dict:
        out, i = {}, 0
        for m in self.methods:
            out.update(m.extras(*more[i:i + m.outputs]))
            i += m.outputs
        return out

    def update(self, step: int) -> None:
        for m in self.methods:
            m.update(step)

    def describe(self) -> str | None:
        return "; ".join(d for d in (m.describe() for m in self.methods) if d) or None

    def checkpoint_state(self) -> dict:
        return {k: v for m in self.methods for k, v in m.checkpoint_state().items()}

    def restore(self, trainer_state: dict, where) -> None:
        for m in self.methods:
            m.restore(trainer_state, where)

    def inherit(self, weights: dict) -> None:
        for m in self.methods:
            m.inherit(weights)

    def close(self) -> None:
        for m in self.methods:
            m.close()


def build_method(cfg, engine) -> Method:
    """The method object for ``cfg`` around a built engine (after ``attach`` on the model)."""
    methods: list[Method] = []
    if cfg.eclipse.enabled:   # first: the model returns ECLIPSE's teacher output before PSD's
        from .eclipse import Eclipse
        methods.append(Eclipse(cfg, engine))
    if cfg.psd.enabled:
        from .psd import Psd
        methods.append(Psd(cfg, engine))
    if cfg.text_lm.enabled:   # last: the model returns the LM loss after the teachers' outputs
        from .text_lm import TextLm
        methods.append(TextLm(cfg, engine))
    return methods[0] if len(methods) == 1 else Methods(methods) if methods else Method()


def attach(model, cfg) -> None:
    """Add what the enabled methods need to the model, before DeepSpeed wraps it."""
    from . import eclipse, psd, text_lm
    psd.attach(model, cfg)       # copies the stock towers, before ECLIPSE expedites the student's
    eclipse.attach(model, cfg)
    text_lm.attach(model, cfg)
