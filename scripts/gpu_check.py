"""Helpers of scripts/gpu_check.sh (`make gpu-check`): probe the machine, resolve the plan's commands
without running them (DRY_RUN=1), record each step, and write summary.md from what the steps left.

    python scripts/gpu_check.py probe [--gpus]         # shell lines: MISSING="open_clip ...", GPUS=1
    python scripts/gpu_check.py env --out DIR          # DIR/env.json: device, driver, versions, commit
    python scripts/gpu_check.py resolve PLAN           # PLAN: one "STEP<TAB>command" a line; exit 1 naming
                                                       # every step whose command does not resolve
    python scripts/gpu_check.py record DIR --step S --status ok|failed|skipped --command CMD [...]
    python scripts/gpu_check.py summary DIR            # DIR/summary.md (also printed)

Resolving a command runs none of it: the interpreter exists, the module imports, the command line
parses with the CLI's own parser (trainer verbs and `bench NAME` down to the benchmark's parser,
`torch.distributed.run` and then the module it launches, pytest by collecting), config files load
with their overrides (unknown keys fail), and repository paths named on it exist.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as _dt
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# modules the steps need beside torch; a step needing a missing one is recorded as skipped
OPTIONAL = ("triton", "deepspeed", "webdataset", "open_clip", "transformers", "pytest", "xdist")
REPO_DIRS = ("tests/", "trainer/", "kernels/", "scripts/", "ds_configs/", "bench/sweeps/")


# ----------------------------------------------------------------------------------- probe / env

def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def probe(gpus: bool) -> dict:
    """The optional modules this python lacks (found, not imported: cheap) and, with ``gpus``, the
    number of GPUs torch sees."""
    out = {"MISSING": " ".join(m for m in OPTIONAL if not _importable(m))}
    if gpus:
        import torch
        out["GPUS"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return out


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict:
    import torch
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": (_run(["git", "rev-parse", "--short", "HEAD"]) or "unknown") + ("+dirty" if dirty else ""),
            "host": platform.node(), "python": sys.executable, "python_version": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus,
            "nvidia_smi": smi.splitlines() if smi else [],
            "packages": {d: _version(d) for d in ("triton", "deepspeed", "open_clip_torch", "webdataset",
                                                  "transformers", "pytest")}}


# ----------------------------------------------------------------------------------- resolve

class Unresolved(Exception):
    pass


@contextlib.contextmanager
def _argparse_errors(what: str):
    """An argparse exit (status 2, message on stderr) as Unresolved naming ``what``."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            yield
    except SystemExit as e:
        if e.code not in (0, None):
            lines = [l for l in err.getvalue().splitlines() if l.strip()]
            raise Unresolved(f"{what}: {lines[-1] if lines else f'exit {e.code}'}") from None


def _strip_env(argv: list[str]) -> list[str]:
    """``env [-u NAME] [NAME=VALUE] ... CMD`` -> CMD (the variables set the run, not the parse)."""
    if argv[:1] != ["env"]:
        return argv
    i = 1
    while i < len(argv) and (argv[i] == "-u" or "=" in argv[i] or argv[i - 1] == "-u"):
        i += 1
    return argv[i:]


def _check_paths(args: list[str]) -> None:
    for a in args:
        for part in a.split("=", 1)[-1:]:
            if part.startswith(REPO_DIRS) and not (ROOT / part.split("::")[0]).exists():
                raise Unresolved(f"no such file in the repository: {part}")


def _resolve_module(module: str, args: list[str]) -> str:
    """Check ``python -m module args`` without running it; return what was checked."""
    if importlib.util.find_spec(module) is None:
        raise Unresolved(f"python module {module!r} not found")
    if module == "pytest":
        import pytest
        # pytest-xdist's -n N collected in this process (-n 0): the flag is checked, no workers start
        args = ["0" if prev == "-n" else a for prev, a in zip([None, *args], args)]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args])
        if code != 0:
            tail = [l for l in out.getvalue().splitlines() if l.strip()][-3:]
            raise Unresolved(f"pytest {' '.join(args)}: collection failed (exit {int(code)}): {' | '.join(tail)}")
        return "pytest collects"
    if module == "torch.distributed.run":
        from torch.distributed.run import get_args_parser
        with _argparse_errors("torch.distributed.run"):
            ns = get_args_parser().parse_args(args)
        if not ns.module:
            raise Unresolved(f"torch.distributed.run: expected -m MODULE, got script {ns.training_script!r}")
        return "torchrun parses; " + _resolve_module(ns.training_script, list(ns.training_script_args))
    if module == "kernels.bench":
        from kernels.bench import _args
        with _argparse_errors("kernels.bench"):
            _args(args)
        return "kernels.bench parses"
    if module == "trainer":
        return _resolve_trainer(args)
    return "module found (arguments not checked)"


