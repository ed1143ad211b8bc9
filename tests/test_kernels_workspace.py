"""The workspace log stays bounded, and the allocation meter the Triton workspace tests rely on
counts what it should (tests/test_kernels_triton.py uses both under the interpreter)."""
import gc

import torch

from kernels.fused import WorkspaceLog
from kernels.testing import AllocationMeter


def test_workspace_log_is_bounded():
    """A training run launches twice per step for as long as it runs: the log keeps the last
    few launches, the count and the largest launch, not a record per buffer."""
    log = WorkspaceLog()
    for step in range(10_000):
        phase = log.phase("forward")
        log.alloc(phase, (4,), torch.float32, "cpu")
        log.note(phase, 16 + step % 3)
        log.alloc(log.phase("backward"), (2, 3), torch.float32, "cpu")
    assert len(log.records) <= 8, len(log.records)
    assert log.launches == 20_000
    assert log.peak_bytes() == 16 + 16 + 2
    assert list(log.records)[-1] == ["backward:20000", 24]
    log.reset()
    assert log.peak_bytes() == 0 and not log.records


def test_allocation_meter_counts_live_storages():
    meter = AllocationMeter()

    def work():
        a = torch.empty(100)                  # 400 B
        b = a[10:].view(9, 10)                # a view: nothing new
        a.mul_(2.0)                           # in place: nothing new
        c = torch.exp(b)                      # 360 B
        del a, b                              # the storage lives on in nothing: freed
        return c

    c = meter.wrap(work)()
    assert meter.allocations == 2 and meter.peak == 760, (meter.allocations, meter.peak)
    assert meter.live == 360
    del c
    gc.collect()
    assert meter.live == 0
    meter.wrap(lambda: torch.zeros(10, dtype=torch.float64))()   # freed on return
    assert (meter.live, meter.peak, meter.allocations) == (0, 760, 3)
    meter.reset_peak()
    assert meter.peak == 0
    x = torch.ones(8)
    meter.wrap(lambda t: t.add_(1))(x)        # an input, changed in place: not an allocation
    assert meter.allocations == 3
