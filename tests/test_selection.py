"""EfficientCLIP's ensemble confident learning (trainer/methods/selection.py): the `select` verb
alone, under torchrun and as array tasks; its manifest read back by training; rounds inside a
training run, killed and rerun."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import check, data_overrides, read_metrics, run_trainer

from trainer import data as D
from trainer.methods import selection as S


@pytest.fixture(scope="module")
def ragged(tmp_path_factory) -> Path:
    """300 noisy pairs in shards of 128, 128 and 44 (a ragged last shard)."""
    from trainer.demo_data import make_demo_data

    out = tmp_path_factory.mktemp("ragged")
    make_demo_data(out, num_train=300, num_val=32, num_text=8, noise_rate=0.3, seed=3, shard_size=128)
    return out


@pytest.fixture(scope="module")
def ckpts(ragged, tmp_path_factory) -> list[Path]:
    """Two checkpoints (steps 2 and 4) of a tiny run on the ragged data."""
    out = tmp_path_factory.mktemp("sel-run")
    check(run_trainer(["train", "--config", "trainer/configs/demo.yaml", *data_overrides(ragged, out), "max_steps=4",
                       "checkpoint.every_steps=2", "checkpoint.keep_last=3", "data.batch_size=16",
                       "data.train_num_samples=300", "log.progress=false", "data.val_shards=null"]))
    return [out / "checkpoints" / "step_2", out / "checkpoints" / "step_4"]


def select(ckpts, shards, out, *extra, nproc=1, **env):
    return run_trainer(["select", "--checkpoints", *map(str, ckpts), "--shards", str(shards), "--out", str(out),
                        "--batch-size", "32", *extra], nproc=nproc, **env)


def scores(out: Path) -> list[tuple[str, float]]:
    return [(r["key"], r["score"]) for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())]


def shard_truth(shards: Path) -> list[tuple[str, bool]]:
    """Every (key, noisy) of the shards, read with tarfile (not the trainer's reader)."""
    rows = []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    rows.append((m.name[:-5], bool(json.load(tf.extractfile(m))["noisy"])))
    return rows


@pytest.fixture(scope="module")
def single(ckpts, ragged, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sel-1")
    check(select(ckpts, ragged / "train", out, "--keep", "0.7"))
    return out


# ----------------------------------------------------------------------------- pure functions

def test_work_units_cover_every_sample_once_for_any_world():
    for n_shards in (1, 2, 3, 7):
        for world in (1, 2, 3, 4, 8, 9):
            units = S.work_units(n_shards, world)
            owners = [u for r in range(world) for u in S.share(units, r, world)]
            assert sorted(owners, key=lambda u: (u.shard, u.part)) == units      # each unit to one rank
            for s in range(n_shards):
                mine = [u for u in units if u.shard == s]
                covered = sorted(i for u in mine for i in range(50) if i % u.parts == u.part)
                assert covered == list(range(50))                                # each sample in one unit


def test_keep_rule_is_rank_based_with_ties_in_data_order():
    scores = np.array([0.5, 0.1, 0.5, 0.9, 0.5, -1.0])
    assert S.make_rule(0.5, None, None, "t").kept_mask(scores).tolist() == [True, False, True, True, False, False]
    assert S.make_rule(None, 0.5, None, "t").kept_mask(scores).tolist() == [True, False, True, True, True, False]
    assert S.make_rule(None, None, 50.0, "t").kept_mask(scores).sum() == (scores >= np.median(scores)).sum()
    assert S.make_rule(None, None, None, "t").keep == 0.9


def test_auc_is_the_pairwise_probability():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=200), 1)       # rounded: many ties
    noisy = rng.random(200) < 0.3
    clean, bad = scores[~noisy], scores[noisy]
    brute = ((clean[:, None] > bad[None, :]).sum() + 0.5 * (clean[:, None] == bad[None, :]).sum()) / (clean.size * bad.size)
    assert S._auc(scores, noisy) == pytest.approx(brute, abs=1e-12)


