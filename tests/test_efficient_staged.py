"""The all-four run in stages with growth between them: scripts/efficient_staged.sh (local,
torchrun) and slurm/efficient_staged.sh (SLURM) run efficient.yaml at 2+2 layers of width 64,
grow it deeper (4+4), train, grow it wider (width 128), train. Each grown stage must start where
the source run stopped: with ``--pim-beta 1`` its first loss, every term of it, is the loss the
ungrown model has on the same first batch with the same teacher, kept set and schedule position
(a one-step run of the source's config from its checkpoint, measured here); ECL's kept set and
round count carry, ECLIPSE's teacher (PSD's too) is grown and keeps its function, and every loss
term is logged in every stage.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, check, read_metrics, run_child, run_trainer, trainer_env

LOCAL = ROOT / "scripts" / "efficient_staged.sh"
SLURM = ROOT / "slurm" / "efficient_staged.sh"
TERMS = ("clip", "teacher_kl", "self_distill", "text_lm")
STEPS = (4, 3, 2)   # stage 1's round at step 2, stage 2's at step 2, none in stage 3 (select.max_rounds 2)
# stage-1 overrides for a tiny run (the grown stages inherit them through the grown config.yaml)
TINY = ["data.batch_size=16", "data.train_num_samples=768", "data.shuffle_buffer=64", "data.workers=1",
        "optim.warmup_steps=1", "log.every_steps=1", "log.progress=false", "eval.batch_size=48",
        "select.batch_size=64", "text_lm.batch_size=4", "text_lm.num_samples=40", "dist.timeout_s=300"]


def _env(data: Path, runs: Path, **extra) -> dict:
    return trainer_env(DEMO_DATA=str(data), RUNS=str(runs), STEPS=" ".join(map(str, STEPS)), PY=sys.executable,
                       **extra)


def _trainer_args(words: list[str]) -> list[str]:
    """``train --config X k=v ...`` or ``grow ...`` out of a torchrun/sbatch command line."""
    if "slurm/train.sbatch" in words:
        return ["train", "--config", *words[words.index("slurm/train.sbatch") + 1:]]
    return words[words.index("trainer", words.index("-m")) + 1:]


# ------------------------------------------------------------------ fast: the plans

def test_local_and_slurm_plans_are_the_same_stages(tmp_path):
    """Both scripts' --dry-run: the same five trainer commands (SLURM chains them with afterok),
    stage 1 at the small shape with the pipeline's schedule length, each grow from the stage
    before it and each later stage from the grow's config.yaml; the configs load and the grows
    reach their shapes (test_slurm's checks of a documented pipeline); a dry run writes nothing."""
    from test_slurm import _check_stages
    env = _env(Path("runs/no-such-data"), tmp_path / "runs")
    local = run_child(["bash", str(LOCAL), "--dry-run", "data.batch_size=16"], env=env, cwd=ROOT)
    slurm = run_child(["bash", str(SLURM), "--dry-run", "--after", "41", "data.batch_size=16"], env=env, cwd=ROOT)
    assert local.returncode == 0 and slurm.returncode == 0, (local.stderr, slurm.stderr)
    lines = slurm.stdout.splitlines()
    assert len(lines) == 5 and "--dependency=afterok:41" in lines[0]
    assert all(f"--dependency=afterok:STAGE{i}" in line for i, line in enumerate(lines[1:], 1))
    a = [_trainer_args(shlex.split(line)) for line in local.stdout.splitlines()]
    b = [_trainer_args(shlex.split(line)) for line in lines]
    assert a == b
    assert [c[0] for c in a] == ["train", "grow", "train", "grow", "train"]
    assert not (tmp_path / "runs").exists()
    stages = [[a for a in shlex.split(line)[1:] if a != "--parsable" and not a.startswith(("--dependency=", "--kill-on"))]
              for line in lines]
    checked = _check_stages("slurm/efficient_staged.sh", stages)
    cfgs = [cfg for _, cfg in checked if cfg is not None]
    from trainer.model import preset_shape
    shapes = [{k: preset_shape(c.model)[k] for k in ("vision_layers", "text_layers", "vision_width", "text_width")}
              for c in cfgs]
    # (the later stages' configs are the grow's: _check_stages rebuilds them from stage 1's arguments)
    assert shapes == [{"vision_layers": 2, "text_layers": 2, "vision_width": 64, "text_width": 64},
                      {"vision_layers": 4, "text_layers": 4, "vision_width": 64, "text_width": 64},
                      {"vision_layers": 4, "text_layers": 4, "vision_width": 128, "text_width": 128}]
    for c, steps in zip(cfgs, STEPS):
        assert c.eclipse.enabled and c.psd.enabled and c.select.enabled and c.text_lm.enabled
        assert c.max_steps == steps and c.select.every_steps == (steps + 1) // 2 and c.data.batch_size == 16
        assert c.growth.schedule_steps == sum(STEPS) and c.select.max_rounds == 2
    # bad input: one error line, exit 2, nothing submitted
    for script in (LOCAL, SLURM):
        p = run_child(["bash", str(script), "--bogus"], env=env, cwd=ROOT)
        assert p.returncode == 2 and p.stderr.count("error:") == 1, p.stderr
        p = run_child(["bash", str(script)], env={**env, "SBATCH": "/bin/false"}, cwd=ROOT)
        assert p.returncode == 2 and "make-demo-data --out runs/no-such-data" in p.stderr, p.stderr
        p = run_child(["bash", str(script), "--dry-run"], env={**env, "STEPS": "4 x 2"}, cwd=ROOT)
        assert p.returncode == 2 and "STEPS" in p.stderr, p.stderr


# ------------------------------------------------------------------ full: the local pipeline, run

@pytest.fixture(scope="module")
def staged(demo_data, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("efficient-staged") / "runs"
    p = run_child(["bash", str(LOCAL), *TINY], env=_env(demo_data, runs, PIM_BETA="1"), cwd=ROOT, timeout=900)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-6000:])
    return runs


