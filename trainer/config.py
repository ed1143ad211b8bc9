"""Typed run configuration: YAML file + dotted ``key=value`` overrides, validated up front.

    cfg = load_config("trainer/configs/demo.yaml", ["max_steps=100", "optim.lr=1e-3"])

Every section is a dataclass; each field's ``help`` doubles as documentation. Unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` naming the key and what is allowed;
the CLI turns that into one line on stderr and exit status 2, before any process group starts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in the config or the command line (reported without a traceback)."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    preset: str = _f("tiny", "model shape: tiny | vit-b-32 | vit-b-16 | vit-l-14 (see trainer/model.py)")
    image_size: int | None = _f(None, "override the preset's input resolution (pixels)")
    context_length: int | None = _f(None, "override the preset's text context length (tokens)")
    vision_width: int | None = _f(None, "override the preset: image tower width (hidden size)", min=1)
    vision_layers: int | None = _f(None, "override the preset: image tower depth", min=1)
    vision_heads: int | None = _f(None, "override the preset: image tower attention heads (must divide vision_width)", min=1)
    text_width: int | None = _f(None, "override the preset: text tower width (hidden size)", min=1)
    text_layers: int | None = _f(None, "override the preset: text tower depth", min=1)
    text_heads: int | None = _f(None, "override the preset: text tower attention heads (must divide text_width)", min=1)
    mlp_ratio: float | None = _f(None, "override the preset: MLP hidden size / width in both towers (CLIP: 4); width * ratio must be an integer", min=0.0)
    embed_dim: int | None = _f(None, "override the preset: joint embedding dimension (both projections)", min=1)
    shared_layers: int = _f(0, "GrowCLIP's shared encoder: the top N transformer layers are one set of weights used by both towers (their widths, heads and MLP must match); export-hf copies them into both", min=0)
    grad_checkpointing: bool = _f(False, "activation checkpointing in both towers (saves memory, costs a recompute)")
    compile: bool = _f(False, "torch.compile each transformer layer of both towers and of a method's teacher (regional compilation; a method's token-dropping layers stay eager); ZeRO 0-2 only; a one-off compile per process (CPU: ~40 s tiny, ~6 min ViT-B/16) for a step that saved 3-6 % on CPU, where fp32 steps are GEMM-bound (bench/results/compile_cpu_findings.md)")
    attn_implementation: str = _f("sdpa", "attention kernel: sdpa | eager", choices=("sdpa", "eager"))
    patch_size: int | None = _f(None, "override the preset: image patch size (pixels; must divide image_size)", min=1)
    act: str | None = _f(None, "MLP activation of both towers: quick_gelu (OpenAI CLIP's; the default when empty) | gelu (exact GELU, open_clip's models without -quickgelu); a pretrained checkpoint.init sets it", choices=("quick_gelu", "gelu"))
    lock_image: bool = _f(False, "LiT: freeze the image tower (embeddings, layers, final norm, projection); frozen weights are left out of the optimizer and ZeRO's gradient partitions")
    lock_image_unlocked_layers: int = _f(0, "with model.lock_image: leave the top N image layers trainable (and the final norm and projection above them)", min=0)
    lock_text: bool = _f(False, "freeze the text tower (embeddings, layers, final norm, projection) like model.lock_image")
    lock_text_unlocked_layers: int = _f(0, "with model.lock_text: leave the top N text layers trainable (and the final norm and projection above them)", min=0)


@dataclass
class DataConfig:
    train_shards: Any = _f(None, "training shards: a directory (all *.tar), a brace pattern, pipe: URL, or a list of those")
    val_shards: Any = _f(None, "validation shards (same forms); empty disables evaluation")
    manifest: str | None = _f(None, "optional file of kept sample keys (one per line); others are dropped")
    key_manifest_max_mb: float = _f(64.0, "largest key-per-line data.manifest held whole by every loader worker; above it, exit 2 with the convert-manifest command (per-shard form)", min=0.0)
    train_num_samples: int = _f(10000, "samples per training epoch (the data stream is reseeded each epoch)", min=1)
    batch_size: int = _f(64, "per-rank micro-batch size (pairs)", min=1)
    workers: int = _f(2, "data loader worker processes per rank", min=0)
    worker_start: str = _f("forkserver", "how loader workers start: forkserver (forked from one single-threaded server per rank; safe beside the rank's communication threads), spawn, or fork (quickest, but on Python < 3.12 a fork can hang when it races another thread)",
                           choices=("forkserver", "spawn", "fork"))
    shuffle_buffer: int = _f(1000, "samples in the shuffle buffer of each worker", min=1)
    crop_scale_min: float = _f(0.9, "RandomResizedCrop lower scale bound for training images", min=0.05, max=1.0)
    image_mean: list = _f([0.48145466, 0.4578275, 0.40821073], "per-channel normalisation mean (CLIP's)")
    image_std: list = _f([0.26862954, 0.26130258, 0.27577711], "per-channel normalisation std (CLIP's)")


@dataclass
class TokenizerConfig:
    path: str | None = _f(None, "local directory that transformers.AutoTokenizer loads (never a hub name)")


@dataclass
class OptimConfig:
    lr: float = _f(5e-4, "peak learning rate", min=0.0)
    min_lr_ratio: float = _f(0.0, "final lr as a fraction of the peak (cosine floor)", min=0.0, max=1.0)
    warmup_steps: int = _f(100, "linear warm-up steps", min=0)
    weight_decay: float = _f(0.2, "AdamW weight decay (not applied to norms, biases, embeddings, logit scale)", min=0.0)
    betas: list = _f([0.9, 0.98], "AdamW betas")
    eps: float = _f(1e-6, "AdamW epsilon", min=0.0)
    grad_clip: float = _f(1.0, "global gradient-norm clip (0 disables)", min=0.0)
    impl: str = _f("auto", "optimizer implementation: auto | apex | deepspeed | torch (auto: apex if installed, else DeepSpeed FusedAdam on GPU, else torch)",
                   choices=("auto", "apex", "deepspeed", "torch"))


@dataclass
class TrainConfig:
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step", min=1)
    global_batch_size: int | None = _f(None, "if set, must equal data.batch_size * grad_accum_steps * world size")
    accum_negatives: bool = _f(False, "with grad_accum_steps > 1: the contrastive loss over all batch_size x grad_accum_steps x world pairs of the step, exactly as one large batch (cached embeddings, then each micro-batch's forward again for its backward: GradCache, open_clip's --accum-freq), at one micro-batch's activation memory and one extra forward per micro-batch; false: each micro-batch's loss sees only its own batch_size x world pairs")
    max_bad_microbatches: int = _f(5, "stop after this many consecutive micro-batches dropped for a non-finite loss or gradient (an optimizer step whose accumulated gradients are non-finite drops all its micro-batches)", min=1)


@dataclass
class LossConfig:
    impl: str = _f("auto", "contrastive loss implementation", choices=("torch", "triton", "chunked", "auto"))
    terms: dict = _f({"clip": 1.0}, "named loss terms and their weights (see trainer/losses.py)")


@dataclass
class DeepSpeedConfig:
    config: str | None = _f(None, "DeepSpeed JSON file; default ds_configs/zero{zero_stage}.json")
    zero_stage: int = _f(1, "ZeRO stage", min=0, max=3)
    precision: str = _f("bf16", "training precision", choices=("bf16", "fp16", "fp32"))
    offload: bool = _f(False, "ZeRO-3 with optimizer and parameters offloaded to CPU (ds_configs/zero3_offload.json)")
    reduce_dtype: str = _f("fp32", "bf16 runs: the dtype gradients are reduced across ranks in (DeepSpeed's communication_data_type, and the loss's gathered-embedding gradient) and, at ZeRO 2-3, accumulated over micro-batches in (data_types.grad_accum_dtype): fp32 (ZeRO 0-1 still accumulate in bf16: DeepSpeed 0.19.8 has no fp32 accumulation for bf16 without ZeRO, and at stage 1 swaps in a BF16_Optimizer whose checkpoints its zero_to_fp32 cannot read) | bf16 (DeepSpeed's default: every micro-batch sum and every hop of a ring reduction rounds to 8 bits of mantissa); under fp16 it sets only the loss's sum (DeepSpeed's loss-scaled fp16 reductions are left as they are)", choices=("fp32", "bf16"))


@dataclass
class CheckpointConfig:
    every_steps: int = _f(500, "save a checkpoint every N optimizer steps (and at the end)", min=1)
    keep_last: int = _f(3, "complete checkpoints to keep", min=1)
    init: str | None = _f(None, "weights-only start: a checkpoint (step_N directory or run directory), a 'grow' output directory, a local transformers CLIPModel directory, or an open_clip checkpoint (a directory with open_clip_config.json and its weights, or a weights file with checkpoint.init_config); a pretrained source sets the model shape (and tokenizer.path when it holds a tokenizer); fresh optimizer and schedule (with --optimizer transform at grow time: its Adam moments), ignored once output_dir has its own checkpoint")
    init_config: str | None = _f(None, "with checkpoint.init an open_clip weights file (.safetensors, .bin, .pt): its open_clip model config JSON (e.g. open_clip's model_configs/ViT-B-32.json, or an open_clip_config.json)")
    resume: str = _f("auto", "auto (= latest): resume from output_dir's latest checkpoint if present | none: start fresh, refusing an output_dir that holds checkpoints | a checkpoint path (step_N directory) to continue from")
    elastic_batch: str = _f("keep", "resuming with another world size (or a config whose global batch differs from the checkpoint's): keep (the checkpoint's global batch, by setting train.grad_accum_steps = global batch / (data.batch_size x world size); exit 2 where that is not a whole number) | change (resume with this config's data.batch_size x train.grad_accum_steps x world size)", choices=("keep", "change"))


@dataclass
class LogConfig:
    every_steps: int = _f(10, "write metrics every N optimizer steps", min=1)
    tensorboard: bool = _f(True, "write TensorBoard event files under output_dir/tensorboard")
    progress: bool = _f(True, "progress bar with ETA on rank 0")


@dataclass
class EvalConfig:
    every_steps: int = _f(0, "evaluate every N steps (0: only at the end)", min=0)
    zeroshot: str | None = _f(None, "zeroshot.json with classnames and templates; val samples' json carries 'label'")
    batch_size: int = _f(128, "per-rank evaluation batch size", min=1)
    imagefolder: str | None = _f(None, "an image-folder class set (CLASS/*.jpg, ImageNet's layout) for zero-shot classification: keys imagefolder/top1, imagefolder/top5")
    imagefolder_classes: str = _f("auto", "class names of eval.imagefolder: auto (OpenAI's ImageNet-1k names when there are 1000 class folders, else the folder names) | folders | imagenet | a JSON file {classnames, templates?}")
    retrieval_images: str | None = _f(None, "folder of a retrieval set's images (with eval.retrieval_captions): keys retrieval/i2t_r1 ... retrieval/t2i_r10")
    retrieval_captions: str | None = _f(None, "captions of eval.retrieval_images: JSON {image: [captions]}, Karpathy's split JSON (its test split), or IMAGE<TAB>caption lines")


@dataclass
class DistConfig:
    timeout_s: int = _f(1800, "process-group timeout: a dead peer fails the job after this many seconds", min=10)
    backend: str = _f("auto", "auto (nccl on GPU, gloo on CPU) | nccl | gloo", choices=("auto", "nccl", "gloo"))


@dataclass
class DebugConfig:
    inject_nan_steps: list = _f([], "fault injection for tests: a NaN on rank 0 at these optimizer steps (at debug.inject_nan_microbatch)")
    inject_nan_microbatch: int = _f(0, "fault injection for tests: which good micro-batch of the step (0-based, < train.grad_accum_steps) gets the NaN; the last one is the accumulation boundary", min=0)
    inject_nan_where: str = _f("loss", "where the injected NaN arises: loss (the finished loss) | forward (inside the vision tower) | grad (the gradient only; the loss stays finite)", choices=("loss", "forward", "grad"))
    raise_at_step: int | None = _f(None, "fault injection for tests: rank 0 raises an exception after this optimizer step (a failing rank must exit, not hang)")
    kill_during_select_step: int | None = _f(None, "fault injection for tests: SIGKILL rank 0 after it wrote its first scored unit of the selection round at step N")
    signal_during_eval_step: int | None = _f(None, "fault injection for tests: rank 0 sends itself SIGUSR1 at the first forward of the evaluation after step N (eval.every_steps; not the final one)")
    signal_during_select_step: int | None = _f(None, "fault injection for tests: rank 0 sends itself SIGUSR1 after writing each scored unit of the selection round at step N")
    kill_during_save_step: int | None = _f(None, "fault injection for tests: SIGKILL this process after writing checkpoint N but before marking it latest")


@dataclass
class EclipseConfig:
    enabled: bool = _f(False, "ECLIPSE (docs/methods.md): momentum image teacher, shared text tower, expedited student, KL term 'teacher_kl'")
    momentum: float = _f(0.995, "EMA momentum m of the teacher (theta_bar <- m theta_bar + (1 - m) theta), every optimizer step", min=0.0, max=1.0)
    momentum_final: float | None = _f(None, "if set, m follows a cosine from eclipse.momentum to this value at max_steps")
    keep_rate: float = _f(0.7, "student's token keep rate after the schedule (EViT: fraction of patch tokens kept per drop layer; random: fraction kept at the input)", min=0.05, max=1.0)
    keep_schedule: str = _f("cosine", "student keep rate over training: cosine (1 through the warm-up, a cosine down to keep_rate over the shrink window, then keep_rate held; EViT) | constant (keep_rate from the first step)", choices=("cosine", "constant"))
    keep_warmup_steps: int | None = _f(None, "steps at keep rate 1 before the cosine down to keep_rate (default: optim.warmup_steps)", min=0)
    keep_shrink_steps: int | None = _f(None, "steps of the cosine from 1 down to keep_rate, after which keep_rate is held (default: a third of max_steps, EViT's 100 of 300 epochs)", min=1)
    drop_layers: list = _f([], "0-indexed vision layers that drop tokens (EViT); empty: EViT's relative depths, layers 3, 6, 9 of 12 (1, 2, 3 of the tiny preset's 4)")
    fuse_tokens: bool = _f(True, "EViT: fuse the dropped tokens into one, weighted by the class token's attention")
    expedite: str = _f("evit", "how the student saves compute: evit (token reorganisation) | random (FLIP patch dropout at the input) | none", choices=("evit", "random", "none"))
    kl_weight: float = _f(1.0, "lambda: weight of KL(teacher || student) ('teacher_kl'), both directions", min=0.0)
    text_stop_grad: bool = _f(True, "the KL term's gradient stops at the shared text embeddings (ECLIPSE)")


@dataclass
class PsdConfig:
    enabled: bool = _f(False, "progressive self-distillation (docs/methods.md): soft image-text targets for a subset of each batch, loss term 'self_distill'")
    teacher: str = _f("self", "where the soft targets come from: self (this pass, detached, at psd.teacher_tau) | momentum (an EMA model; ECLIPSE's teacher when eclipse.enabled) | previous (the model as it was psd.refresh_every steps ago)", choices=("self", "momentum", "previous"))
    teacher_tau: float = _f(2.0, "teacher temperature tau_t: targets softmax(teacher logits / tau_t); 1 with psd.teacher=self is the degenerate case (a down-weighted hard-label loss)", min=1e-3)
    alpha_max: float = _f(0.5, "a_max: weight of the soft targets at the end of the schedule, yhat = (1 - a_t) onehot + a_t q", min=0.0, max=1.0)
    subset: float = _f(0.5, "fraction of each global batch that gets soft targets, resampled every step (the same subset on every rank)", min=0.0, max=1.0)
    schedule: str = _f("linear", "a_t over training: linear (a_max * t / max_steps) | constant (a_max from the first step)", choices=("linear", "constant"))
    momentum: float = _f(0.995, "EMA momentum of psd.teacher=momentum when ECLIPSE is off (with ECLIPSE on, its teacher and eclipse.momentum are used)", min=0.0, max=1.0)
    refresh_every: int | None = _f(None, "psd.teacher=previous: copy the model into the teacher every N optimizer steps (default: one data epoch, as PS-KD)", min=1)
    inherit_teacher: bool = _f(True, "a run started from checkpoint.init (a checkpoint or a 'grow' directory) starts PSD's own teacher (momentum without ECLIPSE, previous) from the init's teacher, grown with the student's operator; false: from a copy of the init's student (a momentum teacher's EMA restarts; previous: a_t = 0 until the first refresh)")


@dataclass
class TextLmConfig:
    enabled: bool = _f(False, "EfficientCLIP's non-paired text (docs/methods.md): a text-only stream trains the text tower with a language-modelling loss, term 'text_lm' (trainer/methods/text_lm.py)")
    shards: Any = _f(None, "text-only shards (KEY.txt samples; make-demo-data writes DIR/text): a directory (all *.tar), a brace pattern, pipe: URL, or a list of those")
    batch_size: int = _f(40, "per-rank texts per micro-batch, next to data.batch_size pairs (public code: 256 pairs + 40 texts per GPU)", min=1)
    objective: str = _f("clm", "clm (next-token prediction with CLIP's causal text tower) | mlm (masked tokens, bidirectional attention for this stream only; the public code's)", choices=("clm", "mlm"))
    weight: float = _f(1.0, "weight of the 'text_lm' term next to the contrastive loss (the public code's (L_con + L_lm) / 2 is weight 1: AdamW ignores a constant loss scale; the weight sets the terms' ratio and when grad clipping bites)", min=0.0)
    mask_rate: float = _f(0.15, "mlm: fraction of the non-special, non-pad tokens of each text batch that are predicted", min=1e-6, max=1.0)
    mask_token_rate: float = _f(0.8, "mlm: of the predicted tokens, the fraction replaced by the mask token; the rest get a random token (public code: 80/20)", min=0.0, max=1.0)
    num_samples: int = _f(10000, "text samples per epoch of the text stream (reseeded each epoch, like data.train_num_samples)", min=1)
    shuffle_buffer: int = _f(1000, "texts in the shuffle buffer of each loader worker (the text stream uses data.workers workers)", min=1)
    head_scale: float = _f(1.0, "multiplies the tied head's logits (h @ E^T): 'grow' sets it to 1/f when the text tower grows f times wider (the tiled stream and embedding make h @ E^T f times larger), so the grown model's LM loss is the source's", min=1e-6)


@dataclass
class SelectConfig:
    enabled: bool = _f(False, "EfficientCLIP's ensemble confident learning (docs/methods.md) inside training: every select.every_steps, score the current subset with the model (plus the earlier rounds' scores) and train on the kept fraction only (trainer/methods/selection.py)")
    every_steps: int | None = _f(None, "a selection round every N optimizer steps (default: every epoch of the paired stream, as the public code)", min=1)
    keep: float | None = _f(None, "keep this fraction of the current subset per round, by score rank (default 0.9, the public code's; give at most one of keep, threshold, percentile)")
    threshold: float | None = _f(None, "instead of keep: keep samples whose ensemble score (the sum of the members' scores, select.score) is >= this")
    percentile: float | None = _f(None, "instead of keep: keep samples scoring >= this percentile (0-100) of the subset's scores")
    max_rounds: int | None = _f(None, "stop selecting after this many rounds (default: no limit)", min=1)
    temporal: bool = _f(True, "add the previous round's scores to this round's (the temporal ensemble of the public code)")
    batch_size: int = _f(256, "per-rank scoring batch size", min=1)
    score: str = _f("selfconf", "each member's score of a pair: selfconf (confident learning's self-confidence: the pair's log-softmax against the first select.pool pairs, both directions, at logits select.temperature * cosine) or cosine (the public code's)", choices=("selfconf", "cosine"))
    temperature: float | None = _f(100.0, "selfconf: the logit scale of the self-confidence (null: each member's own logit scale)")
    pool: int = _f(1024, "selfconf: the candidate pool, the first N pairs (of the current subset) in shard order", min=1)
    free_scores: bool = _f(False, "record each pair's self-confidence from the training forward itself (before the model trains on its micro-batch) to output_dir/select/free/")


@dataclass
class GrowthConfig:
    schedules: str = _f("continue", "the methods' step schedules (ECLIPSE keep rate and momentum, PSD's a_t) in a run started from a 'grow' directory: continue (from where the source run's schedules were: step growth.schedule_start + t of growth.schedule_steps) | restart (step t of max_steps, like the learning rate)", choices=("continue", "restart"))
    schedule_start: int = _f(0, "with growth.schedules=continue: the step the methods' schedules are at when this run starts ('grow' sets it to the source run's position)", min=0)
    schedule_steps: int | None = _f(None, "with growth.schedules=continue: the length of the methods' schedules ('grow' sets it to the source run's; empty: growth.schedule_start + max_steps)", min=1)


@dataclass
class Config:
    output_dir: str = _f("runs/default", "where checkpoints, metrics, TensorBoard and eval.json go")
    seed: int = _f(0, "seed for weights, data order and augmentation")
    max_steps: int = _f(1000, "optimizer steps to train", min=1)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eclipse: EclipseConfig = field(default_factory=EclipseConfig)
    psd: PsdConfig = field(default_factory=PsdConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    text_lm: TextLmConfig = field(default_factory=TextLmConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# ----------------------------------------------------------------------------- parsing

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _check_scalar(key: str, value, hint, meta: dict):
    """Coerce/validate one leaf value against its annotation and metadata."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if value is None:
        if optional or hint is Any:
            return None
        raise ConfigError(f"config key '{key}' must not be empty")
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if base is Any:
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"config key '{key}' must be {base.__name__}; got {value!r} ({type(value).__name__})")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"config key '{key}' must be >= {meta['min']}; got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"config key '{key}' must be <= {meta['max']}; got {value!r}")
    return value


