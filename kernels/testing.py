"""Test helpers for the loss kernels (used by tests/test_kernels*.py; importable by spawned ranks).

    batch = make_batch(n=14, dim=24, seed=0)
    full = run_case(batch, slice(0, 14), "torch", "clip")          # one process, whole batch
    ranks = spawn_ranks([7, 7], batch_args, cases)                 # gloo ranks on CPU
    assert rel_err(mean_over_ranks, full["loss"]) < 1e-5
    meter = AllocationMeter(); launch = meter.wrap(launch)         # tensor bytes it allocates

A case embeds raw features through a *shared* projection ``P`` (a stand-in for the towers), so
"parameter gradients averaged over ranks equal the full-batch gradient" is checked on a real
parameter, next to the per-sample feature gradients and the logit scale's gradient.
"""
from __future__ import annotations

import functools
import os
import sys
import tempfile
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import gathered_clip_loss, gathered_distill_loss


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """``max|a - b| / max(max|b|, floor)`` in fp64 (b is the reference; ``floor`` turns it
    into an absolute error where the reference is ~0, e.g. every gradient at b = 1)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def make_batch(n: int, dim: int, seed: int = 0, scale: float = 14.0, near_identical: bool = False,
               mask_rate: float = 0.5) -> dict:
    """A global batch of raw features, the shared projection, a scale and a subset mask."""
    g = torch.Generator().manual_seed(seed)
    fx, fy, fxt = (torch.randn(n, dim, generator=g) for _ in range(3))
    if near_identical:   # every pair almost the same direction: logits all ~ scale
        base = torch.randn(1, dim, generator=g)
        fx, fy, fxt = (base + 1e-3 * f for f in (fx, fy, fxt))
    out = {"fx": fx, "fy": fy, "fxt": fxt,
           "proj": torch.eye(dim) + 0.1 * torch.randn(dim, dim, generator=g),
           "scale": torch.tensor(float(scale)),
           "mask": torch.rand(n, generator=g) < mask_rate}
    # the self-distillation teacher's own features, drawn last (the draws above stay as they were)
    fxp, fyp = (torch.randn(n, dim, generator=g) for _ in range(2))
    if near_identical:
        fxp, fyp = (base + 1e-3 * f for f in (fxp, fyp))
    return {**out, "fxp": fxp, "fyp": fyp}


DISTILL_KW = {"self_distill_alpha": 0.3, "self_distill_tau": 0.7, "teacher_weight": 0.8}
# Self-distillation from teacher embeddings (run_case kinds): its own images and texts, its own
# images with the student's texts (shared text tower), both beside the momentum teacher, and
# the momentum teacher's very image tensor (the kernels reuse its logits T).
TEACHER_KINDS = ("psd_teacher", "psd_teacher_shared", "distill_psd_teacher", "distill_psd_ecl")


def run_case(batch: dict, rows: slice, impl: str, kind: str, *, group=None,
             dtype=torch.float32, grad_output: float = 1.0, workspace_bytes: int | None = None,
             **overrides) -> dict:
    """Forward + backward of one loss on ``rows`` of ``batch``; returns values and gradients.

    ``kind``: ``clip``, ``self_distill``, ``teacher`` (momentum teacher only), ``distill`` (both)
    or one of ``TEACHER_KINDS``."""
    fx = batch["fx"][rows].clone().requires_grad_()
    fy = batch["fy"][rows].clone().requires_grad_()
    proj = batch["proj"].clone().requires_grad_()
    scale = batch["scale"].clone().requires_grad_()
    x = F.normalize(fx @ proj, dim=1).to(dtype)
    y = F.normalize(fy @ proj, dim=1).to(dtype)
    ws = {} if workspace_bytes is None else {"workspace_bytes": workspace_bytes}
    if kind == "clip":
        loss = gathered_clip_loss(x, y, scale, group=group, impl=impl, **ws)
        terms = loss.detach()[None]
    else:
        def teacher(key):   # no grad: the projection as it is, not the tracked copy
            return F.normalize(batch[key][rows] @ batch["proj"], dim=1).to(dtype)
        kw = dict(DISTILL_KW, self_distill_mask=batch["mask"][rows], teacher_image_emb=teacher("fxt"))
        if kind in ("self_distill", "psd_teacher", "psd_teacher_shared"):
            kw.pop("teacher_image_emb")
        elif kind == "teacher":
            kw.pop("self_distill_alpha")
        if kind in ("psd_teacher", "psd_teacher_shared", "distill_psd_teacher"):
            kw["self_distill_teacher_image"] = teacher("fxp")
        if kind in ("psd_teacher", "distill_psd_teacher"):
            kw["self_distill_teacher_text"] = teacher("fyp")
        if kind == "distill_psd_ecl":
            kw["self_distill_teacher_image"] = kw["teacher_image_emb"]   # the same tensor
        kw.update(overrides)
        out = gathered_distill_loss(x, y, scale, group=group, impl=impl, **ws, **kw)
        loss, terms = out.loss, torch.stack([t.detach().float() for t in out])
    (loss.float() * grad_output).backward()
    return {"loss": loss.detach().float(), "terms": terms.float(), "fx": fx.grad, "fy": fy.grad,
            "proj": proj.grad, "scale": scale.grad}


class AllocationMeter:
    """Bytes of tensor storage that torch ops allocate inside ``wrap``-ped functions: how many
    are alive now (``live``) and at most (``peak``), however long they live after the call.

        meter = AllocationMeter()
        launch = meter.wrap(launch_forward)    # every storage a torch op creates inside it
        launch(...); assert meter.peak <= budget

    A ``TorchDispatchMode`` sees every aten op, factory functions included; an output whose
    storage was not among the op's inputs (tensors or storages: views, in-place ops and
    ``set_`` share them) is a new allocation, counted until the storage is freed (a weakref
    finalizer). Not seen: memory an op uses internally and frees before returning, and
    memory that is not a torch tensor (the Triton interpreter's numpy tiles: registers and
    shared memory on a GPU)."""

    def __init__(self):
        self.live = self.peak = self.allocations = 0
        self._sizes: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def _mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        meter = self

        def storage(x):
            if isinstance(x, torch.Tensor):
                return x.untyped_storage()
            if isinstance(x, torch.TypedStorage):
                return x._untyped_storage
            return x if isinstance(x, torch.UntypedStorage) else None

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                old = {id(s) for s in map(storage, tree_leaves((args, kwargs))) if s is not None}
                out = func(*args, **kwargs)
                for s in map(storage, tree_leaves(out)):
                    if s is None or id(s) in old or id(s) in meter._sizes or s.nbytes() == 0:
                        continue
                    old.add(id(s))
                    meter._sizes[id(s)] = s.nbytes()
                    weakref.finalize(s, meter._free, id(s))
                    meter.live += s.nbytes()
                    meter.allocations += 1
                    meter.peak = max(meter.peak, meter.live)
                return out
        return _Mode()

    def wrap(self, fn):
        """``fn`` with every torch op inside it metered."""
        @functools.wraps(fn)
        def metered(*args, **kwargs):
            with self._mode():
                return fn(*args, **kwargs)
        return metered


def _rank_main(rank: int, world: int, outdir: str, sizes: list, batch: dict,
               cases: list, interpret: bool) -> None:
    if interpret:   # before kernels.triton_launch is imported in this fresh process
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    # a file store in the run's own directory: no port to pick and race for
    dist.init_process_group("gloo", init_method=f"file://{outdir}/store", rank=rank, world_size=world)
    try:
        lo = sum(sizes[:rank])
        rows = slice(lo, lo + sizes[rank])
        results = {name: run_case(batch, rows, **case) for name, case in cases}
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        import traceback
        traceback.print_exc()
        os._exit(1)
    dist.destroy_process_group()
    # No interpreter finalization after gloo: a gloo thread that wants the GIL then aborts the
    # process (SIGABRT) after the results are written (trainer.dist.exit_process says more).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(sizes: list, batch: dict, cases: list, interpret: bool = False) -> list[dict]:
    """Run named ``cases`` (``[(name, run_case kwargs), ...]``) on ``len(sizes)`` gloo ranks;
    rank r holds ``sizes[r]`` rows of ``batch``. Returns each rank's results."""
    import torch.multiprocessing as mp
    world = len(sizes)
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_rank_main, args=(world, outdir, list(sizes), batch, cases, interpret),
                           nprocs=world, start_method="spawn")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_rss(impl: str, n: int, dim: int, *, kind: str = "clip", backward: bool = True,
                   threads: int = 2) -> dict:
    """Peak resident memory above the inputs for one forward (+ backward), in this process.

    Method: make the inputs, reset the kernel's high-water mark (``echo 5 >
    /proc/self/clear_refs`` sets VmHWM to the current RSS), run, read VmHWM. Extra = VmHWM -
    RSS before the call, which counts every page the loss touched (logits, workspace,
    gradients). Run it in a fresh process (``python -m kernels.testing rss IMPL N D``) so that
    nothing else shares the high-water mark. Where clear_refs is not writable, the high-water
    mark of the fresh process is used as is (an over-estimate of the extra, never an under-).
    Set ``MALLOC_MMAP_THRESHOLD_`` in that process's environment to measure live memory rather
    than glibc's heap caching (its dynamic mmap threshold otherwise keeps freed blocks of up to
    32 MiB resident)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, dim, generator=g), dim=1).requires_grad_()
    y = F.normalize(torch.randn(n, dim, generator=g), dim=1).requires_grad_()
    xt = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    s = torch.tensor(14.0, requires_grad=True)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = _rss_kib("VmRSS")
    if kind == "clip":
        loss = gathered_clip_loss(x, y, s, impl=impl)
    else:
        loss = gathered_distill_loss(x, y, s, self_distill_alpha=0.3, teacher_image_emb=xt,
                                     impl=impl).loss
    if backward:
        loss.backward()
    return {"impl": impl, "n": n, "dim": dim, "kind": kind, "backward": backward, "hwm_reset": reset,
            "extra_bytes": (_rss_kib("VmHWM") - base) * 1024, "loss": loss.item()}


if __name__ == "__main__":   # python -m kernels.testing rss IMPL N D [clip|distill] [fwd]
    import json
    import sys
    if len(sys.argv) >= 5 and sys.argv[1] == "rss":
        print(json.dumps(peak_extra_rss(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                        kind=sys.argv[5] if len(sys.argv) > 5 else "clip",
                                        backward="fwd" not in sys.argv[6:])))
    else:
        raise SystemExit("usage: python -m kernels.testing rss IMPL N D [clip|distill] [fwd]")
