"""``python -m trainer sweep``: train every (variant, seed) of a variants file, then table and plots.

    python -m trainer sweep --config BASE.yaml --variants VARIANTS.yaml --out DIR [--nproc N] [--slurm] \\
        [key=value ...]

VARIANTS.yaml maps variant names to overrides (dotted keys, or nested sections, to values), plus
an optional top-level ``seeds`` list (default ``[0]``); a variant may carry its own ``seeds``::

    seeds: [0, 1]
    baseline: {}
    lowlr: {optim.lr: 1.0e-4}
    short: {max_steps: 100, seeds: [0]}

A ``{seed}`` in a variant's value becomes the run's seed (e.g. ``checkpoint.init:
runs/grown/seed{seed}``: each seed continues from its own earlier stage).

Each (variant, seed) is the ordinary train command, ``python -m trainer train --config BASE
<key=value arguments> <variant's overrides> seed=S output_dir=DIR/runs/<variant>/seed<S>``, under
``torchrun --nproc_per_node N`` (plain ``python`` for N=1), or with ``--slurm`` submitted as
``sbatch --parsable slurm/train.sbatch BASE ...`` (extra sbatch options, e.g. the CPU-node form
``-N 1 --ntasks-per-node 1 --gpus-per-node 0``, come from ``$TRAINER_SWEEP_SBATCH_ARGS``). A
variant's override wins over the same key given on the sweep's command line.

``--budget-flops F`` trains every run to the same compute instead of the same steps: each run's
``max_steps`` becomes the largest step count whose training FLOPs (the trainer's analytic count,
every forward of every enabled method charged: trainer/flops.py) stay within ``F``, and the
schedule keys given in steps (warm-up, and where set EViT's keep-rate window, PSD's refresh
interval, ECL's round interval) keep their share of the run's own ``max_steps``
(trainer/experiments/budget.py). A variant's ``max_steps`` then only shapes its schedule. The
FLOPs count the global batch of ``--nproc`` ranks (with ``--slurm``: give the ranks per run).

Before anything runs, every run's config is resolved and checked as ``train`` checks it (one
``error: variant 'x': ...`` line, exit 2), and every existing run directory is checked against it:
``DIR/runs/<v>/seed<S>/sweep.json`` records the resolved config (minus ``output_dir``) and the
launch (ranks per run, or SLURM), and its hash; a run directory of any other config, or one this
sweep did not make, stops the sweep with exit 2 naming it (nothing is reused or deleted).
A finished run (``eval.json`` at ``max_steps``, same hash) is skipped; an interrupted one is run
again with the same command, which resumes from its ``checkpoints/latest``.

Outputs in DIR:
  runs/<v>/seed<S>/   the run's output_dir, plus sweep.json (config, hash, attempts with wall time)
                      and train.log (the trainer's output, every attempt; slurm-JOB.out under SLURM)
  results.jsonl       one row per finished run: variant, seed, overrides, every figure of its
                      eval.json, median samples/s, wall time (s, all attempts), steps, parameters,
                      training FLOPs (metrics.jsonl's ``flops`` at the last step)
  table.md            variants side by side (mean +- sample std over seeds; differences from the
                      first variant; step throughput from the controlled measurement below), every
                      run (with its own, uncontrolled samples/s and wall time), and the plots
  throughput/         the controlled measurement: once every run has finished, one ``bench train
                      --variants`` invocation over every variant, alternating over rounds
                      (trainer/experiments/sweep_speed.py; ``--throughput-steps/-warmup/-rounds``,
                      ``--no-throughput``); throughput.json is reused while its hash matches
  loss.png, zeroshot_top1.png, top1_vs_time.png, vs_flops.png (zero-shot, R@1 and validation
                      loss against training FLOPs)
  sweep.log           what every invocation of the sweep did

Re-running the same command continues an unfinished sweep; with every run finished it only
rewrites results.jsonl, table.md and the plots. Exit status: 0 every run finished; 2 bad input;
1 some run failed (the others are reported); 75 stopped by SIGTERM/SIGUSR1 (the running trainer
checkpoints first; run the same command to continue); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import BEFORE_KEY, Config, ConfigError, load_config, to_dict
from ..data import load_tokenizer
from ..model import ClipTrainModel, build_clip_config
from ..preflight import check_run_inputs
from . import sweep_speed
from .budget import scaled_schedule, steps_for_budget

ROOT = Path(__file__).resolve().parents[2]   # the repository
SBATCH_SCRIPT = ROOT / "slurm" / "train.sbatch"
META = "sweep.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
SET_BY_SWEEP = ("seed", "output_dir")
# Headline figures of table.md: (eval.json key, label).
ACCURACY = [("zeroshot_top1", "zero-shot top-1"), ("zeroshot_top5", "zero-shot top-5"),
            ("i2t_r1", "I→T R@1"), ("t2i_r1", "T→I R@1")]
SLURM_DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
              "DEADLINE", "PREEMPTED"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "STOPPED", "SUSPENDED"}
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_INTERRUPTED = 1, 2, 75, 130


# ----------------------------------------------------------------------------- the plan

@dataclass
class Run:
    variant: str
    seed: int
    overrides: dict          # the variant's own overrides, dotted key -> value
    args: list[str]          # key=value arguments of the train command (sweep's, variant's, seed, output_dir)
    dir: Path
    cfg: Config
    resolved: dict           # to_dict(cfg) without output_dir
    launch: dict
    hash: str
    params: int = 0
    state: str = "new"       # new | finished | resume | restart | adopt (a SLURM job still queued or running)
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}"


@dataclass
class Sweep:
    base: str
    variants_file: str
    out: Path
    slurm: bool
    nproc: int
    overrides: list[str]
    variants: dict           # name -> (overrides dict, seeds)
    runs: list[Run]
    sbatch_args: list[str]
    budget_flops: float | None = None
    throughput: sweep_speed.Settings | None = sweep_speed.Settings()   # None: --no-throughput
    log_fh: typing.Any = None

    def say(self, msg: str) -> None:
        line = f"[sweep] {msg}"
        print(line, flush=True)
        if self.log_fh is not None:
            self.log_fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
            self.log_fh.flush()


def _seeds(value, where: str) -> list[int]:
    seeds = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"{where}: 'seeds' must be a non-empty list of non-negative integers; got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: 'seeds' lists a seed twice: {seeds}")
    return seeds


def _section(path: str):
    """The config dataclass a dotted path names (``optim`` -> OptimConfig), or None for a leaf/unknown key."""
    cls = Config
    for part in path.split("."):
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return None
        cls = hints[part]
    return cls


def _flatten(body: dict, where: str, prefix: str = "") -> dict:
    """``{optim: {lr: 1}}`` and ``{optim.lr: 1}`` both become ``{"optim.lr": 1}``; a mapping given to a
    leaf key (``loss.terms``) stays whole. Nested sections are flattened so that a variant changes
    only the keys it names, never the rest of a section of the base config."""
    out = {}
    for key, value in body.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: override keys must be dotted config keys; got {key!r}")
        full = prefix + key
        if isinstance(value, dict) and _section(full) is not None:
            out.update(_flatten(value, where, full + "."))
        else:
            out[full] = value
    return out


def yaml_arg(value) -> str:
    """The text of a ``key=value`` argument that the trainer's override parser reads back as ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True)
    if text.endswith("\n...\n"):
        text = text[:-5]
    text = text.strip()
    if yaml.safe_load(text) != value:  # pragma: no cover - a value YAML cannot round-trip
        raise ConfigError(f"cannot pass {value!r} as a key=value argument")
    return text


