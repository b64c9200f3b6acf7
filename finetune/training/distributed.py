"""Data-parallel training across processes with PyTorch's own engine (``torchrun``).

``torchrun --nproc_per_node N -m finetune fit DATA ...`` (or multi-node, with ``--nnodes`` and a
rendezvous) starts N copies of ``fit``. Each reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
from the environment, joins the process group (NCCL on GPUs, gloo on CPUs) and trains its
shard of every batch; DistributedDataParallel averages the gradients. Rank 0 alone decides
(``auto``), prints, and writes the run directory; every epoch's metrics are summed over the
ranks, so all of them see the same numbers and make the same decisions (best epoch, early
stop). ``batch_size`` stays the global batch: each rank takes ``batch_size / WORLD_SIZE``, so
a run keeps its optimisation whatever the number of processes.

A run that joined the process group leaves it in order (:meth:`World.finish`): every rank
waits for the others at a barrier, then destroys the group, which joins gloo's and NCCL's
threads while the interpreter is whole. A group left for the interpreter's exit to tear down
can abort a finished run (SIGABRT, "terminate called without an active exception": gloo's
threads still hold tensors when Python is already gone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from finetune.errors import ConfigError

__all__ = ["ALONE", "World", "world"]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # world() joined the process group for this run, so the run leaves it (finish); False when
    # the caller had joined it already: theirs to destroy
    joined: bool = field(default=False, compare=False)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes."""
        return self.rank == 0

    def device(self, requested: str | None) -> str | None:
        """The device of this rank: its own GPU (``cuda:LOCAL_RANK``) when on CUDA."""
        if not self.distributed:
            return requested
        if (requested or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return "cpu"

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def finish(self, value: Any) -> Any:
        """The end of a run: rank 0's ``value`` on every rank (:meth:`share`, the run's last
        collective), then, when :func:`world` joined the process group for this run, a barrier
        (no rank tears down while another still communicates) and the group destroyed.

        Called on success only: after an error on one rank, the others may be inside a
        collective, and a barrier would wait for them forever; torchrun stops them.
        """
        value = self.share(value)
        if self.distributed and self.joined and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return value

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """``values`` summed over the ranks (float64)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each of ``flags``: whether it is set on any rank (so that every rank takes the same
        branch); one collective call for all of them."""
        if not self.distributed:
            return flags
        return [total > 0 for total in self.sum([float(f) for f in flags], device)]

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics drift apart when each
        rank normalises its own share of the batch)."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)


ALONE = World()  # a single process


def world(device: str | None = None) -> World:
    """The world this process runs in: when launched by ``torchrun`` (``WORLD_SIZE`` > 1), joins
    the process group unless the caller joined it already (a run that joined it leaves it at
    its end: :meth:`World.finish`), else a world of one. ``device`` (the config's) picks the
    backend: NCCL for CUDA, gloo for CPUs."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return ALONE
    joined = not dist.is_initialized()
    if joined:
        for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ConfigError(
                    f"WORLD_SIZE is {size} but {name} is not set: start distributed training "
                    "with torchrun, e.g. torchrun --nproc_per_node 2 -m finetune fit DATA."
                )
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, joined)
