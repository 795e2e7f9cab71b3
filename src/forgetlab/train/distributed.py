"""Data-parallel training over several GPUs through ``torch.distributed`` (one process per GPU, started by
``torchrun``): ``forgetlab cit run`` and ``forgetlab biography run``.

Every process runs the whole experiment: the same seeds, the same evaluation, the same decisions. Only
the optimizer steps are shared: :func:`forgetlab.train.trainer.train_phase` wraps the model in
``DistributedDataParallel`` and gives each process its share of every micro-batch, so N processes train
the model one process would, on N times the throughput. Evaluation by generation is shared the same way
(:func:`share`, :func:`gather_shares`). Only the main process writes files; the others read what it wrote
(a resumed run's state, a cached phase) after :func:`main_first` or :func:`barrier`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """Started by a launcher with more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> None:
    """Join the process group a launcher set up: NCCL with one GPU per process, gloo on CPUs.

    The timeout is long because a process may wait at the next collective while the main process writes a
    7B checkpoint.
    """
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=1))


def leave() -> None:
    """Take the process group down at the end of a finished run.

    Left to the interpreter's exit, gloo's worker threads can still be alive and abort the process ("terminate
    called without an active exception", SIGABRT), which turns a finished run into a failed one. A process that
    fails does not come here: taking the group down can then wait on peers stuck in a collective, while exiting
    lets the launcher stop them.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def check_batch_split(batch_size: int, setting: str = "train.batch_size") -> None:
    """Every process takes the same share of each micro-batch, so its size must divide by the process count."""
    if batch_size % world_size():
        raise ValueError(f"{setting}={batch_size} does not split over {world_size()} processes; "
                         f"use a multiple of {world_size()} (--set {setting}=...)")


def total(value: float) -> float:
    """The sum of ``value`` over the processes (itself on one)."""
    if world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def agree(flag: bool) -> bool:
    """The main process's ``flag`` on every process (an early stop must stop all of them at the same step)."""
    if world_size() == 1:
        return flag
    value = [flag]
    dist.broadcast_object_list(value, src=0)
    return bool(value[0])


def share(items: Sequence[T]) -> list[T]:
    """This process's interleaved share of ``items`` (every ``world_size``-th, from its rank)."""
    return list(items[rank()::world_size()])


def gather_shares(mine: list[T], n: int) -> list[T]:
    """The inverse of :func:`share` on every process: the shares of all processes, back in the original order."""
    if world_size() == 1:
        return mine
    shares: list = [None] * world_size()
    dist.all_gather_object(shares, mine)
    return [shares[i % world_size()][i // world_size()] for i in range(n)]


def barrier() -> None:
    """Wait until every process is here (e.g. until the main process has written what the others read next)."""
    if world_size() > 1:
        dist.barrier()


# the errors that :func:`main_first` sends to the other processes: any other ValueError or OSError goes as the
# nearest of these it derives from (a json.JSONDecodeError as a ValueError, "disk full" as an OSError)
_SENT_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError, OSError,
                ValueError)


def _sendable(err: Exception) -> tuple[str, str]:
    """The name of the nearest class in ``_SENT_ERRORS`` that ``err`` derives from, and its message."""
    kind = next(c for c in type(err).__mro__ if c in _SENT_ERRORS)
    return kind.__name__, str(err)


def main_first(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on the main process only (e.g. creating the run directory), then let the others go on.

    A ValueError or OSError there is raised on every process, with its message, so no process is left waiting:
    the main process raises it as it was, the others as the nearest class they can rebuild (a
    ``json.JSONDecodeError`` as a ValueError, ``NotADirectoryError`` as itself, "disk full" as an OSError).
    """
    if world_size() == 1:
        return fn()
    result, error, sent = None, None, None
    if is_main():
        try:
            result = fn()
        except (ValueError, OSError) as err:
            error, sent = err, _sendable(err)
    shared = [sent]
    dist.broadcast_object_list(shared, src=0)
    if error is not None:
        raise error
    if shared[0] is not None:
        kind, message = shared[0]
        raise {c.__name__: c for c in _SENT_ERRORS}[kind](message)
    return result