def load_variants(path: str) -> dict[str, tuple[dict, list[int]]]:
    """``{name: (dotted overrides, seeds)}`` in file order."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"variants file not found: {path}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"variants file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"variants file {path} must map variant names to overrides "
                          "(e.g. 'baseline: {}' and 'lowlr: {optim.lr: 1.0e-4}'), with an optional 'seeds: [0, 1]'")
    raw = dict(raw)
    seeds = _seeds(raw.pop("seeds"), f"variants file {path}") if "seeds" in raw else [0]
    variants: dict[str, tuple[dict, list[int]]] = {}
    for name, body in raw.items():
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(f"variants file {path}: variant name {name!r} must be a word of letters, digits, "
                              "'_', '.', '+', '-' (it names a directory)")
        where = f"variant {name!r}"
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: must be a mapping of config keys to values (e.g. {{optim.lr: 1.0e-4}}); "
                              f"got {body!r}")
        body = dict(body)
        vseeds = _seeds(body.pop("seeds"), where) if "seeds" in body else seeds
        flat = _flatten(body, where)
        for key in SET_BY_SWEEP:
            if key in flat:
                raise ConfigError(f"{where}: key '{key}' is set by the sweep (seeds come from 'seeds', "
                                  "output_dir is OUT/runs/<variant>/seed<S>)")
        variants[name] = (flat, vseeds)
    if not variants:
        raise ConfigError(f"variants file {path} defines no variants (e.g. 'baseline: {{}}')")
    return variants


def _override_key(item: str) -> str:
    return item.split("=", 1)[0]


def _check_like_train(cfg: Config, world: int | None) -> None:
    """What ``train`` checks before it starts a process group, minus the resume check (the sweep
    checks its run directories itself)."""
    check_run_inputs(cfg, world)


_PARAMS: dict[str, int] = {}


def count_params(cfg: Config) -> int:
    """Exact parameter count of the run's model, built on the meta device (no memory, no init)."""
    import torch

    key = json.dumps([dataclasses.asdict(cfg.model), cfg.tokenizer.path], sort_keys=True, default=str)
    if key not in _PARAMS:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
        with torch.device("meta"):
            model = ClipTrainModel(build_clip_config(cfg.model, tokenizer))
        _PARAMS[key] = sum(p.numel() for p in model.parameters())
    return _PARAMS[key]


