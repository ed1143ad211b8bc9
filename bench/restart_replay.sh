#!/bin/bash
# Restart time against how far into the epoch the checkpoint was, with slow `pipe:` shards: the
# old resume (the code at OLD_REF, which replays every sample its loader workers had delivered
# since the epoch began) against this tree's (each worker re-reads its current shard up to the
# recorded position and the shards its shuffle buffer still holds samples of).
#
#   bash bench/restart_replay.sh                          # ~20 min on 2 loaded CPU cores
#   BUFFER=64 TAG=_buffer64 bash bench/restart_replay.sh  # a buffer as large as a shard
#
# 1. demo data: 2048 pairs in 32 shards of 64, each read through `pipe:sh slow_cat.sh SHARD`,
#    which logs the open and sleeps SLEEP seconds (an object store's first byte) before `cat`;
# 2. per implementation, one run of one epoch (128 steps of 16 pairs, 1 rank, 2 loader workers,
#    shuffle buffer BUFFER, default 16), checkpointing every 16 steps;
# 3. restarts: `checkpoint.resume=.../step_S` for S = 16 .. 112 (and a fresh start for 0), timed
#    from launch to the first line of metrics.jsonl (the first logged step), and from the engine
#    being built (its log line, before the checkpoint loads) to that line, which leaves out the
#    interpreter's start-up (tens of seconds on a loaded machine); the shard opens logged by then;
#    old and new alternate so that the machine's load falls on both alike; rows in WORK/rows.jsonl;
# 4. bench/results/restart_replay_cpu$TAG.{json,md,png} (REPORT_ONLY=1: from WORK/rows.jsonl alone).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
OLD_REF=${OLD_REF:-2bdc761}
TAG=${TAG:-}
SLEEP=${SLEEP:-2}
BUFFER=${BUFFER:-16}
WORK=${WORK:-$PWD/runs/restart-replay-b$BUFFER}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK"
if [ ! -d "$WORK/old/trainer" ]; then   # the old code, as committed (no checkout of this tree)
    mkdir -p "$WORK/old" && git archive "$OLD_REF" | tar -x -C "$WORK/old"
fi
$PY - "$WORK" "$SLEEP" "$OLD_REF" "$(git rev-parse --short HEAD)" "${REPORT_ONLY:-0}" "$BUFFER" "$TAG" <<'PYEOF'
import datetime, json, os, platform, signal, subprocess, sys, time
from pathlib import Path

work, sleep_s, old_ref, new_ref = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
report_only, buffer, tag = sys.argv[5] == "1", int(sys.argv[6]), sys.argv[7]
new_code, old_code = Path.cwd(), work / "old"
data = work / "data"
if not (data / "train").is_dir():
    sys.path.insert(0, str(new_code))
    from trainer.demo_data import make_demo_data
    make_demo_data(data, num_train=2048, num_val=64, num_text=8, seed=0, shard_size=64)
slow = work / "slow_cat.sh"
slow.write_text('echo "$1" >> "${OPEN_LOG:-/dev/null}"\nsleep "${SHARD_SLEEP:-0}"\nexec cat "$1"\n')
shards = f"pipe:sh {slow} {data}/train/train-{{000000..000031}}.tar"
EPOCH_STEPS, EVERY, BATCH = 128, 16, 16
common = ["--config", "trainer/configs/demo.yaml", f"data.train_shards={shards}", "data.val_shards=null",
          f"tokenizer.path={data}/tokenizer", f"eval.zeroshot={data}/zeroshot.json", "model.context_length=24",
          f"data.batch_size={BATCH}", "data.workers=2", f"data.shuffle_buffer={buffer}",
          f"data.train_num_samples={EPOCH_STEPS * BATCH}", "log.progress=false", "optim.warmup_steps=10"]


