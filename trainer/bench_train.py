"""Training-step benchmark: open_clip's step, a bare torch loop and ours, on the same data.

    python -m trainer bench train [--config trainer/configs/demo.yaml] [--steps 30] [--warmup 5]
        [--nproc 2] [--impls openclip,bare,ours] [--out bench/results] [--tag T]
        [--profile timers|cprofile] [key=value ...]

Each implementation runs in its own ``torchrun`` child (``--nproc`` ranks; gloo on CPU, NCCL on
GPU), one after the other, on the same shards, seed, per-rank batch, accumulation, precision and
world size (the config's, after the ``key=value`` overrides; ``max_steps`` becomes
``warmup + steps``, so the lr schedule runs its warm-up and cosine over the benchmark):

- ``openclip``: ``open_clip.model.CLIP`` with our preset's shape (quick_gelu, eos pooling at our
  tokenizer's eos id), ``ClipLoss(local_loss=True, gather_with_grad=True)``, DDP, torch AdamW
  built as open_clip_train builds it, its ``cosine_lr``, ``get_autocast`` precision, grad-norm
  clip and ``logit_scale.clamp_(0, ln 100)`` after each step.
- ``bare``: our model (``build_model``), our loss (``kernels.gathered_clip_loss``, ``loss.impl``),
  torch AdamW as the engine builds it, LambdaLR with our schedule, DDP; no DeepSpeed.
- ``ours``: ``build_engine`` + ``train_step`` with GradGuard and NanInjector, in a copy of
  ``run()``'s loop (window metrics and MetricsLogger at ``log.every_steps``, the stop-signal
  all-reduce every step); checkpoints and evaluation are left out.
- ``eclipse``: ``ours`` with ECLIPSE on (``eclipse.enabled=true``, the keep rate held at
  ``eclipse.keep_rate`` from the first step: ``eclipse.keep_schedule=constant``): the expedited
  student's forward/backward plus the teacher's forward and EMA, against ``ours`` (not in the
  default ``--impls``; ``--impls ours,eclipse`` measures ECLIPSE's cost).
- ``psd-self``, ``psd-momentum``, ``psd-previous``: ``ours`` with progressive self-distillation
  on (``psd.enabled=true``, ``psd.teacher=...``, the other ``psd.*`` keys as given) and its soft
  targets from the first step (``psd.schedule=constant``, and the ``previous`` teacher refreshed
  every step, the costliest case): the cost of each teacher against ``ours``.

All three read batches from ``TrainData`` (the WebDataset stream), so the data cost is the same.
After ``--warmup`` steps, ``--steps`` steps are timed between two barriers:
``samples_per_s = steps * global_batch / measured_s``. The per-step split (mean over ranks),
with ``torch.cuda.synchronize`` at each mark on GPUs: ``data`` (waiting for the next batch),
``forward`` (host-to-device copy, model forward and loss, and for ours the finite-loss check),
``backward``, ``optimizer`` (clip, step, schedule; DeepSpeed's ``engine.step``) and ``other``
(everything else: ours' per-term ``.item()``, GradGuard flag, logging, stop flag). Peak memory
per rank: ``max_memory_allocated`` on GPUs, VmHWM above the RSS before the model was built on CPUs.
``--profile timers`` also times the suspected overheads of our step; ``--profile cprofile`` adds
cProfile on every rank (rank 0's stats are written); both slow the step, so the table is marked.

Writes ``OUT/train_<tag>.jsonl`` (one row per impl), ``train_<tag>.md`` and ``train_<tag>.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import linecache
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from .config import ConfigError

IMPLS = ("openclip", "bare", "ours", "eclipse", "psd-self", "psd-momentum", "psd-previous")
PHASES = ("data", "forward", "backward", "optimizer", "other")
ROOT = Path(__file__).resolve().parent.parent


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m trainer bench train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="trainer/configs/demo.yaml")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    p.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    p.add_argument("--impls", default="openclip,bare,ours", help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default=None, help="file names train_<tag>.*; default DEVICE_PRESET_DATE")
    p.add_argument("--rounds", type=int, default=1, help="run the impls this many times, alternating the order; "
                   "each row is its median round (on a shared machine)")
    p.add_argument("--profile", choices=("timers", "cprofile"), default=None)
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return p.parse_intermixed_args(argv)


# ============================================================================ parent

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _args(argv)
    if args.worker:
        return _worker(args)
    impls = [i for i in args.impls.split(",") if i]
    bad = sorted(set(impls) - set(IMPLS))
    if bad or not impls:
        raise ConfigError(f"--impls: unknown {bad or impls}; choose from {','.join(IMPLS)}")
    if args.steps < 1 or args.warmup < 0 or args.nproc < 1 or args.rounds < 1:
        raise ConfigError("--steps, --nproc and --rounds must be >= 1, --warmup >= 0")
    cfg = _check_config(args)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tag = args.tag or f"{device}_{cfg.model.preset}_{_dt.date.today().isoformat()}"
    command = "python -m trainer bench train " + shlex.join(argv)
    uptime_before = _uptime()
    results = {impl: [] for impl in impls}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for rnd in range(args.rounds):  # alternate the order, so no impl always runs first
            for impl in impls if rnd % 2 == 0 else impls[::-1]:
                results[impl].append(_launch(impl, args, Path(tmp), rnd))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for impl in impls:
            prof = Path(tmp) / f"{impl}.prof.txt"
            if prof.is_file():
                shutil.copy(prof, out / f"train_{tag}_cprofile_{impl}.txt")
    meta = {"tag": tag, "command": command, "commit": _commit(), "uptime_before": uptime_before,
            "uptime_after": _uptime(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    rows = [_row(results[impl], meta) for impl in impls]
    paths = _write(rows, meta, out)
    for r in rows:
        print(json.dumps({k: r[k] for k in ("impl", "samples_per_s", "step_ms", "peak_mem_mb", "loss_first",
                                            "loss_last", "params")}), flush=True)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _check_config(args):
    """Everything a user can get wrong, before any rank starts (ConfigError: exit 2)."""
    from . import data as D
    from .config import check_world, load_config
    from .engine import build_ds_config
    from .losses import build_terms, method_terms
    from .model import preset_shape

    cfg = load_config(args.config, _overrides(args, "check"))
    check_world(cfg, args.nproc)
    preset_shape(cfg.model)
    build_terms(cfg.loss, method_terms(cfg))
    build_ds_config(cfg, args.nproc)
    D.expand_shards(cfg.data.train_shards, "data.train_shards")
    D.read_manifest(cfg.data.manifest, D.expand_shards(cfg.data.train_shards, "data.train_shards"))
    D.load_tokenizer(cfg.tokenizer.path)
    return cfg


def _overrides(args, output_dir) -> list[str]:
    return [*args.overrides, f"max_steps={args.warmup + args.steps}", f"output_dir={output_dir}",
            "log.progress=false"]


def _launch(impl: str, args, tmp: Path, rnd: int) -> dict:
    """One implementation under torchrun; returns rank 0's result (exits 1 on a failed run)."""
    result = tmp / f"{impl}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_port", str(_free_port()), "-m", "trainer.bench_train", "--worker", impl,
           "--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--result", str(result), *(["--profile", args.profile] if args.profile else []),
           *_overrides(args, tmp / f"run_{impl}")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}
    print(f"bench train: {impl} ({args.nproc} ranks, {args.warmup} + {args.steps} steps, round {rnd + 1} of "
          f"{args.rounds}) ...", file=sys.stderr, flush=True)
    load = _loadavg()
    t0 = time.monotonic()
    with open(tmp / f"{impl}.log", "w+") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        log.seek(0)
        text = log.read()
    if code != 0 or not result.is_file():
        sys.stderr.write(text[-6000:])
        raise SystemExit(f"bench train: {impl} failed (exit {code}); its output is above")
    out = json.loads(result.read_text())
    out.update(loadavg_before=load, loadavg_after=_loadavg(), wall_s=round(time.monotonic() - t0, 1), round=rnd + 1)
    return out


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average: {_loadavg()}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ============================================================================ worker (one rank)

