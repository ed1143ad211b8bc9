"""The training run: ``python -m trainer train --config FILE [key=value ...]``.

``run(cfg, launch)`` builds everything, resumes from ``output_dir/checkpoints/latest`` if present,
and loops: fetch micro-batches, ``train_step``, log, evaluate, checkpoint. The step itself is
``train_step`` (forward, named loss terms, backward, optimizer step); everything periodic lives in
the outer loop.

Exit status: 0 finished; 75 stopped by SIGUSR1/SIGTERM after writing a checkpoint (re-run the
same command to resume); 1 too many consecutive non-finite losses. A stop signal is answered at
the next optimizer step's boundary, at the next forward of an evaluation (which is abandoned: the
step's checkpoint is written and the run exits 75), at the next forward of an ECL round (which runs
after its step's checkpoint: exit 75, the round re-runs on resume, reusing its finished units),
and right after a resume (exit 75 with the checkpoint just loaded still ``latest``).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from . import data as D
from .checkpoint import (CheckpointManager, ResumePlan, RankStates, apply_plan, atomic_write_text, load_elastic,
                         restore_frozen, resume_plan, to_universal)
from .config import Config, to_dict
from .dist import (LaunchEnv, all_reduce, all_reduce_flags, barrier, from_rank0, hostname, init_distributed,
                   is_main, rank as this_rank, shutdown)
from .engine import build_ds_config, build_engine
from .evaluate import evaluate_all
from .faults import (GradGuard, NanInjector, StopRequested, fp16_loss_scale, loss_scale_state, restore_loss_scale,
                     skip_update)
from .flops import peak_tflops
from .losses import LossContext, build_terms, compute_loss
from .methods import (Inherited, Method, attach as attach_method, build_method, load_init, loss_terms, prefixes,
                      step_flops, train_flops)
from .metrics import MetricsLogger
from .model import build_model

log = logging.getLogger("trainer")
EXIT_PREEMPTED = 75
EXIT_BAD_LOSS = 1


class StopRequest:
    """SIGUSR1 (SLURM's pre-timeout signal) or SIGTERM (preemption): checkpoint, then exit 75."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signum = signum

    def requested(self) -> bool:
        return self.signum != 0

    def anywhere(self) -> bool:
        """Whether some rank got the signal (a collective: every rank calls it)."""
        (flag,) = all_reduce_flags(float(self.requested()))
        return bool(flag)


class TrainData(D.ResumableStream):
    """The image-text micro-batches of this rank (``data.*``), with a resumable position;
    ``manifest`` (an ECL round's selection) replaces ``data.manifest``."""

    def __init__(self, cfg: Config, decoder: D.SampleDecoder, rank: int, world: int, position: dict,
                 manifest: str | None = None):
        d = cfg.data
        urls = D.shard_list(d.train_shards, "data.train_shards")
        super().__init__(urls, decoder, batch_size=d.batch_size, num_samples=d.train_num_samples, seed=cfg.seed,
                         rank=rank, world=world, workers=d.workers, worker_start=d.worker_start, shuffle_buffer=d.shuffle_buffer,
                         manifest=D.read_manifest(manifest or d.manifest, urls, d.key_manifest_max_mb, d.train_shards),
                         position=position)


class TooManyBadSteps(RuntimeError):
    pass


def train_step(engine, next_batch, terms, cfg: Config, step: int, state: dict, guard: GradGuard,
               inject: NanInjector, stop_flag, method: Method):
    """One optimizer step: forward/backward over ``grad_accum_steps`` good micro-batches.

    A micro-batch whose loss is non-finite on any rank is dropped by every rank and replaced by
    the next one; if the loss was finite but a gradient was not, every rank skips the update and
    the step starts over with new micro-batches (see trainer/faults.py); under fp16 a gradient
    overflow above the loss scale's floor is DeepSpeed's loss scaling at work: the step starts
    over and it is counted in ``fp16_overflows``, not as bad micro-batches.

    No host sync per micro-batch: every rank runs every micro-batch's backward (so every rank
    enters the same collectives) and keeps "was my loss finite?" on the device; the ranks agree
    once, at the accumulation boundary, in one all-reduce of those flags, the gradients' flag and
    the stop flag (the step's one host read). A non-finite loss has poisoned the accumulated
    gradients by then, so the attempt's update is skipped (:func:`_attempt_failed`) and its good
    micro-batches are run again first, with the inputs and random state they had, followed by new
    ones: the same micro-batches as dropping the bad one before its backward, in the same order,
    so the same gradients (the failure path pays one more pass over them; faults are rare).
    ``method`` (trainer/methods) is called before the forward, for its loss inputs, and after
    each applied update. Returns ``(metrics, data wait s, stop)``.
    """
    if cfg.train.accum_negatives:
        return cached_negatives_step(engine, next_batch, terms, cfg, step, state, guard, stop_flag, method)
    dtype = next(engine.module.parameters()).dtype
    sizes = (cfg.data.batch_size,) * engine.dp_world_size  # training micro-batches are always full
    cuda = engine.device.type == "cuda"
    k_steps, t_data = cfg.train.grad_accum_steps, 0.0
    method.prepare(step)
    replay: list[_Micro] = []   # good micro-batches of a failed attempt, to run again first
    rng_after = None            # the random state after the failed attempt's last forward
    while True:
        sums: dict[str, torch.Tensor] = {}
        ran: list[tuple[_Micro, torch.Tensor]] = []
        for n in range(k_steps):
            if replay:
                micro = replay.pop(0)
                _set_step_rng(micro.rng, engine.device)
            else:
                if rng_after is not None:   # new micro-batches continue where the last attempt left
                    _set_step_rng(rng_after, engine.device)
                    rng_after = None
                t0 = time.perf_counter()
                mb = next_batch()
                extra = method.micro_kwargs(engine.device)   # e.g. text_lm's batch from its own stream
                t_data += time.perf_counter() - t0
                micro = _Micro(mb, extra, _step_rng(engine.device, cuda))
            fault = inject.where if n == cfg.debug.inject_nan_microbatch and inject.due(step) else None
            hook = NanInjector.forward_hook(engine.module) if fault == "forward" else None
            image, text, scale, *more = engine(**_inputs(micro.batch, engine.device, dtype, cfg), **micro.extra)
            if hook is not None:
                hook.remove()
            if fault == "grad":
                NanInjector.poison_grad(image)
            if not micro.observed:   # once per micro-batch, as the model was before training on it
                method.observe(micro.batch, image, text, scale)
                micro.observed = True
            ctx = LossContext(image, text, scale, step=step, impl=cfg.loss.impl, sizes=sizes, extras=method.extras(*more))
            total, parts = compute_loss(terms, ctx)
            if fault == "loss":
                total = total * float("nan")
            ran.append((micro, ~torch.isfinite(total.detach()).reshape(())))
            engine.backward(total)
            for name, value in {"loss": total, **parts}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            if n < k_steps - 1:
                engine.step()  # inside the accumulation: DeepSpeed only counts the micro-step
        flags = torch.stack([*(bad.float() for _, bad in ran), guard.flag(),
                             torch.full((), stop_flag(), device=engine.device)])
        *loss_bad, grads_bad, stop_now = all_reduce(flags, "max").tolist()   # the step's host read
        if any(loss_bad):
            rng_after = _step_rng(engine.device, cuda)
            replay = _attempt_failed(engine, ran, loss_bad, cfg, step, state)
            continue
        state["bad_streak"] = 0
        applied = _boundary(engine, grads_bad, method, cfg, step, state, k_steps)
        if applied:
            return {k: v / k_steps for k, v in sums.items()}, t_data, bool(stop_now)


class _Micro:
    """A micro-batch of an attempt: its inputs, the method's inputs, the random state before its forward."""

    def __init__(self, batch: dict, extra: dict, rng):
        self.batch, self.extra, self.rng, self.observed = batch, extra, rng, False


def _step_rng(device, cuda: bool):
    # host-side state (the CUDA generator's seed and offset live on the host): no sync
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None


def _set_step_rng(rng, device) -> None:
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)


