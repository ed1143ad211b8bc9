"""EViT token reorganisation and FLIP patch dropout in the transformers CLIP vision tower, against
the stock tower (keep rate 1) and a plain reference written here with eager attention and an
explicit top-k."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from trainer.methods import evit


def tower(seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=4, num_attention_heads=4)
    cfg._attn_implementation = "sdpa"
    return CLIPVisionModel(cfg).eval()


def pixels(b: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference(model: CLIPVisionModel, x: torch.Tensor, drop: list[int], keep: float, fuse: bool):
    """Eager attention, explicit per-head softmax and top-k (EViT's Block.forward); returns the
    pooled output, and per drop layer the kept indices and the fused token."""
    vm = model
    h = vm.pre_layrnorm(vm.embeddings(x))
    record = {}
    for i, layer in enumerate(vm.encoder.layers):
        a = layer.self_attn
        b, n, d = h.shape
        y = layer.layer_norm1(h)
        split = lambda t: t.view(b, n, a.num_heads, a.head_dim).transpose(1, 2)
        q, k, v = split(a.q_proj(y)), split(a.k_proj(y)), split(a.v_proj(y))
        probs = torch.softmax(q @ k.transpose(-1, -2) * a.scale, dim=-1)          # [b, H, n, n]
        h = h + a.out_proj((probs @ v).transpose(1, 2).reshape(b, n, d))
        if i in drop:
            left = math.ceil(keep * (n - 1) - 1e-9)
            cls_attn = probs[:, :, 0, 1:].mean(1)                                   # [b, n - 1]
            _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
            others = h[:, 1:]
            parts = [h[:, :1], torch.stack([others[j, idx[j]] for j in range(b)])]
            mask = torch.ones_like(cls_attn, dtype=torch.bool)
            mask.scatter_(1, idx, False)
            fused = torch.stack([(others[j][mask[j]] * cls_attn[j][mask[j]][:, None]).sum(0) for j in range(b)])
            if fuse:
                parts.append(fused[:, None])
            record[i] = {"idx": idx, "fused": fused}
            h = torch.cat(parts, dim=1)
        h = h + layer.mlp(layer.layer_norm2(h))
    return vm.post_layernorm(h[:, 0]), record


def test_default_drop_layers_and_schedule():
    assert evit.default_drop_layers(12) == [3, 6, 9]
    assert evit.default_drop_layers(4) == [1, 2, 3]
    assert evit.default_drop_layers(24) == [6, 12, 18]
    assert evit.kept_patches(10, 0.7) == 7 and evit.kept_patches(16, 0.7) == 12 and evit.kept_patches(3, 0.1) == 1
    assert evit.keep_rate_at(10, 10, 100, 0.7) == 1.0
    assert evit.keep_rate_at(60, 10, 100, 0.7) == pytest.approx(0.85)       # half-way through the window
    assert evit.keep_rate_at(110, 10, 100, 0.7) == pytest.approx(0.7)
    assert evit.keep_rate_at(500, 10, 100, 0.7) == pytest.approx(0.7)       # held after the window
    with pytest.raises(ValueError, match="mode"):
        evit.install(tower(), [1], mode="bogus")
    with pytest.raises(ValueError, match="drop_layers"):
        evit.install(tower(), [4])
    with pytest.raises(ValueError, match="install"):
        evit.set_keep_rate(tower(), 0.5)


@pytest.mark.parametrize("mode", ["evit", "random"])
def test_keep_rate_one_is_the_stock_tower_and_the_weights_are_untouched(mode):
    stock, ours = tower(), tower()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    evit.install(ours, [1, 2, 3], mode=mode)
    assert list(ours.state_dict()) == list(before)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items())
    x = pixels()
    with torch.no_grad():
        a, b = stock(pixel_values=x), ours(pixel_values=x)
    assert torch.equal(a.pooler_output, b.pooler_output)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


@pytest.mark.parametrize("keep,fuse", [(0.5, True), (0.7, True), (0.7, False)])
def test_dropping_equals_an_eager_top_k_reference(keep, fuse):
    model = tower()
    ref_model = copy.deepcopy(model)
    drop = [1, 3]
    evit.install(model, drop, fuse=fuse)
    evit.set_keep_rate(model, keep)
    for i in drop:
        model.encoder.layers[i].record = True
    x = pixels()
    with torch.no_grad():
        got = model(pixel_values=x).pooler_output
        want, record = reference(ref_model, x, drop, keep, fuse)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the token counts follow 1 + ceil(k (n - 1)) (+1 fused) at each drop layer: 17 tokens in
    n, counts = 17, evit.token_counts(model)
    for i in drop:
        n = 1 + math.ceil(keep * (n - 1) - 1e-9) + int(fuse)
        assert counts[i] == n, (i, counts)
    assert record[1]["idx"].shape[1] == math.ceil(keep * 16 - 1e-9)
    # the same tokens were kept, in the same (attention) order, and the same token was fused
    for i in drop:
        layer = model.encoder.layers[i]
        assert torch.equal(layer.last["idx"], record[i]["idx"]), i
        if fuse:
            torch.testing.assert_close(layer.last["fused"], record[i]["fused"], rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_weight_of_the_tower():
    """(A random projection of the pooled output: the sum of a LayerNorm's output does not depend
    on its input, so ``.sum()`` would test nothing.)"""
    for fuse in (True, False):
        model = tower()
        evit.install(model, [1], fuse=fuse)   # one early drop, then 2 more layers
        evit.set_keep_rate(model, 0.25)
        out = model(pixel_values=pixels(2)).pooler_output
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not dead, (fuse, dead)


def test_fused_token_carries_the_dropped_tokens_gradient():
    """Layer output = [cls, kept..., fused]; d(fused)/d(dropped token j) = its attention weight."""
    model = tower()
    layer = model.encoder.layers[0]
    layer.__class__ = evit.EViTEncoderLayer
    layer.keep_rate, layer.fuse = 0.5, True
    layer.record = True
    torch.manual_seed(0)
    h = torch.randn(1, 9, 32, requires_grad=True)
    fused_out = layer(h, None)
    assert fused_out.shape[1] == 1 + 4 + 1
    kept = set(layer.last["idx"][0].tolist())        # indices among the 8 non-class tokens
    dropped = [j for j in range(8) if j not in kept]
    assert len(dropped) == 4
    fused_out[:, -1].sum().backward()
    with_fuse = h.grad.clone()
    h.grad = None
    layer.fuse = False
    plain_out = layer(h, None)
    assert plain_out.shape[1] == 1 + 4
    # the MLP and its norm act per token: fusion appends a token and leaves the others alone
    torch.testing.assert_close(fused_out[:, :-1], plain_out, rtol=0, atol=0)
    # the fused token depends on every dropped token (its own row and the attention weight)
    assert all(with_fuse[0, 1 + j].abs().sum() > 0 for j in dropped)
    # without fusion a dropped token reaches the outputs only as a key/value of the kept tokens'
    # attention: its gradient is smaller than the kept tokens' (which also pass the residual)
    plain_out[:, 1:].sum().backward()
    g = h.grad[0, 1:].abs().sum(-1)
    assert max(g[j] for j in dropped) < min(g[j] for j in kept)


def test_random_patch_dropout_is_reproducible_from_the_rng():
    model = tower()
    evit.install(model, [], mode="random")
    evit.set_keep_rate(model, 0.5)
    x = pixels(2)
    emb = model.embeddings
    torch.manual_seed(5)
    a = emb(x)
    torch.manual_seed(5)
    b = emb(x)
    torch.manual_seed(6)
    c = emb(x)
    assert a.shape == (2, 1 + 8, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    full = model.embeddings.__class__.__mro__[1].forward(emb, x)
    assert torch.equal(a[:, 0], full[:, 0])                         # the class token is kept
    # every kept token is one of the image's own patch tokens
    for j in range(2):
        assert all(any(torch.equal(t, p) for p in full[j, 1:]) for t in a[j, 1:])
    with evit.expedited(model, 1.0):
        assert model(pixel_values=x).last_hidden_state.shape[1] == 17
    assert evit.keep_rate_of(model) == 0.5


def test_inference_benchmark_times_each_case_at_its_keep_rate(monkeypatch):
    """bench expedite's bookkeeping, against a clock the test controls: each forward "takes" one
    tick per token it leaves in the last layer, and the first timed round of every case is an
    outlier 100 times slower. images/s must then be batch / (the closed-form token count) for every
    case -- so each case is timed at its own keep rate, on its own tower, and the median (not the
    mean) over rounds is taken -- and each speedup the ratio of two of those numbers."""
    import trainer.experiments.bench_expedite as B

    clock = {"now": 0.0}
    calls: dict = {}

    class FakeTime:
        @staticmethod
        def perf_counter():
            return clock["now"]

    monkeypatch.setattr(B, "time", FakeTime)
    real_tower = B._tower

    def counting_tower(preset, device):
        model, shape = real_tower(preset, device)
        forward = model.forward

        def timed_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            key = (id(model), evit.keep_rate_of(model))
            calls[key] = calls.get(key, 0) + 1
            # call 1 is the warm-up (not timed); call 2 is the first timed round: the outlier
            clock["now"] += out.last_hidden_state.shape[1] * (100.0 if calls[key] == 2 else 1.0)
            return out
        model.forward = timed_forward
        return model, shape

    monkeypatch.setattr(B, "_tower", counting_tower)
    batch, keep = 4, [0.5, 0.7]
    row = B.measure("tiny", batch, keep, rounds=3, device=torch.device("cpu"), bf16=False)

    def evit_tokens(k, n=65, drop=(1, 2, 3)):          # tiny: 64 patches + class token; fused token kept
        for _ in drop:
            n = 1 + math.ceil(k * (n - 1) - 1e-9) + 1
        return n
    want_tokens = {"full": 65, "evit@0.5": evit_tokens(0.5), "evit@0.7": evit_tokens(0.7), "flip@0.5": 1 + 32}
    assert want_tokens["evit@0.5"] == 11 and want_tokens["evit@0.7"] == 26
    assert row["drop_layers"] == [1, 2, 3] and row["rounds"] == 3 and row["batch"] == batch
    assert row["images_per_s"] == pytest.approx({n: batch / t for n, t in want_tokens.items()}, rel=1e-12)
    assert row["speedup_vs_full"] == pytest.approx({n: 65 / t for n, t in want_tokens.items()}, rel=1e-12)
    assert sorted(calls.values()) == [4, 4, 4, 4]      # one warm-up and 3 rounds per case, nothing else
