"""Triton kernels under the interpreter (TRITON_INTERPRET=1) against a textbook fp64 loss.

The interpreter must be on before kernels.triton_launch is first imported, and must not leak
into other test modules, so the real tests run in a child pytest process started by
``test_triton_kernels_under_interpreter`` (its output is shown when it fails).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = os.environ.get("KERNELS_TRITON_CHILD") == "1"


def _child_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


if not CHILD:
    def test_triton_kernels_under_interpreter():
        env = _child_env(TRITON_INTERPRET="1", KERNELS_TRITON_CHILD="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                            "-W", "ignore::RuntimeWarning", __file__],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
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
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        assert "REFUSED impl='triton' needs CUDA tensors" in r.stdout, r.stdout + r.stderr

else:
    import torch

    import kernels.triton_launch as TL
    from kernels import WORKSPACE
    from kernels.testing import make_batch, run_case
    from test_kernels_chunked import (KINDS, TERM_CASES, assert_matches,
                                      check_terms_against_reference, textbook)

    assert TL.INTERPRET, "child must run with TRITON_INTERPRET=1"

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

    def test_triton_teacher_text_grad():
        batch = make_batch(21, 10, seed=5)
        got = run_case(batch, slice(0, 21), "triton", "distill", teacher_text_grad=True, grad_output=0.7)
        assert_matches(got, textbook(batch, "distill", teacher_text_grad=True, grad_output=0.7), 1e-5)

    @pytest.mark.parametrize("case", TERM_CASES)
    def test_triton_terms_match_reference(case):
        """Each named term and the gradients against the materialised-logits reference."""
        check_terms_against_reference("triton", case)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("kind", ["clip", "distill"])
    def test_triton_half_precision(dtype, kind):
        batch = make_batch(27, 24, seed=8, scale=30.0)
        got = run_case(batch, slice(0, 27), "triton", kind, dtype=dtype, grad_output=0.5)
        assert_matches(got, textbook(batch, kind, grad_output=0.5), 3e-2, f"{dtype} {kind}")

    class _Counted:
        """Counts launches of a kernel (``kernel[grid](...)``)."""

        def __init__(self, kernel):
            self.kernel, self.launches = kernel, 0

        def __getitem__(self, grid):
            self.launches += 1
            return self.kernel[grid]

    @pytest.mark.parametrize("kind", ["clip", "distill"])
    def test_workspace_stays_under_budget(kind, monkeypatch):
        """Small tiles, 3 column splits and a tight budget: several forward launches and
        backward panels; every buffer the launcher allocates is within the budget."""
        n, dim = 45, 20
        cfg = TL.TileConfig(16, 16, 16, 1, 1, col_splits=3)
        monkeypatch.setattr(TL, "INTERPRETER_CONFIG", cfg)
        fwd, bwd = _Counted(TL._clip_fwd_kernel), _Counted(TL._clip_bwd_kernel)
        monkeypatch.setattr(TL, "_clip_fwd_kernel", fwd)
        monkeypatch.setattr(TL, "_clip_bwd_kernel", bwd)
        families = 1 if kind == "clip" else 3
        panels = 1 if kind == "clip" else 2
        # forward: row partials + one row block of column partials (and its merge temporaries)
        budget = max(families * 3 * 3 * n * 4 + 2 * families * 3 * n * 4,
                     panels * n * 16 * 4) + 64
        batch = make_batch(n, dim, seed=9)
        WORKSPACE.reset()
        got = run_case(batch, slice(0, n), "triton", kind, workspace_bytes=budget)
        assert 0 < WORKSPACE.peak_bytes() <= budget, (WORKSPACE.records, budget)
        assert fwd.launches >= 2 and bwd.launches >= 2, (fwd.launches, bwd.launches)
        assert_matches(got, textbook(batch, kind), 1e-5, kind)

    def test_workspace_too_small_is_refused():
        batch = make_batch(8, 8, seed=1)
        with pytest.raises(ValueError, match="workspace_bytes=64 is too small"):
            run_case(batch, slice(0, 8), "triton", "clip", workspace_bytes=64)