def test_self_confidence_is_the_pairs_log_softmax_among_itself_and_the_pool():
    torch.manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape), dim=-1)
    img, txt, pool_img, pool_txt = unit(5, 8), unit(5, 8), unit(7, 8), unit(7, 8)
    pool_img[2], pool_txt[2] = img[1], txt[1]          # pair 1 is pool entry 2: not its own competitor
    same = torch.zeros(5, 7, dtype=torch.bool)
    same[1, 2] = True
    got = S.self_confidence(img, txt, pool_img, pool_txt, 20.0, same)
    for i in range(5):
        others = [j for j in range(7) if not same[i, j]]
        texts = torch.stack([txt[i], *pool_txt[others]]).double()     # own caption first
        images = torch.stack([img[i], *pool_img[others]]).double()
        i2t = torch.log_softmax(20.0 * texts @ img[i].double(), 0)[0]
        t2i = torch.log_softmax(20.0 * images @ txt[i].double(), 0)[0]
        assert got[i].item() == pytest.approx(((i2t + t2i) / 2).item(), abs=1e-12)
    assert (got < 0).all()
    # Against the whole batch as its own pool: the diagonal of CLIP's two log-softmaxes.
    logits = 20.0 * img.double() @ txt.double().T
    ref = (torch.log_softmax(logits, 1).diagonal() + torch.log_softmax(logits, 0).diagonal()) / 2
    torch.testing.assert_close(S.self_confidence(img, txt, img, txt, 20.0, torch.eye(5, dtype=torch.bool)), ref)


def test_free_scores_are_read_from_the_training_forward(tmp_path):
    """select.free_scores: each micro-batch's pairs, scored against the micro-batch (and, for the
    queue, the rank's earlier micro-batches), as CLIP's log-softmaxes would score them."""
    from trainer.config import load_config

    cfg = load_config("trainer/configs/demo.yaml", [f"output_dir={tmp_path}", "select.free_scores=true"])
    sel = S.Selection(cfg, rank=1, world=2)
    torch.manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 6), dim=-1)
    batches = [(unit(4), unit(4)), (unit(3), unit(3))]
    for step, (img, txt) in enumerate(batches, start=1):
        sel.prepare(step)
        sel.observe({"keys": [f"s{step}-{i}" for i in range(len(img))]}, img, txt, torch.tensor(12.0))
    rows = [json.loads(line) for line in (tmp_path / "select" / "free" / "rank_1.jsonl").read_text().splitlines()]
    assert [(r["step"], r["key"]) for r in rows] == [(1, f"s1-{i}") for i in range(4)] + [(2, f"s2-{i}") for i in range(3)]

    def clip_diag(img, txt, t, n):   # the pairs are the first n rows; the rest only compete
        logits = t * img.double() @ txt.double().T
        return ((torch.log_softmax(logits[:n], 1).diagonal() + torch.log_softmax(logits[:, :n], 0).diagonal()) / 2)

    (i1, t1), (i2, t2) = batches
    for rows_b, (img, txt), (q_img, q_txt) in ((rows[:4], batches[0], batches[0]),
                                               (rows[4:], batches[1], (torch.cat([i2, i1]), torch.cat([t2, t1])))):
        np.testing.assert_allclose([r["cos"] for r in rows_b], (img * txt).sum(-1).numpy(), atol=1e-6)
        np.testing.assert_allclose([r["sc_batch"] for r in rows_b], clip_diag(img, txt, 12.0, len(img)).numpy(), atol=1e-9)
        np.testing.assert_allclose([r["sc_queue"] for r in rows_b], clip_diag(q_img, q_txt, 12.0, len(img)).numpy(), atol=1e-9)
        np.testing.assert_allclose([r["sc_queue_t30"] for r in rows_b], clip_diag(q_img, q_txt, 30.0, len(img)).numpy(), atol=1e-9)


def test_the_default_score_is_the_self_confidence_at_temperature_100():
    from trainer.cli import build_parser
    from trainer.config import Config

    sc = Config().select
    assert (sc.score, sc.temperature, sc.pool) == ("selfconf", 100.0, 1024)
    args = build_parser().parse_args(["select", "--checkpoints", "c", "--shards", "s", "--out", "o"])
    assert (args.score, args.temperature, args.pool) == ("selfconf", "100", 1024)
    assert S.Score() == S.make_score("selfconf", 100.0, 1024, "t")


def test_the_score_benchmarks_dropped_set_counts():
    from trainer.experiments.bench_select import separation

    score = np.array([0.3, 0.1, 0.5, 0.2, 0.4])      # dropped lowest first: 0.1, 0.2, 0.3, ...
    noisy = np.array([True, True, False, False, False])
    got = separation(score, noisy, keep=0.6)          # drops 0.1 (noisy) and 0.2 (clean)
    assert (got["precision_at_keep"], got["recall_at_keep"]) == (0.5, 0.5)
    assert got["precision_at_recall_0.8"] == pytest.approx(2 / 3)   # both noisy only once 0.3 is dropped
    assert got["auroc"] == pytest.approx(5 / 6)      # clean above noisy in 5 of the 6 pairs (0.2 < 0.3)


