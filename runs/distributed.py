"""Steps 1 and 5 under torchrun: one process per GPU (NCCL) or per CPU process (gloo), PyTorch's own DDP.

    torchrun --nproc_per_node=4 train_hash.py --data datasets/cifar10 --run checkpoint/cifar10-vgg-48

A launch by torchrun (WORLD_SIZE > 1 in the environment) starts the process group; otherwise everything is the
single-process path. Every process trains on its contiguous share of each global batch of --batch-size images (the
same global batches, in the same order, as one process would see), the loss is computed on the whole global batch
(outputs gathered from all processes), and only rank 0 writes files and evaluates.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from runs.device import pick_device
from runs.errors import UserError


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def training_device(name: str = "auto") -> torch.device:
    """The device of this process: pick_device(name) alone, or under torchrun the process group is started and the
    device is cuda:LOCAL_RANK (NCCL), or the CPU (gloo) when --device cpu or no GPU."""
    if not launched_by_torchrun():
        return pick_device(name)
    if dist.is_initialized():
        return current_device()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if pick_device(name).type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started local rank {local_rank} but this machine has "
                            f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node={torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def finish() -> None:
    """Leave the process group (after a torchrun launch; nothing otherwise)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_batch(outputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch from every process's share, in rank order; only this process's outputs carry gradients.

    Each process then computes the same loss on the same global batch. The gradient reaching its own outputs is that
    loss's gradient for them alone, so the sum over processes is the single-process gradient: the caller multiplies
    the loss by the world size before backward, and DDP's averaging turns it into that sum.
    """
    if not dist.is_initialized():
        return outputs, labels
    gathered = [torch.empty_like(outputs) for _ in range(world_size())]
    dist.all_gather(gathered, outputs.detach().contiguous())
    gathered[rank()] = outputs
    all_labels = [torch.empty_like(labels) for _ in range(world_size())]
    dist.all_gather(all_labels, labels.contiguous())
    return torch.cat(gathered), torch.cat(all_labels)