def _attempt_failed(engine, ran: list, loss_bad: list[float], cfg: Config, step: int, state: dict) -> list:
    """Some micro-batch's loss was non-finite on some rank: skip the update (the accumulated
    gradients hold its backward; under fp16 DeepSpeed's loss scale is put back, as this is not its
    overflow), count each bad micro-batch, and return the good ones, to be run again."""
    keep = loss_scale_state(engine)
    with skip_update(engine):
        engine.step()
    restore_loss_scale(engine, keep)
    good = []
    for (micro, _), bad in zip(ran, loss_bad):
        if bad:
            _count_bad(state, 1, cfg, f"step {step}: non-finite loss, micro-batch dropped")
        else:
            state["bad_streak"] = 0
            good.append(micro)
    return good


def _inputs(mb: dict, device, dtype, cfg: Config) -> dict:
    """A micro-batch's model inputs on the device: uint8 images normalised there (data.to_model_pixels)."""
    return {"pixel_values": D.to_model_pixels(mb["image"], device, dtype, cfg.data.image_mean, cfg.data.image_std),
            "input_ids": mb["input_ids"].to(device, non_blocking=True),
            "attention_mask": mb["attention_mask"].to(device, non_blocking=True)}


def _boundary(engine, grads_bad: float, method: Method, cfg: Config, step: int, state: dict, good: int) -> bool:
    """The accumulation boundary, with the ranks' agreed gradient flag: apply or skip the update.
    Returns whether it was applied (False: the step starts over with new micro-batches)."""
    scale = fp16_loss_scale(engine)
    if not grads_bad:
        engine.step()
        # fp16: DeepSpeed's own check may still find an overflow (the guard read the same reduced
        # gradients; belt and braces): it skipped the update, so the step starts over.
        if scale is None or engine.was_step_applied():
            method.update(step)
            return True
    else:
        with skip_update(engine):
            engine.step()
    if scale is not None and scale[0] > scale[1]:   # fp16 loss scaling's own overflow
        state["fp16_overflows"] = state.get("fp16_overflows", 0) + 1
        log.info("step %d: fp16 gradients overflowed at loss scale %g; update skipped, DeepSpeed's scale "
                 "now %g (not a fault)", step, scale[0], fp16_loss_scale(engine)[0])
    else:
        _count_bad(state, good, cfg, f"step {step}: non-finite gradients, update skipped and "
                                     f"its {good} micro-batch(es) dropped")
    return False