def config_hash(resolved: dict, launch: dict) -> str:
    text = json.dumps({"config": resolved, "launch": launch}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(args) -> Sweep:
    """Resolve and check every run before anything runs (raises ConfigError; writes nothing)."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1; got {args.nproc}")
    throughput = sweep_speed.settings_from(args)
    overrides = list(args.overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        if _override_key(item) in SET_BY_SWEEP:
            raise ConfigError(f"key '{_override_key(item)}' is set by the sweep (seeds come from the variants "
                              "file's 'seeds', output_dir is OUT/runs/<variant>/seed<S>)")
    variants = load_variants(args.variants)
    sbatch_args = shlex.split(os.environ.get("TRAINER_SWEEP_SBATCH_ARGS", "")) if args.slurm else []
    launch = {"slurm": True, "sbatch_args": sbatch_args} if args.slurm else {"nproc": args.nproc}
    world = None if args.slurm else args.nproc
    out = Path(args.out)
    budget = getattr(args, "budget_flops", None)
    if budget is not None and not budget > 0:
        raise ConfigError(f"--budget-flops must be > 0; got {budget}")

    # A mistake in the base config or in the sweep's own key=value arguments is nobody's variant.
    try:
        common = load_config(args.config, overrides)
    except ConfigError as err:
        common, common_err = None, str(err)
    runs: list[Run] = []
    for name, (flat, seeds) in variants.items():
        vargs = [f"{k}={yaml_arg(v)}" for k, v in flat.items()]
        for seed in seeds:
            run_dir = out / "runs" / name / f"seed{seed}"
            rargs = [*overrides, *(a.replace("{seed}", str(seed)) for a in vargs), f"seed={seed}",
                     f"output_dir={run_dir}"]
            try:
                cfg = load_config(args.config, rargs)
                if budget is not None:
                    rargs = _budget_args(args.config, rargs, cfg, budget, args.nproc)
                    cfg = load_config(args.config, rargs)
                _check_like_train(cfg, world)
                params = count_params(cfg)
            except ConfigError as err:
                if common is None and str(err) == common_err:
                    raise ConfigError(f"{err} (base config {args.config} with the sweep's key=value arguments)") from None
                raise ConfigError(f"variant {name!r}: {err}") from None
            resolved = to_dict(cfg)
            resolved.pop("output_dir")
            runs.append(Run(name, seed, flat, rargs, run_dir, cfg, resolved, launch, config_hash(resolved, launch),
                            params))
    # Seed-major order: every variant's first seed before any second seed, so a sweep stopped
    # half-way already compares all variants.
    seed_rank = {(r.variant, r.seed): variants[r.variant][1].index(r.seed) for r in runs}
    runs.sort(key=lambda r: (seed_rank[(r.variant, r.seed)], list(variants).index(r.variant)))
    return Sweep(args.config, args.variants, out, args.slurm, args.nproc, overrides, variants, runs, sbatch_args,
                 budget, throughput)


def _budget_args(config: str, rargs: list[str], cfg: Config, budget: float, world: int) -> list[str]:
    """``rargs`` plus ``max_steps`` and the scaled schedule that spend ``budget`` FLOPs (module doc)."""
    def extra(n: int) -> list[str]:
        return [f"max_steps={n}", *(f"{k}={v}" for k, v in scaled_schedule(cfg, n).items())]
    steps = steps_for_budget(lambda n: load_config(config, [*rargs, *extra(n)]), budget, world)
    return [*rargs, *extra(steps)]


# ------------------------------------------------------------------ run directories

def read_meta(run_dir: Path) -> dict | None:
    path = run_dir / META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"run directory {run_dir}: {META} is unreadable ({err}); move that directory away") from None


def write_meta(run: Run) -> None:
    run.meta["wall_s"] = round(sum(a.get("wall_s", 0.0) for a in run.meta.get("attempts", [])), 3)
    tmp = run.dir / (META + ".tmp")
    tmp.write_text(json.dumps(run.meta, indent=2, default=str))
    os.replace(tmp, run.dir / META)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _differences(old: dict, new: dict, limit: int = 4) -> str:
    a, b = _flat(old), _flat(new)
    diffs = [f"{k}: {a.get(k, '<unset>')!r} there, {b.get(k, '<unset>')!r} now" for k in sorted(set(a) | set(b))
             if a.get(k, "<unset>") != b.get(k, "<unset>")]
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def _only_new_default_keys(meta: dict, run: Run) -> bool:
    """True when a run made earlier differs from this config only by keys the trainer gained since
    (absent from the saved config, at their default value now: e.g. a new method's section, off;
    or at the value that gives what the trainer did before the key existed, config.BEFORE_KEY).
    Evidence measured before a method existed stays comparable with the method's variants."""

    old = _flat({"config": meta.get("config", {}), "launch": meta.get("launch", {})})
    new = _flat({"config": run.resolved, "launch": run.launch})
    default = _flat({"config": to_dict(Config())})
    before = {f"config.{k}": v for k, v in BEFORE_KEY.items()}
    return all(old.get(k, "<unset>") == v or (k not in old and v in (default.get(k, "<unset>"), before.get(k, "<unset>")))
               for k, v in new.items()) and set(old) <= set(new)


def is_finished(run: Run) -> bool:
    if run.cfg.data.val_shards:
        path = run.dir / "eval.json"
        try:
            return json.loads(path.read_text()).get("step") == run.cfg.max_steps
        except (OSError, json.JSONDecodeError):
            return False
    latest = run.dir / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{run.cfg.max_steps}"


def classify(run: Run) -> None:
    """Set ``run.state`` from its directory; a directory of another config is a ConfigError."""
    meta = read_meta(run.dir)
    if meta is None:
        if run.dir.exists() and any(run.dir.iterdir()):
            raise ConfigError(f"run directory {run.dir} exists but this sweep did not make it (no {META}); "
                              "move it away or use another --out")
        run.state = "new"
        return
    if meta.get("config_hash") != run.hash and not _only_new_default_keys(meta, run):
        what = _differences({"config": meta.get("config", {}), "launch": meta.get("launch", {})},
                            {"config": run.resolved, "launch": run.launch})
        raise ConfigError(f"run directory {run.dir} holds variant {run.variant!r} seed {run.seed} of a different "
                          f"config ({what or 'hash ' + str(meta.get('config_hash'))}); use another --out, rename the "
                          "variant, or move that directory away")
    run.meta = meta
    if is_finished(run):
        run.state = "finished"
    elif meta.get("slurm_job") and _slurm_state(meta["slurm_job"]) not in SLURM_DONE | {None}:
        run.state = "adopt"
    elif (run.dir / "checkpoints" / "latest").is_file():
        run.state = "resume"
    else:
        run.state = "restart"


def _orphan(meta: dict):
    """The trainer a killed sweep left behind, if it still runs (pid and start time recorded)."""
    attempts = meta.get("attempts") or []
    if not attempts or not attempts[-1].get("pid"):
        return None
    import psutil

    a = attempts[-1]
    try:
        proc = psutil.Process(a["pid"])
        if abs(proc.create_time() - a.get("pid_created", 0)) < 1.0:
            return proc
    except psutil.Error:
        pass
    return None


# ------------------------------------------------------------------ local runs

def _child_env() -> dict:
    env = dict(os.environ)
    # A sweep started inside torchrun or a SLURM task must not hand its own rank/world to the runs.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def train_command(sweep: Sweep, run: Run) -> list[str]:
    train = ["-m", "trainer", "train", "--config", sweep.base, *run.args]
    if sweep.nproc == 1:
        return [sys.executable, *train]
    # --standalone: the launcher binds its rendezvous store to a port the kernel picks and holds
    # it, so no port is chosen, closed and raced for by a concurrent run
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(sweep.nproc),
            *train]


