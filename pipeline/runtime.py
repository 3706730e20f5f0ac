"""Where and how compute runs: the device, the autocast precision, and torchrun's ranks."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import ConfigError

CPU = torch.device("cpu")
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's processes (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK."""
        env = {k: os.environ.get(k, "") for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        if not env["WORLD_SIZE"]:
            return cls()
        try:
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"] or 0))
        except ValueError:
            raise ConfigError(f"cannot read the torchrun environment {env}") from None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ALONE = Ranks()  # a process run without torchrun


def resolve_device(name: str, ranks: Ranks = ALONE) -> torch.device:
    """``auto``: this rank's CUDA device when there is one, else the CPU; or an explicit torch device name."""
    if name == "auto":
        return torch.device("cuda", ranks.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 autocast on a CUDA device that supports it, float16 on an older one, float32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return PRECISIONS[name]


def autocast(device: torch.device, precision: torch.dtype):
    """Mixed-precision autocast for ``precision``, or nothing for float32."""
    if precision == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision)


@contextlib.contextmanager
def process_group(ranks: Ranks, *, timeout: timedelta = timedelta(hours=12)):
    """A gloo process group for barriers among torchrun's ranks (nothing when run alone).

    gloo works on CPU and GPU nodes alike, and barriers are all kdcache needs from it;
    the long timeout lets a slow rank finish a large capture.
    """
    import torch.distributed as dist

    if ranks.world == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()