class Phases:
    """Wall time per step phase; ``mark(name)`` books the time since the previous mark to ``name``."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.sums = dict.fromkeys(PHASES, 0.0)
        self.last = 0.0

    def _now(self) -> float:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset(self) -> None:
        self.sums = dict.fromkeys(PHASES, 0.0)

    def begin(self) -> None:
        self.last = self._now()

    def mark(self, name: str) -> None:
        now = self._now()
        self.sums[name] += now - self.last
        self.last = now


def _worker(args) -> int:
    import torch

    from kernels.bench import _device_name

    from . import data as D
    from .config import load_config
    from .dist import barrier, launch_env, shutdown
    from .model import preset_shape
    from .train import TrainData, setup_logging

    cfg = load_config(args.config, args.overrides)
    le = launch_env()
    device = _init(args.worker, cfg, le)
    setup_logging(le.rank)
    tokenizer = D.load_tokenizer(cfg.tokenizer.path)
    shape = preset_shape(cfg.model)
    decoder = D.SampleDecoder(tokenizer, shape["context_length"], D.build_transforms(
        shape["image_size"], cfg.data.image_mean, cfg.data.image_std, cfg.data.crop_scale_min, train=True))
    data = TrainData(cfg, decoder, le.rank, le.world_size, None)
    phases = Phases(device)
    suspects = _instrument() if args.profile else None
    memory = _PeakMemory(device)
    memory.start()
    step, info = BUILDERS[args.worker](cfg, tokenizer, shape, device, le, data, phases)
    losses = []

    def run_step(n):
        phases.begin()
        losses.append(step(n))
        phases.mark("other")
    for n in range(1, args.warmup + 1):
        run_step(n)
    profiler = _start_timed(phases, suspects, args.profile)
    barrier()
    t0, cpu0, loader0 = phases._now(), time.process_time(), _children_cpu_s()
    for n in range(args.warmup + 1, args.warmup + args.steps + 1):
        run_step(n)
    phases._now()
    barrier()
    measured_s = time.perf_counter() - t0
    cpu_s, loader_s = time.process_time() - cpu0, _children_cpu_s() - loader0
    if profiler is not None:
        profiler.disable()
    if suspects is not None:
        suspects.active = False
        suspects.flag_latency_ms = _flag_latency_ms()
    info.pop("close", lambda: None)()
    result = _gather(args, cfg, le, device, info, losses, phases, memory, suspects,
                     measured_s=measured_s, cpu_s=cpu_s, loader_s=loader_s)
    if le.rank == 0:
        result.update(device=_device_name(device), torch=torch.__version__, threads_per_rank=torch.get_num_threads())
        tmp = Path(args.result).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, args.result)
        if profiler is not None:
            _write_pstats(profiler, Path(args.result).with_suffix(".prof.txt"), args)
    data._it = None  # shut the loader workers down before the group goes
    shutdown()
    return 0


def _init(impl: str, cfg, le):
    """Ours starts the group as the trainer does (through DeepSpeed); the others as torch does."""
    import datetime

    import torch
    import torch.distributed as dist

    from .dist import init_distributed, select_device

    if impl in OURS:
        return init_distributed(le, cfg.dist.backend, cfg.dist.timeout_s)
    device = select_device(le.local_rank)
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    kw = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kw["device_id"] = device
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist.timeout_s), **kw)
    return device


def _start_timed(phases, suspects, profile):
    phases.reset()
    if suspects is not None:
        suspects.active = True
    if profile != "cprofile":
        return None
    import cProfile
    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _gather(args, cfg, le, device, info, losses, phases, memory, suspects, *, measured_s, cpu_s, loader_s) -> dict:
    """Combine every rank's numbers (one all-reduce per quantity, after the timed steps)."""
    import torch

    from .dist import all_reduce

    world, steps = le.world_size, args.steps
    loss_t = torch.stack([torch.as_tensor(v).detach().float().cpu() for v in losses]).double()
    global_losses = (all_reduce(loss_t, "sum") / world).tolist()
    phase_ms = all_reduce(torch.tensor([phases.sums[k] for k in PHASES], dtype=torch.float64), "sum")
    per_rank = torch.zeros(3, world, dtype=torch.float64)
    per_rank[:, le.rank] = torch.tensor([memory.peak_mb(), cpu_s, loader_s], dtype=torch.float64)
    per_rank = all_reduce(per_rank, "sum")
    out = {"impl": args.worker, **info, "world": world, "steps": steps, "warmup": args.warmup,
           "batch_per_rank": cfg.data.batch_size, "grad_accum": cfg.train.grad_accum_steps,
           "global_batch": cfg.data.batch_size * cfg.train.grad_accum_steps * world,
           "precision": cfg.deepspeed.precision, "preset": cfg.model.preset, "measured_s": measured_s,
           "phase_ms": {k: 1e3 * v / world / steps for k, v in zip(PHASES, phase_ms.tolist())},
           "losses": global_losses, "peak_mem_mb_per_rank": [round(v, 1) for v in per_rank[0].tolist()],
           "cpu_ms_per_step": 1e3 * per_rank[1].mean().item() / steps,
           "loader_cpu_ms_per_step": 1e3 * per_rank[2].mean().item() / steps,
           "profile": args.profile}
    if suspects is not None:
        out["suspects"] = suspects.gather(world, steps)
    return out


