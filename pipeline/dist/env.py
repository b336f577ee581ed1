"""Process-group set-up from the environment torchrun (or srun + torchrun) provides.

A plain ``python stages/x.py`` is one process of world size 1 with no process group;
under ``torchrun`` the variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT are set and :func:`init_distributed` joins the group: ``nccl`` when a CUDA
device is present, else ``gloo``. The library never creates a group it was not asked
to, and :func:`shutdown` only destroys a group that :func:`init_distributed` created,
so a caller that owns its process group (a Ray Train worker) keeps it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # True when init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items of a list every rank holds in the same order: ``items[rank::world_size]``.

        The one rule by which shards are split across ranks (masks, embeddings,
        validation): over all ranks each item is taken exactly once.
        """
        return list(items[self.rank::self.world_size])


SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_group=False)
"""One plain CPU process, for library calls made outside torchrun (tests, notebooks)."""


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Join (or reuse) the process group described by the environment; pick this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    owns = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None:
            # torchrun keeps one store across restarts: without a per-attempt prefix a
            # restarted worker can read the dead attempt's keys and hang (pytorch#135712).
            store = dist.PrefixStore(f"pven/attempt_{attempt}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        owns = True
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)
    return DistInfo(0, 1, local_rank, device, owns)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def gather_to_main(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (the others pass anything, e.g. None)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    """Destroy the group if we made it (gloo processes may abort at exit otherwise)."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively (CPU: oneDNN bf16 support; CUDA: compute capability).

    Without it (a CPU without AVX512-BF16/AMX) autocast emulates bf16 and a training step is
    tens of times slower than fp32: the training loops then run in fp32, with a warning.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
