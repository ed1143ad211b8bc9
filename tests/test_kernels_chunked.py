"""The chunked (pure-torch fused) loss and the torch reference against a textbook fp64 loss.

The textbook loss below materialises the full N x N logits of one process in fp64 and spells
out docs/methods.md directly; it shares no code with kernels/ except the test batch.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from kernels import gathered_clip_loss, gathered_distill_loss, resolve_impl
from kernels.testing import DISTILL_KW, TEACHER_KINDS, make_batch, rel_err, run_case

KINDS = ("clip", "self_distill", "teacher", "distill")
ALL_KINDS = KINDS + TEACHER_KINDS
PSD_KINDS = ("self_distill", "distill") + TEACHER_KINDS     # self-distillation on
ECL_KINDS = ("teacher", "distill", "distill_psd_teacher", "distill_psd_ecl")   # momentum teacher on


def textbook(batch: dict, kind: str, grad_output: float = 1.0, **overrides) -> dict:
    """Full-batch loss, its terms ``[loss, contrastive, clip, self_distill_ce, teacher_kl]`` (the
    loss alone for ``clip``) and gradients in fp64 with materialised logits."""
    fx, fy, proj, scale = (batch[k].double().clone().requires_grad_() for k in ("fx", "fy", "proj", "scale"))
    x, y = F.normalize(fx @ proj, dim=1), F.normalize(fy @ proj, dim=1)
    n = x.shape[0]
    logits = scale * x @ y.T
    eye = torch.eye(n, dtype=torch.float64)
    kw = dict(DISTILL_KW, **overrides)
    m = batch["mask"].double() if kind in PSD_KINDS else torch.zeros(n, dtype=torch.float64)
    a = kw["self_distill_alpha"] * m
    tau = kw["self_distill_tau"]

    def emb(key):   # teacher embeddings: no gradient
        return F.normalize(batch[key].double() @ batch["proj"].double(), dim=1)
    # the self-distillation teacher's logits W (rows: image i vs all texts), detached scale
    s0 = scale.detach()
    W = {"psd_teacher": lambda: s0 * emb("fxp") @ emb("fyp").T,
         "distill_psd_teacher": lambda: s0 * emb("fxp") @ emb("fyp").T,
         "psd_teacher_shared": lambda: s0 * emb("fxp") @ y.detach().T,
         "distill_psd_ecl": lambda: s0 * emb("fxt") @ y.detach().T}.get(kind, logits.detach)()
    q_rows, q_cols = torch.softmax(W / tau, 1), torch.softmax(W.T / tau, 1)
    lp_rows, lp_cols = torch.log_softmax(logits, 1), torch.log_softmax(logits.T, 1)
    rows_t = (1 - a)[:, None] * eye + a[:, None] * q_rows
    cols_t = (1 - a)[:, None] * eye + a[:, None] * q_cols
    contrastive = -((rows_t * lp_rows).sum() + (cols_t * lp_cols).sum()) / (2 * n)
    clip = -(torch.diagonal(lp_rows).sum() + torch.diagonal(lp_cols).sum()) / (2 * n)
    sd_ce = -(m[:, None] * (q_rows * lp_rows + q_cols * lp_cols)).sum() / (2 * n)
    kl_term = torch.zeros((), dtype=torch.float64)
    if kind in ECL_KINDS:
        teacher = (scale * emb("fxt") @ y.T).detach()
        student = scale * x @ (y if kw.get("teacher_text_grad") else y.detach()).T
        def kl(t, s):
            return (torch.softmax(t, 1) * (torch.log_softmax(t, 1) - torch.log_softmax(s, 1))).sum()
        kl_term = (kl(teacher, student) + kl(teacher.T, student.T)) / (2 * n)
    loss = contrastive + kw["teacher_weight"] * kl_term
    terms = torch.stack([loss, contrastive, clip, sd_ce, kl_term]).detach() if kind != "clip" else loss.detach()[None]
    (loss * grad_output).backward()
    return {"loss": loss.detach(), "terms": terms, "fx": fx.grad, "fy": fy.grad, "proj": proj.grad,
            "scale": scale.grad}


def assert_matches(got: dict, want: dict, tol: float, what: str = "", atol: float = 0.0) -> None:
    """Relative error below ``tol`` where the reference is O(1), absolute near 0 (b = 1 has
    loss 0, and fp32 logits of size `scale` carry ~scale * 6e-8 absolute error); ``atol``
    also accepts an absolute error up to that (see test_chunked_property)."""
    for key in ("loss", "terms", "fx", "fy", "proj", "scale"):
        if key == "terms" and key not in want:
            continue
        err = rel_err(got[key], want[key], floor=1.0 if key in ("loss", "terms") else 1e-2)
        diff = (got[key].double() - want[key].double()).abs().max().item()
        assert err < tol or diff <= atol, \
            f"{what} {key}: relative error {err:.2e} >= {tol:.0e}, absolute {diff:.2e} > {atol:.1e}"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_reference_matches_textbook(kind):
    batch = make_batch(23, 17, seed=1)
    assert_matches(run_case(batch, slice(0, 23), "torch", kind), textbook(batch, kind), 2e-5, kind)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("n,dim,scale,near,go", [
    (1, 8, 14.0, False, 1.0),        # b = 1: the only column is the positive
    (29, 13, 14.0, False, 2.5),      # odd sizes, grad_output != 1
    (40, 33, 100.0, True, 1.0),      # extreme scale, near-identical embeddings
])
def test_chunked_matches_textbook(kind, n, dim, scale, near, go):
    batch = make_batch(n, dim, seed=2, scale=scale, near_identical=near)
    # a tiny workspace forces many column chunks and backward panels
    got = run_case(batch, slice(0, n), "chunked", kind, grad_output=go, workspace_bytes=4 * n * 24 * 3)
    tol = 3e-4 if near else 1e-5    # near-identical: fp32 logits of ~100 carry ~1e-5 absolute error
    assert_matches(got, textbook(batch, kind, grad_output=go), tol, kind)
    assert_matches(got, run_case(batch, slice(0, n), "torch", kind, grad_output=go), tol, "vs torch")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), dim=st.integers(2, 40), scale=st.floats(1.0, 100.0),
       seed=st.integers(0, 2**16), chunk=st.integers(1, 48), kind=st.sampled_from(ALL_KINDS),
       tau=st.sampled_from([0.5, 1.0, 2.0]), alpha=st.floats(0.0, 1.0))
def test_chunked_property(n, dim, scale, seed, chunk, kind, tau, alpha):
    # dim >= 2: at dim = 1 normalize() has zero gradient, so every gradient is pure roundoff
    batch = make_batch(n, dim, seed=seed, scale=scale)
    over = dict(self_distill_tau=tau, self_distill_alpha=alpha)
    got = run_case(batch, slice(0, n), "chunked", kind, workspace_bytes=4 * n * 12 * chunk,
                   **(over if kind != "clip" and kind != "teacher" else {}))
    # Gradients of ~1e-4..1e-2 (b = 2..3 at scale ~80: one logit dominates each softmax) carry
    # an absolute error of up to ~1.4 * scale * 2^-24 on the fused path (likely its per-line
    # lse: one fp32 number of size ~scale, whose rounding exp(S - lse) inherits), i.e. 5e-4
    # relative with the 1e-2 floor, where the reference stays under 5e-5: such draws
    # failed now and then. Allow 8 * scale * 2^-24 absolute on top of the relative 5e-5.
    assert_matches(got, textbook(batch, kind, **over), 5e-5, f"{kind} n={n} dim={dim}",
                   atol=8 * scale * 2.0 ** -24)


def test_chunked_teacher_text_grad():
    """With ``teacher_text_grad`` the KL's gradient also reaches the text tower (one panel)."""
    batch = make_batch(21, 10, seed=5)
    got = run_case(batch, slice(0, 21), "chunked", "distill", teacher_text_grad=True)
    assert_matches(got, textbook(batch, "distill", teacher_text_grad=True), 1e-5)
    stopped = textbook(batch, "distill")
    assert rel_err(got["fy"], stopped["fy"]) > 1e-3    # and it differs from the default


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["clip", "distill", "distill_psd_teacher"])
def test_chunked_half_precision(dtype, kind):
    batch = make_batch(31, 24, seed=3, scale=30.0)
    got = run_case(batch, slice(0, 31), "chunked", kind, dtype=dtype)
    assert_matches(got, textbook(batch, kind), 3e-2, f"{dtype} {kind}")