def cached_negatives_step(engine, next_batch, terms, cfg: Config, step: int, state: dict, guard: GradGuard,
                          stop_flag, method: Method):
    """One optimizer step with ``train.accum_negatives``: the loss over all ``K = grad_accum_steps``
    micro-batches' pairs of every rank, as one batch of ``K x batch_size x world`` (GradCache,
    Gao et al. 2021; open_clip's ``--accum-freq``).

    1. Each micro-batch's forward without autograd: the embeddings are cached (the RNG state
       before each forward too, so the second forward draws the same randomness).
    2. The loss of the whole step over the cached embeddings (the gathered kernels, with this
       rank's ``K x batch_size`` rows), backward to the embeddings and the logit scale only.
    3. Each micro-batch's forward again, with autograd, and the backward of
       ``<emb, dL/demb>`` (+ the scale's share): by the chain rule the parameters' gradients sum
       to the large batch's, at one micro-batch's activation memory, for one extra forward each.
       DeepSpeed's division by the accumulation steps is off (``scale_wrt_gas=False``): the
       loss is already the step's mean.
    A non-finite loss drops the step's K micro-batches; the boundary is train_step's."""
    dtype = next(engine.module.parameters()).dtype
    k_steps, b = cfg.train.grad_accum_steps, cfg.data.batch_size
    sizes = (k_steps * b,) * engine.dp_world_size
    cuda = engine.device.type == "cuda"
    t_data = 0.0
    method.prepare(step)
    while True:
        inputs, rngs, images, texts = [], [], [], []
        for _ in range(k_steps):
            t0 = time.perf_counter()
            mb = next_batch()
            t_data += time.perf_counter() - t0
            inputs.append(_inputs(mb, engine.device, dtype, cfg))
            rngs.append((torch.get_rng_state(), torch.cuda.get_rng_state(engine.device) if cuda else None))
            with torch.no_grad():
                image, text, scale, *_ = engine(**inputs[-1])
            images.append(image)
            texts.append(text)
        image = torch.cat(images).requires_grad_()
        text = torch.cat(texts).requires_grad_()
        scale = scale.detach().requires_grad_()
        total, parts = compute_loss(terms, LossContext(image, text, scale, step=step, impl=cfg.loss.impl, sizes=sizes))
        if all_reduce((~torch.isfinite(total.detach())).float().reshape(1), "max").item():
            _count_bad(state, k_steps, cfg, f"step {step}: non-finite loss, its {k_steps} micro-batches dropped")
            continue
        total.backward()
        g_image, g_text, g_scale = image.grad.split(b), text.grad.split(b), scale.grad / k_steps
        for k in range(k_steps):
            cpu_rng, cuda_rng = rngs[k]
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, engine.device)
            image_k, text_k, scale_k, *_ = engine(**inputs[k])
            surrogate = ((image_k * g_image[k]).sum() + (text_k * g_text[k]).sum()
                         + (scale_k * g_scale).sum())
            engine.backward(surrogate, scale_wrt_gas=False)
            if k < k_steps - 1:
                engine.step()  # inside the accumulation: DeepSpeed only counts the micro-step
        state["bad_streak"] = 0
        flags = torch.stack([guard.flag(), torch.full((), stop_flag(), device=engine.device)])
        grads_bad, stop_now = all_reduce(flags, "max").tolist()
        if _boundary(engine, grads_bad, method, cfg, step, state, k_steps):
            return ({"loss": total.detach().float(), **{n: v.detach().float() for n, v in parts.items()}}, t_data,
                    bool(stop_now))


