"""Triton kernels of the fused gathered contrastive loss (+ soft-target statistics).

Derivation (kernels/README.md, docs/methods.md). S = s X Y^T, X local [b, D], Y gathered
[N, D]. For each family of softmax (student w = S; self-distillation teacher w = W / tau with
value v = S; momentum teacher w = T = s Xbar Y^T with v = T - S) one streaming pass keeps

    rows (online over column tiles):   m <- max(m, max_j w),  l <- l e^(m_old - m) + sum_j e^(w - m),
                                       a <- a e^(m_old - m) + sum_j e^(w - m) v
    columns (one tile at a time):      the same sums over the tile's rows, written per row block

so loss terms need only these O(b + N) numbers (stats.py); nothing b x N is stored.
The self-distillation teacher's W (constexpr PSD_SRC, LossSpec.psd_source): 0 = S itself,
1 = s XP YP^T from teacher embeddings (XP local [b, D], YP gathered [N, D]: one more
``_dot_tile`` per tile), 2 = the momentum teacher's T (reused; needs ECL).
The backward recomputes S (and T) tile by tile and writes the panel of

    G = P + Q - (2 - a_i - a_j)[j = o+i] - a_i P~ - a_j Q~ + w_kd (P + Q - Pbar - Qbar)

(unscaled; fused.py applies k * s and runs the dX / dY GEMMs on cuBLAS).

Layout of the statistics buffers (fp32, contiguous): row partials ``mx [F, SPLITS, b]``,
``sm [F, 2, SPLITS, b]``; column partials ``mx [F, RB, N]``, ``sm [F, 2, RB, N]`` (RB = row
blocks of one launch). Deterministic: no atomics.

Interpreter (TRITON_INTERPRET=1, read when this module is imported): kernels run on CPU
tensors; tiles are cast to fp32 before ``tl.dot`` there (the interpreter mishandles bf16 dots).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot_tile(A, B, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              CAST_F32: tl.constexpr, IP: tl.constexpr):
    """``A[rows] @ B[cols]^T`` as an fp32 ``[BLOCK_M, BLOCK_N]`` tile (masked K tail)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptr = A + rows.to(tl.int64)[:, None] * stride_a
    b_ptr = B + cols.to(tl.int64)[None, :] * stride_b
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(a_ptr + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if CAST_F32:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=IP)
    return acc


@triton.jit
def _row_online(m, l, a, w, v, valid, HAS_V: tl.constexpr):
    """Fold one tile into running row statistics (rescale when the max moves)."""
    m_new = tl.maximum(m, tl.max(tl.where(valid, w, float("-inf")), 1))
    # out-of-range rows keep m = -inf; subtract 0 there instead (-inf - -inf would be NaN)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    e = tl.exp(tl.where(valid, w - m_ref[:, None], float("-inf")))
    l = l * alpha + tl.sum(e, 1)
    if HAS_V:
        a = a * alpha + tl.sum(e * v, 1)
    return m_new, l, a


@triton.jit
def _col_store(MX, SM, f, pid_m, RB, N, cols, col_ok, w, v, valid, HAS_V: tl.constexpr):
    """Write this row block's column statistics of family ``f`` for the tile's columns."""
    cm = tl.max(tl.where(valid, w, float("-inf")), 0)
    e = tl.exp(tl.where(valid, w - cm[None, :], float("-inf")))
    base = (f * RB + pid_m).to(tl.int64) * N + cols
    tl.store(MX + base, cm, mask=col_ok)
    tl.store(SM + (f * 2 * RB + pid_m).to(tl.int64) * N + cols, tl.sum(e, 0), mask=col_ok)
    if HAS_V:
        tl.store(SM + ((f * 2 + 1) * RB + pid_m).to(tl.int64) * N + cols, tl.sum(e * v, 0),
                 mask=col_ok)


@triton.jit
def _row_store(MX, SM, f, pid_s, SPLITS, b, rows, row_ok, m, l, a, HAS_V: tl.constexpr):
    tl.store(MX + (f * SPLITS + pid_s).to(tl.int64) * b + rows, m, mask=row_ok)
    tl.store(SM + (f * 2 * SPLITS + pid_s).to(tl.int64) * b + rows, l, mask=row_ok)
    if HAS_V:
        tl.store(SM + ((f * 2 + 1) * SPLITS + pid_s).to(tl.int64) * b + rows, a, mask=row_ok)