# ----------------------------------------------------------------------------- the verb

@pytest.mark.full   # fast tier: the select array pipeline on SLURM and the killed-pass resume
def test_scores_are_identical_from_1_2_and_3_ranks_and_cover_every_sample_once(single, ckpts, ragged, tmp_path):
    truth = shard_truth(ragged / "train")
    assert len(truth) == 300
    one = scores(single)
    assert [k for k, _ in one] == [k for k, _ in truth]                          # each sample once, in order
    for nproc in (2, 3):
        out = tmp_path / f"w{nproc}"
        check(select(ckpts, ragged / "train", out, "--keep", "0.7", nproc=nproc))
        assert scores(out) == one                                                 # bit for bit
        assert (out / "manifest.txt").read_text() == (single / "manifest.txt").read_text()
    # 4 SLURM array tasks over 3 shards: every shard split in 2 interleaved slices (6 units).
    out = tmp_path / "array4"
    for task in range(4):
        check(select(ckpts, ragged / "train", out, "--keep", "0.7", SLURM_ARRAY_TASK_ID=str(task),
                     SLURM_ARRAY_TASK_COUNT="4", SLURM_ARRAY_TASK_MIN="0"))
        assert (out / "summary.json").is_file() == (task == 3)                    # the last task merges
    assert sorted(p.stem for p in (out / "parts").glob("*.jsonl")) == [f"{s:06d}-{j}of2" for s in range(3) for j in range(2)]
    four = scores(out)
    assert [k for k, _ in four] == [k for k, _ in one]
    np.testing.assert_allclose([s for _, s in four], [s for _, s in one], rtol=0, atol=1e-5)


