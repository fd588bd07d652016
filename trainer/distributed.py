"""Data-parallel training across the processes torchrun starts: the process group, rank helpers, reductions.

`torchrun --nproc-per-node N -m bitmoji.trainer fit ...` (or its multi-node rendezvous
flags) sets RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT; that is all we
read. Without them every helper here is the identity for one process, so `fit`
reads the same either way, as in nanoGPT's train.py.

- gloo on CPU, NCCL on CUDA with each rank on cuda:LOCAL_RANK.
- SyncBatchNorm only on CUDA: in this torch it raises on CPU tensors
  ("SyncBatchNorm expected input tensor to be on GPU..."), so with gloo each
  rank normalises with its own per-rank batch statistics, and DDP broadcasts
  rank 0's running statistics (see `broadcast_buffers`): a CNN trained on N
  CPU processes is not the one-process CNN, the MLP (no BatchNorm) is.
- A rank that raises (a non-finite loss, bad data) ends the job: torchrun
  stops the other ranks, which would otherwise wait in the next collective.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def launched() -> bool:
    """True in a process that torchrun started."""
    return int(os.environ.get("RANK", -1)) != -1


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); return the device this rank trains on."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 alone prints, shows progress bars and writes files."""
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` under torchrun (SyncBatchNorm first on CUDA, in place); else `model`.

    DDP broadcasts rank 0's weights when it is built, so every rank starts from them.
    """
    if not dist.is_initialized():
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (its parameter names, without DDP's "module." prefix)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo, CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Each value summed over all ranks (float64); unchanged in one process."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (any picklable object: a flag, a whole checkpoint)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (e.g. each rank's RNG state for the checkpoint)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    So every shard of the validation set is scored with the model rank 0 saves.
    """
    if not dist.is_initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
