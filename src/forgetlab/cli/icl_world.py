"""``forgetlab icl-world``: the synthetic in-context-learning world and the model grown on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from forgetlab.cli.errors import user_errors

app = typer.Typer(help="A task world and a small model in which in-context learning and function vectors emerge.",
                  no_args_is_help=True)
console = Console()


@app.command()
@user_errors
def build(
    preset: Annotated[str, typer.Option(help="smoke (about a minute) | cpu (2 CPU cores) | gpu (one GPU, bf16)")] = "cpu",
    out: Annotated[Path, typer.Option("--out", help="output directory")] = Path("runs/icl-world"),
    seed: Annotated[int, typer.Option(help="seed of the world, the corpus and the initialisation")] = 0,
    resume: Annotated[bool, typer.Option(help="continue an interrupted build in --out")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace the build in --out")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a setting, e.g. --set train.max_steps=2000")] = None,
) -> None:
    """Generate the world, pretrain the model, score every general task and its function vector."""
    from forgetlab.experiments.icl_world import build_icl_world, preset_config
    from forgetlab.experiments.rundir import prepare_run_dir
    from forgetlab.utils.io import apply_overrides

    cfg = apply_overrides(preset_config(preset, seed), set_ or [])
    cfg.validate()
    prepare_run_dir(out, cfg, resume=resume, overwrite=overwrite, log=tqdm.write)
    results = build_icl_world(cfg, out, log=tqdm.write, progress=progress)
    show(results, preset)
    console.print(f"wrote {out}/model/ (HF checkpoint + tokenizer + forgetlab_card.json), world.json, eval.json, fv/")


@app.command()
@user_errors
def evaluate(
    out: Annotated[Path, typer.Option("--out", help="directory of an icl-world build")],
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Score an existing build again (all prompt kinds and the function vectors); rewrites eval.json."""
    from forgetlab.experiments.icl_world import reevaluate

    results = reevaluate(out, log=tqdm.write, progress=progress)
    show(results, results.get("preset", "?"))
    console.print(f"wrote {out}/eval.json, fv/")


def show(results: dict, preset: str) -> None:
    table = Table(title=f"ICL world - preset {preset} - {len(results['tasks'])} general tasks (mean accuracy)")
    table.add_column("prompt")
    for group in ("mean", "mean_shared_inputs", "mean_own_inputs"):
        if group in results:
            table.add_column(group.replace("mean_", "").replace("mean", "all tasks"), justify="right")
    for key in ("ten_shot", "zero_shot_instruction", "zero_shot_bare", "shuffled_ten_shot", "fv_zero_shot",
                "fv_shuffled_ten_shot", "fv_gap_recovered"):
        table.add_row(key, *["-" if results[g][key] is None else f"{results[g][key]:.3f}"
                             for g in ("mean", "mean_shared_inputs", "mean_own_inputs") if g in results])
    console.print(table)