class _PeakMemory:
    """GPU: max_memory_allocated above the start; CPU: VmHWM above the RSS at the start (the mark
    reset through /proc/self/clear_refs, as kernels/bench.py does), else the ru_maxrss delta."""

    def __init__(self, device):
        from kernels.bench import _Memory
        self.mem, self.maxrss_kib = _Memory(device), None

    def start(self) -> None:
        try:
            self.mem.start()
        except OSError:
            import resource
            self.maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mb(self) -> float:
        if self.maxrss_kib is not None:
            import resource
            return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss_kib) / 1024
        return self.mem.peak() / 2**20


def _children_cpu_s() -> float:
    """CPU seconds of this rank's child processes (its data loader workers) so far."""
    import psutil
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


# ---------------------------------------------------------------------------- the three steps
# Each builder returns ``(step(n) -> this rank's loss share, info)``; ``step`` books its phases.

def _build_ours(cfg, tokenizer, shape, device, le, data, phases):
    """The trainer's own step (train_step) in a copy of run()'s loop, minus checkpoints and eval."""
    from . import train as T
    from .engine import build_ds_config, build_engine
    from .faults import GradGuard, NanInjector
    from .losses import build_terms, method_terms
    from .methods import attach as attach_method, build_method
    from .metrics import MetricsLogger
    from .model import build_model

    ds_config = build_ds_config(cfg, le.world_size)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    params = sum(p.numel() for p in model.parameters())
    attach_method(model, cfg)
    engine, optimizer_name = build_engine(cfg, model, ds_config)
    method = build_method(cfg, engine)
    terms = build_terms(cfg.loss, method_terms(cfg))
    guard = GradGuard(engine.module)
    inject = NanInjector(cfg.debug.inject_nan_steps, cfg.debug.inject_nan_where, le.rank, [])
    state = {"step": 0, "data": None, "bad_total": 0, "bad_streak": 0, "injected": []}
    stop = T.StopRequest()
    if le.rank == 0:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    metrics_log = MetricsLogger(cfg.output_dir, tensorboard=cfg.log.tensorboard, enabled=le.rank == 0)
    global_batch = ds_config["train_batch_size"]
    window = [T._new_window()]
    _book(engine, "backward", phases, before="forward", after="backward")
    _book(engine, "step", phases, before="other", after="optimizer")

    def next_batch():
        phases.mark("other")
        mb = data.next()
        phases.mark("data")
        return mb

    def step(n: int):
        t0 = time.perf_counter()
        metrics, t_data, _ = T.train_step(engine, next_batch, terms, cfg, n, state, guard, inject,
                                          lambda: float(stop.signum != 0), method)  # run()'s stop check rides along
        state["step"] = n
        T._accumulate(window[0], metrics, time.perf_counter() - t0, t_data)
        if n % cfg.log.every_steps == 0 or n == cfg.max_steps:
            metrics_log.log(T._window_metrics(window[0], engine, global_batch, state, data, le.world_size), n)
            window[0] = T._new_window()
        return metrics["loss"]
    return step, {"params": params, "optimizer": optimizer_name, "loss_impl": _loss_impl(cfg, device),
                  "close": lambda: (metrics_log.close(), method.close())}   # method: text_lm's loader workers


