"""The process group of a training run: rank / world size, the device, DDP / FSDP2 wrapping.

Launched with ``torchrun`` (``WORLD_SIZE > 1``), :func:`init_distributed` joins (or
creates) the process group; a plain ``python`` run is one rank and touches nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world``, its ``local_rank`` on the
    node, and whether :func:`init_distributed` created the process group (then the
    caller destroys it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False
    host_group: object = field(default=None, repr=False)   # gloo group for host-side flags

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag, device) -> bool:
        """Whether ``flag`` (a bool or a one-element tensor) is true on any rank: one
        all-reduce and one host read with several ranks, ``bool(flag)`` with one."""
        if self.world <= 1:
            return bool(flag)
        t = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1).clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def any_host(self, flag: bool) -> bool:
        """Whether a host-side ``flag`` is true on any rank, agreed over a CPU (gloo) group:
        no device work, so unlike :meth:`any` it never waits for the device's queue. Every
        rank must call it at the same point (the group is created on the first call)."""
        if self.world <= 1:
            return bool(flag)
        if self.host_group is None:
            self.host_group = torch.distributed.new_group(backend="gloo")
        t = torch.tensor([float(bool(flag))])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.host_group)
        return bool(t.item())

    def share(self, fn: Callable):
        """``fn()`` run on rank 0 only, its result given to every rank (a broadcast). A
        ``ConfigError`` it raises is raised on every rank (another error: a RuntimeError
        on the others), so no rank waits for a rank that gave up."""
        if self.world <= 1:
            return fn()
        from minorsft.train.config import ConfigError
        box, error = [None], None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except ConfigError as e:
                box[0], error = ("config", e.field, e.message), e
            except Exception as e:
                box[0], error = ("error", f"rank 0: {type(e).__name__}: {e}"), e
        torch.distributed.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0][0] == "config":
            raise ConfigError(box[0][1], box[0][2])
        if box[0][0] == "error":
            raise RuntimeError(box[0][1])
        return box[0][1]


def init_distributed(device: Optional[str] = None) -> Dist:
    """A :class:`Dist` from the ``torchrun`` environment, initialising the process group
    (NCCL on CUDA, one GPU per rank; else gloo, also when ``device`` asks for the CPU)
    unless one already exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and requested_device(device) in (None, "cuda") else "gloo"
        if backend == "nccl":
            # One GPU per rank: make it current before any CUDA work (else every rank
            # creates a context and allocates on cuda:0).
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")), owns_group=owns)


def requested_device(device: Optional[str]) -> Optional[str]:
    """``device``, else the ``MINORSFT_DEVICE`` environment variable, else None (auto)."""
    return device if device is not None else os.environ.get("MINORSFT_DEVICE") or None


def select_device(device: Optional[str], dist: Dist) -> torch.device:
    """The requested device (``device`` or ``MINORSFT_DEVICE``; a bare ``cuda`` becomes
    this rank's GPU), else this rank's GPU, else CPU."""
    if requested_device(device) is not None:
        d = torch.device(requested_device(device))
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", dist.local_rank)
        return d
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def wrap_model(model, dist: Dist, device: torch.device, *, fsdp: bool):
    """The model to run forward / backward through: unchanged on one rank; with several,
    sharded in place with FSDP2 ``fully_shard`` (each decoder layer, then the whole) when
    ``fsdp``, else wrapped in ``DistributedDataParallel``."""
    if dist.world <= 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        layers = getattr(getattr(model, "model", None), "layers", None) or []
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
