"""``forgetlab cit``: continual instruction tuning on the ICL world or natural-instructions tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from tqdm.auto import tqdm

from forgetlab.cli.errors import join_launched_run, leave_launched_run, user_errors

app = typer.Typer(help="Continual instruction tuning: a task sequence, the score matrix, GP/IP/FP/AP.",
                  no_args_is_help=True, result_callback=leave_launched_run)
console = Console()


@app.callback()
def launch(ctx: typer.Context) -> None:
    join_launched_run(ctx, "cit")


@app.command()
@user_errors
def run(
    out: Annotated[Path, typer.Option("--out", help="run directory")],
    world: Annotated[Optional[Path], typer.Option(help="an icl-world build (model + world.json)")] = None,
    model: Annotated[Optional[Path], typer.Option(help="HF checkpoint \\[default: the world's model]")] = None,
    sequence: Annotated[str, typer.Option(help="world sequence index, `coded:K` (sequence K's abilities asked by coded "
                                               "instructions, which no build already does), world task names a,b,c, or "
                                               "`new` (the sequences' tasks its model does not already do; with --world); "
                                               "NI-Seq-G1|C1|M1 or task names a,b,c (with --tasks-dir); task files "
                                               "a.json,b.jsonl (natural-instructions or instruction/input/output rows)")] = "0",
    tasks_dir: Annotated[Optional[Path], typer.Option(help="natural-instructions tasks/ folder")] = None,
    method: Annotated[str, typer.Option(help="seq | replay | ewc | multitask (full fine-tuning); "
                                             "lora | inclora | lwf | olora (LoRA)")] = "seq",
    general: Annotated[str, typer.Option(help="general sets for GP/IP as task files a.json,b.jsonl "
                                              "\\[default: the ICL world's general tasks]")] = "",
    max_train: Annotated[int, typer.Option(help="training instances per task")] = 1000,
    max_test: Annotated[int, typer.Option(help="test instances per task (the last ones; ICL-world tasks keep their split)")] = 100,
    epochs: Annotated[float, typer.Option(help="passes over each task")] = 10.0,
    lr: Annotated[float, typer.Option(help="learning rate (constant)")] = 1e-4,
    fvg: Annotated[bool, typer.Option(help="FV-guided training on top of the method (α_FV=1, α_KL=20, T=2)")] = False,
    seed: Annotated[int, typer.Option(help="data order, the training rows and answers drawn, LoRA init and dropout")] = 0,
    resume: Annotated[bool, typer.Option(help="continue a killed run in --out after its last finished task "
                                              "(same options)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace the run in --out")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override any setting, e.g. --set train.batch_size=16")] = None,
) -> None:
    """Train the sequence task by task and score every task (and GP/IP) after each."""
    from dataclasses import replace

    from forgetlab.experiments.cit import CITConfig, check_inputs, run_cit
    from forgetlab.experiments.rundir import prepare_run_dir
    from forgetlab.train import distributed
    from forgetlab.utils.io import apply_overrides

    base = CITConfig()
    cfg = CITConfig(world_dir=str(world or ""), model=str(model or ""), sequence=sequence, tasks_dir=str(tasks_dir or ""),
                    method=method, general=general, n_train=max_train, n_test=max_test, seed=seed, fvg=fvg,
                    train=replace(base.train, lr=lr, epochs=epochs))
    cfg = apply_overrides(cfg, set_ or [])
    check_inputs(cfg)  # bad input fails here, before --out is created
    distributed.main_first(lambda: prepare_run_dir(out, cfg, resume=resume, overwrite=overwrite, log=tqdm.write))
    if not distributed.is_main():  # the other processes of a multi-GPU run compute in silence
        run_cit(cfg, out, log=lambda line: None, progress=False)
        return
    results = run_cit(cfg, out, log=tqdm.write, progress=progress)
    line = f"AP={results['AP']:.1f}  FP={results['FP']:.1f}  forget={results['forget']:.1f}"
    if "initial" in results:
        line += "".join(f"  {k}: {results['initial'][k]:.1f} -> {results['final'][k]:.1f}" for k in ("GP", "IP"))
    console.print(line)
    console.print(f"wrote {out}/results.json, report.md, scores.png, config.json, model/")


@app.command()
@user_errors
def analyze(
    run_dirs: Annotated[list[Path], typer.Argument(help="finished `forgetlab cit run` directories (several: pooled)")],
    out: Annotated[Optional[Path], typer.Option("--out", help="where the files go (default: the run itself, "
                                                              "when only one is given)")] = None,
    prompts: Annotated[int, typer.Option(help="clean 10-shot prompts per FV")] = 32,
    eval_prompts: Annotated[int, typer.Option(help="test queries per general task")] = 40,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """FV drift vs. forgetting over the runs' checkpoints (two FV measures, R² against three controls); for one run, also FV
    interventions on its last checkpoint."""
    from forgetlab.analysis.fv_drift import DriftSettings
    from forgetlab.experiments.cit_analysis import analyze_runs

    for option, value in (("--prompts", prompts), ("--eval-prompts", eval_prompts)):
        if value < 1:
            raise ValueError(f"{option} {value} must be at least 1")
    result = analyze_runs(run_dirs, out, DriftSettings(n_prompts=prompts, eval_prompts=eval_prompts), log=tqdm.write,
                          progress=progress)
    for measure, fit in result["summary"].items():
        console.print(f"{measure}: R² pooled {_r2(fit['pooled_r2'])}, median per task {_r2(fit['median_task_r2'])}, "
                      f"over checkpoint means {_r2(fit['checkpoint_mean_r2'])}")
    written = "drift.json, drift.csv, drift.png, drift.md"
    if "interventions" in result:
        written += ", drift_tasks.png"
        s = result["interventions"]
        console.print(f"forgotten general tasks: {s['forgotten_tasks']}; share of the drop recovered by adding the "
                      f"original FV: {_share(s['mean_add_recovered'])} (of all points lost: "
                      f"{_share(s.get('pooled_add_recovered'))}), by subtracting the last task's FV: "
                      f"{_share(s['mean_subtract_recovered'])}")
        written += ", interventions.json"
    console.print(f"wrote {written} in {out or run_dirs[0]}")


@app.command()
@user_errors
def compare(
    baseline: Annotated[Path, typer.Argument(help="the baseline run (e.g. IncLoRA)")],
    run_dirs: Annotated[list[Path], typer.Argument(help="runs to set against it (e.g. IncLoRA + FVG), same model and "
                                                        "sequence")],
    out: Annotated[Path, typer.Option("--out", help="where compare.json and compare.md go")],
    keep: Annotated[float, typer.Option(help="share of each drop a run must keep to meet the target")] = 0.5,
    fp_tolerance: Annotated[float, typer.Option(help="points of FP a run may lose against the baseline")] = 5.0,
) -> None:
    """Share of the baseline's GP and IP drops each run keeps, its FP change, and whether it meets the target."""
    from forgetlab.report.compare import compare_runs, write_comparison

    console.print(write_comparison(compare_runs(baseline, run_dirs, keep, fp_tolerance), out), soft_wrap=True)
    console.print(f"wrote {out}/compare.json, compare.md")


def _r2(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _share(value) -> str:
    return "-" if value is None else f"{value:.0%}"
