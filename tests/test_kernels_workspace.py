"""The workspace log stays bounded."""
import torch

from kernels.fused import WorkspaceLog


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