def test_a_killed_scoring_pass_resumes_and_scores_only_what_is_missing(single, ckpts, ragged, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(single, out)
    for name in ("summary.json", "manifest.txt", "scores.jsonl", "index.json"):
        (out / name).unlink()
    (out / "parts" / "000001-0of1.jsonl").unlink()                # as if killed while scoring shard 1
    text = check(select(ckpts, ragged / "train", out, "--keep", "0.7"))
    assert "scored 1 unit(s) (2 of its 3 were done already)" in text
    assert scores(out) == scores(single)
    # A part written from other checkpoints is not trusted: it is scored again.
    other = tmp_path / "other"
    shutil.copytree(out, other)
    check(select(ckpts[1:], ragged / "train", other, "--keep", "0.7"))
    assert scores(other) != scores(single)
    summary = json.loads((other / "summary.json").read_text())
    assert summary["checkpoints"] == [str(ckpts[1])]
    # --merge-only with a unit missing names it and exits 2.
    (other / "parts" / "000002-0of1.jsonl").unlink()
    text = check(select(ckpts[1:], ragged / "train", other, "--merge-only"), code=2)
    assert "not scored yet" in text and "train-000002.tar" in text


def test_summary_counts_and_auc_match_the_shards_noise_flags(single, ragged):
    truth = dict(shard_truth(ragged / "train"))
    kept = set((single / "manifest.txt").read_text().split())
    summary = json.loads((single / "summary.json").read_text())
    dropped = set(truth) - kept
    noisy = {k for k, v in truth.items() if v}
    assert summary["total"] == 300 and summary["kept"] == len(kept) == 210
    assert summary["precision"] == pytest.approx(len(dropped & noisy) / len(dropped))
    assert summary["recall"] == pytest.approx(len(dropped & noisy) / len(noisy))
    sc = dict(scores(single))
    # Kept = the 210 best scores; the score is the sum of the two checkpoints' self-confidences (log-probabilities).
    assert min(sc[k] for k in kept) >= max(sc[k] for k in dropped)
    assert all(v < 0.0 for v in sc.values()) and summary["score"] == "selfconf" and summary["temperature"] == 100.0
    # AUC = P(a clean sample outscores a noisy one), ties counting half: every pair counted here
    clean = [v for k, v in sc.items() if not truth[k]]
    bad = [v for k, v in sc.items() if truth[k]]
    pairs = sum((c > b) + 0.5 * (c == b) for c in clean for b in bad)
    assert summary["auc"] == pytest.approx(pairs / (len(clean) * len(bad)), abs=1e-12)


def test_the_verbs_scores_are_each_members_self_confidence_summed(single, ckpts, ragged):
    """Recomputed from the members' embeddings of all 300 pairs (fewer than the pool of 1024, so
    every pair competes with all others): CLIP's two log-softmaxes at logit scale 100, diagonal."""
    from trainer.methods import load_trained_model
    from trainer.sources import checkpoint_config

    truth = shard_truth(ragged / "train")
    total = torch.zeros(len(truth), dtype=torch.float64)
    for ckpt in ckpts:
        cfg, root, tag = checkpoint_config(str(ckpt))
        tok = D.load_tokenizer(cfg.tokenizer.path)
        model = load_trained_model(cfg, root, tag, tok)
        dec = D.eval_decoder(cfg, tok)
        batch = dec.collate([dec(s)[:2] for s in _samples(ragged / "train")])
        with torch.no_grad():
            img, txt, *_ = model(pixel_values=D.model_pixels(cfg)(batch["image"], "cpu", torch.float32),
                                 input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = 100.0 * img.double() @ txt.double().T
        total += (torch.log_softmax(logits, 1).diagonal() + torch.log_softmax(logits, 0).diagonal()) / 2
    got = scores(single)
    assert [k for k, _ in got] == [k for k, _ in truth]
    np.testing.assert_allclose([v for _, v in got], total.numpy(), rtol=1e-5, atol=1e-4)


def _samples(shards: Path):
    from webdataset import tariterators

    for tar in sorted(shards.glob("*.tar")):
        yield from tariterators.tarfile_samples([{"url": str(tar)}])


def test_scores_from_an_earlier_selection_are_added(single, ckpts, ragged, tmp_path):
    out = tmp_path / "round2"
    check(select(ckpts[:1], ragged / "train", out, "--keep", "0.5", "--manifest", str(single),
                 "--scores-from", str(single)))
    first = dict(scores(single))
    kept1 = (single / "manifest.txt").read_text().split()
    alone = tmp_path / "alone"   # the same subset (the self-confidence's pool is drawn from it), nothing carried
    check(select(ckpts[:1], ragged / "train", alone, "--keep", "0.5", "--manifest", str(single)))
    own = dict(scores(alone))
    two = dict(scores(out))
    assert sorted(two) == sorted(kept1)                                          # only the subset is scored
    for k in kept1:
        assert two[k] == pytest.approx(first[k] + own[k], abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"] == 210 and summary["kept"] == 105 and summary["not_in_subset"] == 90


def test_training_reads_only_the_kept_keys(single, ragged, tmp_path):
    from trainer.config import load_config
    from trainer.train import TrainData

    kept = set((single / "manifest.txt").read_text().split())
    tok = D.load_tokenizer(str(ragged / "tokenizer"))
    dec = D.SampleDecoder(tok, 24, D.build_transforms(64, [0.5] * 3, [0.5] * 3, 0.9, train=True))
    flat = tmp_path / "flat.txt"
    flat.write_text("# a plain key list\n" + "\n".join(sorted(kept)) + "\n")
    for manifest in (single, single / "manifest.txt", flat):
        cfg = load_config("trainer/configs/demo.yaml", [f"data.train_shards={ragged}/train", "data.batch_size=30",
                                                        "data.workers=0", f"data.manifest={manifest}"])
        td = TrainData(cfg, dec, rank=0, world=1, position=None)
        assert isinstance(td.manifest, D.KeyManifest if manifest == flat else D.ShardManifest)
        seen = [k for _ in range(12) for k in td.next()["keys"]]
        assert set(seen) <= kept and len(set(seen)) > 150
    # The per-shard form holds one shard's keys at a time, exactly that shard's kept keys.
    m = D.ShardManifest(single)
    for tar in sorted((ragged / "train").glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys = {n.name.split(".")[0] for n in tf.getmembers()}
        assert m.keys_for(str(tar)) == keys & kept
    # A training shard the selection never scored is refused up front.
    extra = tmp_path / "more"
    extra.mkdir()
    shutil.copy(sorted((ragged / "train").glob("*.tar"))[0], extra / "new-000000.tar")
    for t in sorted((ragged / "train").glob("*.tar")):
        shutil.copy(t, extra / t.name)
    text = check(run_trainer(["train", "--config", "trainer/configs/demo.yaml", *data_overrides(ragged, tmp_path / "o"),
                              f"data.train_shards={extra}", f"data.manifest={single}"]), code=2)
    assert "new-000000.tar" in text and "not in the selection" in text


@pytest.mark.full   # the loader's skip-and-count is fast-tier tested in tests/test_data.py
def test_corrupt_samples_are_skipped_and_counted(single, ckpts, ragged, tmp_path):
    shards = tmp_path / "train"
    shutil.copytree(ragged / "train", shards)
    with tarfile.open(ragged / "train" / "train-000002.tar") as src, tarfile.open(shards / "train-000002.tar", "w") as dst:
        for m in src.getmembers():
            payload = src.extractfile(m).read()
            if m.name == "train_00000260.jpg":
                payload = b"\xff\xd8 not a jpeg"
            m.size = len(payload)
            dst.addfile(m, io.BytesIO(payload))
    out, clean = tmp_path / "sel", tmp_path / "clean"
    # A pool of the first 200 pairs: the corrupt sample (the 261st) is no competitor either way.
    check(select(ckpts, shards, out, "--keep", "0.7", "--pool", "200"))
    check(select(ckpts, ragged / "train", clean, "--keep", "0.7", "--pool", "200"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == 1 and summary["total"] == 299 and summary["samples_in_shards"] == 300
    expected = [(k, v) for k, v in scores(clean) if k != "train_00000260"]
    assert [k for k, _ in scores(out)] == [k for k, _ in expected]
    # Batches of shard 2 shift by one sample: the same scores up to float noise.
    np.testing.assert_allclose([v for _, v in scores(out)], [v for _, v in expected], atol=1e-5)


@pytest.mark.parametrize("case", ["other-shape", "weights-mismatch", "no-shards", "no-pairs", "keeps-none",
                                  "not-a-checkpoint"])
def test_bad_select_input_exits_2_with_the_reason(case, ckpts, ragged, tmp_path):
    bent = tmp_path / "bent" / "step_4"
    shutil.copytree(ckpts[1], bent)
    (bent.parent / "latest").write_text("step_4")
    cfg = yaml.safe_load((bent / "config.yaml").read_text())
    cfg["model"]["context_length"] = 16
    (bent / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = {"other-shape": ([ckpts[0], bent], ragged / "train", ["--keep", "0.7"], "another model"),
            "weights-mismatch": ([bent], ragged / "train", ["--keep", "0.7"], "do not fit"),
            "no-shards": ([ckpts[0]], tmp_path / "nothing-*.tar", [], "no shard matches"),
            "no-pairs": ([ckpts[0]], ragged / "text", [], "no sample was scored"),     # text-only shards
            "keeps-none": ([ckpts[0]], ragged / "train", ["--threshold", "10"], "keeps none"),
            "not-a-checkpoint": ([tmp_path], ragged / "train", [], "not a complete checkpoint")}[case]
    text = check(select(args[0], args[1], tmp_path / "out", *args[2]), code=2)
    assert args[3] in text and "Traceback" not in text


# ----------------------------------------------------------------------------- rounds in training

def _train_args(data: Path, out: Path, *extra) -> list[str]:
    return ["train", "--config", "trainer/configs/demo.yaml", *data_overrides(data, out), "max_steps=6",
            "data.batch_size=16", "data.train_num_samples=300", "log.every_steps=1", "log.progress=false",
            "checkpoint.every_steps=100", "select.enabled=true", "select.every_steps=3", "select.keep=0.8",
            "select.batch_size=40", "data.val_shards=null", *extra]


@pytest.fixture(scope="module")
def round_run(ragged, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("round-run")
    check(run_trainer(_train_args(ragged, out), nproc=2))
    return out


def test_a_round_inside_training_selects_and_the_stream_follows(round_run):
    summary = json.loads((round_run / "select" / "round_001" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["total"] == 300 and summary["kept"] == 240
    assert not (round_run / "select" / "round_002").exists()   # a round at step 6 = max_steps would be wasted
    steps = [m["step"] for m in read_metrics(round_run)]
    assert steps == [1, 2, 3, 4, 5, 6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(round_run / "tensorboard"))
    ea.Reload()
    kept = ea.Scalars("select/kept")
    assert [(e.step, e.value) for e in kept] == [(3, 240.0)]
    assert ea.Scalars("select/precision")[0].value == pytest.approx(summary["precision"])


@pytest.mark.full   # a method's kill test beyond test_train_e2e's real SIGKILL; the select verb's resume of a killed scoring pass stays in the fast tier
def test_a_round_killed_while_scoring_reruns_to_the_same_manifest_and_losses(round_run, ragged, tmp_path):
    out = tmp_path / "killed"
    proc = run_trainer(_train_args(ragged, out, "debug.kill_during_select_step=3"), nproc=2)
    assert proc.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert not (out / "select" / "round_001" / "summary.json").exists()
    assert len(list((out / "select" / "round_001" / "parts").glob("*.jsonl"))) >= 1
    text = check(run_trainer(_train_args(ragged, out), nproc=2))
    assert "resumed from" in text
    a, b = round_run / "select" / "round_001", out / "select" / "round_001"
    assert (a / "manifest.txt").read_text() == (b / "manifest.txt").read_text()
    assert scores(a) == scores(b)
    la = {m["step"]: m["loss"] for m in read_metrics(round_run)}
    lb = {m["step"]: m["loss"] for m in read_metrics(out)}
    assert sorted(lb) == [1, 2, 3, 4, 5, 6]
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=1e-7), step


@pytest.mark.full   # two 2-rank runs, like the kill test above
def test_a_stop_signal_during_a_round_exits_75_and_the_rerun_selects_the_same(round_run, ragged, tmp_path):
    """SIGUSR1 on rank 0 after its first scored unit of the round at step 3: every rank stops at
    the next forward, the run exits 75 with step_3 (written before the round) as the latest, and
    the same command without the fault finishes the round from the units written, to the same
    manifest, scores and losses as the uninterrupted run."""
    out = tmp_path / "stopped"
    proc = run_trainer(_train_args(ragged, out, "debug.signal_during_select_step=3"), nproc=2)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "(exitcode: 75)" in text and "(exitcode: 1)" not in text, text[-3000:]
    assert "stop requested by signal between steps (e.g. an ECL round) at step 3" in text
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert not (out / "select" / "round_001" / "summary.json").exists()
    assert len(list((out / "select" / "round_001" / "parts").glob("*.jsonl"))) >= 1
    check(run_trainer(_train_args(ragged, out), nproc=2))
    a, b = round_run / "select" / "round_001", out / "select" / "round_001"
    assert (a / "manifest.txt").read_text() == (b / "manifest.txt").read_text()
    assert scores(a) == scores(b)
    la = {m["step"]: m["loss"] for m in read_metrics(round_run)}
    lb = {m["step"]: m["loss"] for m in read_metrics(out)}
    assert sorted(lb) == [1, 2, 3, 4, 5, 6]
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=1e-7), step


@pytest.mark.full   # two more 2-rank runs (the ZeRO-0 variant); ZeRO-3 rounds run in test_efficientclip_config_runs_both_parts_together
def test_rounds_under_zero_3_score_like_zero_0(round_run, ragged, tmp_path):
    runs = {}
    for stage in (0, 3):
        out = tmp_path / f"z{stage}"
        check(run_trainer(_train_args(ragged, out, f"deepspeed.zero_stage={stage}", "max_steps=4"), nproc=2))
        runs[stage] = scores(out / "select" / "round_001")
    assert [k for k, _ in runs[0]] == [k for k, _ in runs[3]] == [k for k, _ in scores(round_run / "select" / "round_001")]
    np.testing.assert_allclose([s for _, s in runs[3]], [s for _, s in runs[0]], atol=1e-4)


def test_conflicting_select_rules_exit_2(ragged, tmp_path):
    text = check(run_trainer(_train_args(ragged, tmp_path / "x", "select.threshold=0.1")), code=2)
    assert "give one of keep, threshold, percentile" in text


def test_efficientclip_config_runs_both_parts_together(ragged, tmp_path):
    """trainer/configs/efficientclip.yaml as shipped (ECL rounds + the text stream), 2 ranks, ZeRO-3."""
    out = tmp_path / "both"
    args = _train_args(ragged, out, f"text_lm.shards={ragged}/text", "text_lm.batch_size=4", "text_lm.num_samples=8",
                       "deepspeed.zero_stage=3", "max_steps=4")
    args[args.index("trainer/configs/demo.yaml")] = "trainer/configs/efficientclip.yaml"
    check(run_trainer(args, nproc=2))
    logged = read_metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert all(np.isfinite(m["text_lm"]) and m["text_lm"] > 0 for m in logged)
    assert json.loads((out / "select" / "round_001" / "summary.json").read_text())["kept"] == 240
