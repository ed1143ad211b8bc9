"""EfficientCLIP's text-only language-modelling stream (trainer/methods/text_lm.py): the clm and
mlm losses equal a plain torch reference (and mlm's attention is bidirectional, clm's causal);
the masking is a pure function of (seed, step, micro-batch, rank); the text stream resumes at the
same text batches; ZeRO 0-3 on 2 ranks give the same losses; a SIGKILL + rerun continues with the
same text_lm losses; bad input exits 2 naming the key; export-hf is the stock CLIPModel."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import (LazyRuns, check, data_overrides, kill_group, read_metrics, run_trainer,
                      start_trainer, wait_for_step)

CONFIG = "trainer/configs/efficientclip.yaml"
STEPS = 4
FAST = ["data.batch_size=8", "text_lm.batch_size=8", "data.workers=1", "data.shuffle_buffer=64",
        "text_lm.shuffle_buffer=32", "data.train_num_samples=192", "text_lm.num_samples=64", "optim.warmup_steps=2",
        "optim.lr=2e-3", "log.every_steps=1", "log.progress=false", "data.val_shards=null",
        f"max_steps={STEPS}", "checkpoint.every_steps=2",
        "select.enabled=false"]   # the config's ECL rounds are tested in test_selection.py


def train_args(data: Path, out: Path, *extra) -> list[str]:
    return ["train", "--config", CONFIG, *data_overrides(data, out), f"text_lm.shards={data}/text", *FAST, *extra]


def logged(out: Path, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(out)}


# ----------------------------------------------------------------------------- the loss

def _tiny_model(demo_data, attn: str = "eager"):
    from trainer.config import load_config
    from trainer.data import load_tokenizer
    from trainer.model import build_model

    cfg = load_config(CONFIG, [f"tokenizer.path={demo_data}/tokenizer", f"model.attn_implementation={attn}"])
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    return build_model(cfg.model, tokenizer, seed=3).double(), tokenizer


def _reference_hidden(tm, ids, mask, causal: bool) -> torch.Tensor:
    """CLIP's text transformer written out in plain torch: embeddings, pre-LN blocks with an
    explicit attention mask (padding keys off; with ``causal`` also every later key), final LN."""
    b, n = ids.shape
    x = tm.embeddings.token_embedding.weight[ids] + tm.embeddings.position_embedding.weight[:n]
    allowed = mask.bool()[:, None, None, :].expand(b, 1, n, n)                 # [b, 1, query, key]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    for layer in tm.encoder.layers:
        a = layer.self_attn
        heads, hd = a.num_heads, a.head_dim
        h = F.layer_norm(x, (x.shape[-1],), layer.layer_norm1.weight, layer.layer_norm1.bias, layer.layer_norm1.eps)
        q, k, v = (F.linear(h, p.weight, p.bias).view(b, n, heads, hd).transpose(1, 2)
                   for p in (a.q_proj, a.k_proj, a.v_proj))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v      # [b, heads, n, hd]
        x = x + F.linear(att.transpose(1, 2).reshape(b, n, -1), a.out_proj.weight, a.out_proj.bias)
        h = F.layer_norm(x, (x.shape[-1],), layer.layer_norm2.weight, layer.layer_norm2.bias, layer.layer_norm2.eps)
        h = F.linear(h, layer.mlp.fc1.weight, layer.mlp.fc1.bias)
        x = x + F.linear(h * torch.sigmoid(1.702 * h), layer.mlp.fc2.weight, layer.mlp.fc2.bias)   # quick_gelu
    ln = tm.final_layer_norm
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


TEXTS = ["a red circle on a blue square", "two green triangles next to a small yellow star", "x",
         "a purple star", "a large grey square in the corner of a striped picture"]


def _batch(tokenizer, texts=TEXTS):
    from trainer.data import TextDecoder
    return TextDecoder(tokenizer, 24).collate(list(texts))


def _mlm(tokenizer, ids, mask, seed=0, rate=0.3):
    from trainer.methods.text_lm import mask_token_id, mlm_inputs
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    vocab = torch.arange(len(tokenizer))
    return mlm_inputs(ids, mask, torch.Generator().manual_seed(seed), rate=rate, mask_token_rate=0.8,
                      mask_id=mask_token_id(tokenizer), special_ids=special, ordinary_ids=vocab[~torch.isin(vocab, special)])


ATTN = pytest.mark.parametrize("attn", ["eager", "sdpa"])


@ATTN
def test_clm_loss_equals_a_plain_torch_reference(demo_data, attn):
    """Predict token t + 1 from position t through the tied head; padding targets ignored; loss
    and the token embedding's gradient equal the reference (float64)."""
    from trainer.methods.text_lm import clm_labels

    model, tok = _tiny_model(demo_data, attn)
    b = _batch(tok)
    ids, mask = b["input_ids"], b["attention_mask"]
    tm = model.text_model
    got = model.text_lm_loss(ids, mask, clm_labels(ids, mask), causal=True)
    (g_got,) = torch.autograd.grad(got, tm.embeddings.token_embedding.weight)

    hidden = tm(input_ids=ids, attention_mask=mask).last_hidden_state          # transformers' causal tower
    # the written-out tower the mlm test uses is CLIP's (eager and sdpa softmax in float32)
    torch.testing.assert_close(_reference_hidden(tm, ids, mask, causal=True), hidden, rtol=1e-5, atol=1e-6)
    logits = hidden @ tm.embeddings.token_embedding.weight.T                   # [b, n, V]
    keep = mask[:, 1:].bool()                                                 # targets that are not padding
    want = F.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])
    (g_want,) = torch.autograd.grad(want, tm.embeddings.token_embedding.weight)
    assert keep.sum() == mask.sum() - len(TEXTS)          # every real token but the first is a target
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-12)


def test_host_computed_index_gives_the_boolean_masks_loss_and_gradients(demo_data):
    """The train step passes ``lm_index`` (the predicted positions, found on the host by
    ``TextLm.lm_batch``) instead of letting the loss index by a boolean mask on the device (a
    host sync per micro-batch on a GPU): the same rows in the same order, so the same loss and
    gradients exactly (clm and mlm), and no boolean-mask index on the way."""
    from trainer.methods.text_lm import TextLm, clm_labels

    model, tok = _tiny_model(demo_data)
    b = _batch(tok)
    w = model.text_model.embeddings.token_embedding.weight
    getitem = torch.Tensor.__getitem__
    bool_index = []

    def watch(t, idx):
        bool_index.append(isinstance(idx, torch.Tensor) and idx.dtype == torch.bool)
        return getitem(t, idx)
    for objective in ("clm", "mlm"):
        fake = SimpleNamespace(cfg=SimpleNamespace(text_lm=SimpleNamespace(objective=objective, mask_rate=0.3,
                                                                             mask_token_rate=0.8), seed=0),
                               step=1, micro=0, rank=0, tokenizer=tok,
                               special_ids=torch.tensor(sorted(set(tok.all_special_ids))), ordinary_ids=torch.arange(len(tok)))
        lm = TextLm.lm_batch(fake, b)
        ids, mask, labels, index = lm["lm_input_ids"], lm["lm_attention_mask"], lm["lm_labels"], lm["lm_index"]
        if objective == "clm":
            assert torch.equal(labels, clm_labels(b["input_ids"], b["attention_mask"]))
        assert torch.equal(index, (labels.flatten() != -100).nonzero().squeeze(1)) and index.numel() > 0
        want = model.text_lm_loss(ids, mask, labels, causal=objective == "clm")
        (g_want,) = torch.autograd.grad(want, w)
        torch.Tensor.__getitem__ = watch
        try:
            got = model.text_lm_loss(ids, mask, labels, causal=objective == "clm", index=index)
        finally:
            torch.Tensor.__getitem__ = getitem
        (g_got,) = torch.autograd.grad(got, w)
        assert not any(bool_index), objective
        assert torch.equal(got, want) and torch.equal(g_got, g_want), objective