def _die_with_sweep() -> None:
    """In the child: SIGTERM when the sweep dies, so the trainer checkpoints instead of running on."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the child simply outlives a killed sweep
        pass


class Signals:
    """SIGTERM/SIGUSR1 to the sweep: pass SIGTERM on to the running trainer (it checkpoints and exits
    75), then stop. Ctrl-C (KeyboardInterrupt) does the same through :func:`_stop_tree`."""

    def __init__(self):
        self.stop = 0
        self.child: subprocess.Popen | None = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame):
        self.stop = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def _progress(run: Run) -> str:
    path = run.dir / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
        last = json.loads(lines[-1])
        return (f"step {last['step']}/{run.cfg.max_steps}, loss {last.get('loss', float('nan')):.3f}, "
                f"{last.get('samples_per_s', 0):.0f} samples/s")
    except (OSError, IndexError, ValueError, KeyError):
        return "starting"


def run_local(sweep: Sweep, run: Run, sig: Signals) -> str:
    """One attempt of one run under torchrun/python; returns finished | failed | stopped."""
    cmd = train_command(sweep, run)
    attempts = run.meta.setdefault("attempts", [])
    with open(run.dir / "train.log", "a") as log:
        log.write(f"\n===== sweep attempt {len(attempts) + 1} ({time.strftime('%Y-%m-%d %H:%M:%S')}): "
                  f"{shlex.join(cmd)}\n")
        log.flush()
        t0, start = time.monotonic(), time.time()
        # Its own session: a terminal's Ctrl-C reaches the sweep alone, which then stops the trainer
        # with SIGTERM (checkpoint, exit 75); a SIGINT would kill the ranks without a checkpoint.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(),
                                preexec_fn=_die_with_sweep, start_new_session=True)
        sig.child = proc
        try:
            import psutil
            created = psutil.Process(proc.pid).create_time()
        except Exception:  # noqa: BLE001 - it may already have exited
            created = 0.0
        attempt = {"how": "local", "start": start, "end": start, "wall_s": 0.0, "rc": None, "pid": proc.pid,
                   "pid_created": created, "command": cmd}
        attempts.append(attempt)
        run.meta["status"] = "running"
        write_meta(run)
        heartbeat = float(os.environ.get("TRAINER_SWEEP_HEARTBEAT_S", 2))
        last_note = time.monotonic()
        try:
            while True:
                try:
                    rc = proc.wait(timeout=heartbeat)
                    break
                except subprocess.TimeoutExpired:
                    pass
                attempt["end"], attempt["wall_s"] = time.time(), round(time.monotonic() - t0, 3)
                write_meta(run)
                if time.monotonic() - last_note >= 60:
                    sweep.say(f"{run.name}: {_progress(run)} ({_clock(time.monotonic() - t0)})")
                    last_note = time.monotonic()
        except KeyboardInterrupt:
            sweep.say(f"{run.name}: interrupted; asking the trainer to checkpoint (SIGTERM), up to 120 s")
            rc = _stop_tree(proc, grace=120)
            sig.stop = signal.SIGINT
        finally:
            sig.child = None
        attempt.update(end=time.time(), wall_s=round(time.monotonic() - t0, 3), rc=rc, pid=None)
    if is_finished(run):
        result = "finished"
    elif sig.stop or rc == 75:
        result = "stopped"
    else:
        result = "failed"
    run.meta["status"] = result
    write_meta(run)
    return result


def _stop_tree(proc: subprocess.Popen, grace: float) -> int:
    """SIGTERM the launcher and every process under it (torchrun starts its ranks in sessions of
    their own, so a terminal's Ctrl-C reaches them only through torchrun), then SIGKILL what is
    left after ``grace`` seconds."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    for p in tree:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return proc.wait()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


# ------------------------------------------------------------------ SLURM runs

def _slurm_state(job) -> str | None:
    """The job's state from squeue, else sacct, else scontrol (None: SLURM does not know it)."""
    queries = (["squeue", "-h", "-j", str(job), "-o", "%T"],
               ["sacct", "-n", "-X", "-P", "-j", str(job), "-o", "State"],
               ["scontrol", "show", "job", "-o", str(job)])
    for argv in queries:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        text = p.stdout.strip()
        if p.returncode != 0 or not text:
            continue
        if argv[0] == "scontrol":
            m = re.search(r"\bJobState=(\S+)", text)
            return m.group(1) if m else None
        return text.split()[0].rstrip("+")  # sacct: "CANCELLED by 0", "CANCELLED+"
    return None


def submit(sweep: Sweep, run: Run) -> str:
    if not SBATCH_SCRIPT.is_file():
        raise ConfigError(f"{SBATCH_SCRIPT} not found")
    cmd = ["sbatch", "--parsable", "--job-name", f"sweep-{run.variant}-s{run.seed}",
           "--output", str(run.dir / "slurm-%j.out"), *sweep.sbatch_args, str(SBATCH_SCRIPT), sweep.base, *run.args]
    env = _child_env()
    env.setdefault("PYTHON", sys.executable)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"sbatch failed ({p.returncode}): {(p.stdout + p.stderr).strip()}")
    job = p.stdout.strip().split(";")[0]
    run.meta.setdefault("slurm_jobs", []).append(job)
    run.meta["slurm_job"] = job
    run.meta["status"] = "queued"
    write_meta(run)
    return job


def run_slurm(sweep: Sweep, runs: list[Run], sig: Signals) -> dict[str, str]:
    """Submit every run (adopting jobs a previous sweep left queued or running) and wait for all.

    A requeued job (the trainer checkpointed and ``train.sbatch`` requeued it) goes back to
    PENDING with the same id and is simply waited for. Wall time is the time the job was seen
    RUNNING, summed over its runs, polled every ``$TRAINER_SWEEP_POLL_S`` seconds (default 10)."""
    poll = float(os.environ.get("TRAINER_SWEEP_POLL_S", 10))
    jobs: dict[str, tuple[Run, str]] = {}
    for run in runs:
        if run.state == "adopt":
            job = run.meta["slurm_job"]
            sweep.say(f"{run.name}: SLURM job {job} of an earlier sweep is still queued or running; waiting for it")
        else:
            job = submit(sweep, run)
            sweep.say(f"{run.name}: submitted SLURM job {job} ({'resumes from ' + _latest(run) if run.state == 'resume' else 'new run'}); "
                      f"log {run.dir / f'slurm-{job}.out'}")
        jobs[run.name] = (run, job)
    results: dict[str, str] = {}
    open_attempt: dict[str, dict] = {}
    seen_done: dict[str, int] = {}
    last_state: dict[str, str | None] = {}
    while jobs:
        if sig.stop:
            for name, (run, job) in jobs.items():
                sweep.say(f"{run.name}: SLURM job {job} keeps running; re-run the sweep to wait for it again")
                results[name] = "stopped"
            break
        for name, (run, job) in list(jobs.items()):
            state = _slurm_state(job)
            now = time.time()
            if state != last_state.get(name):
                sweep.say(f"{run.name}: SLURM job {job} {state or 'unknown to SLURM'}")
                last_state[name] = state
            attempt = open_attempt.get(name)
            if state in SLURM_RUNNING:
                if attempt is None:
                    attempt = {"how": "slurm", "job": job, "start": now, "end": now, "wall_s": 0.0}
                    run.meta.setdefault("attempts", []).append(attempt)
                    open_attempt[name] = attempt
                attempt["end"], attempt["wall_s"] = now, round(now - attempt["start"], 3)
                run.meta["status"] = "running"
            elif attempt is not None:  # left RUNNING: finished, failed, or requeued (PENDING again)
                attempt["end"], attempt["wall_s"] = now, round(now - attempt["start"], 3)
                attempt["state"] = state
                open_attempt.pop(name)
            done = state in SLURM_DONE or state is None
            seen_done[name] = seen_done.get(name, 0) + 1 if done else 0
            # Confirm a final state on a second poll: a requeue passes through states that look final.
            if done and (seen_done[name] >= 2 or is_finished(run)):
                result = "finished" if is_finished(run) else "failed"
                run.meta["status"], run.meta["slurm_job"] = result, None
                run.meta.setdefault("slurm_states", {})[job] = state
                results[name] = result
                jobs.pop(name)
                write_meta(run)
                sweep.say(f"{run.name}: {result} (SLURM job {job} {state}, "
                          f"{run.meta['wall_s']:.0f} s running)")
                continue
            write_meta(run)
        if jobs:
            time.sleep(poll)
    return results