def _book(obj, name: str, phases: Phases, *, before: str, after: str) -> None:
    """Wrap ``obj.name`` (an instance attribute shadows the method) to book the phases around it."""
    inner = getattr(obj, name)

    def timed(*args, **kwargs):
        phases.mark(before)
        out = inner(*args, **kwargs)
        phases.mark(after)
        return out
    setattr(obj, name, timed)


def _build_bare(cfg, tokenizer, shape, device, le, data, phases):
    """Our model and loss in a plain DDP + torch AdamW loop: the engine's overhead made visible."""
    import torch

    from kernels import gathered_clip_loss

    from .engine import lr_lambda
    from .model import build_model, param_groups

    model = build_model(cfg.model, tokenizer, cfg.seed).to(device)
    ddp = _ddp(model, device)
    o, on_gpu = cfg.optim, device.type == "cuda"
    # What build_optimizer falls back to without apex / DeepSpeed's FusedAdam.
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  fused=on_gpu, foreach=not on_gpu)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    autocast = _autocast(cfg.deepspeed.precision, device)

    def forward_loss(mb):
        with autocast():
            image, text, scale = ddp(pixel_values=mb["image"].to(device, non_blocking=True),
                                     input_ids=mb["input_ids"].to(device, non_blocking=True),
                                     attention_mask=mb["attention_mask"].to(device, non_blocking=True))
            return gathered_clip_loss(image, text, scale, impl=cfg.loss.impl)
    step = _torch_loop(cfg, data, phases, ddp, optimizer, _scaler(cfg, device), forward_loss,
                       before=lambda n: None, after=schedule.step)
    name = f"torch.optim.AdamW({'fused' if on_gpu else 'foreach'})"
    return step, {"params": sum(p.numel() for p in model.parameters()), "optimizer": name,
                  "loss_impl": _loss_impl(cfg, device)}


