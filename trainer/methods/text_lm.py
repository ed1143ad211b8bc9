"""EfficientCLIP's non-paired text (Wang et al., 2021; docs/methods.md): a second stream of
text-only samples trains the text tower with a language-modelling loss, next to the contrastive
loss, in every micro-batch of the step.

    text_lm.check(cfg)                        # before anything starts (exit 2 naming the key)
    text_lm.attach(model, cfg)                # before the engine: the tied head under ZeRO-3
    method = TextLm(cfg, engine)              # after it (and restore() on resume)
    method.prepare(step)
    image, text, scale, ..., lm = engine(..., **method.micro_kwargs(device))   # one text batch each
    ctx.extras = method.extras(lm)            # {"text_lm": this rank's mean CE}
    ... loss (term ``text_lm``, weight ``text_lm.weight``) ...
    method.close()                            # the text stream's loader workers

**The stream.** ``text_lm.shards`` (``KEY.txt`` samples; ``make-demo-data`` writes ``DIR/text``)
are read by a ``data.ResumableStream`` of their own (``stream_id="text"``, so its shard and
shuffle draws differ from the paired stream's), ``text_lm.batch_size`` texts per micro-batch,
``data.workers`` loader workers, epochs of ``text_lm.num_samples`` texts. Its position is this
method's ``state_dict()``, so it is in every checkpoint (``trainer_state/rank_R.pt``) and a
resumed run reads exactly the text batches the uninterrupted run would have read. A micro-batch
dropped for a non-finite loss consumes its text batch too, in both runs alike.

**The loss** (``ClipTrainModel.text_lm_loss``, inside the engine's forward so that ZeRO-3 gathers
the text tower as usual). The head is tied to the token embedding ``E`` [V, d]: ``logits =
h @ E.T`` for the hidden states ``h`` after ``final_layer_norm`` (times ``text_lm.head_scale``,
which ``grow`` sets to ``1 / f`` when the text tower grows ``f`` times wider: the tiled ``h`` and
``E`` make ``h @ E.T`` ``f`` times larger). It adds no parameter, so the
exported ``CLIPModel`` (``export-hf``) is the stock model. The term is the mean cross-entropy over
this rank's predicted tokens (the logged value is the mean over ranks).

- ``clm``: CLIP's causal text tower as it is; position ``t`` predicts token ``t + 1``; targets
  that are padding are ignored (the end-of-text token is a target).
- ``mlm`` (the public code's): ``text_lm.mask_rate`` (15%) of the batch's non-special, non-pad
  tokens are chosen; of those ``text_lm.mask_token_rate`` (80%) become the mask token and the
  rest a random non-special token (the public code's 80/20; BERT's 80/10/10 keeps 10%); the loss
  is on the chosen positions only. The attention is bidirectional for this stream only (the
  padding mask and no causal mask; the paired texts keep CLIP's causal tower). The mask token is
  the tokenizer's ``mask_token`` if it has one, else its ``unk_token``: the demo tokenizer is a
  byte-level BPE, which never emits unk (every byte is in its alphabet), so unk is a free
  stand-in. A tokenizer with neither is refused. The choices are drawn from a generator seeded
  by (seed, step, micro-batch, rank): a resumed run masks the same positions.

Weight ``text_lm.weight`` (default 1): the public code's ``(L_con + L_lm) / 2`` is weight 1 here.
AdamW's update does not change when the whole loss is scaled by a constant (up to its ``eps``),
so the halving does not halve the learning rate; what the weight sets is the ratio of the two
terms' gradients, and how soon ``optim.grad_clip`` bites (clipping sees the scaled gradient).
"""
from __future__ import annotations

import functools

import numpy as np
import deepspeed
import torch

from .. import data as D
from ..config import Config, ConfigError
from ..dist import rank as this_rank
from ..flops import text_flops
from ..model import preset_shape
from .base import Method, MethodSpec


def mask_token_id(tokenizer) -> int | None:
    """The token MLM puts in place of a chosen token: ``mask_token_id``, else ``unk_token_id``."""
    return tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id


def check(cfg: Config) -> None:
    """Values a user can get wrong (exit 2 naming the key)."""
    t = cfg.text_lm
    if not t.enabled:
        return
    if t.shards in (None, "", []):
        raise ConfigError("config key 'text_lm.shards' is empty but text_lm.enabled is true; give the "
                          "text-only shards (make-demo-data writes DIR/text) or text_lm.enabled=false")
    D.check_shards(t.shards, "text_lm.shards")
    if t.objective == "mlm" and mask_token_id(D.load_tokenizer(cfg.tokenizer.path)) is None:
        raise ConfigError(f"config key 'text_lm.objective' is mlm, but the tokenizer at {cfg.tokenizer.path} has "
                          "neither a mask token nor an unk token to mask with; use text_lm.objective=clm")