# Limits where terms coincide, and every option at once; each against the reference.
TERM_CASES = {
    "clip": None,                                             # gathered_clip_loss
    "alpha0": dict(self_distill_alpha=0.0),                   # contrastive = clip
    "teacher_is_student": "teacher=x",                        # KL(p || p) = 0
    "alpha1_tau1": dict(self_distill_alpha=1.0, self_distill_tau=1.0),   # contrastive = CE term
    "all": dict(DISTILL_KW, self_distill_mask="mask", teacher_image_emb="xt"),
    # self-distillation from teacher embeddings: own texts, shared texts, beside the momentum
    # teacher, and the momentum teacher's own tensor (T reused)
    "psd_teacher": dict(DISTILL_KW, self_distill_mask="mask", self_distill_teacher_image="xp",
                        self_distill_teacher_text="yp"),
    "psd_teacher_shared": dict(DISTILL_KW, self_distill_teacher_image="xp"),
    "all_psd_teacher": dict(DISTILL_KW, self_distill_mask="mask", teacher_image_emb="xt",
                            self_distill_teacher_image="xp", self_distill_teacher_text="yp"),
    "all_psd_ecl": dict(DISTILL_KW, self_distill_mask="mask", teacher_image_emb="xt",
                        self_distill_teacher_image="xt"),
}


