"""Checkpoint durability without a process group: every rank's trainer state is on disk (data
fsync'd, then renamed, then the directory fsync'd) before `latest` names the checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import torch


class _Engine:
    """What CheckpointManager.save needs of a DeepSpeed engine: it writes one file."""

    def save_checkpoint(self, root, tag, save_latest):
        assert save_latest is False
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")


def test_trainer_state_is_durable_before_latest_names_the_checkpoint(tmp_path, monkeypatch):
    import trainer.checkpoint as C

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(C.os, "fsync", fsync)
    monkeypatch.setattr(C.os, "replace", replace)
    root = tmp_path / "checkpoints"
    mgr = C.CheckpointManager(root, keep_last=2)
    state = {"step": 7, "data": {"epoch": 0}}
    assert mgr.save(_Engine(), 7, state, "seed: 0\n") == "step_7"

    rank_file = str(root / "step_7" / "trainer_state" / "rank_0.pt")
    latest = str(root / "latest")
    at = {e: i for i, e in reversed(list(enumerate(events)))}   # first index of each event
    assert ("fsync", rank_file + ".tmp") in at                  # the data, before its rename
    assert at[("fsync", rank_file + ".tmp")] < at[("replace", rank_file)]
    assert at[("replace", rank_file)] < at[("fsync", str(root / "step_7" / "trainer_state"))]
    # `latest` is renamed into place last, after the state file, its directory and config.yaml
    assert max(at[("fsync", str(root / "step_7" / "trainer_state"))],
               at[("replace", str(root / "step_7" / "config.yaml"))]) < at[("replace", latest)]
    assert events[-1] == ("fsync", str(root)) and (root / "latest").read_text() == "step_7"
    assert torch.load(rank_file, weights_only=False) == state