def _reference(src: Path, out: Path, start: int) -> dict:
    """Step 1 of the ungrown source model (its config, weights, teacher) on the kept set the grown
    stage reads, at the schedule position the grown stage starts from: the grown stage's first loss."""
    kept = max((src / "select").glob("round_*"))
    check(run_trainer(["train", "--config", str(src / "config.yaml"), f"checkpoint.init={src}", f"output_dir={out}",
                       "max_steps=1", f"data.manifest={kept}", f"growth.schedule_start={start}",
                       f"growth.schedule_steps={sum(STEPS)}"], nproc=2))
    return read_metrics(out)[0]


@pytest.mark.full   # three 2-rank training stages, two grows and two one-step reference runs (2-3 min)
def test_grown_stages_start_at_the_ungrown_models_loss(staged, tmp_path):
    """Depth growth (s1 -> s2) and width growth (s2 -> s3), both with --pim-beta 1: each grown
    stage's first loss and every term of it equal the source model's own loss on the same batch.
    The source and the grown model compute the same function within fp32 rounding (grow.json's
    function_error: a few 1e-7 in the embeddings, ~2e-6 in logits of scale up to 100); summed and
    averaged over a 32-pair batch that moves a loss term by at most ~1e-6, so 1e-5 is the
    tolerance (depth growth is bit-exact here: the new blocks add exact zeros)."""
    for src, dst, start in (("s1", "s2", STEPS[0]), ("s2", "s3", STEPS[0] + STEPS[1])):
        info = json.loads((staged / f"{src}-grown" / "grow.json").read_text())
        assert info["request"]["pim_beta"] == 1.0
        assert all(e < 1e-5 for e in info["function_error"].values()), info["function_error"]
        first = read_metrics(staged / dst)[0]
        ref = _reference(staged / src, tmp_path / f"ref-{dst}", start)
        assert first["step"] == ref["step"] == 1
        for term in ("loss", *TERMS):
            assert first[term] == pytest.approx(ref[term], abs=1e-5), (dst, term, first[term], ref[term])
        # the teacher is its own (the KL is not 0 as it is when the teacher starts as the student),
        # and the soft targets are in the loss
        assert first["teacher_kl"] > 1e-3 and first["self_distill"] > 0.1, first