def _latest(run: Run) -> str:
    try:
        return "checkpoints/" + (run.dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return "its last checkpoint"


# ------------------------------------------------------------------ the verb

def new_meta(sweep: Sweep, run: Run) -> dict:
    return {"variant": run.variant, "seed": run.seed, "overrides": run.overrides,
            "sweep_overrides": sweep.overrides, "base_config": sweep.base, "config_hash": run.hash,
            "launch": run.launch, "params": run.params, "config": run.resolved, "attempts": [],
            "status": "new", "wall_s": 0.0}


def _lock(out: Path):
    import fcntl

    fh = open(out / ".sweep.lock", "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise ConfigError(f"another sweep is running on {out} (it holds {out / '.sweep.lock'})") from None
    return fh


def run_sweep(args) -> int:
    sweep = plan(args)                      # every config checked; nothing written yet
    sweep.out.mkdir(parents=True, exist_ok=True)
    lock = _lock(sweep.out)
    sweep.log_fh = open(sweep.out / "sweep.log", "a")
    try:
        for run in sweep.runs:
            classify(run)                   # a run directory of another config stops everything here
        for run in sweep.runs:
            if run.meta.get("status") == "running" and run.meta.get("attempts") and run.meta["attempts"][-1].get("pid"):
                proc = _orphan(run.meta)
                if proc is not None:
                    sweep.say(f"{run.name}: the trainer of a killed sweep (pid {proc.pid}) still runs; waiting for it")
                    try:
                        proc.wait(timeout=300)
                    except Exception:  # noqa: BLE001 - psutil.TimeoutExpired
                        raise ConfigError(f"run directory {run.dir} is still being trained by pid {proc.pid}; "
                                          "stop it, then run the sweep again") from None
        sweep.say(f"{shlex.join(command_line(sweep))}")
        sweep.say(f"{len(sweep.runs)} runs: " + ", ".join(f"{r.name} {r.state}" for r in sweep.runs))
        return execute(sweep)
    finally:
        sweep.log_fh.close()
        lock.close()


def execute(sweep: Sweep) -> int:
    todo = []
    for run in sweep.runs:
        if run.state == "finished":
            sweep.say(f"{run.name}: finished earlier (eval at step {run.cfg.max_steps}, config {run.hash}); skipped")
            continue
        run.dir.mkdir(parents=True, exist_ok=True)
        if not run.meta:
            run.meta = new_meta(sweep, run)
            write_meta(run)
        todo.append(run)
    results: dict[str, str] = {}
    with Signals() as sig:
        if sweep.slurm and todo:
            results = run_slurm(sweep, todo, sig)
        else:
            for i, run in enumerate(todo):
                if sig.stop:
                    break
                how = {"resume": f"resuming from {_latest(run)}", "restart": "restarting (no checkpoint yet)",
                       "new": "starting"}[run.state]
                sweep.say(f"{run.name}: {how} ({i + 1}/{len(todo)}); log {run.dir / 'train.log'}")
                result = run_local(sweep, run, sig)
                results[run.name] = result
                attempt = run.meta["attempts"][-1]
                sweep.say(f"{run.name}: {result} (exit {attempt['rc']}, {attempt['wall_s']:.1f} s; "
                          f"{run.meta['wall_s']:.1f} s over {len(run.meta['attempts'])} attempt(s))")
                if result == "failed":
                    tail = (run.dir / "train.log").read_text(errors="replace").splitlines()[-15:]
                    sweep.say(f"{run.name}: last lines of {run.dir / 'train.log'}:\n" + "\n".join(tail))
        failed = [n for n, r in results.items() if r == "failed"]
        if not sig.stop and all(is_finished(run) for run in sweep.runs) and not throughput(sweep, sig):
            failed.append("the throughput measurement")
    paths = write_reports(sweep)
    sweep.say("wrote " + ", ".join(str(p) for p in paths))
    if sig.stop:
        sweep.say(f"stopped by signal {sig.stop}; run the same command to continue")
        return EXIT_INTERRUPTED if sig.stop == signal.SIGINT else EXIT_STOPPED
    if failed:
        sweep.say(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (logs in their run directories); "
                  "run the same command to retry them")
        return EXIT_FAILED
    return 0


def throughput(sweep: Sweep, sig: Signals) -> bool:
    """The controlled step-throughput measurement of every variant (sweep_speed.py), unless one of
    the same variants and settings is stored; False when it failed."""
    s = sweep.throughput
    if s is None or sweep.slurm:
        return True
    if sweep_speed.load(sweep, s) is not None:
        sweep.say(f"throughput: measured earlier ({sweep.out / sweep_speed.SUBDIR / sweep_speed.RESULT}, same "
                  "variants and settings); reused")
        return True
    sweep.say(f"throughput: {shlex.join(sweep_speed.command(sweep, s))} ({len(sweep.variants)} variants x "
              f"{s.rounds} rounds; log {sweep.out / sweep_speed.SUBDIR / 'bench.log'})")
    try:
        result, why = sweep_speed.measure(sweep, s, _child_env(), sig)
    except KeyboardInterrupt:
        sig.stop = signal.SIGINT
        return True
    if result is None:
        if not sig.stop:
            sweep.say(f"error: throughput: {why}")
        return sig.stop != 0
    sweep.say("throughput: " + ", ".join(f"{r['variant']} {r['samples_per_s']:.1f} samples/s" for r in result["rows"]))
    return True


def command_line(sweep: Sweep) -> list[str]:
    cmd = ["python", "-m", "trainer", "sweep", "--config", sweep.base, "--variants", sweep.variants_file,
           "--out", str(sweep.out)]
    cmd += ["--slurm"] if sweep.slurm else ["--nproc", str(sweep.nproc)]
    cmd += ["--budget-flops", f"{sweep.budget_flops:g}"] if sweep.budget_flops is not None else []
    return cmd + sweep_speed.flags(sweep.throughput) + sweep.overrides


# ------------------------------------------------------------------ results, table, plots

def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, one record per step (the last one written wins)."""
    by_step: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def collect(sweep: Sweep) -> list[dict]:
    """One row per finished run, in variants-file order, then seed order."""
    order = {name: i for i, name in enumerate(sweep.variants)}
    rows = []
    for run in sorted(sweep.runs, key=lambda r: (order[r.variant], sweep.variants[r.variant][1].index(r.seed))):
        if not is_finished(run):
            continue
        meta = read_meta(run.dir) or {}
        ev_path = run.dir / "eval.json"
        ev = json.loads(ev_path.read_text()) if ev_path.is_file() else {}
        metrics = read_metrics(run.dir)
        speeds = [m["samples_per_s"] for m in metrics if isinstance(m.get("samples_per_s"), (int, float))]
        try:
            global_batch = json.loads((run.dir / "ds_config.json").read_text())["train_batch_size"]
        except (OSError, KeyError, json.JSONDecodeError):
            global_batch = None
        rows.append({
            "variant": run.variant, "seed": run.seed, "overrides": run.overrides,
            "sweep_overrides": sweep.overrides, **ev,
            "samples_per_s": statistics.median(speeds) if speeds else None,
            "wall_s": meta.get("wall_s"), "attempts": len(meta.get("attempts", [])),
            "steps": metrics[-1]["step"] if metrics else ev.get("step"), "max_steps": run.cfg.max_steps,
            "params": run.params, "global_batch": global_batch,
            "train_flops": metrics[-1].get("flops") if metrics else None, "budget_flops": sweep.budget_flops,
            "final_loss": metrics[-1].get("loss") if metrics else None,
            "run_dir": str(run.dir), "config_hash": run.hash,
        })
    return rows


def summarize(values: list[float]) -> dict | None:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return None
    return {"n": len(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def by_variant(sweep: Sweep, rows: list[dict]) -> dict[str, dict]:
    """``{variant: {key: summary}}`` for the table's figures, variants in file order."""
    keys = [k for k, _ in ACCURACY] + ["samples_per_s", "wall_s", "final_loss", "train_flops", "steps"]
    out = {}
    for name in sweep.variants:
        mine = [r for r in rows if r["variant"] == name]
        out[name] = {k: summarize([r.get(k) for r in mine]) for k in keys}
        out[name]["seeds"] = [r["seed"] for r in mine]
        out[name]["params"] = next((r.params for r in sweep.runs if r.variant == name), None)
    return out


def _pct(s: dict | None) -> str:
    if s is None:
        return "n/a"
    return f"{100 * s['mean']:.1f}" + (f" ± {100 * s['sd']:.1f}" if s["sd"] is not None else "")


def _num(s: dict | None, digits: int = 1) -> str:
    if s is None:
        return "n/a"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['sd']:.{digits}f}" if s["sd"] is not None else "")


def _delta_pt(s: dict | None, ref: dict | None) -> str:
    return "n/a" if s is None or ref is None else f"{100 * (s['mean'] - ref['mean']):+.1f}"


def _chance(sweep: Sweep) -> float | None:
    path = sweep.runs[0].cfg.eval.zeroshot if sweep.runs else None
    try:
        return 1.0 / len(json.loads(Path(path).read_text())["classnames"]) if path else None
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        return None


def _views_table(rows: list[dict], names: list[str]) -> list[str]:
    """Evaluations of other views of a run that a method adds to eval.json (ECLIPSE: ``fast/``,
    the expedited student; ``teacher/``, the momentum teacher), next to the plain keys."""
    prefixes = sorted({k.split("/")[0] + "/" for r in rows for k in r if k.startswith(("fast/", "teacher/"))})
    if not prefixes:
        return []
    keys = [(p + key, f"{p}{label}") for p in ["", *prefixes] for key, label in ACCURACY if key != "zeroshot_top5"]
    L = ["", "### Other views of the same runs (eval.json; % , mean ± std over seeds)", "",
         "The plain columns are the model as trained (an ECLIPSE student at full capacity); `fast/` is the "
         "student at its training keep rate; `teacher/` the momentum teacher with the shared text tower.", "",
         "| variant | " + " | ".join(label for _, label in keys) + " |", "|---|" + "--:|" * len(keys)]
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        cells = [_pct(summarize([r.get(k) for r in mine])) if any(k in r for r in mine) else "—" for k, _ in keys]
        L.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return L


def write_table(sweep: Sweep, rows: list[dict], path: Path) -> None:
    stats = by_variant(sweep, rows)
    names = list(sweep.variants)
    ref_name = names[0]
    ref = stats[ref_name]
    chance = _chance(sweep)
    steps = sorted({r.cfg.max_steps for r in sweep.runs})
    launch = "SLURM (slurm/train.sbatch" + (f" {shlex.join(sweep.sbatch_args)}" if sweep.sbatch_args else "") + ")" \
        if sweep.slurm else (f"torchrun, {sweep.nproc} ranks per run" if sweep.nproc > 1 else "1 process per run")
    L = [f"# Sweep: `{Path(sweep.variants_file).name}` on `{sweep.base}`", ""]
    L.append(f"Command: `{shlex.join(command_line(sweep))}`  ")
    budget = (f"every run trained to the same compute, {sweep.budget_flops:.3g} training FLOPs (`--budget-flops`), "
              "so the step counts differ; " if sweep.budget_flops is not None else "")
    L.append(f"{len(names)} variant(s); {budget}{', '.join(map(str, steps))} steps per run; {launch}; "
             f"{len(rows)} of {len(sweep.runs)} runs finished"
             + (f"; zero-shot chance level {100 * chance:.1f} %." if chance else "."))
    L += ["",
          "**How to read it.** Each cell is the mean ± sample standard deviation (n−1) over the variant's "
          "seeds (n = number of seeds; no ± with one seed). Accuracies in %. "
          f"Δ columns: difference of the means from the first variant, `{ref_name}`, in percentage points; "
          f"samples/s also as the ratio to `{ref_name}`.", ""]
    measured = sweep_speed.load(sweep, sweep.throughput)
    speed = sweep_speed.per_variant(measured, {n: stats[n]["params"] for n in names})
    L += sweep_speed.paragraph(measured, speed, names, sweep.throughput, sweep.slurm) + [""]
    head = ["variant", "n", "steps", "train FLOPs"]
    for key, label in ACCURACY:
        head += [f"{label} %", f"Δ {label} (pt)"]
    head += [h.format(ref=ref_name) for h in sweep_speed.HEAD] + ["params"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "|".join(["---", "--:"] + ["--:"] * (len(head) - 2)) + "|")
    for name in names:
        s = stats[name]
        cells = [f"`{name}`", str(len(s["seeds"])), _num(s["steps"], 0), _flops(s["train_flops"])]
        for key, _ in ACCURACY:
            cells += [_pct(s[key]), "—" if name == ref_name else _delta_pt(s[key], ref[key])]
        cells += sweep_speed.cells(speed, name, ref_name, s["steps"] and s["steps"]["mean"])
        cells += [f"{s['params'] / 1e6:.2f}M" if s["params"] else "n/a"]
        L.append("| " + " | ".join(cells) + " |")
    L += _views_table(rows, names)
    L += ["", "## Verdict", ""]
    L += _verdict(stats, names, speed)
    L += ["", "## Variants", "", "| variant | seeds | overrides |", "|---|---|---|"]
    for name in names:
        flat, seeds = sweep.variants[name]
        text = " ".join(f"`{k}={yaml_arg(v)}`" for k, v in flat.items()) or "(base config)"
        L.append(f"| `{name}` | {', '.join(map(str, seeds))} | {text} |")
    if sweep.overrides:
        L += ["", "Every variant also gets: " + " ".join(f"`{o}`" for o in sweep.overrides)]
    L += ["", "## Runs", "",
          "A run's own samples/s (the median of its logged windows) and wall time (all attempts, start-up and "
          "evaluations included) were measured while it trained, under whatever else the machine ran then: "
          "uncontrolled, not a speed comparison between variants (the throughput columns above are).", "",
          "| variant | seed | top-1 % | top-5 % | I→T R@1 % | T→I R@1 % | samples/s (median, uncontrolled) | "
          "wall s (uncontrolled) | attempts | steps | final loss | run directory |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        acc = [f"{100 * r[k]:.1f}" if isinstance(r.get(k), (int, float)) else "n/a" for k, _ in ACCURACY]
        L.append(f"| `{r['variant']}` | {r['seed']} | " + " | ".join(acc) +
                 f" | {_fmt(r['samples_per_s'], 1)} | {_fmt(r['wall_s'], 0)} | {r['attempts']} | {r['steps']} | "
                 f"{_fmt(r['final_loss'], 3)} | `{r['run_dir']}` |")
    missing = [run.name for run in sweep.runs if not any(r["variant"] == run.variant and r["seed"] == run.seed
                                                         for r in rows)]
    if missing:
        L += ["", f"Not finished (left out above): {', '.join(missing)}."]
    L += ["", "## Plots", "",
          "Training loss (global batch; bold: mean over seeds, thin: each seed):", "", "![loss](loss.png)", "",
          "Zero-shot top-1 during training (evaluations every `eval.every_steps` and at the end; dashed: chance):",
          "", "![zero-shot top-1](zeroshot_top1.png)", "",
          "Zero-shot top-1, image→text R@1 and the validation contrastive loss against training FLOPs "
          "(every forward charged; thin: each seed, bold: mean over seeds):", "", "![against FLOPs](vs_flops.png)", "",
          "Zero-shot top-1 against training wall time (thin: each seed's evaluations, placed at the wall time "
          "into the run when each was logged; big markers: each variant's mean final accuracy and the mean time "
          "it was reached, bars ± one sample std):", "", "![top-1 vs time](top1_vs_time.png)",
          "", "Rows behind this table: `results.jsonl`. Regenerate it all: run the same command again.", ""]
    _atomic(path, "\n".join(L))


def _flops(s: dict | None) -> str:
    """Training FLOPs, mean over seeds (metrics.jsonl's ``flops``; runs before it existed: n/a)."""
    return "n/a" if s is None else f"{s['mean']:.3g}"


def _fmt(x, digits: int) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "n/a"


def _verdict(stats: dict, names: list[str], speed: dict) -> list[str]:
    key = "zeroshot_top1"
    have = [n for n in names if stats[n][key] is not None]
    if not have:
        return ["No variant has finished runs with a zero-shot accuracy yet."]
    best = max(have, key=lambda n: stats[n][key]["mean"])
    out = [f"- Highest mean zero-shot top-1: `{best}` ({100 * stats[best][key]['mean']:.1f} %, "
           f"n={stats[best][key]['n']})."]
    ref_name = names[0]
    ref = stats[ref_name][key]
    for name in names[1:]:
        s = stats[name][key]
        if s is None or ref is None:
            continue
        line = (f"- `{name}` vs `{ref_name}`: zero-shot top-1 {100 * (s['mean'] - ref['mean']):+.1f} pt "
                f"({100 * s['mean']:.1f} vs {100 * ref['mean']:.1f} %)")
        if s["n"] > 1 and ref["n"] > 1:
            overlap = s["min"] <= ref["max"] and ref["min"] <= s["max"]
            line += (f"; per-seed ranges {100 * s['min']:.1f}–{100 * s['max']:.1f} and "
                     f"{100 * ref['min']:.1f}–{100 * ref['max']:.1f} % "
                     + ("overlap: not distinguishable from seed noise with these seeds." if overlap
                        else "do not overlap."))
        else:
            line += "; one seed, so no estimate of seed noise."
        ratio = sweep_speed.ratio(speed, name, ref_name)
        if ratio is not None:
            line += f" Step throughput {ratio:.2f}× `{ref_name}` (the controlled measurement above)."
        out.append(line)
    return out


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def eval_curve(run_dir: Path, tag: str = "eval/zeroshot_top1") -> list[tuple[int, float, float]]:
    """``[(step, wall_time, value)]`` of a TensorBoard scalar; a step written twice (by an attempt that
    was later resumed from an earlier checkpoint) keeps its last value."""
    tb = run_dir / "tensorboard"
    if not tb.is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    by_step: dict[int, tuple[float, float]] = {}
    for e in acc.Scalars(tag):
        if e.step not in by_step or e.wall_time >= by_step[e.step][0]:
            by_step[e.step] = (e.wall_time, e.value)
    return [(s, *by_step[s]) for s in sorted(by_step)]


def elapsed_at(t: float, attempts: list[dict]) -> float:
    """Seconds of the run's attempts before wall-clock time ``t`` (gaps between attempts left out)."""
    return sum(max(0.0, min(t, a["end"]) - a["start"]) for a in attempts if a["start"] <= t)


def write_plots(sweep: Sweep, rows: list[dict]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(sweep.variants)
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    done = {(r["variant"], r["seed"]): r for r in rows}
    runs = [r for r in sweep.runs if (r.variant, r.seed) in done]
    curves = {run.name: eval_curve(run.dir) for run in runs}
    for run in runs:  # no TensorBoard: the final evaluation only
        if not curves[run.name] and isinstance(done[(run.variant, run.seed)].get("zeroshot_top1"), float):
            ev = done[(run.variant, run.seed)]
            end = max((a["end"] for a in (read_meta(run.dir) or {}).get("attempts", [])), default=0.0)
            curves[run.name] = [(ev["step"], end, ev["zeroshot_top1"])]
    chance = _chance(sweep)
    paths = []

    def finish(fig, ax, name, title, xlabel, ylabel):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if "%" in ylabel:
            ax.set_ylim(bottom=0)
        if xlabel.startswith("wall time"):
            ax.set_xlim(left=0)
        if xlabel == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = sweep.out / name
        fig.savefig(path.with_name(name + ".tmp.png"), dpi=120)
        plt.close(fig)
        os.replace(path.with_name(name + ".tmp.png"), path)
        paths.append(path)

    # 1. loss over steps
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in names:
        mine = [run for run in runs if run.variant == name]
        series = []
        for run in mine:
            m = {x["step"]: x["loss"] for x in read_metrics(run.dir) if isinstance(x.get("loss"), (int, float))}
            series.append(m)
            ax.plot(list(m), list(m.values()), color=colors[name], lw=0.8, alpha=0.35)
        if series:
            common = sorted(set.intersection(*(set(m) for m in series)))
            ax.plot(common, [statistics.fmean(m[s] for m in series) for s in common], color=colors[name], lw=2,
                    label=f"{name} (n={len(series)})")
    finish(fig, ax, "loss.png", "Training loss (bold: mean over seeds; thin: each seed)", "step", "loss")

    # 2. zero-shot top-1 over steps
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in names:
        series = []
        for run in (r for r in runs if r.variant == name):
            c = curves[run.name]
            series.append({s: v for s, _, v in c})
            ax.plot([s for s, _, _ in c], [100 * v for _, _, v in c], color=colors[name], lw=0.8, alpha=0.35,
                    marker=".", ms=4)
        if series:
            common = sorted(set.intersection(*(set(m) for m in series)))
            ax.plot(common, [100 * statistics.fmean(m[s] for m in series) for s in common], color=colors[name],
                    lw=2, marker="o", ms=5, label=f"{name} (n={len(series)})")
    if chance:
        ax.axhline(100 * chance, color="gray", ls="--", lw=1, label=f"chance ({100 * chance:.1f} %)")
    finish(fig, ax, "zeroshot_top1.png", "Zero-shot top-1 during training (bold: mean over seeds)", "step",
           "zero-shot top-1 (%)")

    # 3. accuracy against wall time
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    walls = [r["wall_s"] for r in rows if isinstance(r.get("wall_s"), (int, float))]  # an upper bound of the x range
    minutes = bool(walls) and max(walls) > 300
    unit = 60.0 if minutes else 1.0
    for name in names:
        finals = []
        for run in (r for r in runs if r.variant == name):
            attempts = (read_meta(run.dir) or {}).get("attempts", [])
            c = curves[run.name]
            xs = [elapsed_at(t, attempts) / unit for _, t, _ in c]
            ax.plot(xs, [100 * v for _, _, v in c], color=colors[name], lw=0.8, alpha=0.4, marker=".", ms=4)
            if c:  # the final evaluation: its accuracy, and the wall time at which it was logged
                finals.append((xs[-1], 100 * c[-1][2]))
        if finals:
            xs, ys = zip(*finals)
            ax.errorbar(statistics.fmean(xs), statistics.fmean(ys),
                        xerr=statistics.stdev(xs) if len(xs) > 1 else None,
                        yerr=statistics.stdev(ys) if len(ys) > 1 else None,
                        color=colors[name], marker="D", ms=8, capsize=4, lw=1.5,
                        label=f"{name}: {statistics.fmean(ys):.1f} % in {statistics.fmean(xs):.1f} "
                              f"{'min' if minutes else 's'} (n={len(finals)})")
    if chance:
        ax.axhline(100 * chance, color="gray", ls="--", lw=1, label=f"chance ({100 * chance:.1f} %)")
    finish(fig, ax, "top1_vs_time.png", "Zero-shot top-1 against training wall time",
           f"wall time into the run when the evaluation was logged ({'minutes' if minutes else 'seconds'}; "
           "all attempts, start-up included)", "zero-shot top-1 (%)")

    # 4. zero-shot, R@1 and validation loss against training FLOPs (metrics.jsonl's ``flops``)
    panels = [("eval/zeroshot_top1", "zero-shot top-1 (%)", 100.0), ("eval/i2t_r1", "image→text R@1 (%)", 100.0),
              ("eval/val_loss", "validation contrastive loss", 1.0)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (tag, ylabel, mult) in zip(axes, panels):
        for name in names:
            series = []
            for run in (r for r in runs if r.variant == name):
                at = {m["step"]: m["flops"] for m in read_metrics(run.dir) if isinstance(m.get("flops"), (int, float))}
                c = [(at[s], v) for s, _, v in (curves[run.name] if tag == "eval/zeroshot_top1" else
                                                eval_curve(run.dir, tag)) if s in at]
                series.append(c)
                ax.plot([f for f, _ in c], [mult * v for _, v in c], color=colors[name], lw=0.8, alpha=0.35,
                        marker=".", ms=4)
            n = min((len(c) for c in series), default=0)
            if n:   # the mean over seeds at each evaluation (same schedule, so the same FLOPs up to rounding)
                ax.plot([statistics.fmean(c[i][0] for c in series) for i in range(n)],
                        [mult * statistics.fmean(c[i][1] for c in series) for i in range(n)], color=colors[name],
                        lw=2, marker="o", ms=4, label=f"{name} (n={len(series)})")
        if sweep.budget_flops is not None:
            ax.axvline(sweep.budget_flops, color="gray", ls=":", lw=1, label="budget")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" (")[0] + " against training FLOPs", fontsize=10)
        ax.grid(alpha=0.3)
        if ax is axes[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = sweep.out / "vs_flops.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, sweep.out / "vs_flops.png")
    paths.append(sweep.out / "vs_flops.png")
    return paths


def write_reports(sweep: Sweep) -> list[Path]:
    rows = collect(sweep)
    _atomic(sweep.out / "results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))
    write_table(sweep, rows, sweep.out / "table.md")
    paths = [sweep.out / "results.jsonl", sweep.out / "table.md"]
    if rows:
        paths += write_plots(sweep, rows)
    return paths
