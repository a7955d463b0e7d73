"""Ranks for data-parallel training: one process per GPU under torchrun, or just one.

    python -m app.launch --nproc-per-node 8 sft ...

The HF Trainer runs DDP itself; these helpers are for what runs beside it: the DPO trainer's
CUDA-graph path, which holds no DDP wrapper (DDP's accumulation nodes break a capture) and so
broadcasts the adapter at the start and all-reduces its gradients in one flat buffer after
each step (~170 MB for r=16 on a 7B model: about a millisecond on NVLink), the reference pass
that splits pairs over the ranks, and the bench's process group and global rates.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size): from the process group if there is one, else from torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup() -> tuple[int, int, torch.device]:
    """Join the process group when started by torchrun; returns (rank, world size, this rank's device)."""
    rank, size = world()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, size, device


def is_main() -> bool:
    return world()[0] == 0


def all_reduce_grads(params: list[torch.nn.Parameter], average: bool = False) -> None:
    """Sum (or, with `average`, as DDP does, average) the gradients of `params` over all ranks, in one flat buffer."""
    size = world()[1]
    if size == 1:
        return
    for p in params:  # a rank with no examples in this step still takes part, with zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    if average:
        flat.div_(size)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


@torch.no_grad()
def broadcast_params(params: list[torch.nn.Parameter]) -> None:
    """Rank 0's values of `params` on every rank, in one flat buffer (what DDP does when it wraps a model)."""
    if world()[1] == 1:
        return
    flat = torch._utils._flatten_dense_tensors([p.data for p in params])
    dist.broadcast(flat, src=0)
    for param, synced in zip(params, torch._utils._unflatten_dense_tensors(flat, [p.data for p in params])):
        param.data.copy_(synced)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor
