"""One clear line and a non-zero exit for bad input, instead of a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import typer


def user_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, PermissionError) as err:
            if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per process of a multi-GPU run
                print(f"forgetlab: error: {err}", file=sys.stderr)
            raise typer.Exit(code=2) from None
    return wrapper