def build_openclip_model(shape: dict, tokenizer):
    """``open_clip.model.CLIP`` with a preset's shape: quick_gelu (as transformers' CLIP configs)
    and text pooling at our tokenizer's eos id (open_clip's default argmax pools at the largest
    token id, which is the eos token of OpenAI's BPE only)."""
    import open_clip

    vision = dict(layers=shape["vision_layers"], width=shape["vision_width"], patch_size=shape["patch_size"],
                  head_width=shape["vision_width"] // shape["vision_heads"], image_size=shape["image_size"],
                  mlp_ratio=shape["mlp_ratio"])
    text = dict(context_length=shape["context_length"], vocab_size=len(tokenizer), width=shape["text_width"],
                heads=shape["text_heads"], layers=shape["text_layers"], mlp_ratio=shape["mlp_ratio"], pool_type="eos",
                eos_id=tokenizer.eos_token_id)
    return open_clip.model.CLIP(embed_dim=shape["embed_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=True,
                                output_dict=True)


def _build_openclip(cfg, tokenizer, shape, device, le, data, phases):
    """open_clip's training step (open_clip_train.train.train_one_epoch, accum_freq 1)."""
    import torch
    from open_clip.loss import ClipLoss

    torch.manual_seed(cfg.seed)
    model = build_openclip_model(shape, tokenizer).to(device)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    ddp = _ddp(model, device)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=le.rank,
                       world_size=le.world_size)
    o = cfg.optim
    # open_clip_train.main's AdamW: no decay on gains, biases and the logit scale; default flags.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": o.weight_decay}],
                                  lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    schedule = _openclip_schedule(optimizer, cfg)
    precision = {"bf16": "amp_bf16", "fp16": "amp", "fp32": "fp32"}[cfg.deepspeed.precision]
    try:
        from open_clip_train.precision import get_autocast
        autocast = get_autocast(precision, device_type=device.type)
    except ImportError:
        autocast = _autocast(cfg.deepspeed.precision, device)

    def forward_loss(mb):
        images = mb["image"].to(device=device, non_blocking=True)
        texts = mb["input_ids"].to(device=device, non_blocking=True)
        with autocast():
            losses = loss_fn(**ddp(images, texts), output_dict=True)
            return sum(losses.values())

    def clamp():
        with torch.no_grad():  # "we clamp to 4.6052 = ln(100), as in the original paper"
            model.logit_scale.clamp_(0, math.log(100))
    step = _torch_loop(cfg, data, phases, ddp, optimizer, _scaler(cfg, device), forward_loss,
                       before=lambda n: schedule(n - 1), after=clamp)
    return step, {"params": sum(p.numel() for p in model.parameters()), "loss_impl": "open_clip.ClipLoss",
                  "optimizer": "torch.optim.AdamW(default flags: for-loop on CPU, foreach on CUDA)"}


def _openclip_schedule(optimizer, cfg):
    try:
        from open_clip_train.scheduler import cosine_lr
    except ImportError:
        from .engine import lr_lambda
        fn = lr_lambda(cfg)

        def cosine_lr(opt, base_lr, _warmup, _steps):
            def adjust(i):
                for g in opt.param_groups:
                    g["lr"] = base_lr * fn(i)
            return adjust
    return cosine_lr(optimizer, cfg.optim.lr, cfg.optim.warmup_steps, cfg.max_steps)


def _torch_loop(cfg, data, phases, ddp, optimizer, scaler, forward_loss, *, before, after):
    """One optimizer step of a plain DDP loop: zero grad, micro-batches, clip, step, ``after()``."""
    import torch

    accum, clip = cfg.train.grad_accum_steps, cfg.optim.grad_clip
    params = [p for p in ddp.parameters() if p.requires_grad]

    def step(n: int):
        before(n)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(accum):
            mb = data.next()
            phases.mark("data")
            with ddp.no_sync() if i < accum - 1 else contextlib.nullcontext():
                loss = forward_loss(mb)
                phases.mark("forward")
                scaled = loss / accum if accum > 1 else loss
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                phases.mark("backward")
            total = total + loss.detach()  # kept on the device: no host sync per step
        if scaler is not None and clip:
            scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        after()
        phases.mark("optimizer")
        return total / accum
    return step


def _ddp(model, device):
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _autocast(precision: str, device):
    import torch
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _scaler(cfg, device):
    import torch
    return torch.amp.GradScaler(device.type) if cfg.deepspeed.precision == "fp16" else None


def _loss_impl(cfg, device) -> str:
    from kernels import resolve_impl
    fn = "gathered_distill_loss" if cfg.eclipse.enabled or cfg.psd.enabled else "gathered_clip_loss"
    return f"kernels.{fn}({resolve_impl(cfg.loss.impl, device)})"


def _build_eclipse(cfg, *args):
    """``ours`` with ECLIPSE on, the student at its final keep rate from the first step."""
    import dataclasses
    cfg = dataclasses.replace(cfg, eclipse=dataclasses.replace(cfg.eclipse, enabled=True, keep_schedule="constant"))
    return _build_ours(cfg, *args)


def _build_psd(teacher: str):
    def build(cfg, *args):
        """``ours`` with PSD on and its soft targets from the first step (see the module doc)."""
        import dataclasses
        psd = dataclasses.replace(cfg.psd, enabled=True, teacher=teacher, schedule="constant",
                                  refresh_every=1 if teacher == "previous" else cfg.psd.refresh_every)
        return _build_ours(dataclasses.replace(cfg, psd=psd), *args)
    return build