def _count_bad(state: dict, n: int, cfg: Config, what: str) -> None:
    state["bad_total"] += n
    state["bad_streak"] += n
    log.warning("%s (%d in a row)", what, state["bad_streak"])
    if state["bad_streak"] >= cfg.train.max_bad_microbatches:
        raise TooManyBadSteps(state["bad_streak"])


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def seed_rank(seed: int, rank: int, step: int | None = None) -> None:
    """Seed the step's randomness (dropout, FLIP's patch masks, ...) per rank: the model was built
    from ``seed`` on every rank (identical initial weights), which left every rank's generators
    in the same state, so every rank would draw the same masks for different samples."""
    s = int(np.random.SeedSequence([seed, rank] + ([] if step is None else [step])).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)   # CPU and every CUDA device


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_run_files(config_yaml: str, ds_config: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", config_yaml)
    atomic_write_text(out / "ds_config.json", json.dumps(ds_config, indent=2))


def fresh_state() -> dict:
    """The trainer state of a run at step 0 (what a checkpoint's trainer state restores)."""
    return {"step": 0, "data": None, "bad_total": 0, "bad_streak": 0, "injected": []}


def decided_plan(cfg: Config, world: int) -> ResumePlan | None:
    """:func:`resume_plan` as rank 0 reads it, on every rank: the resume source is read from the
    shared file system once, so a stale cache on one node cannot make the ranks load different
    checkpoints (or one start fresh) and hang. A ConfigError there is raised on every rank."""
    return from_rank0(lambda: resume_plan(cfg, world))


def universal_load(cfg: Config, plan: ResumePlan | None, world: int) -> bool:
    """Whether the resume goes through DeepSpeed's universal checkpoint: another world size under
    ZeRO 1-3, whose optimizer state is partitioned by world size (ZeRO-0's is whole)."""
    return plan is not None and plan.world != world and cfg.deepspeed.zero_stage >= 1


def resume_state(cfg: Config, ckpt: CheckpointManager, engine, method: Method, inherited: Inherited | None,
                 plan: ResumePlan | None, world: int | None = None) -> dict:
    """Load the checkpoint of ``plan`` (:func:`decided_plan`, None: a fresh start) into the
    engine; return the trainer state. A fresh start from ``checkpoint.init`` has its weights
    in the model already (``inherited``). A plan at another world size or worker count resumes
    elastically (:func:`elastic_state`)."""
    world = engine.dp_world_size if world is None else world
    if plan is None:
        if inherited is not None:
            method.inherit(inherited)
        return fresh_state()
    root, tag = Path(plan.root), plan.tag
    if plan.elastic:
        return elastic_state(cfg, ckpt, engine, method, plan, world)
    tag = ckpt.readable_tag(tag, root)   # falls back to the previous complete one, saying so
    state = ckpt.load(engine, tag, root=root)
    _set_rng_state(state.pop("rng"))
    method.restore(state, where=root / tag)
    log.info("resumed from %s (step %d)", root / tag, state["step"])
    return state


def elastic_state(cfg: Config, ckpt: CheckpointManager, engine, method: Method, plan: ResumePlan,
                  world: int) -> dict:
    """Resume a checkpoint written by ``plan.world`` ranks x ``plan.workers`` loader workers on
    this layout: model, optimizer moments, learning-rate schedule and step through DeepSpeed's
    universal checkpoint (converted once, by rank 0, under ``checkpoints/elastic``, removed after
    the load); the methods' state from every old rank's (:meth:`Method.restore_elastic`); the
    data position redistributed (``data.elastic_position``); each rank's random generators
    seeded afresh from ``(seed, rank, step)`` (the old ranks' generators have no counterpart)."""
    root = Path(plan.root)
    tag = ckpt.readable_tag(plan.tag, root, writers=plan.world)
    universal = universal_load(cfg, plan, world)
    source = root
    if universal:
        work = ckpt.root / "elastic"
        def convert() -> None:
            log.info("converting %s (world size %d) to a universal checkpoint under %s", root / tag, plan.world, work)
            to_universal(root, tag, work)
        from_rank0(convert)   # rank 0 converts; a failure there is raised on every rank, none hangs
        source = work
    load_elastic(engine, source, tag, universal)
    states = RankStates(root, tag, plan.world)
    if universal:
        restore_frozen(engine, root, tag, skip=prefixes())
    first = states[0]
    state = {**fresh_state(), **{k: first[k] for k in ("step", "bad_total", "bad_streak", "injected") if k in first}}
    urls = D.shard_list(cfg.data.train_shards, "data.train_shards")   # rank 0 globs; the loader reuses it
    state["data"] = D.elastic_position(states.field("data"), plan.workers, this_rank(), world, cfg.data.workers,
                                       urls=urls, seed=cfg.seed, key=state["step"])
    seed_rank(cfg.seed, this_rank(), state["step"])
    method.restore_elastic(states, root / tag, plan.workers, state["step"])
    barrier()
    if universal and is_main():
        shutil.rmtree(source / tag, ignore_errors=True)   # the converted copy; the run's own checkpoints follow
    log.warning("resumed elastically from %s (step %d), written by world size %d x data.workers %d, now %d x %d; "
                "global batch %d (train.grad_accum_steps %d); the data epoch continues with fresh streams "
                "(docs/running.md, elastic resume)", root / tag, state["step"], plan.world, plan.workers, world,
                cfg.data.workers, plan.global_batch if cfg.checkpoint.elastic_batch == "keep" else
                cfg.data.batch_size * cfg.train.grad_accum_steps * world, cfg.train.grad_accum_steps)
    return state


def run(cfg: Config, le: LaunchEnv, tokenizer) -> int:
    """Train to ``max_steps`` (resuming when possible); returns the process exit status."""
    stop = StopRequest()
    device = init_distributed(le, cfg.dist.backend, cfg.dist.timeout_s)
    setup_logging(le.rank)
    logging.getLogger("trainer").warning("rank %d/%d on %s (launcher: %s, device: %s)", le.rank, le.world_size,
                                         os.environ.get("SLURMD_NODENAME", hostname()), le.launcher, device)
    out = Path(cfg.output_dir)
    plan = decided_plan(cfg, le.world_size)
    apply_plan(cfg, plan)   # the global batch the checkpoint trained at (checkpoint.elastic_batch)
    ds_config = build_ds_config(cfg, le.world_size)
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if le.rank == 0:
        write_run_files(config_yaml, ds_config, out)
    decoder = D.train_decoder(cfg, tokenizer)
    if cfg.data.workers:   # the loader workers' server (data.worker_start) imports while the engine is built
        D.prestart_workers(cfg.data.worker_start, D.TrainStream, decoder)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    attach_method(model, cfg)
    inherited = load_init(model, cfg, resuming=plan is not None)   # checkpoint.init: weights in before ZeRO flattens or partitions them
    engine, optimizer_name = build_engine(cfg, model, ds_config)
    method = build_method(cfg, engine)
    terms = build_terms(cfg.loss, loss_terms(cfg))
    log.info("world_size=%d rank=%d zero_stage=%d precision=%s optimizer=%s params=%.2fM global_batch=%d",
             le.world_size, le.rank, cfg.deepspeed.zero_stage, cfg.deepspeed.precision, optimizer_name,
             sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
             ds_config["train_batch_size"])
    if method.describe():
        log.info("%s", method.describe())

    ckpt = CheckpointManager(out / "checkpoints", cfg.checkpoint.keep_last)
    seed_rank(cfg.seed, le.rank)   # a resume then restores each rank's own saved generators
    state = resume_state(cfg, ckpt, engine, method, inherited, plan, le.world_size)
    if state["step"] > 0 and stop.anywhere():   # loading can take minutes of SLURM's grace time
        log.warning("stop requested by signal while resuming: step %d's checkpoint is still the latest; re-run "
                    "the same command to resume", state["step"])
        method.close()
        shutdown()
        return EXIT_PREEMPTED

    train_data = TrainData(cfg, decoder, le.rank, le.world_size, state["data"], manifest=method.data_manifest())
    metrics_log = MetricsLogger(out, tensorboard=cfg.log.tensorboard, enabled=le.rank == 0, resume_step=state["step"])
    global_batch = ds_config["train_batch_size"]

    def save() -> None:
        state["data"] = train_data.position
        ckpt.save(engine, state["step"], {**state, "rng": _rng_state(), "world_size": le.world_size,
                                          **method.checkpoint_state()}, config_yaml,
                  kill_before_latest=cfg.debug.kill_during_save_step == state["step"])

    guard = GradGuard(engine)
    inject = NanInjector(cfg.debug.inject_nan_steps, cfg.debug.inject_nan_where, le.rank, state["injected"])
    progress = _progress(cfg, le.rank, state["step"])
    flops = train_flops(cfg, state["step"], le.world_size)   # analytic, cumulative (trainer/flops.py)
    window = _new_window(flops)
    peak = peak_tflops(torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None,
                       cfg.deepspeed.precision)
    status = 0
    try:
        while state["step"] < cfg.max_steps:
            # e.g. an ECL round: after this step's checkpoint, so a kill re-runs it
            try:
                manifest = method.between_steps(state["step"], engine, tokenizer, metrics_log.log,
                                                should_stop=stop.requested)
            except StopRequested:   # the work re-runs on resume (what it finished is kept)
                log.warning("stop requested by signal between steps (e.g. an ECL round) at step %d: checkpoint %s "
                            "is the latest; re-run the same command to resume", state["step"], ckpt.latest_tag())
                status = EXIT_PREEMPTED
                break
            if manifest is not None:
                train_data.set_manifest(D.read_manifest(manifest, train_data.urls))
            t0 = time.perf_counter()
            upcoming = state["step"] + 1
            try:
                metrics, t_data, stop_now = train_step(engine, train_data.next, terms, cfg, upcoming, state, guard,
                                                       inject, lambda: float(stop.requested()), method)
            except TooManyBadSteps as err:
                log.error("stopping: %s consecutive micro-batches dropped for a non-finite loss or gradient "
                          "(train.max_bad_microbatches=%d); lower optim.lr, check the data, or use "
                          "deepspeed.precision=bf16", err, cfg.train.max_bad_microbatches)
                status = EXIT_BAD_LOSS
                break
            state["step"] = upcoming
            last_step_flops = step_flops(cfg, upcoming, le.world_size)
            flops += last_step_flops
            if cfg.debug.raise_at_step == state["step"] and le.rank == 0:
                raise RuntimeError(f"debug.raise_at_step: injected failure after step {state['step']}")
            dt = time.perf_counter() - t0
            _accumulate(window, metrics, dt, t_data)
            if progress is not None:
                progress.update(1)
            if state["step"] % cfg.log.every_steps == 0 or state["step"] == cfg.max_steps:
                logged = {**_window_metrics(window, engine, global_batch, state, train_data, le.world_size),
                          "flops": flops, **_throughput(flops - window["flops0"], window["t"], le.world_size,
                                                        last_step_flops / global_batch, peak)}
                metrics_log.log(logged, state["step"])
                if progress is not None:
                    progress.set_postfix(loss=f"{logged['loss']:.3f}")
                window = _new_window(flops)
            if cfg.eval.every_steps and state["step"] % cfg.eval.every_steps == 0 and state["step"] < cfg.max_steps:
                stop_now |= run_eval(cfg, engine, tokenizer, metrics_log, state["step"], out, le,
                                     _eval_stop(cfg, stop, state["step"], le.rank)) is STOPPED
            if (state["step"] % cfg.checkpoint.every_steps == 0 or state["step"] == cfg.max_steps or stop_now
                    or method.wants_checkpoint(state["step"])):
                save()
            if stop_now:
                log.warning("stop requested by signal: checkpoint %s written; re-run the same command to resume",
                            ckpt.root / f"step_{state['step']}")
                status = EXIT_PREEMPTED
                break
        if status == 0 and run_eval(cfg, engine, tokenizer, metrics_log, state["step"], out, le,
                                    stop.requested) is STOPPED:
            log.warning("stop requested by signal during the final evaluation: checkpoint %s holds the finished "
                        "run; re-run the same command to evaluate it", ckpt.root / f"step_{state['step']}")
            status = EXIT_PREEMPTED
    finally:
        # Stop the loader workers before the interpreter exits, on every path: they ignore
        # SIGTERM (see data.ignore_stop_signals), so after an exception multiprocessing's exit
        # handler would terminate-and-join them forever and the failed rank would never exit.
        train_data.close()
        method.close()
    if progress is not None:
        progress.close()
    metrics_log.close()
    shutdown()
    return status


def _progress(cfg: Config, rank: int, initial: int):
    if rank != 0 or not cfg.log.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.max_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=2.0)


