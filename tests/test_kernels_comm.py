"""Every torch.distributed collective in kernels/ gets tensors on the backend's device.

NCCL only moves CUDA tensors (a CPU tensor fails, or hangs a job, at the first collective);
this machine has no GPU and gloo accepts any CPU tensor, so a real 2-rank gloo run cannot tell
a misplaced tensor. Here one process pretends to be rank 0 of a 2-rank NCCL group:
``torch.distributed``'s group queries say so, its collectives are replaced by recorders of the
device of every tensor they are handed, and the tensors are FakeTensors (``FakeTensorMode``),
which carry a device - ``cuda:0`` included - and shapes but no storage, and raise on a device
mismatch as real tensors do. Fake tensors hold no values, so the all-reduce of the row counts
cannot produce them: ``gathered_layout`` is checked up to that collective, and the loss tests
substitute the row counts after recording it. The Triton backend shares these collectives
(fused.py) and only adds local kernels, which cannot run on fake tensors; real collectives with
values are in test_kernels_dist.py (gloo).
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels.gather as G
import kernels.reference as R
import kernels.spec as S
from kernels import gathered_clip_loss, gathered_distill_loss

CUDA0 = torch.device("cuda", 0)
COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_tensor")


class _SizesTaken(Exception):
    """Raised by the fake all-reduce of the row counts (fake tensors have no values)."""


class FakeGroup:
    """Rank ``rank`` of a ``world``-rank group whose backend config is ``config``."""

    def __init__(self, monkeypatch, config="cuda:nccl", rank=0, world=2):
        self.calls: list[tuple[str, torch.device]] = []
        name = config.split(":")[-1] if "," not in config else config
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: name)
        monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        for op in COLLECTIVES:
            monkeypatch.setattr(dist, op, self._recorder(op), raising=False)

    def _recorder(self, op):
        def collective(*tensors, **kwargs):
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    self.calls.append((op, t.device))
            if op == "all_reduce" and tensors[0].dtype == torch.long:
                raise _SizesTaken
        return collective

    def devices(self) -> set:
        return {d for _, d in self.calls}


@pytest.mark.parametrize("device", [None, "cpu", "cuda:0"])
def test_row_counts_travel_on_cuda_under_nccl(monkeypatch, device):
    """``gathered_layout`` builds its sizes tensor on the current CUDA device under NCCL,
    whatever device its caller names (None: the public default; cpu: CPU embeddings)."""
    group = FakeGroup(monkeypatch)
    with FakeTensorMode(), pytest.raises(_SizesTaken):
        G.gathered_layout(7, None, device=device)
    assert group.calls == [("all_reduce", CUDA0)]


def test_comm_device_per_backend(monkeypatch):
    cpu = torch.device("cpu")
    FakeGroup(monkeypatch, "cuda:nccl")
    assert [G.comm_device(None, d) for d in (None, "cpu", "cuda:0")] == [CUDA0, CUDA0, CUDA0]
    FakeGroup(monkeypatch, "cpu:gloo,cuda:gloo")   # gloo: CPU tensors (it gathers no CUDA ones)
    assert [G.comm_device(None, d) for d in (None, "cpu", "cuda:0")] == [cpu, cpu, cpu]
    FakeGroup(monkeypatch, "cpu:gloo,cuda:nccl")   # a mixed default group: each its own
    assert [G.comm_device(None, d) for d in (None, "cpu", "cuda:0")] == [CUDA0, cpu, CUDA0]
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert G.comm_device(None, "cpu") == cpu and G.comm_device(None, None) == cpu


def _loss(impl: str, kind: str, device: str, b: int = 6, dim: int = 8, backward: bool = True):
    x = F.normalize(torch.randn(b, dim), dim=1).to(device).requires_grad_()
    y = F.normalize(torch.randn(b, dim), dim=1).to(device).requires_grad_()
    s = torch.tensor(14.0, device=device, requires_grad=True)
    if kind == "clip":
        loss = gathered_clip_loss(x, y, s, impl=impl)
    else:
        xt = F.normalize(torch.randn(b, dim), dim=1).to(device)
        loss = gathered_distill_loss(x, y, s, self_distill_alpha=0.3, teacher_image_emb=xt,
                                     impl=impl).loss
    if not backward:
        return loss, ()
    loss.backward()
    return loss, (x.grad, y.grad, s.grad)


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
@pytest.mark.parametrize("kind", ["clip", "distill"])
@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("ragged", [False, True], ids=["uniform", "ragged"])
def test_loss_collectives_on_cuda_under_nccl(monkeypatch, impl, kind, device, ragged):
    """The row counts, the gathers, the column statistics' all-reduces and the gather's
    backward (reduce-scatter, or all-reduce when ragged) all get CUDA tensors, with CUDA
    embeddings and with CPU ones (which get their loss and gradients back on the CPU).

    The autograd engine cannot run a backward from a fake CUDA tensor without a CUDA device, so
    CUDA embeddings are checked through the forward; the backward's collectives (on the
    communication device either way) are checked with CPU embeddings."""
    group = FakeGroup(monkeypatch)
    b, sizes = 6, [6, 5] if ragged else [6, 6]
    real = G.gathered_layout

    def layout(local_rows, grp=None, device=None, **known):
        assert known.get("sizes") is None  # the loss was not told the sizes: they must be exchanged
        with pytest.raises(_SizesTaken):
            real(local_rows, grp, device=device)      # records the row counts' device
        return 0, sizes                               # what the all-reduce would have given
    for mod in (G, R, S):
        monkeypatch.setattr(mod, "gathered_layout", layout)
    backward = device == "cpu"
    with FakeTensorMode(allow_non_fake_inputs=True):
        loss, grads = _loss(impl, kind, device, b=b, backward=backward)
    ops = {op for op, _ in group.calls}
    assert {"all_reduce"} < ops and ops & {"all_gather_single", "all_gather_into_tensor"}, ops
    if backward:
        assert ("reduce_scatter_tensor" in ops) != ragged, ops
    assert group.devices() == {CUDA0}, group.calls
    assert {loss.device, *(g.device for g in grads)} == {torch.device(device)}
