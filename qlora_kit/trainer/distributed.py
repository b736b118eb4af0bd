"""torchrun support: process-group setup, job sharding, and data parallelism over the LoRA gradients only.

`torchrun --nproc-per-node N -m qlora_kit.trainer train ...` (or qtrain under torchrun) sets RANK, WORLD_SIZE and
LOCAL_RANK; we join the process group (gloo on CPU, NCCL on CUDA) and:
  * train: data parallel. Every rank builds the same step (same seeded micro-batch stream, same loss
    token count), takes micro-batches rank, rank + N, ..., and after the step's last pass sums the LoRA
    gradients over the ranks (one flat dist.all_reduce, public torch.distributed API), so a step is the same
    global batch as one process. The frozen base is never broadcast nor reduced: every rank loads the same
    checkpoint, and the adapters start from the same seed. Rank 0 alone writes the adapter, metrics and checkpoints;
    checkpoints hold the global data position, so they resume under any world size.
  * train-many: job i goes to rank i mod N; each rank trains its jobs with no communication and writes
    their folders; rank 0 gathers the rows and writes summary.json. Job checkpoints are per job, so a
    resumed run may use any world size.
torchrun's own argument parser accepts abbreviations, so a bare `--r 8` after `-m qlora_kit.trainer train` is taken as an
ambiguous --rdzv-* option: put r in the --config file instead.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class DistEnv:
    """This process's place in the job: rank of world_size (local_rank picks its CUDA device)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistEnv:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def device_for(env: DistEnv, requested: str) -> torch.device:
    """This rank's device for --device auto|cpu|cuda (cuda:LOCAL_RANK under torchrun)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is visible (--device)")
    cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


@contextmanager
def process_group(env: DistEnv, device: torch.device):
    """Join (and on exit leave) the default process group when world_size > 1 and none is open yet."""
    mine = env.world_size > 1 and not dist.is_initialized()
    if mine:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world_size)
    try:
        yield env
    finally:
        if mine:
            dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def gather_rows(rows: list, env: DistEnv) -> list:
    """Every rank's rows concatenated (on every rank)."""
    if env.world_size == 1:
        return list(rows)
    out = [None] * env.world_size
    dist.all_gather_object(out, rows)
    return [r for part in out for r in part]


def shard(items: list, env: DistEnv) -> list:
    """Round-robin share of `items` for this rank: items[rank::world_size]."""
    return items[env.rank::env.world_size]


class DataParallel:
    """Splits one job's micro-batches over the ranks and sums its LoRA gradients over them."""

    def __init__(self, env: DistEnv, device: torch.device):
        self.env, self.device = env, device
        self.world_size = env.world_size

    def share(self, steps: list) -> list:
        """This rank's micro-batches of a step: steps[rank::world_size] (possibly none)."""
        return steps[self.env.rank::self.world_size]

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every rank's gradients of `params` in place; a rank that ran no micro-batch adds zeros.

        Every rank must call this with the same parameters in the same order (one flat all-reduce).
        """
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)

    def all_reduce_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())