def attach(model: torch.nn.Module, cfg: Config) -> None:
    """Under ZeRO-3 the tied head reads the token embedding outside the embedding's own forward:
    register it with the top-level module, so that DeepSpeed gathers it for that forward (and its
    backward). Harmless under the other stages (only ZeRO-3's hooks read the registration)."""
    if cfg.text_lm.enabled:
        deepspeed.zero.register_external_parameter(model, model.text_model.embeddings.token_embedding.weight)


def clm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``labels[:, t] = input_ids[:, t + 1]`` where that token is not padding, else -100."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], -100)
    return labels


def mlm_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator, *,
               rate: float, mask_token_rate: float, mask_id: int, special_ids: torch.Tensor,
               ordinary_ids: torch.Tensor):
    """``(masked input_ids, labels)``: ``round(rate * n)`` (at least one) of the batch's ``n``
    non-special, non-pad tokens are chosen; of those a ``mask_token_rate`` share (Bernoulli) become
    ``mask_id``, the others a uniformly random token of ``ordinary_ids``; labels are -100 elsewhere."""
    candidate = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
    n = int(candidate.sum())
    score = torch.rand(input_ids.shape, generator=generator)
    chosen = torch.zeros_like(candidate)
    if n:
        k = max(1, round(rate * n))
        flat = torch.where(candidate, score, 2.0).flatten()   # non-candidates sort last
        chosen.view(-1)[flat.argsort()[:k]] = True
    to_mask = chosen & (torch.rand(input_ids.shape, generator=generator) < mask_token_rate)
    random_ids = ordinary_ids[torch.randint(len(ordinary_ids), input_ids.shape, generator=generator)]
    masked = torch.where(to_mask, mask_id, torch.where(chosen, random_ids, input_ids))
    return masked, torch.where(chosen, input_ids, -100)


