"""Evaluation: retrieval recall (ties count against the model, row blocks, across ranks), every
collective through trainer.dist, and the `eval` verb on 1 and 2 ranks against the in-training eval.

Exact comparisons use integer-valued embeddings: their dot products are exact in fp32, so ties
are real ties whatever the summation order, and blocked, distributed and full-matrix recall must
agree to the last bit.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import check, data_overrides, run_trainer
from test_train_e2e import CONFIG, FAST

KS = (1, 5, 10)
TINY_STEPS = 4


# ---------------------------------------------------------------------------------------------
# Reference and data


def reference_recall(img: torch.Tensor, txt: torch.Tensor, ks=KS) -> dict:
    """The full N x N matrix in fp64; query i's rank = other columns scoring >= its match."""
    sim = img.double() @ txt.double().T
    n = sim.shape[0]
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        beats = (s >= s.diagonal()[:, None]) & ~torch.eye(n, dtype=torch.bool)
        rank = beats.sum(1)
        for k in ks:
            out[f"{name}_r{k}"] = (rank < k).double().mean().item()
    out["num_samples"] = n
    return out


def tied_pairs(n: int = 37, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Small-integer embeddings: many exact ties, plus repeated captions and repeated images."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(-1, 2, (n, dim), generator=g).float()
    txt = torch.randint(-1, 2, (n, dim), generator=g).float()
    txt[6] = txt[5]             # a repeated caption
    txt[20:23] = txt[19]        # three more repeats, across the 2-rank boundary below (rank 0: 0..19)
    img[11] = img[10]           # a repeated image
    txt[30] = img[30]           # some exact matches that tie with others
    txt[31] = img[30]
    return img, txt


# ---------------------------------------------------------------------------------------------
# Ties (item: recall counted ties in the model's favour)


def test_ties_count_against_the_match():
    from trainer.evaluate import retrieval_recall
    # Pairs 0 and 1 have the same caption: image 0 scores texts 0 and 1 equally, so its match
    # ranks below text 1 (and likewise for image 1). Only pair 2 is a hit at R@1, both ways.
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    got = retrieval_recall(img, txt)
    assert got["i2t_r1"] == pytest.approx(1 / 3) and got["t2i_r1"] == pytest.approx(1 / 3)
    assert got["i2t_r5"] == 1.0 and got["t2i_r5"] == 1.0 and got["num_samples"] == 3
    # The old rule (strictly higher scores only) gave every row R@1 = 1 here.
    sim = img @ txt.T
    assert ((sim > sim.diagonal()[:, None]).sum(1) < 1).float().mean().item() == 1.0
    assert got == reference_recall(img, txt)


def test_identical_embeddings_give_no_hits_below_n():
    from trainer.evaluate import retrieval_recall
    n = 12
    img, txt = torch.ones(n, 4), torch.ones(n, 4)   # every candidate ties with every match
    got = retrieval_recall(img, txt)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert got[key] == 0.0, key


# ---------------------------------------------------------------------------------------------
# Blocks (item: each rank built the full N x N matrix)


@pytest.mark.parametrize("block_rows", [1, 3, 7, 36, 37, 1024])
def test_blocked_recall_equals_full_matrix_reference(block_rows):
    from trainer.evaluate import retrieval_recall
    img, txt = tied_pairs()
    assert retrieval_recall(img, txt, block_rows=block_rows) == reference_recall(img, txt)


def test_retrieval_hits_with_an_offset_is_the_reference_slice():
    from trainer.evaluate import retrieval_hits
    img, txt = tied_pairs()
    full = (img.double() @ txt.double().T)
    n = full.shape[0]
    for lo, hi in ((0, 20), (20, 37), (5, 6)):
        rank = ((full[lo:hi] >= full.diagonal()[lo:hi, None]) & ~torch.eye(n, dtype=torch.bool)[lo:hi]).sum(1)
        want = torch.tensor([float((rank < k).sum()) for k in KS], dtype=torch.float64)
        got = retrieval_hits(img[lo:hi], txt, lo, KS, block_rows=4)
        assert torch.equal(got, want), (lo, hi)


class _RecordShapes(TorchFunctionMode):
    """Records the shape of every tensor a torch function or tensor method returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append((getattr(func, "__name__", str(func)), tuple(t.shape)))
        return out


def test_recall_never_holds_more_than_block_rows_by_n_scores():
    from trainer.evaluate import retrieval_recall
    n, dim, block = 200, 4, 8
    g = torch.Generator().manual_seed(1)
    img = torch.randint(-2, 3, (n, dim), generator=g).float()
    txt = torch.randint(-2, 3, (n, dim), generator=g).float()
    with _RecordShapes() as rec:
        got = retrieval_recall(img, txt, block_rows=block)
    assert got == reference_recall(img, txt)
    numels = [(torch.Size(s).numel(), name, s) for name, s in rec.shapes]
    biggest = max(numels)
    assert biggest[0] <= block * n, biggest          # the full matrix would be n * n = 40000
    assert (block, n) in [s for _, s in rec.shapes]  # the score blocks were seen (the recorder works)


# ---------------------------------------------------------------------------------------------
# evaluate() on 1 process and on 2 gloo ranks, with a stub model (items: collectives, blocks)


class StubClip(torch.nn.Module):
    """What evaluate() needs of a model, with integer-valued embeddings: text = bag of token ids
    (mod dim), image = quantised mean colour; ``same_image``: every image embeds the same."""

    def __init__(self, dim: int = 8, same_image: bool = False):
        super().__init__()
        self.config = types.SimpleNamespace(projection_dim=dim)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.dim, self.same_image = dim, same_image

    def encode_text(self, input_ids, attention_mask):
        emb = torch.zeros(input_ids.shape[0], self.dim)
        return emb.scatter_add_(1, input_ids % self.dim, attention_mask.float())

    def encode_image(self, pixel_values):
        emb = torch.zeros(pixel_values.shape[0], self.dim)
        if self.same_image:
            return emb + 1.0
        emb[:, :3] = (pixel_values.mean((2, 3)) * 2).round()
        emb[:, 3] = 1.0
        return emb

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask), self.anchor.exp()


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast",
                "reduce_scatter_tensor", "reduce_scatter", "all_gather_object", "reduce", "gather", "scatter",
                "all_to_all_single", "broadcast_object_list", "all_reduce_coalesced")


def _record_collective_callers(calls: list) -> None:
    """Wrap torch.distributed's collectives: each call records (calling module, function, device)."""
    import torch.distributed as dist

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "?")
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            calls.append((caller, name, str(tensor.device) if tensor is not None else None))
            return fn(*args, **kwargs)
        return recorded
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def _eval_config(data: Path, out: Path):
    from trainer.config import load_config
    return load_config(CONFIG, [*data_overrides(data, out), "model.context_length=24", "eval.batch_size=16"])


