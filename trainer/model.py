"""CLIP towers from ``transformers``' config classes, randomly initialised (pre-training).

    model = build_model(cfg.model, tokenizer)        # ClipTrainModel, a transformers.CLIPModel
    img, txt, scale = model(pixel_values=x, input_ids=ids, attention_mask=mask)

``ClipTrainModel`` subclasses ``transformers.CLIPModel`` and only changes ``forward``: it returns
the L2-normalised embeddings and the exponentiated, clamped logit scale that the gathered loss
needs (and the text embeddings' length check, for ZeRO-3: ``_TextEmbeddings``). Its state dict is exactly ``CLIPModel``'s, so every checkpoint exports as a standard model.
With ``model.shared_layers = k`` (GrowCLIP's shared encoder) the text tower's top ``k`` layers are
the image tower's top ``k`` modules (:func:`tie_shared_layers`); the state dict still lists both.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPTextEmbeddings

from .config import ConfigError, ModelConfig
from .shapes import PRESETS, SHAPE_KEYS, preset_shape  # noqa: F401  (re-exported: the model's API)

MAX_LOGIT_SCALE = 100.0


def build_clip_config(mc: ModelConfig, tokenizer) -> CLIPConfig:
    s = preset_shape(mc)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("tokenizer has no eos token; CLIP pools the text at its end-of-text token")
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=s["text_width"],
                          intermediate_size=int(s["mlp_ratio"] * s["text_width"]),
                          num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
                          max_position_embeddings=s["context_length"], projection_dim=s["embed_dim"],
                          pad_token_id=tokenizer.pad_token_id or 0, bos_token_id=tokenizer.bos_token_id or eos,
                          eos_token_id=eos, hidden_act=s["act"])
    vision = CLIPVisionConfig(image_size=s["image_size"], patch_size=s["patch_size"], hidden_size=s["vision_width"],
                              intermediate_size=int(s["mlp_ratio"] * s["vision_width"]),
                              num_hidden_layers=s["vision_layers"],
                              num_attention_heads=s["vision_heads"], projection_dim=s["embed_dim"],
                              hidden_act=s["act"])
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=s["embed_dim"],
                     logit_scale_init_value=math.log(1 / 0.07))
    cfg._attn_implementation = mc.attn_implementation
    cfg.shared_layers = s["shared_layers"]
    return cfg


# What a CLIPEncoderLayer is built from (CLIPAttention, CLIPMLP, the layer norms): a layer shared
# by both towers must be what either tower's config would have built.
LAYER_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "hidden_act", "layer_norm_eps",
                     "attention_dropout", "_attn_implementation")


def shared_layer_prefixes(shape: dict) -> list[tuple[str, str]]:
    """``(vision prefix, text prefix)`` of each shared layer of a ``preset_shape`` (state-dict keys)."""
    k, lv, lt = shape.get("shared_layers", 0), shape["vision_layers"], shape["text_layers"]
    return [(f"vision_model.encoder.layers.{lv - k + i}.", f"text_model.encoder.layers.{lt - k + i}.")
            for i in range(k)]


def tie_shared_layers(model: CLIPModel, k: int) -> None:
    """GrowCLIP's shared encoder: the text tower's top ``k`` layers become the image tower's top
    ``k`` modules, in order (``text.layers[Lt-k+i] is vision.layers[Lv-k+i]``). Each tower still
    runs them in its own forward with its own mask (the causal mask and ``is_causal`` are passed
    per call, never read from the module), so only the weights are shared. The state dict keeps
    both towers' keys (same tensors): ``CLIPModel``'s layout, loadable from and exportable to it.
    """
    if k <= 0:
        return
    v, t = model.config.vision_config, model.config.text_config
    differ = {key: (getattr(v, key, None), getattr(t, key, None)) for key in LAYER_CONFIG_KEYS
              if getattr(v, key, None) != getattr(t, key, None)}
    if differ:
        raise ConfigError(f"config key 'model.shared_layers' ({k}): the towers' layers are configured differently "
                          f"({', '.join(f'{key}: vision {a!r}, text {b!r}' for key, (a, b) in differ.items())})")
    vl, tl = model.vision_model.encoder.layers, model.text_model.encoder.layers
    if k > min(len(vl), len(tl)):
        raise ConfigError(f"config key 'model.shared_layers' ({k}) must be at most the shallower tower's depth "
                          f"({len(vl)} vision, {len(tl)} text layers)")
    for i in range(k):
        tl[len(tl) - k + i] = vl[len(vl) - k + i]


class ClipTrainModel(CLIPModel):
    """``CLIPModel`` whose forward returns what the contrastive step needs.

    ``logit_scale`` is held with shape ``[1]``: DeepSpeed 0.19.8 broadcasts and partitions
    parameters as ``p.data.view(torch.uint8)``, which raises for 0-dim tensors (engine broadcast,
    ZeRO-3 init). State-dict hooks keep the standard 0-dim ``transformers`` layout on the outside.
    ``config.shared_layers`` (set by :func:`build_clip_config`) ties the towers' top layers.
    """

    def __init__(self, config):
        super().__init__(config)
        self.logit_scale = torch.nn.Parameter(self.logit_scale.data.reshape(1))
        tie_shared_layers(self, getattr(config, "shared_layers", 0))
        self.text_model.embeddings.__class__ = _TextEmbeddings   # same weights; see there
        self._register_state_dict_hook(_logit_scale_to_scalar)
        self._register_load_state_dict_pre_hook(_logit_scale_from_scalar)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(out.pooler_output, dim=-1)

    def scale(self) -> torch.Tensor:
        # Clamped in the forward, not on the parameter: under ZeRO the optimizer holds the fp32
        # master copy, so clamping the module's copy after a step would be silently undone. The
        # clamp lets through the gradient that points back below the bound, so a scale pushed
        # past ln(100) comes back as soon as the loss asks for a lower one (open_clip clamps the
        # parameter after each step, to the same effect).
        return _ClampReturnable.apply(self.logit_scale, math.log(MAX_LOGIT_SCALE)).exp().reshape(())

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, with_teacher: bool = False,
                with_psd_teacher: bool = False, lm_input_ids=None, lm_attention_mask=None, lm_labels=None,
                lm_causal: bool = True, lm_head_scale: float = 1.0, lm_index=None, **_):
        """``(image, text, scale)``, then, with ``with_teacher``, the momentum teacher's image
        embeddings (``self.teacher``, trainer/methods/eclipse.py), with ``with_psd_teacher``,
        the self-distillation teacher's image and text embeddings (``self.psd_teacher``,
        trainer/methods/psd.py), and, with ``lm_input_ids``, the language-modelling loss of a
        text-only batch (:meth:`text_lm_loss`, trainer/methods/text_lm.py). Teachers run without
        gradients inside this forward so that ZeRO-3 gathers their layers like the student's."""
        image = self.encode_image(pixel_values) if pixel_values is not None else None
        text = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        out = (image, text, self.scale())
        with torch.no_grad():
            if with_teacher:
                out += (self.teacher(pixel_values),)
            if with_psd_teacher:
                out += tuple(self.psd_teacher(pixel_values, input_ids, attention_mask))
        if lm_input_ids is not None:
            out += (self.text_lm_loss(lm_input_ids, lm_attention_mask, lm_labels, causal=lm_causal,
                                      head_scale=lm_head_scale, index=lm_index),)
        return out

    def text_lm_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     causal: bool = True, head_scale: float = 1.0, index: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over the positions whose ``labels`` are not -100, through a head tied
        to the token embedding: ``logits = head_scale * h @ E.T`` with ``h`` the text tower's hidden
        states after ``final_layer_norm`` (no new parameter; ``head_scale`` is ``text_lm.head_scale``,
        1 unless the tower was grown wider). ``causal``: CLIP's causal tower as it is; else the
        same layers with the padding mask only (bidirectional attention, for MLM). The logits are
        formed only at the predicted positions. No predicted position gives 0 (not NaN).

        ``index``: the predicted positions of the flattened ``[B * L]`` labels, ascending, as the
        host computed them (trainer/methods/text_lm.py): the rows are gathered without the
        boolean-mask index, whose output size the host would have to wait for on a GPU."""
        tm = self.text_model
        if causal:
            hidden = tm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            from transformers.masking_utils import create_bidirectional_mask
            embeds = tm.embeddings(input_ids=input_ids)
            mask = create_bidirectional_mask(config=tm.config, inputs_embeds=embeds, attention_mask=attention_mask)
            hidden = tm.final_layer_norm(tm.encoder(inputs_embeds=embeds, attention_mask=mask,
                                                    is_causal=False).last_hidden_state)
        if index is None:
            chosen = labels != -100                                              # [B, L]
            rows, targets, count = hidden[chosen], labels[chosen], chosen.sum().clamp(min=1)
        else:   # the same rows in the same order, no host sync
            rows = hidden.flatten(0, 1).index_select(0, index)                   # [n, d]
            targets, count = labels.flatten().index_select(0, index), max(1, index.numel())
        logits = rows @ tm.embeddings.token_embedding.weight.T                   # [n, V]
        if head_scale != 1.0:
            logits = logits * head_scale
        ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                             reduction="sum")   # bf16/fp16 logits: the softmax in fp32
        return ce / count


class _TextEmbeddings(CLIPTextEmbeddings):
    """``CLIPTextEmbeddings`` whose length check reads ``position_embedding.num_embeddings``
    instead of ``position_embedding.weight.shape[0]``. Under ZeRO-3 that child's weight is only
    gathered by the child's own forward hook; the original check relies on it being "persistent"
    (below DeepSpeed's persistence threshold, never released), but DeepSpeed 0.19.8 releases
    persistent parameters too while its module trace is recorded or invalid (which evaluation
    outside the engine's forward causes), and a resumed ZeRO-3 run's final evaluation then
    failed with "max_position_embeddings: 0". Everything else is the original forward."""

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None) -> torch.Tensor:
        seq_length = input_ids.shape[-1] if input_ids is not None else inputs_embeds.shape[-2]
        if seq_length > self.position_embedding.num_embeddings:
            raise ValueError(f"Sequence length must be less than max_position_embeddings (got `sequence length`: "
                             f"{seq_length} and max_position_embeddings: {self.position_embedding.num_embeddings}")
        if position_ids is None:
            position_ids = self.position_ids[:, :seq_length]
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        return inputs_embeds + self.position_embedding(position_ids)


class _ClampReturnable(torch.autograd.Function):
    """``min(x, bound)`` whose gradient is zero above the bound only where it would push ``x``
    further up (descent direction ``-grad`` > 0); a plain clamp zeroes it in both directions,
    leaving a parameter above the bound stuck there for good."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bound: float):
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp(max=bound)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        stuck = (x > ctx.bound) & (grad < 0)
        return torch.where(stuck, torch.zeros_like(grad), grad), None


def _logit_scale_to_scalar(module, state_dict, prefix, local_metadata):
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].numel() == 1:  # ZeRO-3 partitions are empty: leave them
        state_dict[key] = state_dict[key].reshape(())
    return state_dict


def _logit_scale_from_scalar(state_dict, prefix, *args):
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


def build_model(mc: ModelConfig, tokenizer, seed: int) -> ClipTrainModel:
    torch.manual_seed(seed)  # identical initial weights on every rank and every run
    model = ClipTrainModel(build_clip_config(mc, tokenizer))
    if mc.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_locks(model, mc)
    return model


def compile_layers(model: torch.nn.Module) -> int:
    """``model.compile``: ``torch.compile`` each stock transformer layer of ``model`` in place
    (``nn.Module.compile``: parameter names and the state dict are unchanged), in both towers and in
    any teacher's copy; returns how many layers were compiled.

        attach_method(model, cfg); compile_layers(model)     # after the method, before the engine

    Regional, not whole-tower: identical layers share one compiled graph (parameters are graph
    inputs), so the one-off compile is one layer per tower shape, and DeepSpeed's ZeRO-3 hooks on
    each layer's submodules still run. Subclassed layers (a method's token-dropping EViT layer,
    whose token count follows the keep-rate schedule) stay eager; the layers after them see a
    changing sequence length, which dynamo compiles once more as a dynamic dimension.
    Call after the method is attached: a teacher deep-copied from compiled layers would call the
    student's layers.
    """
    layers = [m for m in model.modules() if type(m) is CLIPEncoderLayer]
    for layer in layers:
        layer.compile()
    return len(layers)


def check_locks(mc: ModelConfig, shape: dict) -> None:
    """``model.lock_*``: the unlocked layers fit the tower, and no tower shares layers with the other."""
    for tower, key in (("image", "vision"), ("text", "text")):
        locked, unlocked = getattr(mc, f"lock_{tower}"), getattr(mc, f"lock_{tower}_unlocked_layers")
        if unlocked and not locked:
            raise ConfigError(f"config key 'model.lock_{tower}_unlocked_layers' ({unlocked}) needs model.lock_{tower}=true")
        if unlocked > shape[f"{key}_layers"]:
            raise ConfigError(f"config key 'model.lock_{tower}_unlocked_layers' ({unlocked}) must be at most the "
                              f"{tower} tower's depth (model.{key}_layers: {shape[f'{key}_layers']})")
        if locked and shape.get("shared_layers", 0):
            raise ConfigError(f"config key 'model.lock_{tower}' cannot be combined with model.shared_layers "
                              f"({shape['shared_layers']}): the shared layers belong to both towers")


def apply_locks(model: CLIPModel, mc: ModelConfig) -> None:
    """LiT's locked towers: ``requires_grad=False`` on a locked tower's weights but its top
    ``model.lock_<tower>_unlocked_layers`` layers and what sits above them (the final norm and the
    projection). ``param_groups`` leaves frozen weights out, so neither the optimizer nor ZeRO's
    gradient partitions hold them; the logit scale always trains."""
    check_locks(mc, preset_shape(mc))
    towers = (("image", model.vision_model, model.vision_model.post_layernorm, model.visual_projection),
              ("text", model.text_model, model.text_model.final_layer_norm, model.text_projection))
    for tower, body, final_norm, projection in towers:
        if not getattr(mc, f"lock_{tower}"):
            continue
        unlocked = getattr(mc, f"lock_{tower}_unlocked_layers")
        body.requires_grad_(False)
        projection.requires_grad_(False)
        if unlocked:
            layers = body.encoder.layers
            for layer in layers[len(layers) - unlocked:]:
                layer.requires_grad_(True)
            final_norm.requires_grad_(True)
            projection.requires_grad_(True)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases, embeddings (token/position/class) or the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (p.ndim < 2 or "norm" in name or name.endswith("bias") or "logit_scale" in name
                or "token_embedding" in name or "position_embedding" in name or "class_embedding" in name)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
