"""Host side of the Triton loss kernels: shape checks, tile configs, workspace sizing and the
backend that ``fused.FusedGatheredLoss`` drives.

    from kernels.triton_launch import clip_loss_triton
    loss = clip_loss_triton(image_emb, text_emb, logit_scale)            # CUDA tensors
    # CPU tensors: only with TRITON_INTERPRET=1 set before this module is first imported

Workspace (``spec.workspace_bytes``, default 256 MiB): everything a launcher allocates stays
under the budget - in the forward the partial buffers, the temporaries of their merges and the
statistics it returns (``forward_bytes``), in the backward the G panel(s). Each launch notes its
planned bytes in ``fused.WORKSPACE``; tests/test_kernels_triton.py measures the tensor bytes
the launchers actually allocate against both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
from triton.runtime import errors as triton_errors

from .fused import WORKSPACE, fused_loss
from .gather import comm_device, world_info
from .spec import GPU_WORKSPACE_BYTES, PSD_SOURCES, LossSpec
from .stats import merge_into, merge_partials
from .triton_clip import _clip_bwd_kernel, _clip_fwd_kernel

INTERPRET = type(_clip_fwd_kernel).__name__ == "InterpretedFunction"
# What Triton's own autotuner skips a config for: the tile needs more shared memory or registers
# than the GPU has (PTXASError: ptxas refused it; absent from older Tritons). Anything else
# raised while timing is a real fault and propagates.
UNRUNNABLE = tuple(getattr(triton_errors, name) for name in ("OutOfResources", "PTXASError")
                   if hasattr(triton_errors, name))
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options; ``col_splits=None`` splits columns to fill the device."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    col_splits: int | None = None


# GPU candidates for the built-in tuner, the untuned default first. Every one compiles without
# register spills on sm_80 and sm_90 for every family combination (python -m kernels.compile_check;
# tests/test_kernels_compile.py; before/after: bench/results/kernels_compile_*.md). What spilled: a
# 128 x 128 tile gives each of 256 threads 64 fp32 registers per live [BLOCK_M, BLOCK_N] tile, and
# the distillation families keep two or three such tiles live (S, T, their exponentials), past
# the 255-register ceiling (up to 1 KiB of spill stores in the bf16 forward); so every candidate
# keeps tiles of 32 floats per thread. fp32 inputs multiply in IEEE fp32 on the FMA pipes (no tensor
# cores), whose operand tiles live in registers too: they take K = 32, and with a teacher family
# 64 x 64 x 16, the one tile of those tried that spilled nowhere.
_HALF_CANDIDATES = (TileConfig(128, 64, 64, 8, 3), TileConfig(64, 128, 64, 8, 3), TileConfig(128, 64, 32, 8, 4),
                    TileConfig(64, 64, 64, 8, 3))
_FP32_CANDIDATES = {False: (TileConfig(128, 64, 32, 8, 3), TileConfig(64, 64, 32, 8, 3), TileConfig(64, 64, 16, 4, 3)),
                    True: (TileConfig(64, 64, 16, 8, 3),)}
# Self-distillation with its own logits (psd_source): "teacher" adds a dot (XP vs YP) per tile,
# yet every tile below compiles spill-free (up to 255 registers with the momentum teacher too);
# 128 x 64 x 32 s4 was dropped only to keep the compile check short. "ecl" reuses T and needs one
# dot fewer, but keeps T live beside S through the psd family: at 128 x 64 it spilled 8-16 B on
# sm_80 and 56-64 B on sm_90 (in either family order), at 64 x 128 and 64 x 64 nothing.
_SOURCE_CANDIDATES = {
    "teacher": (TileConfig(128, 64, 64, 8, 3), TileConfig(64, 128, 64, 8, 3), TileConfig(64, 64, 64, 8, 3)),
    "ecl": (TileConfig(64, 128, 64, 8, 3), TileConfig(64, 64, 64, 8, 3)),
}
INTERPRETER_CONFIG = TileConfig(32, 32, 32, 4, 1, col_splits=1)


def candidates(psd: bool = False, ecl: bool = False, dtype: torch.dtype = torch.bfloat16,
               psd_source: str = "self") -> tuple[TileConfig, ...]:
    """The tuner's tile configs for a family combination and input dtype, the untuned default first.

        candidates(psd=True, ecl=True, dtype=torch.bfloat16, psd_source="teacher")[0]"""
    if dtype == torch.float32:
        return _FP32_CANDIDATES[psd or ecl]    # 64 x 64 x 16 spills in no family
    if psd and psd_source != "self":
        return _SOURCE_CANDIDATES[psd_source]
    return _HALF_CANDIDATES


def _check(X: torch.Tensor, Y: torch.Tensor, XT: torch.Tensor | None, XP=None, YP=None) -> None:
    if not (X.is_cuda or INTERPRET):
        raise RuntimeError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           f"kernels.triton_launch is first imported. Got: device {X.device}")
    if X.dtype not in _DTYPES or Y.dtype != X.dtype:
        raise ValueError(f"embeddings must share one of {_DTYPES}. Got: {X.dtype} and {Y.dtype}")
    if X.shape[1] != Y.shape[1] or (XT is not None and XT.shape != X.shape):
        raise ValueError(f"X [b, D], Y [N, D], XT [b, D] expected. Got: {tuple(X.shape)}, "
                         f"{tuple(Y.shape)}, {None if XT is None else tuple(XT.shape)}")
    for name, t, like in (("XP", XP, X), ("YP", YP, Y)):
        if t is not None and (t.shape != like.shape or t.dtype != X.dtype or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {X.dtype} {tuple(like.shape)}. "
                             f"Got: {t.dtype} {tuple(t.shape)}")


def _dot_flags(dtype: torch.dtype) -> dict:
    """fp32 dots in IEEE precision (matches torch's default, no TF32); half dots accumulate in
    fp32 on a GPU, but the interpreter needs fp32 operands (kernels/README.md). (3xTF32 for fp32 was
    tried: it spilled more than IEEE at every tile the compile check tried.)"""
    return {"CAST_F32": INTERPRET or dtype == torch.float32,
            "IP": "ieee" if (INTERPRET or dtype == torch.float32) else "tf32"}


def _sm_count(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_columns(b: int, N: int, cfg: TileConfig, device, sms: int | None = None) -> tuple[int, int]:
    """``(cols_per_split, splits)``: enough programs for ~2 waves when b is small (``sms``: the
    device's SM count, read from ``device`` when not given)."""
    col_blocks = triton.cdiv(N, cfg.block_n)
    want = cfg.col_splits or triton.cdiv(2 * (sms or _sm_count(device)), triton.cdiv(b, cfg.block_m))
    per = triton.cdiv(col_blocks, max(1, min(col_blocks, want))) * cfg.block_n
    return per, triton.cdiv(N, per)


def forward_bytes(b: int, N: int, F: int, splits: int, rb: int) -> int:
    """Peak bytes ``launch_forward`` allocates with ``rb`` row blocks of column partials per
    launch (fp32 floats, F families, S = splits), the larger of two moments:

    - merging a launch's column partials (``merge_partials``) while the row partials (3FSb),
      the column partials (3F rb N), the column statistics so far (3FN) and the merge's
      temporaries (3F rb N) and outputs (3FN) are alive: 3FSb + 6F rb N + 6FN. (Merging
      those outputs into the statistics so far, in place, needs 3FN of temporaries: less.)
    - merging the row partials, column buffers freed: row partials (3FSb), the column
      statistics (3FN), the merge's temporaries (3FSb) and outputs (3Fb).
    """
    merge_cols = 3 * F * splits * b + 6 * F * rb * N + 6 * F * N
    merge_rows = 6 * F * splits * b + 3 * F * b + 3 * F * N
    return 4 * max(merge_cols, merge_rows)


def _forward_row_blocks(b: int, N: int, F: int, splits: int, cfg: TileConfig, budget: int) -> int:
    """Row blocks of column partials per launch: as many as fit in the budget."""
    least = forward_bytes(b, N, F, splits, 1)
    if least > budget:
        raise ValueError(f"workspace_bytes={budget} is too small for the forward: needs at least "
                         f"{least} bytes. Got: b={b}, N={N}, families={F}")
    # each further row block adds 6FN floats to the column merge's moment
    rb = 1 + (budget - 4 * (3 * F * splits * b + 12 * F * N)) // (4 * 6 * F * N)
    return max(1, min(rb, triton.cdiv(b, cfg.block_m)))


def psd_src(spec: LossSpec) -> int:
    """The kernels' PSD_SRC constexpr: 0 self, 1 teacher embeddings, 2 the momentum teacher's T."""
    return PSD_SOURCES.index(spec.psd_source) if spec.psd else 0


def _meta(spec: LossSpec, cfg: TileConfig, dtype: torch.dtype) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PSD=spec.psd, ECL=spec.ecl,
                F_ECL=spec.f_ecl, PSD_SRC=psd_src(spec), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **_dot_flags(dtype))


def forward_args(X, Y, xt, s32, bufs, r0: int, r1: int, per: int, splits: int, rb: int, spec: LossSpec,
                 cfg: TileConfig, xp=None, yp=None) -> tuple[tuple, dict]:
    """The forward kernel's arguments and meta-parameters, exactly as launched (the compile check
    in kernels/compile_check.py builds its variants from this too, so that they carry the
    specialisations a real launch gets). ``xp`` / ``yp``: the self-distillation teacher's
    embeddings (default X / Y: unread unless ``spec.psd_teacher``; ``yp`` = Y is the shared
    text tower)."""
    row_mx, row_sm, col_mx, col_sm = bufs
    b, D = X.shape
    xp, yp = (X if xp is None else xp), (Y if yp is None else yp)
    return ((X, Y, xt, xp, yp, s32, row_mx, row_sm, col_mx, col_sm, b, Y.shape[0], D, r0, r1, per, splits, rb,
             X.stride(0), Y.stride(0), xt.stride(0), xp.stride(0), yp.stride(0), float(spec.inv_tau)),
            _meta(spec, cfg, X.dtype))


def grad_panel_args(X, Y, xt, s32, lse_row, lse_col, a_row, a_col, gx, gy, offset: int, p0: int, p1: int,
                    spec: LossSpec, cfg: TileConfig, xp=None, yp=None) -> tuple[tuple, dict]:
    """The backward kernel's arguments and meta-parameters, exactly as launched."""
    b, D = X.shape
    xp, yp = (X if xp is None else xp), (Y if yp is None else yp)
    return ((X, Y, xt, xp, yp, s32, lse_row, lse_col, a_row, a_col, gx, gy if gy is not None else gx,
             b, Y.shape[0], D, offset, p0, p1, X.stride(0), Y.stride(0), xt.stride(0), xp.stride(0),
             yp.stride(0), gx.stride(0), float(spec.inv_tau), float(spec.teacher_weight)),
            {**_meta(spec, cfg, X.dtype), "SPLIT_GY": gy is not None})


def launch_forward(X, Y, XT, s32, spec: LossSpec, cfg: TileConfig, XP=None, YP=None):
    """Row statistics and this rank's column statistics, as ``((mx, sm), (mx, sm))``.
    ``XP`` / ``YP``: the self-distillation teacher's embeddings (``spec.psd_teacher``)."""
    _check(X, Y, XT, XP, YP)
    b, D = X.shape
    N, F = Y.shape[0], spec.families
    per, splits = _split_columns(b, N, cfg, X.device)
    rb = _forward_row_blocks(b, N, F, splits, cfg, spec.budget(GPU_WORKSPACE_BYTES))
    phase = WORKSPACE.phase("forward")
    row_mx = WORKSPACE.alloc(phase, (F, splits, b), torch.float32, X.device)
    row_sm = WORKSPACE.alloc(phase, (F, 2, splits, b), torch.float32, X.device)
    col_mx = WORKSPACE.alloc(phase, (F, rb, N), torch.float32, X.device)
    col_sm = WORKSPACE.alloc(phase, (F, 2, rb, N), torch.float32, X.device)
    # merge temporaries and the statistics returned (see forward_bytes)
    WORKSPACE.note(phase, forward_bytes(b, N, F, splits, rb) - 4 * 3 * F * (splits * b + rb * N))
    row_sm[0, 1].zero_()    # the student family has no value slot; keep it finite
    col_sm[0, 1].zero_()
    xt = XT if XT is not None else X
    col = None
    for r0 in range(0, b, rb * cfg.block_m):
        r1 = min(b, r0 + rb * cfg.block_m)
        nrb = triton.cdiv(r1 - r0, cfg.block_m)
        args, meta = forward_args(X, Y, xt, s32, (row_mx, row_sm, col_mx, col_sm), r0, r1, per, splits, rb,
                                  spec, cfg, XP, YP)
        _clip_fwd_kernel[(nrb, splits)](*args, **meta)
        del args   # it holds the column buffers, freed below before the row merge
        part = merge_partials(col_mx[:, :nrb], col_sm[:, :, :nrb])
        if col is None:
            col = part
        else:
            merge_into(col, part)
        del part
    del col_mx, col_sm     # before the row merge's temporaries
    return merge_partials(row_mx, row_sm), col


def panel_width(b: int, N: int, dtype, spec: LossSpec, cfg: TileConfig) -> int:
    """Columns of one backward G panel: the largest multiple of BLOCK_N within the budget."""
    n_panels = 2 if spec.split_gy else 1
    budget = spec.budget(GPU_WORKSPACE_BYTES)
    width = budget // (n_panels * b * dtype.itemsize) // cfg.block_n * cfg.block_n
    if width < cfg.block_n:
        raise ValueError(f"workspace_bytes={budget} is too small for one backward "
                         f"panel of {n_panels} x [{b}, {cfg.block_n}] {dtype}. Got: b={b}")
    return min(width, triton.cdiv(N, cfg.block_n) * cfg.block_n)


def panel_buffers(b: int, N: int, dtype, device, spec: LossSpec, cfg: TileConfig):
    """Panel width (a multiple of BLOCK_N) and the G panel buffer(s), within the budget."""
    width = panel_width(b, N, dtype, spec, cfg)
    phase = WORKSPACE.phase("backward")
    gx = WORKSPACE.alloc(phase, (b, width), dtype, device)
    gy = WORKSPACE.alloc(phase, (b, width), dtype, device) if spec.split_gy else None
    return width, (gx, gy)


def launch_grad_panel(X, Y, XT, s32, lse_row, lse_col, a_row, a_col, offset, p0, p1,
                      spec: LossSpec, bufs, cfg: TileConfig, XP=None, YP=None):
    """Write columns ``p0:p1`` of G (and of G_y) into the panel buffers; return views."""
    gx, gy = bufs
    b, D = X.shape
    w = p1 - p0
    xt = XT if XT is not None else X
    a_row = a_row if a_row is not None else lse_row   # unread without PSD
    a_col = a_col if a_col is not None else lse_col
    grid = (triton.cdiv(b, cfg.block_m), triton.cdiv(w, cfg.block_n))
    args, meta = grad_panel_args(X, Y, xt, s32, lse_row, lse_col, a_row, a_col, gx, gy, offset, p0, p1, spec, cfg,
                                 XP, YP)
    _clip_bwd_kernel[grid](*args, **meta)
    return gx[:, :w], (gy[:, :w] if gy is not None else gx[:, :w])


class TritonBackend:
    """Triton passes for ``fused.FusedGatheredLoss``.

    ``config=None`` picks the interpreter's small tiles, or on a GPU times ``candidates(...)`` once
    per shape (``tune=True``) or takes the first (``tune=False``)."""

    name = "triton"
    _tuned: dict = {}

    def __init__(self, config: TileConfig | None = None, tune: bool = True):
        self.config, self.tune = config, tune

    def _cfg(self, X, Y, XT, s32, spec, XP=None, YP=None, group=None) -> TileConfig:
        if self.config is not None:
            return self.config
        if INTERPRET or not X.is_cuda or not self.tune:
            return INTERPRETER_CONFIG if INTERPRET else candidates(spec.psd, spec.ecl, X.dtype, spec.psd_source)[0]
        # Every rank of the group reaches this with the same key at the same call (N is the
        # gathered size; the local b may differ in a ragged batch, so it is not in the key).
        key = (Y.shape[0], X.shape[1], X.dtype, spec.psd, spec.ecl, psd_src(spec), X.device.type)
        if key not in self._tuned:
            tiles = candidates(spec.psd, spec.ecl, X.dtype, spec.psd_source)
            self._tuned[key] = tiles[agree_on_tile(lambda: tiles.index(_time_candidates(X, Y, XT, s32, spec, XP, YP)),
                                                   group, X.device)]
        return self._tuned[key]

    @staticmethod
    def _like(T, X):
        """A teacher input in the student's dtype, contiguous (None stays None)."""
        return T.to(X.dtype).contiguous() if T is not None else None

    def stats(self, X, Y, XT, s32, spec, XP=None, YP=None, group=None):
        X, Y = X.contiguous(), Y.contiguous()
        XT, XP, YP = self._like(XT, X), self._like(XP, X), self._like(YP, X)
        self._last = self._cfg(X, Y, XT, s32, spec, XP, YP, group)
        return launch_forward(X, Y, XT, s32, spec, self._last, XP, YP)

    def panels(self, b, N, dtype, device, spec):
        return panel_buffers(b, N, dtype, device, spec, self._last)

    def grad_panel(self, X, Y, XT, s32, lse_row, lse_col, a_row, a_col, offset, p0, p1, spec,
                   bufs, XP=None, YP=None):
        XT, XP, YP = self._like(XT, X), self._like(XP, X), self._like(YP, X)
        return launch_grad_panel(X.contiguous(), Y.contiguous(), XT, s32, lse_row.contiguous(),
                                 lse_col.contiguous(), a_row, a_col, offset, p0, p1, spec, bufs,
                                 self._last, XP, YP)


def agree_on_tile(choose, group=None, device=None) -> int:
    """The index rank 0 of ``group`` picks with ``choose()`` (the timing), on every rank.

    Timings differ from GPU to GPU (clocks, neighbours, a straggler), so ranks timing for
    themselves can pick different tiles, and different tiles sum the statistics in different
    orders: the ranks' losses and gradients would differ in their last bits and runs would not
    reproduce. So one rank times and broadcasts its choice; the others wait at the broadcast
    (one integer, on the backend's device) instead of timing."""
    rank, world = world_info(group)
    if world == 1:
        return int(choose())
    pick = torch.tensor([int(choose()) if rank == 0 else -1], dtype=torch.long, device=comm_device(group, device))
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(pick, src=src, group=group)
    return int(pick.item())


def _time_candidates(X, Y, XT, s32, spec, XP=None, YP=None) -> TileConfig:
    """Pick the fastest forward tile config on this GPU (the backward kernel shares it)."""
    tiles = candidates(spec.psd, spec.ecl, X.dtype, spec.psd_source)
    best, best_ms = tiles[0], float("inf")
    for cfg in tiles:
        try:
            launch_forward(X, Y, XT, s32, spec, cfg, XP, YP)          # compile + warm up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                launch_forward(X, Y, XT, s32, spec, cfg, XP, YP)
            end.record()
            torch.cuda.synchronize(X.device)
            ms = start.elapsed_time(end)
        except UNRUNNABLE:   # a tile this GPU cannot run (shared memory, registers): skip it
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def clip_loss_triton(image_emb, text_emb, logit_scale, *, group=None,
                     workspace_bytes: int | None = None,
                     config: TileConfig | None = None) -> torch.Tensor:
    """``gathered_clip_loss(..., impl="triton")``: same value and gradients as the reference."""
    loss, _ = fused_loss(image_emb, text_emb, logit_scale, backend=TritonBackend(config),
                         spec=LossSpec(workspace_bytes=workspace_bytes), group=group)
    return loss


__all__ = ["TileConfig", "TritonBackend", "agree_on_tile", "candidates", "psd_src", "clip_loss_triton", "forward_bytes", "forward_args",
           "grad_panel_args", "launch_forward",
           "launch_grad_panel", "panel_buffers", "panel_width", "INTERPRET"]