RENAMED = {"train.max_bad_steps": "train.max_bad_microbatches (it counts micro-batches, not optimizer steps)"}
# What a run whose saved config predates a key did, where that differs from the key's default
# (ECL scored with the public code's cosine before select.score and its self-confidence default).
BEFORE_KEY = {"select.score": "cosine"}


def _build(cls, raw: dict, prefix: str = ""):
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping; got {raw!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    for name in unknown:
        if prefix + name in RENAMED:
            raise ConfigError(f"config key '{prefix}{name}' was renamed to {RENAMED[prefix + name]}")
    if unknown:
        section = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' in {section}; allowed: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw[name] if raw[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_scalar(prefix + name, raw[name], hint, dict(f.metadata))
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse value {text!r}: {err}") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: '{part}' is not a section")
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    cfg = _build(Config, apply_overrides(raw, list(overrides)))
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: Config) -> None:
    for name, weight in cfg.loss.terms.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise ConfigError(f"config key 'loss.terms.{name}' must be a non-negative number; got {weight!r}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1); got {cfg.optim.betas!r}")
    if cfg.deepspeed.offload and cfg.deepspeed.zero_stage != 3:
        raise ConfigError("config key 'deepspeed.offload' needs deepspeed.zero_stage=3; "
                          f"got zero_stage={cfg.deepspeed.zero_stage}")
    if cfg.model.compile and cfg.deepspeed.zero_stage == 3:
        # Measured: dynamo traces into ZeRO-3's per-submodule gather/release hooks, breaks the
        # graph at each and hits its recompile limit, so every layer falls back to eager after a
        # minutes-long compile (same losses, no speed-up).
        raise ConfigError("config key 'model.compile' is not supported with deepspeed.zero_stage=3: ZeRO-3's "
                          "per-submodule parameter hooks break each compiled layer back into eager pieces; "
                          "use zero_stage 1 or 2, or model.compile=false")
    if len(cfg.data.image_mean) != 3 or len(cfg.data.image_std) != 3:
        raise ConfigError("config keys 'data.image_mean' and 'data.image_std' must have 3 values each")
    if cfg.train.accum_negatives and cfg.train.grad_accum_steps < 2:
        raise ConfigError("config key 'train.accum_negatives' needs train.grad_accum_steps >= 2 "
                          f"(got {cfg.train.grad_accum_steps}): it spans the micro-batches of one step")
    if cfg.train.accum_negatives and cfg.debug.inject_nan_steps:
        raise ConfigError("config key 'debug.inject_nan_steps' (fault injection) is not supported with "
                          "train.accum_negatives")
    if cfg.debug.inject_nan_microbatch >= cfg.train.grad_accum_steps:
        raise ConfigError(f"config key 'debug.inject_nan_microbatch' must be < train.grad_accum_steps "
                          f"({cfg.train.grad_accum_steps}); got {cfg.debug.inject_nan_microbatch}")


def check_world(cfg: Config, world_size: int) -> None:
    """Batch arithmetic against the launched world (before any process group starts)."""
    g = cfg.train.global_batch_size
    local = cfg.data.batch_size * cfg.train.grad_accum_steps
    if g is not None and g != local * world_size:
        raise ConfigError(
            f"train.global_batch_size({g}) != data.batch_size({cfg.data.batch_size}) * "
            f"train.grad_accum_steps({cfg.train.grad_accum_steps}) * world size({world_size}) = "
            f"{local * world_size}; launch {g // local if g % local == 0 else 'a matching number of'} "
            f"ranks or change the batch keys")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls=Config, prefix: str = "") -> list[str]:
    """One line per key with its default and help text (used by ``train --help-config``)."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix}{f.name} = {default!r}  # {f.metadata.get('help', '')}")
    return lines
