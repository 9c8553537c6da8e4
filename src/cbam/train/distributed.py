"""Process-group set-up for ``torchrun``: who this process is, sums over ranks, and failures as one message.

Under ``torchrun --nproc_per_node=N -m cbam train ...`` the environment names each process (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); without it there is one process and
nothing here talks to anything. Backend: NCCL on CUDA, gloo on the CPU. Every collective has a
timeout, so a rank that dies or stops ends the others with an error instead of a hang.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist


class Context(NamedTuple):
    """This process: ``rank`` of ``world_size`` (``local_rank`` on its machine) and its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this process logs and writes files (rank 0)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def _device(name: str, local_rank: int, world_size: int) -> torch.device:
    """The device ``--device`` names; under ``torchrun`` (``world_size > 1``) each process's own GPU."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device expects cpu or cuda, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here")
        if device.index is not None and world_size > 1:
            raise ValueError(f"--device {name}: under torchrun each of the {world_size} processes takes the GPU of "
                             "its LOCAL_RANK; pass --device cuda (CUDA_VISIBLE_DEVICES picks the GPUs)")
        return torch.device("cuda", local_rank if device.index is None else device.index)
    if device.type != "cpu":
        raise ValueError(f"--device expects cpu or cuda, got {name!r}")
    return device


def setup(device: str = "cpu", timeout_s: float = 300.0) -> Context:
    """Join the process group ``torchrun`` describes (none when ``WORLD_SIZE`` is unset or 1).

    On the CPU each of the machine's ``LOCAL_WORLD_SIZE`` processes gets an equal share of its cores.
    """
    world_size, rank, local_rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    context = Context(rank, world_size, local_rank, _device(device, local_rank, world_size))
    if world_size == 1:
        return context
    if context.device.type == "cuda":
        torch.cuda.set_device(context.device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // _env_int("LOCAL_WORLD_SIZE", world_size)))
    with failures(context, timeout_s):
        dist.init_process_group("nccl" if context.device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return context


def teardown(context: Context) -> None:
    """Leave the process group, if this process joined one."""
    if context.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def failures(context: Context, timeout_s: float) -> Iterator[None]:
    """Turn a failed collective (a peer died, or none answered within ``timeout_s``) into one clear error."""
    try:
        yield
    except RuntimeError as error:  # DistBackendError and gloo's socket errors are RuntimeErrors
        if context.world_size == 1:
            raise
        cause = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise RuntimeError(f"rank {context.rank} of {context.world_size}: distributed training stopped, another "
                           f"rank died or did not answer within {timeout_s:g} s ({cause})") from None


def broadcast_buffers(context: Context, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics: DDP syncs them only before a training forward)."""
    if context.world_size > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def sum_over_ranks(context: Context, values: Sequence[float]) -> list[float]:
    """``values`` summed element-wise over every rank (float64); unchanged with one process."""
    if context.world_size == 1:
        return [float(value) for value in values]
    total = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(total)
    return total.tolist()
