"""The Triton tile tuner decides once, on rank 0 of the loss's group, and every rank runs its pick.

Ranks that timed for themselves could pick different tiles (GPU timings differ from card to
card), and different tiles sum the loss statistics in different orders: the ranks would compute
slightly different losses and gradients and runs would not reproduce. ``agree_on_tile`` runs the
timing on rank 0 only and broadcasts the chosen index.
"""
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _fake_group(monkeypatch, rank: int, world: int, sent: list, arrives: int):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cpu:gloo")

    def broadcast(t, src, group=None):
        sent.append((rank, int(t.item()), src))
        if rank != src:
            t.fill_(arrives)
    monkeypatch.setattr(dist, "broadcast", broadcast)


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_times_and_every_rank_takes_its_pick(monkeypatch, rank):
    from kernels.triton_launch import agree_on_tile
    sent, timed = [], []
    _fake_group(monkeypatch, rank, 2, sent, arrives=2)

    def time_here():
        timed.append(rank)
        return 2 if rank == 0 else 0
    assert agree_on_tile(time_here) == 2
    assert timed == ([0] if rank == 0 else [])          # rank 1 waits at the broadcast instead
    assert sent == [(rank, 2 if rank == 0 else -1, 0)]


def test_a_single_process_times_without_a_collective(monkeypatch):
    from kernels.triton_launch import agree_on_tile
    monkeypatch.setattr(dist, "broadcast", lambda *a, **k: pytest.fail("no collective without a group"))
    assert agree_on_tile(lambda: 1) == 1


def _rank(rank: int, world: int, tmp: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"   # before kernels.triton_launch is imported here
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    from kernels.triton_launch import INTERPRET, agree_on_tile
    timed = []

    def time_here():
        timed.append(rank)
        return rank + 1       # every rank would pick another tile
    picks = [agree_on_tile(time_here) for _ in range(3)]
    torch.save({"picks": picks, "timed": timed, "interpret": INTERPRET}, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)   # no interpreter finalisation after gloo (see kernels/testing.py)


@pytest.mark.full   # two spawned processes importing Triton: 40 s on 2 cores at load 20
def test_two_gloo_ranks_under_the_interpreter_run_rank_0s_tile():
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, tmp), nprocs=world, start_method="spawn")
        got = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    assert all(g["interpret"] for g in got)
    assert [g["picks"] for g in got] == [[1, 1, 1], [1, 1, 1]]
    assert got[0]["timed"] == [0, 0, 0] and got[1]["timed"] == []
