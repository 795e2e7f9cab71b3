"""One clear line and a non-zero exit for bad input, instead of a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import typer


def first_process() -> bool:
    """Rank 0 of a launcher's processes (read from the environment: errors can come before the group is joined)."""
    return int(os.environ.get("RANK", "0")) == 0


def user_errors(fn: Callable) -> Callable:
    """Bad input (ValueError) and what the file system refuses (a missing file, a file where a directory goes,
    no permission: OSError) end the command with one line and exit code 2. An ``--out`` that is an existing file
    is refused before the command does any work."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            out = kwargs.get("out")
            if isinstance(out, Path) and out.exists() and not out.is_dir():
                raise ValueError(f"--out {out} is a file; give a directory")
            return fn(*args, **kwargs)
        except (ValueError, OSError) as err:
            if first_process():  # one line, not one per process of a multi-GPU run
                print(f"forgetlab: error: {' '.join(str(err).split())}", file=sys.stderr)
            raise typer.Exit(code=2) from None
    return wrapper


def refuse_under_launcher(command: str) -> None:
    """One line and exit 2 for a command that cannot run in several processes (printed once, by rank 0)."""
    if first_process():
        print(f"forgetlab: error: `forgetlab {command}` runs in one process; only `forgetlab cit run` and `forgetlab "
              "biography run` train on several GPUs (start it without torchrun)", file=sys.stderr)
    raise typer.Exit(code=2)


def join_launched_run(ctx: typer.Context, group: str) -> None:
    """Started by torchrun / accelerate launch with several processes: ``run`` joins the process group here, any
    other command of the group stops with one line."""
    from forgetlab.train import distributed

    if distributed.launched():
        if ctx.invoked_subcommand != "run":
            refuse_under_launcher(f"{group} {ctx.invoked_subcommand}")
        distributed.init_from_env()


def leave_launched_run(*_) -> None:
    """Result callback of a command group whose ``run`` may be launched: called only when the command succeeded, it
    takes the process group down (:func:`forgetlab.train.distributed.leave`)."""
    from forgetlab.train import distributed

    distributed.leave()