def _stub_results(cfg, rank: int, world: int) -> dict:
    from trainer.data import load_tokenizer
    from trainer.evaluate import evaluate

    tok = load_tokenizer(cfg.tokenizer.path)
    return {name: evaluate(StubClip(same_image=same), cfg, tok, rank, world, torch.device("cpu"))
            for name, same in (("stub", False), ("same_image", True))}


def _rank_main(rank: int, world: int, outdir: str, data: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file store in the fixture's own directory: no port to pick (and race for) at all.
    dist.init_process_group("gloo", init_method=f"file://{outdir}/store", rank=rank, world_size=world)
    try:
        calls: list = []
        _record_collective_callers(calls)
        img, txt = tied_pairs()
        lo, hi = (0, 20) if rank == 0 else (20, 37)   # ragged: 20 + 17 rows
        try:
            from trainer.evaluate import retrieval_recall
            result = {"recall": {b: retrieval_recall(img[lo:hi], txt[lo:hi], block_rows=b) for b in (3, 1024)}}
        except ImportError as err:   # reported by the test that needs it; the rest still runs
            result = {"recall": repr(err)}
        result.update(_stub_results(_eval_config(Path(data), Path(outdir) / "unused"), rank, world))
        result["calls"] = calls
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        import traceback
        traceback.print_exc()
        os._exit(1)
    # The way a trainer rank leaves: gloo torn down, then no interpreter finalization, where gloo
    # aborted now and then (SIGABRT after the results were written; see trainer.dist.exit_process).
    from trainer.dist import exit_process, shutdown
    shutdown()
    exit_process(0)


@pytest.fixture(scope="module")
def two_ranks(demo_data) -> list[dict]:
    """The distributed cases, run once on 2 gloo ranks (spawned processes)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_rank_main, args=(2, outdir, str(demo_data)), nprocs=2,
                           start_method="spawn")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def test_two_rank_blocked_recall_equals_full_matrix_reference(two_ranks):
    img, txt = tied_pairs()
    want = reference_recall(img, txt)
    for r, res in enumerate(two_ranks):
        assert isinstance(res["recall"], dict), res["recall"]
        for block, got in res["recall"].items():   # block 3 < the 17 or 20 local rows
            assert got == want, (r, block)


def test_evaluate_on_two_ranks_equals_one_process(two_ranks, demo_data, tmp_path):
    single = _stub_results(_eval_config(demo_data, tmp_path), 0, 1)
    assert single["stub"]["num_samples"] == 96
    assert 0 < single["stub"]["i2t_r10"] < 1   # a non-trivial ranking (not all hits, not all misses)
    for r, res in enumerate(two_ranks):
        for name in ("stub", "same_image"):
            # recall and zero-shot are counts: exact; val_loss sums logits in another order
            exact = {k: v for k, v in res[name].items() if k != "val_loss"}
            assert exact == {k: v for k, v in single[name].items() if k != "val_loss"}, (r, name)
            assert res[name]["val_loss"] == pytest.approx(single[name]["val_loss"], rel=1e-6), (r, name)
    # Every image embeds the same: each text scores all images equally, so no text retrieves its
    # image below rank N - 1 (the old rule, ties in the model's favour, gave t2i R@1 = 1.0 here).
    for key in ("t2i_r1", "t2i_r5", "t2i_r10"):
        assert single["same_image"][key] == 0.0


def test_evaluate_calls_collectives_only_through_trainer_dist(two_ranks):
    """NCCL moves only CUDA tensors: every collective goes through trainer.dist (which moves the
    tensor to the communication device) or the kernels' gather (embeddings, on the model device)."""
    for r, res in enumerate(two_ranks):
        callers = {caller for caller, _, _ in res["calls"]}
        assert callers and callers <= {"trainer.dist", "kernels.gather"}, (r, res["calls"])
        assert ("kernels.gather", "all_gather_single") in {(c, n) for c, n, _ in res["calls"]} or \
            ("kernels.gather", "all_gather_into_tensor") in {(c, n) for c, n, _ in res["calls"]}


MATMULS = ("__matmul__", "__rmatmul__", "matmul", "mm", "bmm", "einsum", "addmm", "linear")


def test_evaluate_scores_in_row_blocks(demo_data, tmp_path, monkeypatch):
    """evaluate() as a whole never forms an N x N score matrix: with 8-row blocks, every matmul
    with N = 96 columns has at most 8 rows (the old code made one 96 x 96 matrix)."""
    import trainer.evaluate as E

    monkeypatch.setattr(E, "RETRIEVAL_BLOCK_ROWS", 8, raising=False)
    cfg = _eval_config(demo_data, tmp_path)
    with _RecordShapes() as rec:
        got = _stub_results(cfg, 0, 1)["stub"]
    n = got["num_samples"]
    assert n == 96
    products = [s for name, s in rec.shapes if name in MATMULS]
    assert all(torch.Size(s).numel() < n * n for s in products), sorted(set(products))
    assert all(s[0] <= 8 for s in products if len(s) == 2 and s[1] == n), sorted(set(products))
    assert (8, n) in products   # the blocks were seen (the recorder works)


# ---------------------------------------------------------------------------------------------
# The eval verb against the in-training eval; eval.every_steps (a tiny 2-rank run, shared)


def tiny_run(demo_data: Path, tmp_path_factory) -> Path:
    """A 2-rank, 4-step run with an eval every 2 steps and a checkpoint at step 4; made once per
    session (tests/test_export.py, test_eval_sets.py, test_clip_benchmark.py and test_startio.py use
    it too), and once for all pytest-xdist workers: under xdist each worker's base temp is a folder
    of the session's, and the first worker to take the lock makes the run the others read."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "tiny-eval-run"
    done = out / "tiny-run-complete"
    with open(shared / "tiny-eval-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
        if not done.is_file():
            shutil.rmtree(out, ignore_errors=True)
            check(run_trainer(["train", "--config", CONFIG, *data_overrides(demo_data, out), *FAST,
                               f"max_steps={TINY_STEPS}", "eval.every_steps=2", "checkpoint.every_steps=4"], nproc=2))
            done.write_text("ok\n")
    return out


@pytest.fixture(scope="module")
def tiny(demo_data, tmp_path_factory) -> Path:
    return tiny_run(demo_data, tmp_path_factory)


EVAL_KEYS = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
             "val_loss", "num_samples")


@pytest.mark.parametrize("nproc", [2, 1])
def test_eval_verb_matches_in_training_eval(tiny, tmp_path, nproc):
    out = tmp_path / "eval.json"
    check(run_trainer(["eval", "--checkpoint", str(tiny / "checkpoints"), "--out", str(out)], nproc=nproc))
    got, during = json.loads(out.read_text()), json.loads((tiny / "eval.json").read_text())
    assert during["step"] == TINY_STEPS and got["step"] == TINY_STEPS and during["num_samples"] == 96
    for key in EVAL_KEYS:
        assert got[key] == pytest.approx(during[key], abs=1e-5 if key == "val_loss" else 1e-6), key


def test_periodic_eval_is_logged_to_tensorboard(tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny / "tensorboard"))
    acc.Reload()
    during = json.loads((tiny / "eval.json").read_text())
    assert during["step"] == TINY_STEPS
    for key in EVAL_KEYS[:-1]:
        events = acc.Scalars(f"eval/{key}")
        assert [e.step for e in events] == [2, 4], key
        assert events[-1].value == pytest.approx(during[key], abs=1e-6), key
    # eval.jsonl keeps the history: one line per evaluation, the same values as TensorBoard's
    history = [json.loads(line) for line in (tiny / "eval.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4] and history[-1] == during
    for key in EVAL_KEYS[:-1]:
        assert history[0][key] == pytest.approx(acc.Scalars(f"eval/{key}")[0].value, abs=1e-6), key


def test_eval_history_drops_a_killed_runs_later_lines(tmp_path):
    """On resume at step 4, lines past it (written before the kill) go, as in metrics.jsonl."""
    from trainer.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in (2, 4, 6):
        log.log({"zeroshot_top1": step / 10}, step, prefix="eval")
        log.log({"loss": 1.0}, step)
    log.close()
    MetricsLogger(tmp_path, tensorboard=False, resume_step=4).close()
    assert [json.loads(x)["step"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [2, 4]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4]


def test_val_loss_is_the_full_set_contrastive_loss():
    """Blocked rows give the plain full-matrix symmetric cross-entropy (one process)."""
    import torch.nn.functional as F

    from trainer.evaluate import val_loss
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(37, 8, generator=g), dim=-1)
    logits = 14.0 * img @ txt.T
    labels = torch.arange(37)
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    for block in (5, 37, 100):
        assert val_loss(img, txt, 14.0, block_rows=block) == pytest.approx(float(ref), rel=1e-6)