@pytest.mark.full   # shares the pipeline above
def test_every_stage_logs_every_term_and_carries_the_method_state(staged, demo_data):
    s1, s2, s3 = (staged / s for s in ("s1", "s2", "s3"))
    for run, steps in zip((s1, s2, s3), STEPS):
        logged = read_metrics(run)
        assert [m["step"] for m in logged] == list(range(1, steps + 1)), run
        assert all(math.isfinite(m[t]) and m[t] >= 0 for m in logged for t in ("loss", *TERMS)), run
        assert json.loads((run / "eval.json").read_text())["step"] == steps
    # ECL: round 1 in stage 1 on all 768 pairs, round 2 in stage 2 on round 1's kept set (its
    # scores carried), stage 3 reads round 2's kept set and selects no more (max_rounds 2)
    r1, r2 = s1 / "select" / "round_001", s2 / "select" / "round_002"
    sum1, sum2 = (json.loads((r / "summary.json").read_text()) for r in (r1, r2))
    assert (sum1["round"], sum1["total"], sum1["kept"]) == (1, 768, round(0.85 * 768))
    assert (sum2["round"], sum2["total"], sum2["kept"]) == (2, sum1["kept"], round(0.85 * sum1["kept"]))
    assert sum2["manifest_in"] == str(r1.resolve()) and sum2["scores_from"] == [str(r1.resolve())]
    assert not (s2 / "select" / "round_001").exists() and not (s3 / "select").exists()
    g1, g2 = (yaml.safe_load((staged / f"{s}-grown" / "config.yaml").read_text()) for s in ("s1", "s2"))
    assert g1["data"]["manifest"] == str(r1.resolve()) and g2["data"]["manifest"] == str(r2.resolve())
    assert json.loads((staged / "s2-grown" / "grow.json").read_text())["carried"] == \
        {"select": {"rounds": 2, "manifest": str(r2.resolve())}}
    state = torch.load(s3 / "checkpoints" / f"step_{STEPS[2]}" / "trainer_state" / "rank_0.pt", weights_only=False)
    assert state["select"]["rounds"] == 2 and state["select"]["manifest"] == str(r2.resolve())
    # the schedules span the pipeline; EViT's drop layer moves with its layer; the LM head scale
    # follows the text width (1/2 after 64 -> 128)
    assert (g1["growth"]["schedule_start"], g1["growth"]["schedule_steps"]) == (STEPS[0], sum(STEPS))
    assert (g2["growth"]["schedule_start"], g2["growth"]["schedule_steps"]) == (STEPS[0] + STEPS[1], sum(STEPS))
    assert g1["eclipse"]["drop_layers"] == [2] and g2["eclipse"]["drop_layers"] == [2]   # [1] of 2 layers
    assert g1["text_lm"]["head_scale"] == 1.0 and g2["text_lm"]["head_scale"] == 0.5
    # the learning rate warms up again in every stage
    assert all(read_metrics(r)[0]["lr"] == pytest.approx(1e-3) for r in (s1, s2, s3))