@ATTN
def test_mlm_loss_equals_a_bidirectional_plain_torch_reference(demo_data, attn):
    model, tok = _tiny_model(demo_data, attn)
    b = _batch(tok)
    ids, mask = b["input_ids"], b["attention_mask"]
    masked, labels = _mlm(tok, ids, mask)
    tm = model.text_model
    got = model.text_lm_loss(masked, mask, labels, causal=False)
    (g_got,) = torch.autograd.grad(got, tm.encoder.layers[0].self_attn.q_proj.weight)

    logits = _reference_hidden(tm, masked, mask, causal=False) @ tm.embeddings.token_embedding.weight.T
    chosen = labels != -100
    want = F.cross_entropy(logits[chosen], ids[chosen])       # the original tokens at the chosen positions
    (g_want,) = torch.autograd.grad(want, tm.encoder.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)          # float32 softmax inside the tower
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)


@ATTN
def test_mlm_attends_to_later_tokens_and_clm_does_not(demo_data, attn):
    """The loss only at position 2; changing the (unpredicted) token at position 5 changes the
    mlm loss and leaves the clm loss bit-equal. A padded key changes neither."""
    model, tok = _tiny_model(demo_data, attn)
    b = _batch(tok, TEXTS[:2])
    ids, mask = b["input_ids"], b["attention_mask"]
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 3]
    later = ids.clone()
    later[:, 5] = (ids[:, 5] + 7) % len(tok)
    padded = ids.clone()
    padded[:, -1] = 17                                       # a pad position (attention mask 0)
    assert not mask[:, -1].any()
    with torch.no_grad():
        for causal, changes in ((True, False), (False, True)):
            base = model.text_lm_loss(ids, mask, labels, causal=causal)
            moved = model.text_lm_loss(later, mask, labels, causal=causal)
            assert (abs(moved - base) > 1e-6) == changes, (causal, base, moved)
            torch.testing.assert_close(model.text_lm_loss(padded, mask, labels, causal=causal), base,
                                       rtol=1e-12, atol=1e-12)