def mask_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """MLM's random choices for one (step, micro-batch, rank): a function of those alone, so a
    resumed run draws them again, and the ranks (which read different texts) draw independently."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0]))


class TextLm(Method):
    """What the train step calls when ``text_lm.enabled``: see the module doc."""
    name = "text_lm"
    outputs = 1   # this rank's mean CE over its predicted tokens

    def __init__(self, cfg: Config, engine):
        self.cfg = cfg
        t = cfg.text_lm
        self.rank, self.world = this_rank(), engine.dp_world_size
        self.tokenizer = D.load_tokenizer(cfg.tokenizer.path)
        self.decoder = D.TextDecoder(self.tokenizer, preset_shape(cfg.model)["context_length"])
        self.urls = D.shard_list(t.shards, "text_lm.shards")
        special = sorted(set(self.tokenizer.all_special_ids))
        self.special_ids = torch.tensor(special)
        vocab = torch.arange(engine.module.config.text_config.vocab_size)
        self.ordinary_ids = vocab[~torch.isin(vocab, self.special_ids)]   # MLM's random replacements
        self.step, self.micro = 0, 0
        self.position = None
        self.stream = None   # built at the first micro-batch, after restore() has set the position

    def _next_batch(self) -> dict:
        if self.stream is None:
            t, d = self.cfg.text_lm, self.cfg.data
            self.stream = D.ResumableStream(self.urls, self.decoder, batch_size=t.batch_size,
                                            num_samples=t.num_samples, seed=self.cfg.seed, rank=self.rank,
                                            world=self.world, workers=d.workers, shuffle_buffer=t.shuffle_buffer,
                                            position=self.position, stream_id="text", worker_start=d.worker_start)
        return self.stream.next()

    def prepare(self, step: int) -> None:
        self.step, self.micro = step, 0

    def lm_batch(self, batch: dict) -> dict:
        """The model's LM inputs for one text batch of micro-batch ``self.micro`` (CPU tensors),
        with ``lm_index``, the predicted positions, found here on the host (see
        ``ClipTrainModel.text_lm_loss``) rather than by a boolean mask on the device."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        t = self.cfg.text_lm
        if t.objective == "clm":
            ids, labels = ids, clm_labels(ids, mask)
        else:
            g = mask_generator(self.cfg.seed, self.step, self.micro, self.rank)
            ids, labels = mlm_inputs(ids, mask, g, rate=t.mask_rate, mask_token_rate=t.mask_token_rate,
                                     mask_id=mask_token_id(self.tokenizer), special_ids=self.special_ids,
                                     ordinary_ids=self.ordinary_ids)
        index = (labels.flatten() != -100).nonzero().squeeze(1)
        return {"lm_input_ids": ids, "lm_attention_mask": mask, "lm_labels": labels, "lm_index": index}

    def micro_kwargs(self, device) -> dict:
        lm = self.lm_batch(self._next_batch())
        self.micro += 1
        return {**{k: v.to(device, non_blocking=True) for k, v in lm.items()},
                "lm_causal": self.cfg.text_lm.objective == "clm", "lm_head_scale": self.cfg.text_lm.head_scale}

    def extras(self, lm_loss: torch.Tensor) -> dict:
        return {"text_lm": lm_loss}

    def describe(self) -> str:
        t = self.cfg.text_lm
        what = "next-token (causal tower)" if t.objective == "clm" else \
            f"masked tokens ({t.mask_rate:g}, bidirectional attention for this stream)"
        return (f"text_lm: {what} on {len(self.urls)} text shard(s), {t.batch_size} texts per micro-batch, "
                f"weight {t.weight:g}; head tied to the token embedding (no parameters)")

    def state_dict(self) -> dict:
        return {"position": self.stream.position if self.stream is not None else self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state.get("position")

    def restore_elastic(self, states, where, workers: int, step: int) -> None:
        """Another world size or worker count: the text stream's epoch continues on this layout
        (``data.elastic_position``: carried buffers and open shards, then fresh draws)."""
        if self.name not in states[0]:
            raise RuntimeError(f"checkpoint {where} has no '{self.name}' state: it was written with the method off")
        old = states.field(self.name, "position")
        self.position = D.elastic_position(old, workers, self.rank, self.world, self.cfg.data.workers,
                                           urls=self.urls, seed=self.cfg.seed, stream_id="text", key=step)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


@functools.lru_cache(maxsize=8)
def vocab_size(tokenizer_path: str) -> int:
    """Rows of the token embedding, which is the LM head (the tokenizer's length, as the model's)."""
    return len(D.load_tokenizer(tokenizer_path))


def predicted_per_text(cfg: Config) -> float:
    """Predicted positions per text, an upper bound (texts are padded to the context, and only
    the tokens are predicted): clm, every position but the last; mlm, ``mask_rate`` of the
    positions that can hold a non-special token (all but the start and end tokens)."""
    n = preset_shape(cfg.model)["context_length"]
    return n - 1.0 if cfg.text_lm.objective == "clm" else cfg.text_lm.mask_rate * (n - 2)


def step_flops(cfg: Config, step: int, world: int) -> float:
    """What the text-only stream adds to a step: ``text_lm.batch_size`` texts per micro-batch and
    rank through the text tower (no projection) and the tied head ``h @ E^T`` at the predicted
    positions (:func:`predicted_per_text`, an upper bound), forward and backward (the head's
    weight is the token embedding, so it gets a gradient too)."""
    shape = preset_shape(cfg.model)
    texts = cfg.text_lm.batch_size * cfg.train.grad_accum_steps * world
    head = 2.0 * predicted_per_text(cfg) * shape["text_width"] * vocab_size(cfg.tokenizer.path)
    return 3.0 * texts * (text_flops(shape, projection=False) + head)


class TextLmSpec(MethodSpec):
    name = "text_lm"

    def enabled(self, cfg: Config) -> bool:
        return cfg.text_lm.enabled

    def check(self, cfg: Config) -> None:
        check(cfg)

    def attach(self, model, cfg: Config) -> None:
        attach(model, cfg)

    def build(self, cfg: Config, engine) -> TextLm:
        return TextLm(cfg, engine)

    def loss_terms(self, cfg: Config) -> dict[str, float]:
        return {"text_lm": cfg.text_lm.weight}

    def step_flops(self, cfg: Config, step: int, world: int) -> float:
        return step_flops(cfg, step, world)

    def grown_config(self, raw: dict, cfg: Config, state: dict | None, layer_index) -> None:
        """Width growth tiles the text stream and the token embedding ``f`` times, so the tied
        head's ``h @ E^T`` comes out ``f`` times larger: the grown config scales it back."""
        old, new = preset_shape(cfg.model)["text_width"], raw["model"]["text_width"]
        if new != old:
            raw["text_lm"]["head_scale"] = cfg.text_lm.head_scale * old / new


SPEC = TextLmSpec()