BUILDERS = {"openclip": _build_openclip, "bare": _build_bare, "ours": _build_ours, "eclipse": _build_eclipse,
            **{f"psd-{t}": _build_psd(t) for t in ("self", "momentum", "previous")}}
OURS = ("ours", "eclipse", "psd-self", "psd-momentum", "psd-previous")   # run through the trainer's engine


# ---------------------------------------------------------------------------- --profile
SUSPECTS = {
    "layout": "gathered_layout: all-reduce + .tolist() of batch sizes (per loss call)",
    "finite_item": "finite-loss check: isfinite(loss).item()",
    "finite_flag": "finite-loss check: all_reduce",
    "term_item": ".item() per loss term after backward",
    "guard_hooks": "GradGuard hooks: isfinite(grad).all() per parameter",
    "guard_item": "GradGuard.flag(): .item() at the boundary",
    "guard_flag": "boundary all_reduce: GradGuard flag + stop signal (one call)",
    "stop_flag": "run(): stop-signal all_reduce (before the speed work; now rides with guard_flag)",
    "window": "run(): window metrics at log steps (all-reduce, logit scale)",
}


class Suspects:
    """Wall time of the suspected overheads, booked by who called them (on while ``active``)."""

    def __init__(self):
        self.active = False
        self.ms, self.calls = defaultdict(float), defaultdict(int)
        self.flag_latency_ms = float("nan")

    def wrap(self, fn, label_of):
        """``fn`` timed under ``label_of(caller_frame)`` (None: not booked)."""
        def timed(*args, **kwargs):
            label = label_of(sys._getframe(1)) if self.active else None
            if label is None:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[label] += 1e3 * (time.perf_counter() - t0)
                self.calls[label] += 1
        return timed

    def gather(self, world: int, steps: int) -> dict:
        """ms and calls per step for each suspect: mean and max over ranks."""
        import torch

        from .dist import all_reduce
        local = torch.tensor([[self.ms[k] for k in SUSPECTS], [self.calls[k] for k in SUSPECTS]], dtype=torch.float64)
        mean, top = all_reduce(local, "sum") / world, all_reduce(local, "max")
        out = {k: {"what": SUSPECTS[k], "ms_per_step": mean[0, i].item() / steps,
                   "ms_per_step_max_rank": top[0, i].item() / steps, "calls_per_step": mean[1, i].item() / steps}
               for i, k in enumerate(SUSPECTS)}
        latency = all_reduce(torch.tensor([self.flag_latency_ms], dtype=torch.float64), "sum") / world
        return {**out, "flag_latency_ms": latency.item()}


def _flag_latency_ms(calls: int = 50) -> float:
    """One ``all_reduce_flags`` with the ranks in step (no waiting for a slower peer): the
    intrinsic cost of each such sync point, against which the booked times above are read."""
    from .dist import all_reduce_flags, barrier
    barrier()
    t0 = time.perf_counter()
    for _ in range(calls):
        all_reduce_flags(0.0)
    return 1e3 * (time.perf_counter() - t0) / calls


def _caller_line(frame) -> str:
    return linecache.getline(frame.f_code.co_filename, frame.f_lineno)


def _instrument() -> Suspects:
    """Wrap the suspects where the trainer and the kernels look them up (before anything is built)."""
    import torch

    import kernels.gather
    import kernels.reference
    import kernels.spec

    from . import faults
    from . import train as T

    s = Suspects()
    original = kernels.gather.gathered_layout
    layout = s.wrap(original, lambda f: "layout")
    for mod in (kernels.gather, kernels.spec, kernels.reference):
        if getattr(mod, "gathered_layout", None) is original:
            mod.gathered_layout = layout

    def flag_label(frame):
        line = _caller_line(frame)
        return "finite_flag" if "isfinite" in line else "guard_flag" if "grads_bad" in line else None
    T.all_reduce = s.wrap(T.all_reduce, flag_label)

    def item_label(frame):
        name = frame.f_code.co_name
        if name == "train_step":
            return "finite_item" if "isfinite" in _caller_line(frame) else "term_item"
        return "guard_item" if name == "flag" and frame.f_code.co_filename == faults.__file__ else None
    torch.Tensor.item = s.wrap(torch.Tensor.item, item_label)
    faults.GradGuard._check = s.wrap(faults.GradGuard._check, lambda f: "guard_hooks")
    T._window_metrics = s.wrap(T._window_metrics, lambda f: "window")
    return s


def _write_pstats(profiler, path: Path, args) -> None:
    import io
    import pstats
    buf = io.StringIO()
    buf.write(f"cProfile of rank 0 over {args.steps} timed steps of {args.worker} (totals, not per step)\n")
    stats = pstats.Stats(profiler, stream=buf).strip_dirs()
    stats.sort_stats("cumulative").print_stats(150)
    stats.sort_stats("tottime").print_stats(50)
    path.write_text(buf.getvalue())