def test_mlm_masking_follows_the_public_recipe_and_is_a_function_of_its_seed(demo_data):
    from trainer.data import load_tokenizer
    from trainer.methods.text_lm import mask_generator

    tok = load_tokenizer(f"{demo_data}/tokenizer")
    assert tok.mask_token_id is None and tok.unk_token_id == 1        # the demo tokenizer: unk stands in
    b = _batch(tok, TEXTS * 40)
    ids, mask = b["input_ids"], b["attention_mask"]
    masked, labels = _mlm(tok, ids, mask, rate=0.15)
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    candidates = mask.bool() & ~special
    chosen = labels != -100
    assert chosen.sum() == round(0.15 * candidates.sum().item())
    assert not (chosen & ~candidates).any()                  # never a special token or padding
    assert torch.equal(masked[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    share = (masked[chosen] == tok.unk_token_id).float().mean().item()
    assert 0.7 < share < 0.9, share                          # 80% mask token, 20% random
    others = masked[chosen & (masked != tok.unk_token_id)]
    assert not torch.isin(others, torch.tensor(tok.all_special_ids)).any()
    assert torch.equal(_mlm(tok, ids, mask, rate=0.15)[0], masked)   # the same generator: the same draw

    draw = lambda *a: torch.rand(8, generator=mask_generator(*a))    # noqa: E731
    assert torch.equal(draw(0, 5, 1, 0), draw(0, 5, 1, 0))
    for other in ((1, 5, 1, 0), (0, 6, 1, 0), (0, 5, 2, 0), (0, 5, 1, 1)):   # seed, step, micro, rank
        assert not torch.equal(draw(*other), draw(0, 5, 1, 0)), other


# ----------------------------------------------------------------------------- the stream

def _method(demo_data, *overrides):
    from trainer.config import load_config
    from trainer.methods.text_lm import TextLm

    cfg = load_config(CONFIG, [f"tokenizer.path={demo_data}/tokenizer", f"text_lm.shards={demo_data}/text",
                               "text_lm.batch_size=8", "text_lm.num_samples=24", "data.workers=2", *overrides])
    engine = SimpleNamespace(dp_world_size=1, module=SimpleNamespace(config=SimpleNamespace(
        text_config=SimpleNamespace(vocab_size=470))))
    return TextLm(cfg, engine)


def _take(method, steps: int, first: int = 1) -> list[dict]:
    out = []
    for step in range(first, first + steps):
        method.prepare(step)
        out += [method.micro_kwargs("cpu") for _ in range(2)]     # two micro-batches per step
    return out


def test_the_text_stream_resumes_at_the_same_batches(demo_data):
    """Five steps in one go vs two steps, the method state, a new method restored from it, three
    steps: the same text batches (and the same mlm masks) in the same order, across the epoch
    boundary (3 batches per epoch here) and the rotation of two loader workers."""
    whole = _method(demo_data, "text_lm.objective=mlm")
    want = _take(whole, 5)
    whole.close()
    first = _method(demo_data, "text_lm.objective=mlm")
    got = _take(first, 2)
    saved = copy.deepcopy(first.checkpoint_state())
    first.close()
    assert saved["text_lm"]["position"]["epoch"] == 1           # the resume crosses an epoch boundary
    resumed = _method(demo_data, "text_lm.objective=mlm")
    resumed.restore(saved, where="test")
    got += _take(resumed, 3, first=3)
    resumed.close()
    assert len(got) == len(want) == 10
    for i, (g, w) in enumerate(zip(got, want)):
        for k in ("lm_input_ids", "lm_attention_mask", "lm_labels"):
            assert torch.equal(g[k], w[k]), (i, k)
    assert not torch.equal(want[0]["lm_input_ids"], want[1]["lm_input_ids"])
    assert want[0]["lm_causal"] is False


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def stage_runs(demo_data, tmp_path_factory) -> dict[int, Path]:
    """One short clm run per ZeRO stage, 2 ranks, fp32, text_lm.weight 0.5."""
    def make(stage):
        out = tmp_path_factory.mktemp(f"text-lm-zero{stage}")
        check(run_trainer(train_args(demo_data, out, f"deepspeed.zero_stage={stage}", "text_lm.weight=0.5"), nproc=2))
        return out
    return LazyRuns(make)


# all full: the text stream under ZeRO-3 on 2 ranks runs in the fast tier in
# test_selection.py::test_efficientclip_config_runs_both_parts_together
@pytest.mark.full
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_stages_give_the_same_losses(stage_runs, stage):
    want = {key: logged(stage_runs[1], key) for key in ("loss", "clip", "text_lm")}
    assert sorted(want["text_lm"]) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) and 4.0 < v < 8.0 for v in want["text_lm"].values())   # ~ln(V) at the start
    for t in want["loss"]:   # total = clip + text_lm.weight * text_lm
        assert want["loss"][t] == pytest.approx(want["clip"][t] + 0.5 * want["text_lm"][t], rel=1e-6)
    for key, values in want.items():
        assert logged(stage_runs[stage], key) == pytest.approx(values, rel=1e-5), (stage, key)


@pytest.mark.full   # a real SIGKILL per method is redundant with test_train_e2e's; the stream's state round trip is test_the_text_stream_resumes_at_the_same_batches
def test_sigkill_and_rerun_reads_the_same_text_batches(demo_data, tmp_path):
    """mlm under ZeRO-1 on 2 ranks (checkpoints every 2 steps, 6 steps). Killed after step 3 and
    rerun: every logged text_lm loss equals the uninterrupted run's, and so does the text stream
    position every checkpoint holds on every rank (the same text batches were read)."""
    args = lambda out: train_args(demo_data, out, "text_lm.objective=mlm", "max_steps=6",   # noqa: E731
                                  "checkpoint.keep_last=3")
    whole = tmp_path / "whole"
    check(run_trainer(args(whole), nproc=2))
    out = tmp_path / "killed"
    proc = start_trainer(args(out), nproc=2)
    wait_for_step(proc, out, 3)
    kill_group(proc)
    assert (out / "checkpoints" / "latest").read_text().strip() in ("step_2", "step_4")
    assert "resumed from" in check(run_trainer(args(out), nproc=2))
    for key in ("text_lm", "clip", "loss"):
        got = logged(out, key)
        assert sorted(got) == list(range(1, 7))
        assert got == pytest.approx(logged(whole, key), rel=1e-6, abs=1e-7), key
    for step in (4, 6):
        for rank in (0, 1):
            state = lambda run: torch.load(run / "checkpoints" / f"step_{step}" / "trainer_state" / f"rank_{rank}.pt",  # noqa: E731
                                           weights_only=False)["text_lm"]["position"]
            assert state(out) == state(whole), (step, rank)


