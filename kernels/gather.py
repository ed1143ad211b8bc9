"""All-gather with gradients, the collective under every gathered contrastive loss.

Forward: each rank contributes its local rows ``[b_r, D]`` and receives all ranks' rows
``[N, D]`` (``N = sum_r b_r``; ragged batches allowed). Backward: the gradient of the gathered
tensor is summed over ranks and each rank keeps the slice for its own rows. That is a
reduce-scatter SUM; gloo has no reduce-scatter, so there it is an all-reduce SUM and a slice.

    >>> rows = all_gather_with_grad(local_emb, group)   # [N, D], differentiable
    >>> offset, sizes = gathered_layout(local_emb.shape[0], group)
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_info(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when no process group is running."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gathered_layout(local_rows: int, group=None, device=None) -> tuple[int, list[int]]:
    """This rank's row offset in the gathered tensor and every rank's row count."""
    rank, world = world_info(group)
    if world == 1:
        return 0, [local_rows]
    sizes = torch.zeros(world, dtype=torch.long, device=device)
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
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        max_rows = max(sizes)
        padded = local.new_zeros((max_rows,) + tuple(local.shape[1:]))
        padded[: local.shape[0]] = local
        out = local.new_empty((world * max_rows,) + tuple(local.shape[1:]))
        _all_gather_flat(out, padded.contiguous(), group)
        if all(s == max_rows for s in sizes):
            return out
        return torch.cat([out[r * max_rows: r * max_rows + s] for r, s in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_out = grad_out.contiguous()
        offset = sum(ctx.sizes[: ctx.rank])
        rows = ctx.sizes[ctx.rank]
        uniform = all(s == rows for s in ctx.sizes)
        if uniform and dist.get_backend(ctx.group) != "gloo":
            grad_local = grad_out.new_empty((rows,) + tuple(grad_out.shape[1:]))
            dist.reduce_scatter_tensor(grad_local, grad_out, op=dist.ReduceOp.SUM, group=ctx.group)
            return grad_local, None, None
        dist.all_reduce(grad_out, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_out[offset: offset + rows].clone(), None, None


def all_gather_with_grad(local: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows in rank order, keeping the autograd graph."""
    _, world = world_info(group)
    if world == 1:
        return local
    if sizes is None:
        _, sizes = gathered_layout(local.shape[0], group, device=local.device)
    return _AllGatherWithGrad.apply(local, group, sizes)
