"""All-gather with gradients, the collective under every gathered contrastive loss.

Forward: each rank contributes its local rows ``[b_r, D]`` and receives all ranks' rows
``[N, D]`` (``N = sum_r b_r``; ragged batches allowed). Backward: the gradient of the gathered
tensor is summed over ranks and each rank keeps the slice for its own rows. That is a
reduce-scatter SUM; gloo has no reduce-scatter, so there it is an all-reduce SUM and a slice.

    >>> rows = all_gather_with_grad(local_emb, group)   # [N, D], differentiable
    >>> offset, sizes = gathered_layout(local_emb.shape[0], group)

Half-precision gradients are summed in fp32 by default (``set_grad_reduce_dtype``): a ring
reduce-scatter adds one rank's contribution per hop, and in bf16 each hop rounds to 8 bits of
mantissa, so small contributions next to a large one vanish. The sum is cast back to the
embeddings' dtype once, at the end.

Every collective here (and in stats.py) hands the backend tensors on its communication device
(``comm_device``): NCCL only moves CUDA tensors, gloo is used with CPU tensors. Inputs on another
device are copied there and the results come back to the input's device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


_GRAD_REDUCE_DTYPE: torch.dtype | None = torch.float32


def set_grad_reduce_dtype(dtype: torch.dtype | None) -> None:
    """The dtype the gather's backward sums gradients over ranks in, when theirs is narrower
    (default fp32); None sums in the gradients' own dtype."""
    global _GRAD_REDUCE_DTYPE
    _GRAD_REDUCE_DTYPE = dtype


def _reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    want = _GRAD_REDUCE_DTYPE
    if want is None or torch.finfo(dtype).bits >= torch.finfo(want).bits:
        return dtype
    return want


def world_info(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when no process group is running."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _device_backends(group=None) -> dict[str, str]:
    """Device type -> backend name of ``group``: ``{"cuda": "nccl"}``, ``{"cpu": "gloo",
    "cuda": "gloo"}``, ``{"cpu": "gloo", "cuda": "nccl"}`` (a mixed default group), ..."""
    cfg = (dist.get_backend_config(group) if hasattr(dist, "get_backend_config")
           else dist.get_backend(group))
    cfg = str(cfg).lower()
    if ":" in cfg:
        return dict(part.split(":", 1) for part in cfg.split(",") if ":" in part)
    # a bare name (older torch): the device types that name is the default backend for
    types = [d for d, b in dist.Backend.default_device_backend_map.items() if b == cfg]
    return {d: cfg for d in types or ["cpu"]}


def comm_device(group=None, like=None) -> torch.device:
    """The device a collective's tensors must live on for ``group``'s backend.

    ``like`` (the input's device) when the backend moves that device's tensors itself (CUDA
    under NCCL, CPU under gloo); otherwise the backend's device: the current CUDA device under
    NCCL (also for CPU inputs, or no ``like``), the CPU under gloo (also for CUDA inputs, which
    gloo does not gather). Without a process group: ``like`` (or the CPU)."""
    like = torch.device(like) if like is not None else None
    if not (dist.is_available() and dist.is_initialized()):
        return like or torch.device("cpu")
    backends = _device_backends(group)
    if like is not None and like.type != "cpu" and backends.get(like.type, "gloo") != "gloo":
        return like
    if like is not None and like.type == "cpu" and "cpu" in backends:
        return like
    for dev, name in backends.items():
        if dev != "cpu" and name != "gloo":
            return torch.device(dev, getattr(torch, dev).current_device())
    return torch.device("cpu")


def _backend_name(group, device: torch.device) -> str:
    """The backend that moves ``device``'s tensors in ``group`` (e.g. gloo, nccl)."""
    backends = _device_backends(group)
    return backends.get(device.type, next(iter(backends.values())))


def gathered_layout(local_rows: int, group=None, device=None, sizes=None) -> tuple[int, list[int]]:
    """This rank's row offset in the gathered tensor and every rank's row count.

    The row counts travel in a tensor on ``comm_device(group, device)`` (``device``: the
    embeddings' device; None picks the backend's device). A caller that knows every rank's
    count (a trainer whose micro-batches all have the same size) passes ``sizes`` and saves
    that all-reduce and its host sync; they are checked against this rank's rows."""
    rank, world = world_info(group)
    if sizes is not None:
        sizes = [int(n) for n in sizes]
        if len(sizes) != world or sizes[rank] != local_rows:
            raise ValueError(f"sizes={sizes} do not describe this group: world {world}, rank {rank} "
                             f"has {local_rows} rows")
        return sum(sizes[:rank]), sizes
    if world == 1:
        return 0, [local_rows]
    sizes = torch.zeros(world, dtype=torch.long, device=comm_device(group, device))
    sizes[rank] = local_rows
    dist.all_reduce(sizes, group=group)
    sizes = sizes.tolist()
    return sum(sizes[:rank]), sizes


def _all_gather_flat(out: torch.Tensor, local: torch.Tensor, group) -> None:
    # torch 2.14 renamed all_gather_into_tensor (now a deprecation warning on every call).
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, local, group=group)
    else:
        dist.all_gather_into_tensor(out, local, group=group)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, group, sizes: list[int]):
        rank, world = world_info(group)
        comm = comm_device(group, local.device)
        ctx.group, ctx.sizes, ctx.rank, ctx.comm, ctx.home = group, sizes, rank, comm, local.device
        max_rows = max(sizes)
        rest = tuple(local.shape[1:])
        padded = torch.zeros((max_rows,) + rest, dtype=local.dtype, device=comm)
        padded[: local.shape[0]] = local
        out = torch.empty((world * max_rows,) + rest, dtype=local.dtype, device=comm)
        _all_gather_flat(out, padded, group)
        if not all(s == max_rows for s in sizes):
            out = torch.cat([out[r * max_rows: r * max_rows + s] for r, s in enumerate(sizes)])
        return out.to(local.device)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        home_dtype = grad_out.dtype
        grad_out = grad_out.to(ctx.comm, _reduce_dtype(home_dtype)).contiguous()
        offset = sum(ctx.sizes[: ctx.rank])
        rows = ctx.sizes[ctx.rank]
        uniform = all(s == rows for s in ctx.sizes)
        if uniform and _backend_name(ctx.group, ctx.comm) != "gloo":   # gloo: no reduce-scatter
            grad_local = grad_out.new_empty((rows,) + tuple(grad_out.shape[1:]))
            dist.reduce_scatter_tensor(grad_local, grad_out, op=dist.ReduceOp.SUM, group=ctx.group)
            return grad_local.to(ctx.home, home_dtype), None, None
        dist.all_reduce(grad_out, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_out[offset: offset + rows].to(ctx.home, home_dtype, copy=True), None, None


def all_gather_with_grad(local: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows in rank order, keeping the autograd graph."""
    _, world = world_info(group)
    if world == 1:
        return local
    if sizes is None:
        _, sizes = gathered_layout(local.shape[0], group, device=local.device)
    return _AllGatherWithGrad.apply(local, group, sizes)