# ============================================================================ results

def _row(rounds: list[dict], meta: dict) -> dict:
    """An impl's row: its median round by samples/s (the upper median for an even count)."""
    speed = [r["steps"] * r["global_batch"] / r["measured_s"] for r in rounds]
    r = rounds[sorted(range(len(rounds)), key=speed.__getitem__)[len(rounds) // 2]]
    ph = r["phase_ms"]
    row = {"impl": r["impl"], "samples_per_s": r["steps"] * r["global_batch"] / r["measured_s"],
           "step_ms": 1e3 * r["measured_s"] / r["steps"], **{f"{k}_ms": ph[k] for k in PHASES},
           "peak_mem_mb": max(r["peak_mem_mb_per_rank"]), "loss_first": r["losses"][0], "loss_last": r["losses"][-1]}
    keep = ("params", "measured_s", "steps", "warmup", "global_batch", "batch_per_rank", "grad_accum", "world",
            "precision", "preset", "optimizer", "loss_impl", "peak_mem_mb_per_rank", "losses", "cpu_ms_per_step",
            "loader_cpu_ms_per_step", "threads_per_rank", "loadavg_before", "loadavg_after", "wall_s", "profile",
            "suspects", "device", "torch", "round")
    row.update({k: r[k] for k in keep if k in r})
    row.update(rounds=len(rounds), samples_per_s_rounds=speed, loadavg_rounds=[x["loadavg_before"] for x in rounds])
    row.update(date=meta["date"], commit=meta["commit"], tag=meta["tag"], command=meta["command"])
    return row


def _write(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    stem = out / f"train_{meta['tag']}"
    jsonl, md, png = stem.with_suffix(".jsonl"), stem.with_suffix(".md"), stem.with_suffix(".png")
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _plot(rows, png, meta["tag"])
    md.write_text(_markdown(rows, meta, png.name))
    return [jsonl, md, png]


def _ratios(rows: list[dict]) -> list[str]:
    by = {r["impl"]: r for r in rows}
    if "ours" not in by:
        return []
    lines = [f"ours / {other}: **{by['ours']['samples_per_s'] / by[other]['samples_per_s']:.2f}x** samples/s "
             f"(step time {by['ours']['step_ms'] / by[other]['step_ms']:.2f}x)"
             for other in ("openclip", "bare") if other in by]
    for name, what in (("eclipse", "ECLIPSE's"), ("psd-self", "PSD's self teacher"),
                       ("psd-momentum", "PSD's momentum teacher"), ("psd-previous", "PSD's previous teacher")):
        if name in by:
            lines.append(f"{name} / ours ({what} cost over plain CLIP): step time "
                         f"**{by[name]['step_ms'] / by['ours']['step_ms']:.2f}x**")
    return lines


def _markdown(rows: list[dict], meta: dict, png: str) -> str:
    r0 = rows[0]
    params = sorted({r["params"] for r in rows})
    lines = [f"# Training-step benchmark `{meta['tag']}`", "",
             "open_clip's training step, a bare torch loop (our model and loss, DDP, torch AdamW) and our "
             "trainer's step (DeepSpeed engine + `train_step`), one after the other on the same shards, global "
             "batch, precision and ranks (`trainer/bench_train.py`).", "",
             f"- device: {r0['device']}; {r0['world']} ranks; {r0.get('threads_per_rank')} thread(s) per rank; "
             f"torch {r0.get('torch')}",
             f"- date: {meta['date']}; commit {meta['commit']}",
             f"- command: `{meta['command']}`",
             f"- shape: preset `{r0['preset']}`, parameters "
             + (f"{params[0]:,} (every implementation)" if len(params) == 1
                else ", ".join(f"{r['impl']} {r['params']:,}" for r in rows)),
             f"- batch: {r0['batch_per_rank']} per rank x {r0['grad_accum']} accumulation x {r0['world']} ranks = "
             f"global {r0['global_batch']}; precision {r0['precision']}",
             f"- steps: {r0['warmup']} warm-up + {r0['steps']} timed (lr schedule over those "
             f"{r0['warmup'] + r0['steps']})",
             f"- machine load (`uptime`): before `{meta['uptime_before']}`; after `{meta['uptime_after']}`",
             _rounds_line(rows)]
    if r0.get("profile"):
        lines.append(f"- **profiled run (`--profile {r0['profile']}`): the instrumentation slows every step; "
                     "read the times relative to each other, not as throughput**")
    lines += ["", "| impl | samples/s | step ms | data | forward | backward | optimizer | other | peak MB/rank "
              "| loss first → last | load (1/5/15 min) at start | optimizer | loss |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['samples_per_s']:.1f} | {r['step_ms']:.1f} | "
                     + " | ".join(f"{r[k + '_ms']:.1f}" for k in PHASES)
                     + f" | {r['peak_mem_mb']:.0f} | {r['loss_first']:.3f} → {r['loss_last']:.3f} | "
                     f"{r.get('loadavg_before', '?')} | {r['optimizer']} | {r['loss_impl']} |")
    lines += ["", *[f"- {s}" for s in _ratios(rows)], "",
              "samples/s = timed steps x global batch / wall time between two barriers around them. Phase "
              "columns: ms per step, mean over ranks (`data` waiting for the batch; `forward` copy to the "
              "device, forward and loss, and ours' finite-loss check; `backward`; `optimizer` clip, step, "
              "schedule, open_clip's clamp; `other` the rest: ours' per-term `.item()`, GradGuard flag, window "
              "metrics, stop flag). Peak memory: VmHWM above the RSS before the model was built (CPU), "
              "max_memory_allocated (GPU); loader workers not included. Loader workers used "
              + ", ".join(f"{r['impl']} {r.get('loader_cpu_ms_per_step', 0):.0f}" for r in rows)
              + " CPU ms per step per rank, the ranks themselves "
              + ", ".join(f"{r['impl']} {r.get('cpu_ms_per_step', 0):.0f}" for r in rows) + ".", ""]
    if any(r["impl"] == "openclip" for r in rows):
        lines += ["Known differences of the open_clip row (same shape and parameter count): open_clip's own "
                  "initialisation and fused-QKV `nn.MultiheadAttention` (transformers: separate q/k/v, SDPA); "
                  "causal mask only in the text tower (no padding mask; eos pooling makes the pooled embedding the "
                  "same function); weight decay also on token and positional embeddings (open_clip's rule); "
                  "logit scale clamped on the parameter after each step (ours: in the forward); `cosine_lr` to 0 "
                  "(ours: LambdaLR to `min_lr_ratio`); torch AdamW with default flags (single-tensor loop on CPU); "
                  "autocast for bf16/fp16 with fp32 weights (ours: DeepSpeed's bf16/fp16 weights + fp32 master); "
                  "ClipLoss materialises the local b x N logits; with accumulation, plain gradient accumulation "
                  "(open_clip's accum_freq re-runs the forward with cached features). Losses are global-batch "
                  "means (mean over ranks of each rank's share) in every row.", ""]
    if any(r.get("suspects") for r in rows):
        lines += _suspect_table(rows)
    lines += [f"![samples/s and per-step split]({png})", ""]
    return "\n".join(lines)


def _rounds_line(rows: list[dict]) -> str:
    if rows[0]["rounds"] == 1:
        return "- runs: one after the other, in the order of the table (load at each start in the table)"
    each = "; ".join(f"{r['impl']} " + ", ".join(f"{v:.1f}" for v in r["samples_per_s_rounds"]) for r in rows)
    return (f"- runs: {rows[0]['rounds']} rounds, the order reversed every other round; each row is that impl's "
            f"median round by samples/s. samples/s of every round: {each}")


def _suspect_table(rows: list[dict]) -> list[str]:
    have = [r for r in rows if r.get("suspects")]
    lines = ["## Suspected overheads (ms per step, mean over ranks; max rank; calls per step)", "",
             "| suspect | " + " | ".join(r["impl"] for r in have) + " |", "|---|" + "---:|" * len(have)]
    for key, what in SUSPECTS.items():
        cells = [r["suspects"][key] for r in have]
        if not any(c["calls_per_step"] for c in cells):
            continue
        lines.append(f"| {what} | " + " | ".join(
            f"{c['ms_per_step']:.2f} ({c['ms_per_step_max_rank']:.2f}; {c['calls_per_step']:.1f})" for c in cells) + " |")
    lines.append("| reference: one all_reduce_flags with the ranks in step (ms per call) | " + " | ".join(
        f"{r['suspects']['flag_latency_ms']:.3f}" for r in have) + " |")
    return lines + ["", "A collective's booked time includes waiting for the slower rank; the reference row is "
                    "the cost of the call itself.", ""]


def _plot(rows: list[dict], path: Path, tag: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["impl"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    bars = ax1.bar(names, [r["samples_per_s"] for r in rows], color=["#888888", "#4c72b0", "#dd8452"][:len(rows)])
    ax1.bar_label(bars, fmt="%.1f")
    ax1.set_ylabel("samples/s (global)")
    ax1.set_title("throughput")
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        vals = [r[f"{phase}_ms"] for r in rows]
        ax2.bar(names, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_ylabel("ms per step (mean over ranks)")
    ax2.set_title("per-step split")
    ax2.legend(fontsize=8)
    fig.suptitle(f"bench train {tag}: {rows[0]['preset']}, {rows[0]['world']} ranks, global batch "
                 f"{rows[0]['global_batch']}, {rows[0]['precision']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
