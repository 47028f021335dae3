"""torch.distributed set-up that also works on CPU (gloo), for one process and under torchrun.

LAVIS's ``init_distributed_mode`` hard-codes nccl and ``torch.cuda.set_device``; this one picks gloo on
CPU and nccl on GPU, reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and does
nothing in a plain single process.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: str = "auto", timeout_s: int = 7200, init_method: str = "env://") -> bool:
    """Initialise the default process group from torchrun's env vars; True if distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, init_method=init_method, timeout=datetime.timedelta(seconds=timeout_s),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return True


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalar values over ranks (identity in one process)."""
    if not is_initialized() or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= world_size()
    return {k: float(v) for k, v in zip(keys, tensor.tolist())}


def broadcast_object(obj):
    """``obj`` from rank 0 on every rank."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shard_indices(length: int) -> list[int]:
    """This rank's share of ``range(length)`` (every world_size-th item, starting at the rank)."""
    return list(range(rank(), length, world_size()))


def gather_sharded(local_items: list) -> list:
    """Per-item results of every rank's :func:`shard_indices` share, back in global order, on every rank."""
    if not is_initialized() or world_size() == 1:
        return list(local_items)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, list(local_items))
    merged: list = [None] * sum(len(part) for part in parts)
    for part_rank, part in enumerate(parts):
        merged[part_rank::world_size()] = part
    return merged


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the summed gradient of its own slice.

    Every rank's loss may use every rank's features; summing the gradients of a slice over ranks
    (all-reduce) and keeping the local one gives, after DDP averages parameter gradients, exactly the
    gradient of the mean loss over ranks, i.e. of one process on the concatenated batch.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.local_size = tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = rank() * ctx.local_size
        return grad[start : start + ctx.local_size]


def _check_equal_sizes(tensor: torch.Tensor, what: str) -> None:
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device))
    if len({int(s) for s in sizes}) != 1:
        raise RuntimeError(f"gathering {what} across ranks needs equal per-rank batches, got {[int(s) for s in sizes]} "
                           "(use a DistributedSampler, as the runner does)")


def gather_with_grad(tensor: torch.Tensor, what: str = "features") -> torch.Tensor:
    """``(B, ...)`` on each rank -> ``(world_size * B, ...)`` in rank order, differentiable (identity in one process)."""
    if not is_initialized() or world_size() == 1:
        return tensor
    _check_equal_sizes(tensor, what)
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` -> ``(world_size * B, ...)`` in rank order, without gradient (ids, labels)."""
    if not is_initialized() or world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def global_offset(local_size: int) -> int:
    """Index of this rank's first row in a gathered batch (equal per-rank sizes)."""
    return rank() * local_size if is_initialized() else 0


def gather_padded_with_grad(tensor: torch.Tensor, dim: int = 1, what: str = "features") -> torch.Tensor:
    """:func:`gather_with_grad` of tensors whose size along ``dim`` differs across ranks (e.g. tokens of
    texts padded to the longest in each rank's batch): zero-padded to the longest over all ranks first."""
    if not is_initialized() or world_size() == 1:
        return tensor
    length = torch.tensor([tensor.shape[dim]], dtype=torch.long, device=tensor.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    missing = int(length) - tensor.shape[dim]
    if missing:
        pad_shape = list(tensor.shape)
        pad_shape[dim] = missing
        tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
    return gather_with_grad(tensor, what)