def _new_window(flops: float = 0.0) -> dict:
    """Sums over the steps since the last log line (``flops``: the run's count when it opens)."""
    return {"t": 0.0, "wait": 0.0, "steps": 0, "sums": {}, "flops0": flops}


def _throughput(window_flops: float, seconds: float, world: int, flops_per_sample: float,
                peak: float | None) -> dict:
    """What a cluster user compares with published throughput: the model FLOPs of one training
    sample (forward + backward, every method's extra forwards charged; trainer/flops.py), the
    achieved TFLOP/s per device over the window (data waits included, as MFU is usually quoted),
    and MFU against the device's dense peak where it is known (GPUs in flops.PEAK_TFLOPS)."""
    tflops = window_flops / max(seconds, 1e-9) / world / 1e12
    return {"flops_per_sample": flops_per_sample, "tflops_per_s": tflops,
            **({"mfu": tflops / peak} if peak else {})}


def _accumulate(window: dict, metrics: dict, dt: float, t_data: float) -> None:
    window["t"] += dt
    window["wait"] += t_data
    window["steps"] += 1
    for k, v in metrics.items():
        window["sums"][k] = window["sums"].get(k, 0.0) + v


def _window_metrics(window: dict, engine, global_batch: int, state: dict, train_data: TrainData,
                    world: int) -> dict:
    """The logged values of the steps since the last log line, for the whole global batch.

    Each rank's loss (and each term) is its share, defined so that the mean over ranks is the
    global-batch value (that is what DeepSpeed's gradient averaging optimises); one all-reduce
    here, at log time, sums the shares and the ranks' skipped-sample counts.
    """
    n = max(1, window["steps"])
    names = sorted(window["sums"])  # the same order on every rank
    local = torch.stack([window["sums"][k].double().reshape(()) / n for k in names])
    local = torch.cat([local, local.new_tensor([float(train_data.skipped_local())])])
    *shares, skipped = all_reduce(local, "sum").tolist()  # the window's one host sync
    return {**{k: v / world for k, v in zip(names, shares)},
            "lr": engine.get_lr()[0], "samples_per_s": global_batch * window["steps"] / max(window["t"], 1e-9),
            "data_wait_frac": window["wait"] / max(window["t"], 1e-9), "logit_scale": _logit_scale(engine.module),
            "data/skipped": int(skipped), "bad_microbatches": state["bad_total"],
            **({"fp16_overflows": state.get("fp16_overflows", 0), "loss_scale": scale[0]}
               if (scale := fp16_loss_scale(engine)) is not None else {})}


