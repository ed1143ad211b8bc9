"""Host syncs of the training step, counted for ``bench train --profile``.

A host sync is a point where Python needs a tensor's value (``.item()``, ``bool(t)``,
``.tolist()``, ``.cpu()``, a boolean-mask index, ...): on a GPU it waits for every kernel queued
before it, so the queue drains and the device idles until the host has launched the next work.

    syncs = HostSyncs(device)
    syncs.install()           # before the step's code runs (wraps torch.Tensor's methods)
    syncs.active = True       # count from here (the timed steps)
    ...
    syncs.active = False
    syncs.gather(world, steps)   # {"per_step": ..., "by_caller": {"trainer/train.py:train_step": ...}, ...}

Two counts:

- ``per_step`` (every device): calls of the host-read methods in :data:`READS` and boolean-mask
  indexing made by the rank's main process while active, booked by the calling function. On CPU
  every tensor is a host tensor, so this counts what would be a sync if the tensor lived on the
  GPU; a read of a tensor that is on the host in a GPU run as well (a data-loader batch) is
  counted too: the caller column says which is which.
- ``cuda_per_step`` (GPUs only): the synchronizing CUDA calls that
  ``torch.cuda.set_sync_debug_mode("warn")`` reports (its warnings are counted, not shown);
  the benchmark's own ``torch.cuda.synchronize`` at each phase mark is not one of them.
"""
from __future__ import annotations

import os
import sys
import warnings
from collections import Counter

from ..dist import all_gather_object

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "nonzero")
_WRAPPERS = ("timed", "read", "index")
_ROOTS = ("trainer", "kernels", "deepspeed", "torch", "transformers")


class HostSyncs:
    """Counts the host reads of tensors while ``active`` (see the module doc)."""

    def __init__(self, device):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.active = False
        self.by_caller: Counter = Counter()
        self.cuda_warnings = 0
        self._depth = 0   # a read inside a read (``.cpu().numpy()`` is two; ``float()`` calling ``item`` is one)

    def install(self) -> None:
        import torch

        for name in READS:
            setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        getitem = torch.Tensor.__getitem__

        def index(t, idx):
            if self.active and _bool_mask(idx):
                self._book(sys._getframe(1), "bool-mask index")
            return getitem(t, idx)
        torch.Tensor.__getitem__ = index
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")
            show = warnings.showwarning

            def count(message, category, filename, lineno, file=None, line=None):
                if "synchronizing CUDA operation" in str(message):
                    self.cuda_warnings += self.active
                    return None
                return show(message, category, filename, lineno, file, line)
            warnings.showwarning = count
            warnings.filterwarnings("always", message=".*synchronizing CUDA operation.*")

    def _wrap(self, fn, name: str):
        def read(*args, **kwargs):
            if self.active and not self._depth:
                self._book(sys._getframe(1), name)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        read.__name__ = getattr(fn, "__name__", name)
        return read

    def _book(self, frame, what: str) -> None:
        # past the benchmark's own wrappers (bench_train's Suspects times some of these calls)
        while frame.f_back is not None and frame.f_code.co_name in _WRAPPERS and \
                os.path.dirname(frame.f_code.co_filename) == os.path.dirname(__file__):
            frame = frame.f_back
        self.by_caller[f"{_where(frame)} {what}"] += 1

    def gather(self, world: int, steps: int) -> dict:
        """Per step, mean over ranks: the total, the CUDA-reported count (GPU) and each caller's."""
        everyone = all_gather_object({"by_caller": dict(self.by_caller), "cuda": self.cuda_warnings})
        callers: Counter = Counter()
        for r in everyone:
            callers.update(r["by_caller"])
        by_caller = {k: v / world / steps for k, v in sorted(callers.items(), key=lambda kv: (-kv[1], kv[0]))}
        out = {"per_step": sum(callers.values()) / world / steps, "by_caller": by_caller,
               "by_package": _by_package(by_caller)}
        if self.cuda:
            out["cuda_per_step"] = sum(r["cuda"] for r in everyone) / world / steps
        return out


def _bool_mask(idx) -> bool:
    import torch

    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _where(frame) -> str:
    """``package/relative/path.py:function`` of the caller (site-packages stripped)."""
    path = frame.f_code.co_filename
    parts = path.replace(os.sep, "/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _ROOTS:
            path = "/".join(parts[i:])
            break
    return f"{path}:{frame.f_code.co_name}"


def _by_package(by_caller: dict) -> dict:
    out: Counter = Counter()
    for k, v in by_caller.items():
        head = k.split("/", 1)[0]
        out[head if head in _ROOTS else "other"] += v
    return dict(out)
