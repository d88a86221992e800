"""Data parallelism for `loralab train` under `accelerate launch` or `torchrun`.

Accelerate sets up the process group (gloo on CPU, NCCL on GPUs, across nodes) and says which rank
and device this process has. The gradient exchange is written here rather than through
DistributedDataParallel, because the loss is normalised by the answer tokens of the whole global
step (every rank knows that count from the shared batch plan): summing the ranks' gradients once per
optimizer step is then exactly the single-process gradient at the same global batch, with no
`no_sync` juggling across accumulation steps. LoRA gradients are a few MB, so one all-reduce per
step costs little next to the step itself.

Semantics: `train.batch_size` is per process; the global batch per optimizer step is
batch_size x gradient_accumulation x world_size.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass
class DataParallel:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list) -> list:
        """This rank's part of a global micro-batch (strided, so each part keeps similar lengths)."""
        return items[self.rank :: self.world_size]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if not self.active:
            return
        for p in params:
            if p.grad is None:  # this rank had no example in the step
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)

    def sum_floats(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one: ranks must stop at the same step or hang."""
        return self.sum_floats([float(flag)])[0] > 0 if self.active else flag

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """The main rank's `obj` on every rank (e.g. a checkpoint only the main rank's disk holds)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """The main rank does the body first (e.g. converting the bundled GGUF into the cache),
        the others after it, so they never race on the same files."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def setup(device: torch.device) -> DataParallel:
    """One process (world size 1) unless launched by accelerate/torchrun with WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DataParallel(device=device)
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    return DataParallel(rank=state.process_index, world_size=state.num_processes, device=state.device)
