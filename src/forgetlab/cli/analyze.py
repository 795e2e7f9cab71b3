"""``forgetlab analyze``: spurious-forgetting diagnostics for any Hugging Face checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from forgetlab.cli.errors import user_errors

app = typer.Typer(help="Weight-update angles, loss landscapes, feature shift and recovery of checkpoints.",
                  no_args_is_help=True)
console = Console()
Out = Annotated[Path, typer.Option("--out", help="output directory (data + PNG)")]
Checkpoints = Annotated[list[Path], typer.Option("--checkpoint", help="HF checkpoint directory (repeat, in order)")]


def parse_pair(text: str, option: str, sep: str, kind: type, expected: str) -> tuple:
    """Two numbers written A<sep>B (a grid 41x61, a range -1,7, snapshot steps 100,150), or one line naming the
    option; whether they make sense together is checked where they are used."""
    try:
        first, second = (kind(v) for v in text.lower().split(sep))
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected {expected}") from None
    for value in (first, second):  # float() reads nan and inf, which no range or grid means
        if not math.isfinite(value):
            raise ValueError(f"{option} {text!r}: {value} is not a finite number; expected {expected}")
    return first, second


@app.command()
@user_errors
def angles(
    a1: Annotated[Path, typer.Option(help="phase A start checkpoint")],
    a2: Annotated[Path, typer.Option(help="phase A end checkpoint")],
    b1: Annotated[Path, typer.Option(help="phase B start checkpoint")],
    b2: Annotated[Path, typer.Option(help="phase B end checkpoint")],
    out: Out,
    energy: Annotated[float, typer.Option(help="energy kept by the effective rank")] = 0.99,
) -> None:
    """Angle between phase B's update of every weight matrix and the subspace phase A's update spanned."""
    from forgetlab.analysis.outputs import write_angles

    write_angles(a1, a2, b1, b2, out, energy, log=console.print)


@app.command("angles-over-training")
@user_errors
def angles_over_training_command(
    a1: Annotated[Path, typer.Option(help="phase A start checkpoint")],
    a2: Annotated[Path, typer.Option(help="phase A end checkpoint")],
    checkpoint: Annotated[list[Path], typer.Option(help="checkpoints of the later phase in training order, its start "
                                                        "first (repeat); each consecutive pair is one window")],
    out: Out,
    energy: Annotated[float, typer.Option(help="energy kept by the effective rank")] = 0.99,
) -> None:
    """Angles of each window of a later phase (checkpoint k → k+1) to the subspace phase A updated, over training."""
    from forgetlab.analysis.outputs import write_angles_over_training

    write_angles_over_training(a1, a2, checkpoint, out, energy, log=console.print)


@app.command()
@user_errors
def landscape(
    theta0: Annotated[Path, typer.Option(help="checkpoint at the origin of the plane")],
    theta1: Annotated[Path, typer.Option(help="d1 = theta1 - theta0")],
    theta2: Annotated[Path, typer.Option(help="d2 = theta2 - theta1")],
    data: Annotated[list[str], typer.Option(help="NAME=FILE of QA JSONL rows {prompt, answer} (repeat per task)")],
    out: Out,
    trajectory: Annotated[Optional[list[Path]], typer.Option(help="checkpoints to project onto the plane, in training "
                                                                   "order (repeat) \\[default: theta0, theta1, theta2]")] = None,
    grid: Annotated[str, typer.Option(help="points along d1 x d2 (paper: 41x61)")] = "21x31",
    alpha_range: Annotated[str, typer.Option(help="range along d1: LOW,HIGH (the paper's -1,7) or auto (the "
                                                  "trajectory's span and a quarter of it each side)")] = "-1,7",
    beta_range: Annotated[str, typer.Option(help="range along d2: LOW,HIGH (the paper's -1,12) or auto")] = "-1,12",
    orthogonalize: Annotated[bool, typer.Option(help="make d2 orthogonal to d1")] = False,
    filter_normalize: Annotated[bool, typer.Option(help="rescale each output unit of the directions to the weights' "
                                                        "(Li et al.; before --orthogonalize)")] = False,
    max_examples: Annotated[int, typer.Option(help="QA rows per task used for the loss")] = 2000,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Task losses on the plane through theta0 spanned by (theta1 - theta0, theta2 - theta1), with a trajectory."""
    from forgetlab.analysis.outputs import write_landscape

    ranges = [None if text.strip().lower() == "auto" else parse_pair(text, f"--{name}", ",", float,
                                                                      "LOW,HIGH such as -1,7, or auto")
              for text, name in ((alpha_range, "alpha-range"), (beta_range, "beta-range"))]
    files = {}
    for item in data:
        if "=" not in item:
            raise ValueError(f"--data {item!r}: expected NAME=FILE, e.g. --data task0=qa_task0_test.jsonl")
        name, path = item.split("=", 1)
        if name in files:
            raise ValueError(f"--data {item!r}: the task name {name!r} is given twice; name each task once")
        files[name] = Path(path)
    write_landscape(theta0, theta1, theta2, files, out, trajectory=trajectory, grid=parse_pair(grid, "--grid", "x", int, "AxB such as 41x61"), alpha_range=ranges[0],
                    beta_range=ranges[1], orthogonalize=orthogonalize, filter_normalize=filter_normalize,
                    max_examples=max_examples, progress=progress, log=console.print)


@app.command()
@user_errors
def features(
    checkpoint: Checkpoints,
    prompts: Annotated[Path, typer.Option(help="QA JSONL rows whose prompts are fed to every checkpoint")],
    out: Out,
    max_prompts: Annotated[int, typer.Option(help="prompts used")] = 500,
    scatter_layer: Annotated[int, typer.Option(help="layer of the PCA scatter plot (0 = embedding)")] = 1,
) -> None:
    """Per layer: PC1 angle and mean shift of last-token features, each checkpoint against the first."""
    from forgetlab.analysis.outputs import write_features

    write_features(checkpoint, prompts, out, max_prompts, scatter_layer, log=console.print)


@app.command()
@user_errors
def recovery(
    checkpoint: Checkpoints,
    fit: Annotated[Path, typer.Option(help="QA JSONL rows to re-align on (one part of the old task)")],
    eval_: Annotated[Path, typer.Option("--eval", help="QA JSONL rows to score (a disjoint part of the old task)")],
    out: Out,
    before: Annotated[Optional[float], typer.Option(help="old-task exact match before the forgetting")] = None,
    before_checkpoint: Annotated[Optional[Path], typer.Option(help="or: score this checkpoint to get it")] = None,
    lr: Annotated[float, typer.Option(help="re-alignment learning rate")] = 2e-4,
    epochs: Annotated[float, typer.Option(help="passes over --fit")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="rows per step")] = 32,
    seed: Annotated[int, typer.Option(help="data order")] = 0,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Current vs recovered old-task exact match per checkpoint, and the spurious share of the drop."""
    from forgetlab.analysis.outputs import write_recovery

    write_recovery(checkpoint, fit, eval_, out, before=before, before_checkpoint=before_checkpoint, lr=lr, epochs=epochs,
                   batch_size=batch_size, seed=seed, progress=progress, log=console.print)
