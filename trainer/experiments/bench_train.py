"""Training-step benchmark: open_clip's step, a bare torch loop and ours, on the same data.

    python -m trainer bench train [--config trainer/configs/demo.yaml] [--steps 30] [--warmup 5]
        [--nproc 2] [--impls openclip,bare,ours | --variants FILE] [--out bench/results] [--tag T]
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
- ``eclipse-run``: ``eclipse`` with the student held at the run's *mean* keep rate (the config's
  keep-rate schedule averaged over its own ``max_steps``, before the benchmark shortens it: warm-up
  at 1, the shrink window, the held target), so its step cost is the per-step cost of the whole
  run, not of its cheapest steps.
- ``psd-self``, ``psd-momentum``, ``psd-previous``: ``ours`` with progressive self-distillation
  on (``psd.enabled=true``, ``psd.teacher=...``, the other ``psd.*`` keys as given) and its soft
  targets from the first step (``psd.schedule=constant``, and the ``previous`` teacher refreshed
  every step, the costliest case): the cost of each teacher against ``ours``.

``--variants FILE`` (a sweep's variants file: names mapped to overrides; ``seeds`` is ignored)
replaces ``--impls``: each variant is one implementation, ``ours`` on the config plus the
``key=value`` arguments plus the variant's overrides, at the per-step cost of the run that config
describes (``trainer.methods.steady_overrides``: ECLIPSE's student held at the run's mean keep
rate, ECL's rounds, which run between steps, kept out of the window). Its row adds the analytic
training FLOPs of the measured step (``trainer.methods.step_flops``) and FLOPs per second.
``python -m trainer sweep`` measures its variants this way (trainer/experiments/sweep_speed.py).

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
import datetime as _dt
import json
import linecache
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import kernels.gather
import kernels.reference
import kernels.spec
from kernels.bench import _device_name, _Memory

from .. import data as D
from .. import faults
from .. import train as T
from ..config import ConfigError, check_world, load_config
from ..dist import (all_reduce, all_reduce_flags, barrier, exit_process, init_distributed, launch_env,
                    select_device, shutdown)
from ..engine import build_ds_config, build_engine
from ..faults import GradGuard, NanInjector
from ..losses import build_terms
from ..methods import attach as attach_method, build_method, loss_terms, steady_overrides, step_flops
from ..metrics import MetricsLogger
from ..model import build_model, preset_shape
from ..train import TrainData, setup_logging
from .bare_loop import PHASES, Phases, build_bare, loss_impl_name
from .bench_report import SUSPECTS, summary_row, write_report
from .host_syncs import HostSyncs
from .openclip_step import build_openclip
from .sweep import load_variants, yaml_arg

IMPLS = ("openclip", "bare", "ours", "eclipse", "eclipse-run", "psd-self", "psd-momentum", "psd-previous")
ROOT = Path(__file__).resolve().parents[2]   # the repository


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m trainer bench train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="trainer/configs/demo.yaml")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    p.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    p.add_argument("--impls", default=None, help="comma-separated subset of " + ",".join(IMPLS)
                   + " (default openclip,bare,ours)")
    p.add_argument("--variants", default=None, help="a sweep's variants file: each variant is one implementation "
                   "(our step with its overrides), instead of --impls")
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
    if args.variants and args.impls:
        raise ConfigError("--variants and --impls exclude each other (each variant runs our step)")
    variants = _read_variants(args.variants) if args.variants else {}
    impls = list(variants) or [i for i in (args.impls or "openclip,bare,ours").split(",") if i]
    bad = sorted(set(impls) - set(IMPLS)) if not variants else []
    if bad or not impls:
        raise ConfigError(f"--impls: unknown {bad or impls}; choose from {','.join(IMPLS)}")
    if args.steps < 1 or args.warmup < 0 or args.nproc < 1 or args.rounds < 1:
        raise ConfigError("--steps, --nproc and --rounds must be >= 1, --warmup >= 0")
    cfg = _check_config(args)
    for name, overrides in variants.items():
        try:
            _check_config(args, overrides)
        except ConfigError as err:
            raise ConfigError(f"variant {name!r}: {err}") from None
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tag = args.tag or f"{device}_{cfg.model.preset}_{_dt.date.today().isoformat()}"
    command = "python -m trainer bench train " + shlex.join(argv)
    uptime_before = _uptime()
    results = {impl: [] for impl in impls}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for rnd in range(args.rounds):  # alternate the order, so no impl always runs first
            for impl in impls if rnd % 2 == 0 else impls[::-1]:
                results[impl].append(_launch(impl, args, Path(tmp), rnd, variants.get(impl)))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for impl in impls:
            prof = Path(tmp) / f"{impl}.prof.txt"
            if prof.is_file():
                shutil.copy(prof, out / f"train_{tag}_cprofile_{impl}.txt")
    meta = {"tag": tag, "command": command, "commit": _commit(), "uptime_before": uptime_before,
            "uptime_after": _uptime(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    rows = [summary_row(results[impl], meta) for impl in impls]
    run_cfg = load_config(args.config, list(args.overrides))   # the config's own run, not the benchmark's
    for r in rows:
        if r["impl"] in variants:
            r.update(_variant_fields(args, r, variants[r["impl"]]))
        elif r["impl"].startswith("eclipse"):   # the student's keep rate each ECLIPSE row ran at
            r["keep_rate"] = _student_keep_rate(run_cfg, r["impl"])
    paths = write_report(rows, meta, out)
    for r in rows:
        print(json.dumps({k: r[k] for k in ("impl", "samples_per_s", "step_ms", "peak_mem_mb", "loss_first",
                                            "loss_last", "params", "keep_rate") if k in r}), flush=True)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _student_keep_rate(cfg, impl: str) -> float:
    """``eclipse``: the schedule's target; ``eclipse-run``: the run's mean keep rate (what the
    method's own ``steady_overrides`` holds a benchmark at)."""
    import dataclasses
    cfg = dataclasses.replace(cfg, eclipse=dataclasses.replace(cfg.eclipse, enabled=True))
    return steady_overrides(cfg, cfg.max_steps)["eclipse.keep_rate"] if impl == "eclipse-run" else cfg.eclipse.keep_rate


def _read_variants(path: str) -> dict[str, list[str]]:
    """``{name: [key=value, ...]}`` from a sweep's variants file (its ``seeds`` ignored; a
    ``{seed}`` placeholder gets the first seed)."""
    return {name: [f"{k}={yaml_arg(v)}".replace("{seed}", str(seeds[0])) for k, v in flat.items()]
            for name, (flat, seeds) in load_variants(path).items()}


def _variant_overrides(args, variant: list[str]) -> list[str]:
    """What holds the variant's run at its average per-step cost for the benchmark's steps
    (the run's own config, before the benchmark shortens ``max_steps``)."""
    run_cfg = load_config(args.config, [*args.overrides, *variant])
    return [f"{k}={yaml_arg(v)}" for k, v in steady_overrides(run_cfg, args.warmup + args.steps).items()]


def _variant_fields(args, row: dict, variant: list[str]) -> dict:
    """A variant's row: its overrides, what the benchmark held, and the FLOPs of the measured step."""
    held = _variant_overrides(args, variant)
    cfg = load_config(args.config, [*_overrides(args, "flops", variant), *held])
    timed = range(args.warmup + 1, args.warmup + args.steps + 1)
    flops_per_step = sum(step_flops(cfg, s, row["world"]) for s in timed) / args.steps
    return {"variant": row["impl"], "overrides": variant, "held": held, "flops_per_step": flops_per_step,
            "flops_per_s": flops_per_step * row["samples_per_s"] / row["global_batch"]}


def _check_config(args, variant: list[str] = ()):
    """Everything a user can get wrong, before any rank starts (ConfigError: exit 2)."""

    cfg = load_config(args.config, _overrides(args, "check", variant))
    check_world(cfg, args.nproc)
    preset_shape(cfg.model)
    build_terms(cfg.loss, loss_terms(cfg))
    build_ds_config(cfg, args.nproc)
    D.expand_shards(cfg.data.train_shards, "data.train_shards")
    D.read_manifest(cfg.data.manifest, D.expand_shards(cfg.data.train_shards, "data.train_shards"),
                    cfg.data.key_manifest_max_mb, cfg.data.train_shards)
    D.load_tokenizer(cfg.tokenizer.path)
    return cfg


def _overrides(args, output_dir, variant=()) -> list[str]:
    return [*args.overrides, *variant, f"max_steps={args.warmup + args.steps}", f"output_dir={output_dir}",
            "log.progress=false"]


def _launch(impl: str, args, tmp: Path, rnd: int, variant: list[str] | None = None) -> dict:
    """One implementation (or a variant: our step with its overrides) under torchrun; returns
    rank 0's result (exits 1 on a failed run)."""
    result = tmp / f"{impl}.json"
    result.unlink(missing_ok=True)
    extra = _impl_overrides(impl, args) if variant is None else _variant_overrides(args, variant)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--standalone", "-m", "trainer.experiments.bench_train", "--worker", "ours" if variant is not None else impl,
           "--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--result", str(result), *(["--profile", args.profile] if args.profile else []),
           *_overrides(args, tmp / f"run_{impl}", variant or ()), *extra]
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
    out.update(impl=impl, loadavg_before=load, loadavg_after=_loadavg(), wall_s=round(time.monotonic() - t0, 1), round=rnd + 1)
    return out


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

