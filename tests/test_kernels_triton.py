"""Triton kernels under the interpreter (TRITON_INTERPRET=1) against a textbook fp64 loss.

The interpreter must be on before kernels.triton_launch is first imported, and must not leak
into other test modules, so the real tests run in a child pytest process started by
``test_triton_kernels_under_interpreter`` (its output is shown when it fails).

On a GPU the same cases run compiled: ``TRAINER_TRITON_DEVICE=cuda`` starts the child without the
interpreter, and every ``impl="triton"`` call of the cases gets its tensors moved to the GPU (one
copy per tensor, so that a tensor passed twice stays one tensor) and its results moved back; the
references stay on the CPU, the tolerances are the same (fp32 1e-5, half 3e-2). The kernels run at
each family's default tile (no tuner, as under the interpreter), and ``test_every_tile_candidate``,
defined on a GPU only, runs every tile the tuner may pick. ``scripts/gpu_check.sh`` runs the child
directly:

    KERNELS_TRITON_CHILD=1 TRAINER_TRITON_DEVICE=cuda python -m pytest -q tests/test_kernels_triton.py
"""
import os
import subprocess
import sys
from pathlib import Path

from conftest import run_child

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = os.environ.get("KERNELS_TRITON_CHILD") == "1"
DEVICE = os.environ.get("TRAINER_TRITON_DEVICE", "cpu")   # "cuda": the cases compiled on a GPU


def _child_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