def _parser_of(module: str):
    """``module._args(argv)``, the benchmark's own parser, compiled from its source alone with the
    literal module constants it may read (``IMPLS``) and the docstring, without the module's imports:
    ``trainer.experiments.bench_train``'s load DeepSpeed and the model (~4 CPU-s, most of a dry run).
    The real import where that parser needs more than those."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())

    def literal(node) -> bool:
        try:
            ast.literal_eval(node.value)
            return True
        except ValueError:
            return False
    body = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name == "_args")
            or (isinstance(n, ast.Assign) and literal(n))]
    ns = {"argparse": argparse, "__doc__": ast.get_docstring(tree, clean=False), "__name__": module}
    exec(compile(ast.Module(body=body, type_ignores=[]), spec.origin, "exec"), ns)

    def parse(argv):
        try:
            return ns["_args"](argv)
        except NameError:
            return importlib.import_module(module)._args(argv)
    return parse


def _resolve_trainer(args: list[str]) -> str:
    from trainer.cli import build_parser
    from trainer.config import ConfigError, load_config
    with _argparse_errors("python -m trainer"):
        ns = build_parser().parse_args(args)
    checked = f"trainer {ns.verb} parses"
    if ns.verb == "bench":
        module = "kernels.bench" if ns.what == "loss" else f"trainer.experiments.bench_{ns.what}"
        with _argparse_errors(f"trainer bench {ns.what}"):
            ns = _parser_of(module)(list(ns.rest))
        checked = f"trainer bench parses ({module})"
    if getattr(ns, "config", None) is not None:
        try:
            load_config(ns.config, list(getattr(ns, "overrides", [])))
        except ConfigError as e:
            raise Unresolved(f"config {ns.config}: {e}") from None
        checked += f"; {ns.config} loads with its overrides"
    return checked


def resolve_command(argv: list[str]) -> str:
    argv = _strip_env(argv)
    if not argv:
        raise Unresolved("empty command")
    exe = argv[0]
    if shutil.which(exe) is None and not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        raise Unresolved(f"no such program: {exe}")
    _check_paths(argv[1:])
    if argv[1:2] == ["-m"]:
        return _resolve_module(argv[2], argv[3:])
    if Path(argv[1]).name == Path(__file__).name and len(argv) > 1:
        with _argparse_errors(argv[1]):
            build_parser().parse_args(argv[2:])
        return f"{argv[1]} parses"
    return "program found (arguments not checked)"


def resolve(plan: Path) -> int:
    failed = []
    for line in plan.read_text().splitlines():
        if not line.strip():
            continue
        step, _, command = line.partition("\t")
        try:
            what = resolve_command(shlex.split(command))
            print(f"  resolved  {step}: {what}")
        except (Unresolved, ImportError) as e:
            print(f"  BROKEN    {step}: {e}")
            failed.append(step)
    if failed:
        print(f"dry run: {len(failed)} command(s) do not resolve: {', '.join(failed)}")
        return 1
    print("dry run: every command resolves")
    return 0


# ----------------------------------------------------------------------------------- record / summary

def record(out: Path, ns) -> int:
    row = {"step": ns.step, "status": ns.status, "rc": ns.rc, "seconds": ns.seconds, "estimate_s": ns.estimate,
           "timeout_s": ns.timeout, "reason": ns.reason, "log": ns.log, "command": ns.command}
    with open(out / "steps.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


def _jsonl(paths) -> list[dict]:
    return [json.loads(l) for p in sorted(paths) for l in p.read_text().splitlines() if l.strip()]


def _cell(v, fmt="{:.1f}") -> str:
    return "" if v is None else fmt.format(v) if isinstance(v, (int, float)) else str(v)


def _loss_section(out: Path) -> list[str]:
    rows = _jsonl(out.glob("loss_*.jsonl"))
    if not rows:
        return []
    lines = ["## Loss kernels (`kernels.bench`): forward + backward", "",
             "| b = N | D | impl | tile | ms p50 | peak MiB | TFLOP/s | vs GEMM | status |",
             "|---:|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        mib = r["peak_mem_bytes"] / 2**20 if r.get("peak_mem_bytes") is not None else None
        lines.append(f"| {r['n']} | {r['dim']} | {r['impl']} | {r.get('tile') or ''} | {_cell(r.get('ms_p50'), '{:.2f}')} | "
                     f"{_cell(mib, '{:.0f}')} | {_cell(r.get('tflops'))} | {_cell(r.get('vs_gemm'), '{:.2f}')} | "
                     f"{r.get('status')} |")
    lines.append("")
    for (n, dim) in dict.fromkeys((r["n"], r["dim"]) for r in rows):
        ok = {r["impl"]: r for r in rows if (r["n"], r["dim"]) == (n, dim) and r.get("status") == "ok"}
        tuned = ok.get("triton")
        for impl, r in ok.items():
            if tuned and impl.startswith("triton@"):
                lines.append(f"- N = {n}, D = {dim}: the tuner's {tuned.get('tile')} takes "
                             f"{tuned['ms_p50'] / r['ms_p50']:.2f}x the time of fixed {r['tile']}")
            if tuned and impl == "open_clip":
                lines.append(f"- N = {n}, D = {dim}: triton is {r['ms_p50'] / tuned['ms_p50']:.2f}x faster than "
                             f"open_clip's ClipLoss with {tuned['peak_mem_bytes'] / max(r['peak_mem_bytes'], 1):.3f}x "
                             "its peak memory")
    return lines + [""]


def _train_section(out: Path) -> list[str]:
    rows = _jsonl(out.glob("train_*.jsonl"))
    if not rows:
        return []
    lines = ["## Training step (`bench train`)", "",
             "| impl | samples/s | step ms | peak MB/rank | loss first -> last | keep rate |",
             "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {_cell(r.get('samples_per_s'))} | {_cell(r.get('step_ms'))} | "
                     f"{_cell(r.get('peak_mem_mb'), '{:.0f}')} | {_cell(r.get('loss_first'), '{:.3f}')} -> "
                     f"{_cell(r.get('loss_last'), '{:.3f}')} | {_cell(r.get('keep_rate'), '{:.3f}')} |")
    return lines + ["", f"Full report: {', '.join(p.name for p in sorted(out.glob('train_*.md')))}", ""]


def _nccl_section(out: Path) -> list[str]:
    ev = out / "nccl" / "eval.json"
    if not ev.is_file():
        return []
    e = json.loads(ev.read_text())
    return ["## 2-rank NCCL run (bf16, ZeRO-3)", "",
            f"eval at step {e.get('step')}: zero-shot top-1 {e.get('zeroshot_top1')}, "
            f"R@1 i2t {e.get('i2t_r1')} / t2i {e.get('t2i_r1')}", ""]


def summary(out: Path) -> int:
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
    steps = _jsonl([out / "steps.jsonl"]) if (out / "steps.jsonl").is_file() else []
    device = ", ".join(env.get("nvidia_smi") or env.get("gpus") or ["no GPU seen"])
    lines = [f"# GPU check {out.name}", "",
             f"- device: {device}",
             f"- date: {env.get('date')}; commit {env.get('commit')}; host {env.get('host')}",
             f"- torch {env.get('torch')} (CUDA {env.get('cuda')}); "
             + ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items()),
             f"- steps: {sum(s['seconds'] or 0 for s in steps)} s in all; "
             + ", ".join(f"{n} {st}" for st in ("ok", "failed", "skipped")
                         for n in [sum(s["status"] == st for s in steps)] if n),
             "", "| step | status | s (estimate) | command | log / reason |", "|---|---|---:|---|---|"]
    for s in steps:
        note = s["reason"] or ""
        if s["log"]:
            note = f"[{Path(s['log']).name}](logs/{Path(s['log']).name})" + (f"; {note}" if note else "")
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} ({s['estimate_s']}) | `{s['command']}` | {note} |")
    lines.append("")
    kernel_log = out / "logs" / "kernels.log"
    if kernel_log.is_file():
        tail = [l for l in kernel_log.read_text().splitlines() if l.strip()][-1:]
        lines += ["## Triton kernels compiled (the interpreter tests' cases on the GPU)", "", f"`{tail[0] if tail else ''}`", ""]
    lines += _loss_section(out) + _train_section(out) + _nccl_section(out)
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


# ----------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe").add_argument("--gpus", action="store_true", help="also count the GPUs (imports torch)")
    sub.add_parser("env").add_argument("--out", required=True)
    sub.add_parser("resolve").add_argument("plan")
    r = sub.add_parser("record")
    r.add_argument("out")
    r.add_argument("--step", required=True)
    r.add_argument("--status", choices=("ok", "failed", "skipped"), required=True)
    r.add_argument("--rc", type=int, default=None)
    r.add_argument("--seconds", type=int, default=None)
    r.add_argument("--estimate", type=int, default=None)
    r.add_argument("--timeout", type=int, default=None)
    r.add_argument("--reason", default="")
    r.add_argument("--log", default="")
    r.add_argument("--command", required=True, help="the step's command, shell-quoted")
    sub.add_parser("summary").add_argument("out")
    return p


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.cmd == "probe":
        for k, v in probe(ns.gpus).items():
            print(f"{k}={shlex.quote(str(v))}")
        return 0
    if ns.cmd == "env":
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "env.json").write_text(json.dumps(environment(), indent=1) + "\n")
        print((Path(ns.out) / "env.json").read_text())
        return 0
    if ns.cmd == "resolve":
        return resolve(Path(ns.plan))
    if ns.cmd == "record":
        return record(Path(ns.out), ns)
    return summary(Path(ns.out))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