def _logit_scale(module) -> float:
    import deepspeed
    # Gathers the partitioned parameter under ZeRO-3; a no-op for every other stage.
    with torch.no_grad(), deepspeed.zero.GatheredParameters([module.logit_scale]):
        return float(module.scale().float())


STOPPED = object()   # run_eval's answer when a stop signal cut the evaluation short


def _eval_stop(cfg: Config, stop: StopRequest, step: int, rank: int):
    """The evaluation's stop poll; ``debug.signal_during_eval_step`` sends rank 0 SIGUSR1 from it."""
    def poll() -> bool:
        if cfg.debug.signal_during_eval_step == step and rank == 0 and not stop.requested():
            os.kill(os.getpid(), signal.SIGUSR1)
        return stop.requested()
    return poll


def run_eval(cfg: Config, engine, tokenizer, metrics_log: MetricsLogger, step: int, out: Path, le: LaunchEnv,
             should_stop=None):
    """Evaluate every view and log it; None without validation shards, ``STOPPED`` when a stop
    signal on any rank cut it short (nothing is logged then)."""
    if not cfg.data.val_shards:
        return None
    try:
        result = evaluate_all(engine.module, cfg, tokenizer, le.rank, le.world_size, device=engine.device,
                              should_stop=should_stop)
    except StopRequested:
        log.warning("stop requested by signal: evaluation at step %d abandoned", step)
        return STOPPED
    result["step"] = step
    if le.rank == 0:
        metrics_log.log({k: v for k, v in result.items() if k != "step"}, step, prefix="eval")
        atomic_write_text(out / "eval.json", json.dumps(result, indent=2))
        log.info("eval step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in result.items() if k != "step"))
    return result
