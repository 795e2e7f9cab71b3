"""``forgetlab biography``: the spurious-forgetting experiment on synthetic biographies."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm.auto import tqdm
from rich.console import Console
from rich.table import Table

from forgetlab.cli.errors import join_launched_run, leave_launched_run, user_errors
from forgetlab.experiments.presets import PRESETS, preset_config
from forgetlab.methods import MethodConfig
from forgetlab.report.markdown import undefined
from forgetlab.train import distributed
from forgetlab.utils.io import apply_overrides

app = typer.Typer(help="Spurious forgetting on a synthetic biography world (Zheng et al., ICLR 2025).", no_args_is_help=True,
                  result_callback=leave_launched_run)
console = Console(stderr=False)

Preset = Annotated[str, typer.Option(help=f"configuration: {' | '.join(PRESETS)}")]
Out = Annotated[Path, typer.Option("--out", help="run directory")]
Seed = Annotated[int, typer.Option(help="seed of the world, the initialisation and the data order")]
CacheDir = Annotated[Optional[Path], typer.Option(help="where finished phases are cached "
                                                        "\\[default: $FORGETLAB_CACHE or ~/.cache/forgetlab]")]


def log_line(text: str) -> None:
    """Log lines printed above any progress bar."""
    tqdm.write(text)


@app.callback()
def launch(ctx: typer.Context) -> None:
    join_launched_run(ctx, "biography")


@app.command()
@user_errors
def run(
    preset: Preset = "cpu-demo",
    out: Out = Path("runs/biography"),
    method: Annotated[str, typer.Option(help="seq | freeze | ewc")] = "seq",
    freeze_layers: Annotated[Optional[int], typer.Option(help="freeze: bottom decoder layers frozen with the embedding "
                                                              "(0: the embedding alone; default with --method freeze: 2)")] = None,
    replay: Annotated[float, typer.Option(help="old-task rows mixed into each new task, as a fraction of its rows")] = 0.0,
    early_stop: Annotated[float, typer.Option(help="stop a task once its exact match reaches this (0 = off)")] = 0.0,
    ewc_strength: Annotated[Optional[float], typer.Option(help="ewc: λ of the Fisher penalty λ/2 Σ F (θ − θ*)² "
                                                               "(default with --method ewc: 1e4)")] = None,
    snapshot_steps: Annotated[str, typer.Option(help="task steps to keep as checkpoints/taskK-step-N, e.g. 50,150")] = "",
    seed: Seed = 0,
    resume: Annotated[bool, typer.Option(help="continue the run in --out")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace the run in --out")] = False,
    cache_dir: CacheDir = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override any setting of the preset, e.g. "
                                                       "--set world.full_name=false --set task.lr=1e-4")] = None,
) -> None:
    """Pretrain, learn task 0 then task 1 with the chosen method, and measure recovery."""
    from forgetlab.experiments.biography import run_biography

    if freeze_layers is None:
        freeze_layers = 2 if method == "freeze" else 0
    if ewc_strength is None:
        ewc_strength = 1e4 if method == "ewc" else 0.0
    cfg = preset_config(preset, seed, MethodConfig(name=method, freeze_layers=freeze_layers, replay=replay,
                                                   early_stop=early_stop, ewc_strength=ewc_strength))
    cfg = apply_overrides(cfg, set_ or [])
    if snapshot_steps:
        try:
            steps = tuple(int(v) for v in snapshot_steps.split(","))
        except ValueError:
            raise ValueError(f"--snapshot-steps {snapshot_steps!r}: expected comma-separated step numbers such as 50,150") from None
        cfg = replace(cfg, snapshot_steps=steps)
    main = distributed.is_main()  # the other processes of a multi-GPU run train in silence
    results = run_biography(cfg, out, cache_dir=cache_dir, resume=resume, overwrite=overwrite,
                            log=log_line if main else lambda line: None, progress=progress and main)
    if not main:
        return
    show_results(results)
    console.print(f"wrote {out}/results.json, report.md, curves.csv, curves.png, config.json, checkpoints/")


def show_results(results: dict) -> None:
    table = Table(title=f"biography - preset {results['preset']} - method {results['method']} - seed {results['seed']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    labels = [
        ("task0_before", "task 0, held-out people, before task 1"),
        ("task0_min_during_task1", "task 0, lowest during task 1"),
        ("task0_after_task1", "task 0 after task 1"),
        ("task1_after", "task 1 after task 1"),
        ("task0_recovered", "task 0 after recovery"),
        ("task0_recovery_control", "recovery control (pretrained only)"),
        ("spurious_share", "spurious share of the drop"),
    ]
    for key, label in labels:
        table.add_row(label, "–" if undefined(results[key]) else f"{results[key]:.3f}")  # no drop: no share
    recall = results.get("task0_recall", {})
    for phase, label in (("task0", "before task 1"), ("task1", "after task 1"), ("recovery", "after recovery")):
        if recall.get(phase) is not None:
            table.add_row(f"task 0 values recalled in biographies, {label}", f"{recall[phase]:.3f}")
    table.add_row("seconds", f"{results['seconds']:.0f}")
    console.print(table)


@app.command()
@user_errors
def generate(
    preset: Preset = "cpu-demo",
    out: Annotated[Path, typer.Option("--out", help="world directory")] = Path("runs/biography-world"),
    seed: Seed = 0,
    overwrite: Annotated[bool, typer.Option(help="replace the world already in --out")] = False,
) -> None:
    """Write the world: people, pretraining text, QA files and the tokenizer."""
    from forgetlab.experiments.rundir import replaceable
    from forgetlab.models.tokenizers import build_word_tokenizer
    from forgetlab.utils.io import fresh_tmp_dir, replace_dir
    from forgetlab.worlds.biography import generate_world, write_world

    cfg = preset_config(preset, seed)
    out = Path(out)
    replaceable(out, overwrite, "world.json", "a generated world",  # replaced whole below, as a run is
                f"--out {out} already holds files; pass --overwrite to replace them with this world, or choose a new --out")
    world = generate_world(cfg.world)
    # the whole set is written beside --out and moved into place at the end: --out holds one world, complete, or the
    # one it held before (a kill part-way leaves only the sibling .tmp folder, which the next call clears)
    tmp = fresh_tmp_dir(out.absolute())
    paths = write_world(world, tmp)
    build_word_tokenizer(world.word_list()).save_pretrained(str(tmp / "tokenizer"))
    replace_dir(tmp, out.absolute())
    console.print(f"{len(world.people)} people; wrote {', '.join(sorted(p.name for p in paths.values()))} and tokenizer/ to {out}")


@app.command()
@user_errors
def analyze(
    run_dir: Annotated[Path, typer.Argument(help="a finished `forgetlab biography run` directory", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(help="where the analyses go \\[default: RUN/analysis]")] = None,
    grid: Annotated[str, typer.Option(help="landscape points along d1 x d2 (paper: 41x61)")] = "21x21",
    max_examples: Annotated[int, typer.Option(help="QA rows per task for the landscape's losses")] = 1000,
    plane: Annotated[Optional[str], typer.Option(help="task-1 snapshot steps A,B of the landscape plane (through step A, "
                                                      "d1 = B - A, d2 = end - B) \\[default: 100,150 if kept, else the "
                                                      "last two snapshots]")] = None,
    energy: Annotated[float, typer.Option(help="energy kept by the effective rank of the update angles")] = 0.99,
    landscape_range: Annotated[str, typer.Option(help="the landscape's extent: paper ([-1,7] x [-1,12]) or auto (the "
                                                      "trajectory's span, a quarter of it to spare)")] = "paper",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Every diagnostic of a run: update angles (whole and window by window), feature shift, loss landscape."""
    from forgetlab.cli.analyze import parse_pair
    from forgetlab.experiments.biography_analysis import analyze_biography_run

    steps = None if plane is None else parse_pair(plane, "--plane", ",", int, "two task-1 snapshot steps A,B such as 100,150")
    analyze_biography_run(run_dir, out, grid=parse_pair(grid, "--grid", "x", int, "AxB such as 41x61"),
                          max_examples=max_examples, plane=steps, energy=energy, landscape_range=landscape_range,
                          progress=progress, log=log_line)


@app.command()
@user_errors
def recover(
    model: Annotated[Path, typer.Option(help="checkpoint directory to re-align (e.g. RUN/checkpoints/task1)")],
    run_dir: Annotated[Path, typer.Option("--run", help="the run whose world and recovery settings to use")],
    out: Annotated[Optional[Path], typer.Option(help="where to write recovery.json \\[default: the model dir's run]")] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Recovery for any checkpoint: one epoch of task-0 QA on half its people, scored on held-out people."""
    from forgetlab.experiments.recover import recover_checkpoint

    result = recover_checkpoint(Path(model), Path(run_dir), out=out, cache_dir=cache_dir, log=log_line)
    console.print(f"task 0 exact match: current {result['current']:.3f} -> recovered {result['recovered']:.3f}")