def _worker(args) -> int:
    import torch

    cfg = load_config(args.config, args.overrides)
    le = launch_env()
    device = _init(args.worker, cfg, le)
    setup_logging(le.rank)
    tokenizer = D.load_tokenizer(cfg.tokenizer.path)
    shape = preset_shape(cfg.model)
    data = TrainData(cfg, D.train_decoder(cfg, tokenizer), le.rank, le.world_size, None)
    phases = Phases(device)
    syncs = HostSyncs(device) if args.profile else None
    if syncs is not None:
        syncs.install()   # first: the suspects' timers then wrap its counting reads
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
    if syncs is not None:
        syncs.active = True
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
    if syncs is not None:
        syncs.active = False
    if suspects is not None:
        suspects.active = False
        suspects.flag_latency_ms = _flag_latency_ms()
    info.pop("close", lambda: None)()
    result = _gather(args, cfg, le, device, info, losses, phases, memory, suspects,
                     measured_s=measured_s, cpu_s=cpu_s, loader_s=loader_s)
    if syncs is not None:
        result["host_syncs"] = syncs.gather(le.world_size, args.steps)
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

    ds_config = build_ds_config(cfg, le.world_size)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    params = sum(p.numel() for p in model.parameters())
    attach_method(model, cfg)
    engine, optimizer_name = build_engine(cfg, model, ds_config)
    method = build_method(cfg, engine)
    terms = build_terms(cfg.loss, loss_terms(cfg))
    guard = GradGuard(engine)
    inject = NanInjector(cfg.debug.inject_nan_steps, cfg.debug.inject_nan_where, le.rank, [])
    state = T.fresh_state()
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
    return step, {"params": params, "optimizer": optimizer_name, "loss_impl": loss_impl_name(cfg, device),
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


def _build_eclipse(cfg, *args):
    """``ours`` with ECLIPSE on, the student at its final keep rate from the first step."""
    import dataclasses
    cfg = dataclasses.replace(cfg, eclipse=dataclasses.replace(cfg.eclipse, enabled=True, keep_schedule="constant"))
    return _build_ours(cfg, *args)


def _impl_overrides(impl: str, args) -> list[str]:
    """``eclipse-run``: the student held at the mean keep rate of the run the config describes
    (its own ``max_steps``, before the benchmark shortens it to ``warmup + steps``)."""
    if impl != "eclipse-run":
        return []
    k = _student_keep_rate(load_config(args.config, list(args.overrides)), impl)
    return ["eclipse.keep_schedule=constant", f"eclipse.keep_rate={k!r}"]


def _build_eclipse_run(cfg, *args):
    """``eclipse`` at the run's mean keep rate (set by :func:`_impl_overrides`)."""
    return _build_eclipse(cfg, *args)


def _build_psd(teacher: str):
    def build(cfg, *args):
        """``ours`` with PSD on and its soft targets from the first step (see the module doc)."""
        import dataclasses
        psd = dataclasses.replace(cfg.psd, enabled=True, teacher=teacher, schedule="constant",
                                  refresh_every=1 if teacher == "previous" else cfg.psd.refresh_every)
        return _build_ours(dataclasses.replace(cfg, psd=psd), *args)
    return build


BUILDERS = {"openclip": build_openclip, "bare": build_bare, "ours": _build_ours, "eclipse": _build_eclipse,
            "eclipse-run": _build_eclipse_run,
            **{f"psd-{t}": _build_psd(t) for t in ("self", "momentum", "previous")}}
OURS = ("ours", "eclipse", "eclipse-run", "psd-self", "psd-momentum", "psd-previous")   # run through the trainer's engine


# ---------------------------------------------------------------------------- --profile


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
        if frame.f_code.co_name == "train_step":
            return "finite_item" if "isfinite" in _caller_line(frame) else "term_item"
        return None
    torch.Tensor.item = s.wrap(torch.Tensor.item, item_label)
    faults.non_finite = s.wrap(faults.non_finite, lambda f: "guard_check")
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


if __name__ == "__main__":   # each rank of a --worker child (torchrun -m trainer.experiments.bench_train)
    try:
        status = main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        status = 2
    exit_process(status)   # after gloo, interpreter finalization can abort (trainer.dist.exit_process)