if not CHILD:
    def test_triton_kernels_under_interpreter():
        env = _child_env(KERNELS_TRITON_CHILD="1", TRAINER_TRITON_DEVICE=DEVICE)
        if DEVICE == "cpu":
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        r = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                       "-W", "ignore::RuntimeWarning", __file__], cwd=ROOT, env=env, timeout=900)
        out = r.stdout[-6000:] + r.stderr[-3000:]
        assert r.returncode == 0, out
        assert " passed" in r.stdout and "skipped" not in r.stdout and "deselected" not in r.stdout, out

    def test_triton_on_cpu_without_interpreter_is_refused():
        code = ("import torch; from kernels import gathered_clip_loss\n"
                "x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)\n"
                "try:\n    gathered_clip_loss(x, x, 10.0, impl='triton')\n"
                "except RuntimeError as e:\n    print('REFUSED', e)\n")
        env = _child_env()
        env.pop("TRITON_INTERPRET", None)
        r = run_child([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=300)
        assert "REFUSED impl='triton' needs CUDA tensors" in r.stdout, r.stdout + r.stderr

else:
    import gc

    import torch

    import kernels
    import kernels.testing
    import kernels.triton_launch as TL
    import test_kernels_chunked
    from kernels import WORKSPACE
    from kernels.testing import TEACHER_KINDS, AllocationMeter, make_batch, run_case
    from test_kernels_chunked import (KINDS, TERM_CASES, assert_matches, check_degenerate_teacher,
                                      check_terms_against_reference, textbook)

    if DEVICE == "cpu":
        assert TL.INTERPRET, "child must run with TRITON_INTERPRET=1"
    else:
        assert not TL.INTERPRET and torch.cuda.is_available(), \
            f"TRAINER_TRITON_DEVICE={DEVICE}: needs a GPU and TRITON_INTERPRET unset"

    def _on_device(loss_fn):
        """``loss_fn`` whose ``impl="triton"`` calls run on DEVICE: tensor arguments moved there
        (autograd flows back to the CPU leaves), results moved back. On the CPU every move is the
        tensor itself, so the interpreter's cases run unchanged."""
        def call(*args, impl="auto", **kwargs):
            if impl != "triton":
                return loss_fn(*args, impl=impl, **kwargs)
            moved = {}    # by identity: the momentum teacher's tensor passed twice stays one tensor

            def move(v):
                if not isinstance(v, torch.Tensor):
                    return v
                if id(v) not in moved:
                    moved[id(v)] = v.to(DEVICE)
                return moved[id(v)]
            out = loss_fn(*map(move, args), impl=impl, **{k: move(v) for k, v in kwargs.items()})
            return out.cpu() if isinstance(out, torch.Tensor) else type(out)(*(t.cpu() for t in out))
        return call

    @pytest.fixture(autouse=True)
    def _triton_on_device(monkeypatch):
        """Every module whose helpers call the loss entry points, and the default tile (no
        tuner: each new shape would time every candidate, and the launch counts below would
        include its launches)."""
        for module in (kernels.testing, test_kernels_chunked, sys.modules[__name__]):
            for name in ("gathered_clip_loss", "gathered_distill_loss"):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, _on_device(getattr(module, name)))
        monkeypatch.setattr(kernels, "_backend", lambda impl: (
            kernels.ChunkedBackend() if impl == "chunked" else TL.TritonBackend(tune=False)))

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("n,dim,scale,near,go", [
        (1, 8, 14.0, False, 1.0),        # b = 1
        (29, 37, 14.0, False, 2.5),      # odd b, N; D = 37 not a multiple of BLOCK_K = 32
        (40, 33, 100.0, True, 1.0),      # extreme scale, near-identical embeddings
    ])
    def test_triton_fp32_matches_textbook(kind, n, dim, scale, near, go):
        batch = make_batch(n, dim, seed=7, scale=scale, near_identical=near)
        got = run_case(batch, slice(0, n), "triton", kind, grad_output=go)
        tol = 3e-4 if near else 1e-5
        assert_matches(got, textbook(batch, kind, grad_output=go), tol, kind)
        assert_matches(got, run_case(batch, slice(0, n), "torch", kind, grad_output=go), tol, "vs torch")

    @pytest.mark.parametrize("kind", TEACHER_KINDS)
    @pytest.mark.parametrize("n,dim,go", [(1, 8, 1.0), (29, 37, 2.5)])
    def test_triton_fp32_teacher_embeddings_match_textbook(kind, n, dim, go):
        """Self-distillation from teacher embeddings (PSD_SRC 1: an extra dot of XP vs YP; 2:
        the momentum teacher's T reused): loss, every term and the gradients."""
        batch = make_batch(n, dim, seed=12)
        got = run_case(batch, slice(0, n), "triton", kind, grad_output=go)
        # b = 1: every softmax has one entry, the gradients are 0 up to fp32 roundoff of the
        # logits (scale * 2^-24 each; see test_chunked_property)
        atol = 8 * 14.0 * 2.0 ** -24 if n == 1 else 0.0
        assert_matches(got, textbook(batch, kind, grad_output=go), 1e-5, kind, atol=atol)
        assert_matches(got, run_case(batch, slice(0, n), "chunked", kind, grad_output=go), 1e-5, "vs chunked",
                       atol=atol)

    def test_triton_degenerate_teacher_only_without_teacher_embeddings():
        check_degenerate_teacher("triton")

    def test_triton_teacher_text_grad():
        batch = make_batch(21, 10, seed=5)
        got = run_case(batch, slice(0, 21), "triton", "distill", teacher_text_grad=True, grad_output=0.7)
        assert_matches(got, textbook(batch, "distill", teacher_text_grad=True, grad_output=0.7), 1e-5)

    @pytest.mark.parametrize("case", TERM_CASES)
    def test_triton_terms_match_reference(case):
        """Each named term and the gradients against the materialised-logits reference."""
        check_terms_against_reference("triton", case)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("kind", ["clip", "distill", "distill_psd_teacher", "distill_psd_ecl"])
    def test_triton_half_precision(dtype, kind):
        batch = make_batch(27, 24, seed=8, scale=30.0)
        got = run_case(batch, slice(0, 27), "triton", kind, dtype=dtype, grad_output=0.5)
        assert_matches(got, textbook(batch, kind, grad_output=0.5), 3e-2, f"{dtype} {kind}")

    class _Counted:
        """Counts launches of a kernel (``kernel[grid](...)``), and runs the cyclic garbage
        collector after each: the interpreter copies a launch's arguments in a closure that
        refers to itself (triton's ``GridExecutor._init_args_hst``), a reference cycle that
        keeps every buffer the launch was given alive until the collector runs. A compiled
        launch holds no such references, so memory is measured without them."""

        def __init__(self, kernel):
            self.kernel, self.launches = kernel, 0

        def __getitem__(self, grid):
            self.launches += 1

            def launch(*args, **kwargs):
                out = self.kernel[grid](*args, **kwargs)
                gc.collect()
                return out
            return launch

    def _meter_launchers(monkeypatch) -> AllocationMeter:
        """Meter every tensor the launchers allocate (forward launcher, backward panels and
        panel launches), however long it lives after the call."""
        meter = AllocationMeter()
        for name in ("launch_forward", "panel_buffers", "launch_grad_panel"):
            monkeypatch.setattr(TL, name, meter.wrap(getattr(TL, name)))
        return meter

    def _small_tiles(monkeypatch):
        """16-wide tiles and 3 column splits: b = N = 45 has 3 row blocks and 3 column panels."""
        small = TL.TileConfig(16, 16, 16, 1, 1, col_splits=3)
        monkeypatch.setattr(TL, "INTERPRETER_CONFIG", small)
        monkeypatch.setattr(TL.TritonBackend, "_cfg", lambda self, *a, **k: small)   # compiled too
        fwd, bwd = _Counted(TL._clip_fwd_kernel), _Counted(TL._clip_bwd_kernel)
        monkeypatch.setattr(TL, "_clip_fwd_kernel", fwd)
        monkeypatch.setattr(TL, "_clip_bwd_kernel", bwd)
        return fwd, bwd

    # b = N = 45, S = 3 splits, F families: the forward needs at least 4 * max(3FSb + 12FN,
    # 6FSb + 3Fb + 3FN) bytes (4320 for clip, 12960 for distill; forward_bytes), each further
    # row block of column partials per launch 24FN more (clip 5000: two per launch).
    @pytest.mark.parametrize("kind,budget", [("clip", 4400), ("clip", 5000), ("distill", 13000)])
    def test_workspace_stays_under_budget(kind, budget, monkeypatch):
        """Tight budgets force several forward launches and backward panels. Measured: the
        peak of tensor bytes the launchers allocated (AllocationMeter: every torch allocation
        inside them, alive at once, including merge temporaries and the statistics they
        return) is within the budget, and within what the launchers planned (WORKSPACE)."""
        fwd, bwd = _small_tiles(monkeypatch)
        meter = _meter_launchers(monkeypatch)
        batch = make_batch(45, 20, seed=9)
        WORKSPACE.reset()
        got = run_case(batch, slice(0, 45), "triton", kind, workspace_bytes=budget)
        assert fwd.launches >= 2 and bwd.launches >= 2, (fwd.launches, bwd.launches)
        assert 0 < meter.peak <= budget, (meter.peak, budget)
        assert meter.peak <= WORKSPACE.peak_bytes() <= budget, (meter.peak, list(WORKSPACE.records))
        gc.collect()
        assert meter.live == 0, meter.live        # nothing the launchers made outlives the step
        assert_matches(got, textbook(batch, kind), 1e-5, kind)

    def test_workspace_check_sees_an_over_budget_launcher(monkeypatch):
        """The check is the memory, not the launcher's word: a forward launcher that holds one
        unannounced buffer as large as the slack fails it, though its plan is unchanged."""
        budget = 4400
        real = TL.launch_forward

        def greedy(*args, **kwargs):
            spare = torch.empty(budget // 4 + 1)   # noqa: F841  (alive during the launch)
            return real(*args, **kwargs)
        monkeypatch.setattr(TL, "launch_forward", greedy)
        _small_tiles(monkeypatch)
        meter = _meter_launchers(monkeypatch)
        WORKSPACE.reset()
        run_case(make_batch(45, 20, seed=9), slice(0, 45), "triton", "clip", workspace_bytes=budget)
        assert WORKSPACE.peak_bytes() <= budget < meter.peak, (WORKSPACE.peak_bytes(), meter.peak)

    def test_bookkeeping_stays_bounded_over_many_steps(monkeypatch):
        """40 steps (80 launcher calls): the workspace log keeps a fixed number of records and
        nothing the launchers allocated is still alive."""
        meter = _meter_launchers(monkeypatch)
        batch = make_batch(8, 8, seed=2)
        WORKSPACE.reset()
        before = WORKSPACE.launches
        for _ in range(40):
            run_case(batch, slice(0, 8), "triton", "distill")
        assert len(WORKSPACE.records) <= 8, len(WORKSPACE.records)
        assert WORKSPACE.launches - before == 80
        gc.collect()     # the interpreter's argument copies (see _Counted)
        assert meter.live == 0 and meter.allocations >= 80 * 2, (meter.live, meter.allocations)

    def test_workspace_too_small_is_refused():
        batch = make_batch(8, 8, seed=1)
        with pytest.raises(ValueError, match="workspace_bytes=64 is too small"):
            run_case(batch, slice(0, 8), "triton", "clip", workspace_bytes=64)

    if DEVICE != "cpu":
        # kind -> (psd, ecl, psd_source) of triton_launch.candidates
        _FAMILIES = {"clip": (False, False, "self"), "distill": (True, True, "self"),
                     "distill_psd_teacher": (True, True, "teacher"), "distill_psd_ecl": (True, True, "ecl")}
        _TILES = [(kind, dtype, cfg) for kind, (psd, ecl, src) in _FAMILIES.items()
                  for dtype in (torch.float32, torch.bfloat16)
                  for cfg in TL.candidates(psd, ecl, dtype, src)]

        @pytest.mark.parametrize("kind,dtype,cfg", _TILES, ids=lambda v: str(v).replace(" ", ""))
        def test_every_tile_candidate(kind, dtype, cfg, monkeypatch):
            """Compiled only: every tile the tuner may pick, at a shape of several row blocks and
            column tiles with ragged edges (b = N = 200, D = 72: not a multiple of BLOCK_K)."""
            monkeypatch.setattr(TL.TritonBackend, "_cfg", lambda self, *a, **k: cfg)
            batch = make_batch(200, 72, seed=13, scale=30.0)
            got = run_case(batch, slice(0, 200), "triton", kind, dtype=dtype, grad_output=0.5)
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            assert_matches(got, textbook(batch, kind, grad_output=0.5), tol, f"{kind} {dtype} {cfg}")