@pytest.mark.full   # shares the pipeline above
def test_teacher_is_grown_with_its_function_and_is_not_the_student(staged, demo_data):
    """ECLIPSE's teacher (PSD's soft targets come from it) in each grow directory computes the
    source run's final teacher's image embeddings, which differ from the source student's (that
    the grown stage trains from it: its first teacher_kl and self_distill equal the source's,
    above)."""
    from trainer.data import load_tokenizer
    from trainer.methods.eclipse import PREFIX, teacher_state_dict
    from trainer.model import build_model, preset_shape
    from trainer.sources import checkpoint_config, fp32_state_dict, grown_weights
    tok = load_tokenizer(str(demo_data / "tokenizer"))
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(4, 3, 64, 64, generator=g)

    def image_tower(cfg, sd):
        model = build_model(cfg.model, tok, 0).eval()
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert not unexpected and not [k for k in missing if k.startswith(("vision_model", "visual_projection"))]
        with torch.no_grad():
            return model.encode_image(pixels)

    for src, grown in (("s1", "s1-grown"), ("s2", "s2-grown")):
        small_cfg, root, tag = checkpoint_config(str(staged / src))
        big_cfg, _, _ = checkpoint_config(str(staged / grown))
        teacher = teacher_state_dict(root, tag)
        student = {k: v for k, v in fp32_state_dict(root, tag).items() if not k.startswith(PREFIX)}
        grown_teacher = {k[len(PREFIX):]: v for k, v in grown_weights(staged / grown).items() if k.startswith(PREFIX)}
        assert preset_shape(big_cfg.model) != preset_shape(small_cfg.model)
        before, after = image_tower(small_cfg, teacher), image_tower(big_cfg, grown_teacher)
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
        assert (before - image_tower(small_cfg, student)).abs().max() > 1e-3, src


@pytest.mark.full   # shares the pipeline above; the rerun loads two checkpoints for the grows' no-op
def test_rerun_skips_every_finished_stage(staged, demo_data):
    before = {p: p.read_bytes() for p in staged.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".yaml", ".pt")}
    p = run_child(["bash", str(LOCAL), *TINY], env=_env(demo_data, staged, PIM_BETA="1"), cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for stage, steps in zip(("s1", "s2", "s3"), STEPS):
        assert f"== {staged / stage}: finished at step {steps}, skipped" in p.stderr
    assert p.stderr.count("already holds this growth; nothing to do") == 2 and "torch.distributed.run" not in p.stderr
    after = {p: p.read_bytes() for p in before}
    assert after == before


# ------------------------------------------------------------------ full: the SLURM pipeline, on the loopback cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import slurm_cluster as sc
    sc.skip_or_fail_without_cluster()
    c = sc.SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=1, cred_expire_s=10)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.full   # five SLURM jobs (2-node training stages), after the local pipeline it is compared with
@pytest.mark.timeout(1800)
def test_slurm_pipeline_reproduces_the_local_stages(cluster, staged, demo_data, tmp_path):
    """slurm/efficient_staged.sh on two loopback nodes (one rank each, as torchrun's two ranks):
    five jobs chained by afterok, all complete, and every stage logs the same losses, term by
    term, as the local pipeline (the same stages, data, seeds and world size; an independent
    launcher, rendezvous and process layout), and ends with the same ECL kept sets."""
    runs = tmp_path / "runs"
    env = {"DEMO_DATA": str(demo_data), "RUNS": str(runs), "STEPS": " ".join(map(str, STEPS)), "PIM_BETA": "1",
           "NODES": "2", "CPUS": "1", "PYTHON": sys.executable}
    p = cluster.run(["bash", str(SLURM), *TINY], cwd=ROOT, env=env)
    jobs = [int(j) for j in p.stdout.split()]
    assert len(jobs) == 5, p.stdout + p.stderr
    for job in jobs:
        rec = cluster.wait_done(job, 900)
        logs = "".join(f.read_text(errors="replace")[-3000:] for f in (runs / "logs").glob(f"*-{job}.out"))
        assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", (rec, logs)
    for stage, steps in zip(("s1", "s2", "s3"), STEPS):
        a, b = read_metrics(staged / stage), read_metrics(runs / stage)
        assert [m["step"] for m in b] == list(range(1, steps + 1)), stage
        for x, y in zip(a, b):
            for term in ("loss", *TERMS):
                assert y[term] == pytest.approx(x[term], rel=1e-5, abs=1e-6), (stage, x["step"], term)
    for stage, rnd in (("s1", "round_001"), ("s2", "round_002")):
        assert (runs / stage / "select" / rnd / "manifest.txt").read_text() == \
            (staged / stage / "select" / rnd / "manifest.txt").read_text()
    g2 = yaml.safe_load((runs / "s2-grown" / "config.yaml").read_text())
    assert g2["data"]["manifest"] == str((runs / "s2" / "select" / "round_002").resolve())