@pytest.mark.full   # export's own fast tests cover the stock CLIPModel; this adds the text stream's run
def test_export_of_a_text_lm_run_is_the_stock_clip_model(stage_runs, tmp_path):
    """The tied head adds no parameter: export-hf loads in transformers.CLIPModel with no missing
    or unexpected key, and the token embedding is the trained one."""
    from transformers import CLIPModel

    from trainer.sources import fp32_state_dict

    out = tmp_path / "hf"
    check(run_trainer(["export-hf", "--checkpoint", str(stage_runs[1]), "--out", str(out)]))
    hf, info = CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert sorted(hf.state_dict()) == sorted(CLIPModel(hf.config).state_dict())
    trained = fp32_state_dict(stage_runs[1] / "checkpoints", f"step_{STEPS}")
    key = "text_model.embeddings.token_embedding.weight"
    torch.testing.assert_close(hf.state_dict()[key], trained[key])


@pytest.fixture
def no_mask_tokenizer(demo_data, tmp_path) -> Path:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(f"{demo_data}/tokenizer")
    tok.unk_token = None
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.mark.parametrize("overrides,message", [
    (["text_lm.shards=null"], "config key 'text_lm.shards' is empty but text_lm.enabled is true"),
    (["text_lm.shards=/nonexistent/text-{000..001}.tar"], "config key 'text_lm.shards': no shard matches"),
    (["text_lm.objective=mlm", "tokenizer.path=NOMASK"], "config key 'text_lm.objective' is mlm, but the tokenizer"),
    (["text_lm.objective=bert"], "config key 'text_lm.objective' must be one of clm, mlm"),
    (["text_lm.mask_rate=1.5"], "config key 'text_lm.mask_rate' must be <= 1.0"),
    (["loss.terms={clip: 1.0, text_lm: 1.0}"], "'loss.terms.text_lm' is switched on by text_lm.enabled"),
])
def test_bad_text_lm_input_exits_2_naming_the_key(demo_data, tmp_path, capsys, no_mask_tokenizer, overrides, message):
    """In-process through trainer.cli.main, before anything starts."""
    from trainer.cli import main

    overrides = [o.replace("NOMASK", str(no_mask_tokenizer)) for o in overrides]
    argv = ["train", "--config", CONFIG, *data_overrides(demo_data, tmp_path / "out"),
            f"text_lm.shards={demo_data}/text", *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_help_config_lists_the_text_lm_keys():
    from trainer.config import describe
    text = "\n".join(describe())
    for key in ("text_lm.enabled = False", "text_lm.shards = None", "text_lm.batch_size = 40",
                "text_lm.objective = 'clm'", "text_lm.weight = 1.0", "text_lm.mask_rate = 0.15", "text_lm.num_samples"):
        assert key in text, key


def test_with_eclipse_and_psd_every_method_gets_its_outputs(demo_data, tmp_path):
    """ECLIPSE + PSD (its own EMA teacher: two outputs) + text_lm on one rank: the model returns
    the LM loss after the teachers' outputs and each term is logged."""
    out = tmp_path / "all"
    check(run_trainer(train_args(demo_data, out, "max_steps=2", "eclipse.enabled=true", "psd.enabled=true",
                                 "psd.teacher=previous", "data.workers=0")))
    for key in ("clip", "teacher_kl", "self_distill", "text_lm"):
        assert len(logged(out, key)) == 2, key
    assert all(4.0 < v < 8.0 for v in logged(out, "text_lm").values())
