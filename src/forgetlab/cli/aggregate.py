"""``forgetlab aggregate``: mean ± sd over the seeds of finished runs (either experiment)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from forgetlab.cli.errors import user_errors

console = Console()


@user_errors
def aggregate(
    runs: Annotated[list[Path], typer.Argument(help="finished run directories (or their results.json), any seeds")],
    out: Annotated[Path, typer.Option("--out", help="where aggregate.json and aggregate.md go")],
) -> None:
    """Group runs that differ only in their seed; every number of their results as mean ± sd per setting."""
    from forgetlab.report.aggregate import aggregate_runs, write_aggregate

    summary = aggregate_runs(runs)
    write_aggregate(summary, out)
    console.print((out / "aggregate.md").read_text())
    console.print(f"wrote {out}/aggregate.json, aggregate.md")