@triton.jit
def _clip_fwd_kernel(X, Y, XT, XP, YP, SCALE, ROW_MX, ROW_SM, COL_MX, COL_SM,
                     b, N, D, row_lo, row_hi, cols_per_split, SPLITS, RB,
                     stride_x, stride_y, stride_xt, stride_xp, stride_yp, inv_tau,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PSD: tl.constexpr, ECL: tl.constexpr, F_ECL: tl.constexpr, PSD_SRC: tl.constexpr,
                     CAST_F32: tl.constexpr, IP: tl.constexpr):
    """Program (row block, column split): stream the split's column tiles once."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = row_lo + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    s = tl.load(SCALE).to(tl.float32)
    m0 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l0 = tl.zeros((BLOCK_M,), tl.float32)
    m1, l1, a1, m2, l2, a2 = m0, l0, l0, m0, l0, l0
    col_lo = pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, N)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_hi
        valid = row_ok[:, None] & col_ok[None, :]
        z = s * _dot_tile(X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y,
                          BLOCK_M, BLOCK_N, BLOCK_K, CAST_F32, IP)
        m0, l0, _ = _row_online(m0, l0, l0, z, z, valid, False)
        _col_store(COL_MX, COL_SM, 0, pid_m, RB, N, cols, col_ok, z, z, valid, False)
        if PSD_SRC == 2:
            # the self-distillation family reuses T (PSD_SRC 2 implies ECL), so T comes first,
            # and its own family with it (either order spilled at 128 x 64 tiles and neither at
            # 64 x 128: triton_launch._SOURCE_CANDIDATES)
            t = s * _dot_tile(XT, Y, rows, cols, row_ok, col_ok, D, stride_xt, stride_y,
                              BLOCK_M, BLOCK_N, BLOCK_K, CAST_F32, IP)
            m2, l2, a2 = _row_online(m2, l2, a2, t, t - z, valid, True)
            _col_store(COL_MX, COL_SM, F_ECL, pid_m, RB, N, cols, col_ok, t, t - z, valid, True)
        if PSD:
            if PSD_SRC == 0:
                zt = z * inv_tau
            elif PSD_SRC == 1:
                zt = (s * inv_tau) * _dot_tile(XP, YP, rows, cols, row_ok, col_ok, D, stride_xp,
                                               stride_yp, BLOCK_M, BLOCK_N, BLOCK_K, CAST_F32, IP)
            else:
                zt = t * inv_tau
            m1, l1, a1 = _row_online(m1, l1, a1, zt, z, valid, True)
            _col_store(COL_MX, COL_SM, 1, pid_m, RB, N, cols, col_ok, zt, z, valid, True)
        if ECL and PSD_SRC != 2:
            t = s * _dot_tile(XT, Y, rows, cols, row_ok, col_ok, D, stride_xt, stride_y,
                              BLOCK_M, BLOCK_N, BLOCK_K, CAST_F32, IP)
            m2, l2, a2 = _row_online(m2, l2, a2, t, t - z, valid, True)
            _col_store(COL_MX, COL_SM, F_ECL, pid_m, RB, N, cols, col_ok, t, t - z, valid, True)
    _row_store(ROW_MX, ROW_SM, 0, pid_s, SPLITS, b, rows, row_ok, m0, l0, l0, False)
    if PSD:
        _row_store(ROW_MX, ROW_SM, 1, pid_s, SPLITS, b, rows, row_ok, m1, l1, a1, True)
    if ECL:
        _row_store(ROW_MX, ROW_SM, F_ECL, pid_s, SPLITS, b, rows, row_ok, m2, l2, a2, True)


@triton.jit
def _clip_bwd_kernel(X, Y, XT, XP, YP, SCALE, LSE_ROW, LSE_COL, A_ROW, A_COL, GX, GY,
                     b, N, D, offset, col_lo, col_hi, stride_x, stride_y, stride_xt, stride_xp,
                     stride_yp, stride_g, inv_tau, teacher_weight,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PSD: tl.constexpr, ECL: tl.constexpr, F_ECL: tl.constexpr, PSD_SRC: tl.constexpr,
                     SPLIT_GY: tl.constexpr, CAST_F32: tl.constexpr, IP: tl.constexpr):
    """Program (row block, column tile of the panel): one tile of G, stored once."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_lo + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < b
    col_ok = cols < col_hi
    s = tl.load(SCALE).to(tl.float32)
    z = s * _dot_tile(X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y,
                      BLOCK_M, BLOCK_N, BLOCK_K, CAST_F32, IP)
    r = tl.load(LSE_ROW + rows, mask=row_ok, other=0.0)
    c = tl.load(LSE_COL + cols, mask=col_ok, other=0.0)
    p = tl.exp(z - r[:, None])
    q = tl.exp(z - c[None, :])
    diag = cols[None, :] == (rows[:, None] + offset)
    if PSD_SRC == 2:
        t = s * _dot_tile(XT, Y, rows, cols, row_ok, col_ok, D, stride_xt, stride_y,
                          BLOCK_M, BLOCK_N, BLOCK_K, CAST_F32, IP)
    if PSD:
        a_r = tl.load(A_ROW + rows, mask=row_ok, other=0.0)
        a_c = tl.load(A_COL + cols, mask=col_ok, other=0.0)
        if PSD_SRC == 0:
            zt = z * inv_tau
        elif PSD_SRC == 1:
            zt = (s * inv_tau) * _dot_tile(XP, YP, rows, cols, row_ok, col_ok, D, stride_xp,
                                           stride_yp, BLOCK_M, BLOCK_N, BLOCK_K, CAST_F32, IP)
        else:
            zt = t * inv_tau
        rp = tl.load(LSE_ROW + b + rows, mask=row_ok, other=0.0)
        cp = tl.load(LSE_COL + N + cols, mask=col_ok, other=0.0)
        g = p + q - tl.where(diag, 2.0 - a_r[:, None] - a_c[None, :], 0.0)
        g = g - a_r[:, None] * tl.exp(zt - rp[:, None]) - a_c[None, :] * tl.exp(zt - cp[None, :])
    else:
        g = p + q - tl.where(diag, 2.0, 0.0)
    gx = g
    if ECL:
        if PSD_SRC != 2:
            t = s * _dot_tile(XT, Y, rows, cols, row_ok, col_ok, D, stride_xt, stride_y,
                              BLOCK_M, BLOCK_N, BLOCK_K, CAST_F32, IP)
        re = tl.load(LSE_ROW + F_ECL * b + rows, mask=row_ok, other=0.0)
        ce = tl.load(LSE_COL + F_ECL * N + cols, mask=col_ok, other=0.0)
        gx = g + teacher_weight * (p + q - tl.exp(t - re[:, None]) - tl.exp(t - ce[None, :]))
    offs = rows.to(tl.int64)[:, None] * stride_g + (cols - col_lo)[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(GX + offs, gx.to(GX.dtype.element_ty), mask=ok)
    if SPLIT_GY:
        tl.store(GY + offs, g.to(GY.dtype.element_ty), mask=ok)