def _terms_and_grads(impl: str, case: str, batch: dict) -> tuple[dict, tuple]:
    """Every term of one loss call and the gradients of its loss w.r.t. (x, y, scale)."""
    x, y, xt, xp, yp = (F.normalize(batch[k], dim=1) for k in ("fx", "fy", "fxt", "fxp", "fyp"))
    x, y, s = (t.clone().requires_grad_() for t in (x, y, batch["scale"]))
    kw = TERM_CASES[case]
    if kw is None:
        loss = gathered_clip_loss(x, y, s, impl=impl)
        return {"loss": loss.detach()}, torch.autograd.grad(loss, (x, y, s))
    if kw == "teacher=x":
        kw = dict(teacher_image_emb=x.detach().clone())
    named = {"mask": batch["mask"], "xt": xt, "xp": xp, "yp": yp}   # "xt" twice: one tensor
    kw = {k: named.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    out = gathered_distill_loss(x, y, s, impl=impl, **kw)
    return out._asdict(), torch.autograd.grad(out.loss, (x, y, s))


def check_terms_against_reference(impl: str, case: str, tol: float = 1e-5) -> dict:
    """``impl``'s terms and gradients equal the materialised-logits reference's (impl="torch",
    reference.py: plain torch log-softmax over the full b x N logits, no shared statistics
    code). Returns ``impl``'s terms."""
    batch = make_batch(19, 11, seed=4)
    got, got_g = _terms_and_grads(impl, case, batch)
    want, want_g = _terms_and_grads("torch", case, batch)
    assert got.keys() == want.keys()
    for key in got:    # absolute near 0 (KL of a teacher equal to the student, unused terms)
        err = rel_err(got[key], want[key], floor=1.0)
        assert err < tol, f"{impl} {case} {key}: {got[key].item()} vs reference {want[key].item()}"
    for name, g, w in zip(("x", "y", "scale"), got_g, want_g):
        err = rel_err(g, w, floor=1e-2)
        assert err < tol, f"{impl} {case} d{name}: relative error {err:.2e}"
    return got


@pytest.mark.parametrize("case", TERM_CASES)
def test_chunked_terms_match_reference(case):
    """Each named term (``DistillLoss``) and the gradients against the reference; the textbook
    tests above check the loss and gradients only. In the limits the coinciding terms are also
    compared across the two implementations (chunked vs reference), never within one."""
    got = check_terms_against_reference("chunked", case)
    batch = make_batch(19, 11, seed=4)
    ref_clip = _terms_and_grads("torch", "clip", batch)[0]["loss"]
    if case == "alpha0":
        assert rel_err(got["contrastive"], ref_clip) < 1e-5
        assert rel_err(got["clip"], ref_clip) < 1e-5
    elif case == "teacher_is_student":
        assert abs(got["teacher_kl"].item()) < 1e-5
    elif case == "alpha1_tau1":
        # every target is the model's own distribution: contrastive = the CE term = the mean
        # entropy of the row and column softmaxes, spelled out here in fp64
        x, y = (F.normalize(batch[k].double(), dim=1) for k in ("fx", "fy"))
        logits = batch["scale"].double() * x @ y.T
        entropy = sum(-(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum() for z in (logits, logits.T))
        entropy = entropy / (2 * logits.shape[0])
        assert rel_err(got["contrastive"], entropy) < 1e-5
        assert rel_err(got["self_distill_ce"], entropy) < 1e-5
    elif case in ("all", "all_psd_teacher", "all_psd_ecl"):
        assert rel_err(got["clip"], ref_clip) < 1e-5
    if case == "all_psd_ecl":
        # reusing the momentum teacher's logits T = a distinct tensor holding the same values
        twin = dict(TERM_CASES[case], self_distill_teacher_image="xt_copy")
        x, y, xt = (F.normalize(batch[k], dim=1) for k in ("fx", "fy", "fxt"))
        out = gathered_distill_loss(x, y, batch["scale"], impl="chunked",
                                    **{k: {"mask": batch["mask"], "xt": xt, "xt_copy": xt.clone()}.get(v, v)
                                       if isinstance(v, str) else v for k, v in twin.items()})
        for key in got:
            assert rel_err(out._asdict()[key], got[key], floor=1.0) < 1e-6, key


def check_degenerate_teacher(impl: str) -> None:
    """docs/methods.md, "beware the degenerate teacher": with the self teacher at tau = 1 and every
    row in the subset, dL/dS = (1 - a)(p - e), so every gradient is (1 - a) times the plain
    CLIP loss's; a teacher with its own embeddings gives a different gradient."""
    batch = make_batch(17, 10, seed=11)
    a = 0.4
    x, y, xp, yp = (F.normalize(batch[k], dim=1) for k in ("fx", "fy", "fxp", "fyp"))

    def grads(**kw):
        xx, yy, s = (t.clone().requires_grad_() for t in (x, y, batch["scale"]))
        loss = (gathered_clip_loss(xx, yy, s, impl=impl) if not kw else
                gathered_distill_loss(xx, yy, s, impl=impl, self_distill_alpha=a, **kw).loss)
        return torch.autograd.grad(loss, (xx, yy, s))

    clip = grads()
    same = grads(self_distill_tau=1.0)
    for name, g, c in zip(("x", "y", "scale"), same, clip):
        assert rel_err(g, (1 - a) * c, floor=1e-2) < 1e-5, f"{impl} self teacher d{name}"
    for teacher in (dict(self_distill_teacher_image=xp, self_distill_teacher_text=yp),
                    dict(self_distill_teacher_image=xp)):
        other = grads(self_distill_tau=1.0, **teacher)
        for name, g, c in zip(("x", "y", "scale"), other, clip):
            assert rel_err(g, (1 - a) * c, floor=1e-2) > 1e-2, f"{impl} {list(teacher)} d{name}"


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_degenerate_teacher_only_without_teacher_embeddings(impl):
    check_degenerate_teacher(impl)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_teacher_embedding_errors(impl):
    x = F.normalize(torch.randn(4, 8), dim=1)
    with pytest.raises(ValueError, match="self_distill_teacher_text needs self_distill_teacher_image"):
        gathered_distill_loss(x, x, 1.0, self_distill_alpha=0.5, self_distill_teacher_text=x, impl=impl)
    with pytest.raises(ValueError, match=r"self_distill_teacher_image must have image_emb's shape \(4, 8\)"):
        gathered_distill_loss(x, x, 1.0, self_distill_alpha=0.5, self_distill_teacher_image=x[:3], impl=impl)
    with pytest.raises(ValueError, match=r"self_distill_teacher_text must have image_emb's shape"):
        gathered_distill_loss(x, x, 1.0, self_distill_alpha=0.5, self_distill_teacher_image=x,
                              self_distill_teacher_text=x[:, :4], impl=impl)


def test_loss_spec_psd_source():
    from kernels import LossSpec
    with pytest.raises(ValueError, match="psd_source must be one of"):
        LossSpec(psd=True, psd_source="ema")
    with pytest.raises(ValueError, match="needs ecl=True"):
        LossSpec(psd=True, psd_source="ecl")
    assert LossSpec(psd=True, psd_source="teacher").psd_teacher
    assert not LossSpec(psd=False, psd_source="teacher").psd_teacher


def test_impl_choice_and_errors():
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="impl must be one of"):
        gathered_clip_loss(x, x, 1.0, impl="fast")
    with pytest.raises(ValueError, match=r"Got: \(4, 8\) and \(3, 8\)"):
        gathered_clip_loss(x, x[:3], 1.0, impl="chunked")
    with pytest.raises(ValueError, match="workspace_bytes=8 is too small"):
        gathered_clip_loss(x, x, 1.0, impl="chunked", workspace_bytes=8)
    with pytest.raises(ValueError, match="self_distill_alpha must be in"):
        gathered_distill_loss(x, x, 1.0, self_distill_alpha=1.5, impl="chunked")


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_known_sizes_skip_the_layout_exchange_and_are_checked(impl):
    """A caller that passes every rank's row count gets the same loss; wrong counts are refused."""
    from kernels import gathered_clip_loss

    gen = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    s = torch.tensor(10.0)
    want = gathered_clip_loss(x, y, s, impl=impl)
    assert gathered_clip_loss(x, y, s, impl=impl, sizes=(6,)).item() == want.item()
    with pytest.raises(ValueError, match="do not describe this group"):
        gathered_clip_loss(x, y, s, impl=impl, sizes=(5,))
    with pytest.raises(ValueError, match="do not describe this group"):
        gathered_clip_loss(x, y, s, impl=impl, sizes=(6, 6))
