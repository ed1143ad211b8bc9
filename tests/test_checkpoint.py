"""Checkpoint durability without a process group: every rank's trainer state is on disk (data
fsync'd, then renamed, then the directory fsync'd) before `latest` names the checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
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


class _ShardEngine:
    """Writes what DeepSpeed's ZeRO-1 writes for rank 0 of 2: the model states and its optimizer
    shard (torch.save zip archives); rank 1's shard too, as if rank 1 had written it."""

    def save_checkpoint(self, root, tag, save_latest):
        where = Path(root) / tag
        where.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.arange(4.0)}, where / "mp_rank_00_model_states.pt")
        for r in (0, 1):
            torch.save({"m": torch.full((1000,), float(r))}, where / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


def test_deepspeed_shards_are_fsynced_before_latest(tmp_path, monkeypatch):
    import trainer.checkpoint as C

    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(C.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(C.os, "replace", lambda src, dst: (synced.append(f"replace {dst}"), real_replace(src, dst)))
    root = tmp_path / "checkpoints"
    C.CheckpointManager(root).save(_ShardEngine(), 3, {"step": 3}, "seed: 0\n")
    latest = synced.index(f"replace {root / 'latest'}")
    tag = root / "step_3"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        assert synced.index(str(tag / name)) < latest
    assert str(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt") not in synced   # rank 1's to sync
    assert synced.index(str(tag)) < latest
    assert [p.name for p in C.own_files(tag, 1)] == ["zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, caplog):
    import trainer.checkpoint as C

    root = tmp_path / "checkpoints"
    mgr = C.CheckpointManager(root, keep_last=3)
    for step in (4, 8, 12):
        mgr.save(_ShardEngine(), step, {"step": step}, "seed: 0\n")
    shard = root / "step_12" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])        # a copy cut short
    flipped = root / "step_8" / "mp_rank_00_model_states.pt"
    data = bytearray(flipped.read_bytes())
    at = data.index(torch.arange(4.0).numpy().tobytes())                      # inside the tensor's bytes
    data[at + 5] ^= 0xFF                                                      # one flipped byte: CRC
    flipped.write_bytes(bytes(data))
    assert C.unreadable(root / "step_4" / "mp_rank_00_model_states.pt") is None
    assert "CRC" in C.unreadable(flipped) and "central directory" in C.unreadable(shard)
    with caplog.at_level("WARNING", logger="trainer"):
        assert mgr.readable_tag("step_12") == "step_4"
    text = caplog.text
    assert f"{shard}: RuntimeError" in text and f"{flipped}: member" in text
    assert f"newest checkpoint {root / 'step_12'} is unreadable" in text and f"checkpoint {root / 'step_4'}" in text
    assert mgr.readable_tag("step_4") == "step_4"
    # a file of another rank's is that rank's to check: this rank (0) reads past it
    (root / "step_4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert mgr.readable_tag("step_4") == "step_4"
    (root / "step_4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(RuntimeError, match="no older complete checkpoint of this run is readable"):
        mgr.readable_tag("step_12")