def launch(code: Path, out: Path, *extra, wait_first_step=False):
    """Run the trainer from ``code``; with wait_first_step, time launch -> first metrics line, then stop it."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code), "OPEN_LOG": str(out / "opens.log"), "SHARD_SLEEP": str(sleep_s)}
    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "trainer", "train", *common, f"output_dir={out}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=open(out / "stdout.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    while wait_first_step:
        if metrics.is_file() and metrics.read_text().strip():
            dt = time.perf_counter() - t0
            os.killpg(proc.pid, signal.SIGKILL)   # the run's own process group (start_new_session)
            proc.wait()
            return dt
        if proc.poll() is not None:
            raise SystemExit(f"{cmd} exited {proc.returncode} before a step: {(out / 'stdout.log').read_text()[-3000:]}")
        time.sleep(0.05)
    if proc.wait() != 0:
        raise SystemExit(f"{cmd} exited {proc.returncode}: {(out / 'stdout.log').read_text()[-3000:]}")
    return time.perf_counter() - t0


def engine_to_step_s(out: Path) -> float:
    """From the engine's log line (before the checkpoint loads) to metrics.jsonl's first write."""
    line = next(ln for ln in (out / "stdout.log").read_text().splitlines() if "INFO world_size=" in ln)
    built = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return (out / "metrics.jsonl").stat().st_mtime - built


def losses(out: Path) -> dict:
    return {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


impls = {"old": old_code, "new": new_code}
for name, code in impls.items():   # one epoch each, a checkpoint every EVERY steps
    base = work / f"base-{name}"
    if not report_only and not (base / "checkpoints" / f"step_{EPOCH_STEPS}").is_dir():
        launch(code, base, f"max_steps={EPOCH_STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=20",
               "log.every_steps=1")
same_losses = losses(work / "base-old") == losses(work / "base-new")
rows_file = work / "rows.jsonl"
if not report_only:
    rows_file.write_text("")
for step in range(0, EPOCH_STEPS, EVERY):
    for name, code in impls.items():
        if report_only:
            break
        out = work / "restarts" / f"{name}-{step}"
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        resume = [f"checkpoint.resume={work / f'base-{name}' / 'checkpoints' / f'step_{step}'}"] if step else []
        dt = launch(code, out, f"max_steps={step + 1}", "log.every_steps=1", "checkpoint.every_steps=100000",
                    *resume, wait_first_step=True)
        opens = len((out / "opens.log").read_text().splitlines()) if (out / "opens.log").is_file() else 0
        first = losses(out)[step + 1]
        row = {"impl": name, "step": step, "fraction": step / EPOCH_STEPS, "restart_s": round(dt, 2),
               "shard_opens": opens, "first_loss": first,
               "first_loss_matches_base": abs(first - losses(work / f"base-{name}")[step + 1]) <= 1e-6 * abs(first)}
        with open(rows_file, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
rows = [json.loads(ln) for ln in rows_file.read_text().splitlines() if ln.strip()]
for row in rows:
    row["engine_to_step_s"] = round(engine_to_step_s(work / "restarts" / f"{row['impl']}-{row['step']}"), 2)

meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.node()}, {os.cpu_count()} CPU cores (shared)",
        "load_avg_end": os.getloadavg(), "old": f"main at {old_ref} (replays the epoch)",
        "new": f"this tree at {new_ref} (re-reads the current shard and the buffer's shards)",
        "shard_sleep_s": sleep_s, "shards": "32 x 64 pairs, pipe:sh slow_cat.sh (sleep, then cat)",
        "epoch": f"{EPOCH_STEPS} steps x {BATCH} pairs, 1 rank, 2 loader workers, shuffle buffer {buffer}",
        "base_runs_same_losses": same_losses,
        "command": (f"BUFFER={buffer} TAG={tag} " if tag else "") + "bash bench/restart_replay.sh"}
res = Path("bench/results")
(res / f"restart_replay_cpu{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")

by = {(r["impl"], r["step"]): r for r in rows}
lines = ["# Restart time against the fraction of the epoch consumed (CPU)", "",
         f"{meta['date']}, {meta['machine']}; `{meta['command']}`. Shards: {meta['shards']}, "
         f"{sleep_s:g} s before the first byte of each. Epoch: {meta['epoch']}. Restart time: launch to the "
         "first line of metrics.jsonl (interpreter, model, DeepSpeed, checkpoint load, the loader's restore, one "
         "step); after engine: from the engine's log line (before the checkpoint loads) to that first line, "
         "without the interpreter's start-up. Shard opens: `pipe:` commands the loader workers started by then.", "",
         f"old = {meta['old']}; new = {meta['new']}. The two one-epoch base runs log identical losses: "
         f"{same_losses}; every restart's first loss equals its base run's at that step: "
         f"{all(r['first_loss_matches_base'] for r in rows)}.", "",
         "| step | fraction of epoch | old: restart (s) | old: after engine (s) | old: shard opens "
         "| new: restart (s) | new: after engine (s) | new: shard opens |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|"]
for step in range(0, EPOCH_STEPS, EVERY):
    o, n = by[("old", step)], by[("new", step)]
    lines.append(f"| {step} | {o['fraction']:.3f} | {o['restart_s']:.1f} | {o['engine_to_step_s']:.1f} | "
                 f"{o['shard_opens']} | {n['restart_s']:.1f} | {n['engine_to_step_s']:.1f} | {n['shard_opens']} |")


def slope(name: str, key: str) -> float:
    """Least-squares seconds per whole epoch consumed (0: flat)."""
    pts = [(r["fraction"], r[key]) for r in rows if r["impl"] == name]
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
meta["slope_s_per_epoch"] = {f"{n}/{k}": round(slope(n, k), 1) for n in impls for k in ("restart_s", "engine_to_step_s")}
lines += ["", "Least-squares slope against the fraction consumed, seconds per whole epoch: " + ", ".join(
    f"{k} {v:+.1f}" for k, v in meta["slope_s_per_epoch"].items()) + "."]
(res / f"restart_replay_cpu{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
(res / f"restart_replay_cpu{tag}.md").write_text("\n".join(lines) + "\n")

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, key, label in ((axes[0], "restart_s", "launch to first logged step (s)"),
                       (axes[1], "engine_to_step_s", "engine built to first logged step (s)")):
    for name, style in (("old", "o-"), ("new", "s-")):
        pts = [r for r in rows if r["impl"] == name]
        ax.plot([r["fraction"] for r in pts], [r[key] for r in pts], style, label=meta[name])
    ax.set_xlabel("fraction of the epoch consumed at the checkpoint")
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
fig.suptitle(f"Restart with slow pipe: shards ({sleep_s:g} s before each), CPU, {meta['date']}")
fig.tight_layout()
fig.savefig(res / f"restart_replay_cpu{tag}.png", dpi=120)
print("\n".join(lines))
PYEOF
