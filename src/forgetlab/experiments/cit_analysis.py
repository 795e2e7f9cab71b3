"""FV drift against forgetting over the checkpoints of ``forgetlab cit run`` runs (``forgetlab cit analyze RUN ...``).

For each checkpoint and general task: the task's FV and its cosine to the initial model's, the zero-shot score, and
the controls (hidden-state cosine, parameter distance); the fits of score change on each, pooled over runs as the FV
paper pools checkpoints of sequences and seeds; and, for one run, the FV interventions on its last checkpoint (adding
a forgotten task's original FV, subtracting the last task's). The computations are in
:mod:`forgetlab.analysis.fv_drift`; this module finds the runs' checkpoints, resumes a killed analysis and writes the
files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from forgetlab.experiments.cit import (DTYPES, CITConfig, cut_inputs, general_files, initial_model_dir,
                                       load_sequence)
from forgetlab.fv.tasks import ICLTask
from forgetlab.models.build import ADAPTER_CONFIG
from forgetlab.utils.io import (atomic_path, atomic_write_json, atomic_write_text, config_hash, from_jsonable,
                                read_json)


def tasks_digest(tasks: Sequence[ICLTask]) -> str:
    """A hash of the tasks' names, instructions and pairs: a task file edited under its old name is another task."""
    return config_hash(*tasks)


def analyze_run(run: Path, settings=None, *, log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """``forgetlab cit analyze RUN``: FV drift vs. forgetting over one run's checkpoints, and FV interventions,
    written into the run directory (see :func:`analyze_runs`)."""
    return analyze_runs([run], None, settings, log=log, progress=progress)


def _run_setup(run: Path) -> tuple[CITConfig, list[Path], str]:
    """A finished run's config, its per-task checkpoints and the directory of the model it started from."""
    if not (run / "config.json").is_file() or not (run / "results.json").is_file():
        raise FileNotFoundError(f"{run} is not a finished `forgetlab cit run` directory (no config.json/results.json)")
    saved = read_json(run / "config.json")
    if not isinstance(saved, dict) or "sequence" not in saved or "method" not in saved:
        raise ValueError(f"{run} is not a `forgetlab cit run` directory (its config.json is another command's)")
    cfg = from_jsonable(CITConfig, saved)
    checkpoints = sorted(p for p in (run / "checkpoints").glob("task-*") if not p.name.endswith((".tmp", ".old"))
                         and ((p / "config.json").is_file() or (p / ADAPTER_CONFIG).is_file()))  # not a killed save's
    if not checkpoints:
        raise FileNotFoundError(f"{run}/checkpoints has no per-task checkpoints; rerun with save_checkpoints=true")
    return cfg, checkpoints, initial_model_dir(cfg)


def analyze_runs(runs: Sequence[Path], out: Path | None = None, settings=None, *,
                 log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """``forgetlab cit analyze RUN [RUN ...]``: FV drift vs. forgetting, and FV interventions.

    Writes ``drift.json`` (per checkpoint and general task: FV cosine, the FV heads' zero-shot output
    cosine, hidden-state cosine, parameter distance, zero-shot score; the fits and their R²), ``drift.csv``
    and ``drift.png`` into ``out`` (one run: its own directory). Several runs from the same initial model
    are pooled, as the FV paper pools checkpoints of several sequences and seeds; ``interventions.json``
    (on the last checkpoint) is written for a single run only.
    """
    from forgetlab.analysis.fv_drift import DriftSettings, drift_fits, drift_measurements, fv_interventions
    from forgetlab.models.build import adapter_base, load_model, load_tokenizer, merge_adapter
    from forgetlab.report.cit import plot_drift, plot_drift_tasks
    from forgetlab.report.markdown import drift_report
    from forgetlab.analysis.outputs import fingerprint

    settings = settings or DriftSettings()
    settings.validate()
    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("cit analyze needs at least one run directory")
    setups = [_run_setup(run) for run in runs]
    if len(runs) > 1 and out is None:
        raise ValueError("several runs are pooled into one analysis: give --out DIR for its files")
    out = Path(out) if out is not None else runs[0]
    cfg, _, model_dir = setups[0]
    for run, (other, _, other_model) in zip(runs[1:], setups[1:]):
        same_general = (other.world_dir, other.general) == (cfg.world_dir, cfg.general)
        if Path(other_model).resolve() != Path(model_dir).resolve() or not same_general:
            raise ValueError(f"{run} started from {other_model} (general sets {other.general or other.world_dir}), "
                             f"{runs[0]} from {model_dir} ({cfg.general or cfg.world_dir}); pool runs of one model only")
    names = [run.name for run in runs]
    labels = names if len(set(names)) == len(names) else [str(run) for run in runs]
    tasks, world = load_sequence(cfg)
    tokenizer = load_tokenizer(model_dir)
    if cfg.general:  # task files' inputs may be long: their FV prompts are cut as FVG's are
        general = [ICLTask.from_pairs(t.name, cut_inputs(tokenizer, t.pairs, cfg, settings.shots), t.instruction)
                   for t in (f.as_icl_task() for f in general_files(cfg))]
    elif world is not None:
        general = [t.as_icl_task() for t in world.role("general")]
    else:
        raise ValueError(f"{runs[0]}: the run has no general sets to analyse (use --general task files or an ICL world)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[cfg.dtype]  # the precision the run trained in (a bfloat16 7B run is analysed in bfloat16)
    checkpoints = [(p.name if len(runs) == 1 else f"{label}/{p.name}", label, p)
                   for label, (_, paths, _) in zip(labels, setups) for p in paths]
    run_of = {name: label for name, label, _ in checkpoints}

    held: dict = {}  # the model loaded last: used again, or the adapter checkpoint on it merged in (no chain reload)

    def next_model(path) -> torch.nn.Module:
        here, base = Path(path).resolve(), adapter_base(path)
        last_path, model = held.pop("path", None), held.pop("model", None)
        if last_path is not None and base is not None and Path(base).resolve() == last_path:
            model = merge_adapter(model, path)
        elif last_path != here:
            model = None  # freed before the next model is read
            model = load_model(path, dtype).to(device)
        held.update(path=here, model=model)
        return model

    def loader(name: str, path) -> Callable[[], torch.nn.Module]:
        def load() -> torch.nn.Module:
            log(f"[cit analyze] {name}")
            return next_model(path)
        return load

    # a killed analysis resumes after its last finished checkpoint or intervention task (drift.partial.pt, removed
    # at the end), unless the model, a checkpoint, the general tasks or a setting changed
    partial_path = out / "drift.partial.pt"
    last_task = tasks[-1].as_icl_task() if cfg.method != "multitask" else None
    key = {"settings": asdict(settings), "general": [t.name for t in general], "dtype": cfg.dtype,
           "tasks": tasks_digest(general + ([last_task] if last_task else [])),
           "model": fingerprint(model_dir) if Path(model_dir).exists() else str(model_dir),
           "checkpoints": [[name, fingerprint(p)] for name, _, p in checkpoints]}
    done = None
    if partial_path.is_file():
        saved = torch.load(partial_path, weights_only=True)
        if saved.get("key") == key:
            done = saved
            intervened = len(done.get("interventions", {}).get("tasks", {}))
            log(f"[cit analyze] resuming after {len({r['checkpoint'] for r in done['rows']})} checkpoints"
                + (f" and the interventions of {intervened} tasks" if intervened else "") + f" ({partial_path})")
        else:
            log(f"[cit analyze] {partial_path} is from another model, checkpoints, general tasks or settings; starting afresh")
    partial = dict(done) if done else {"key": key}  # what a resumed analysis keeps, until it saves more

    def save_progress(**state) -> None:
        partial.update(state)
        with atomic_path(partial_path) as tmp:
            torch.save(partial, tmp)

    rows, initial = drift_measurements([(name, loader(name, path)) for name, path in
                                        [("initial", model_dir)] + [(name, p) for name, _, p in checkpoints]],
                                       tokenizer, general, settings, done=done, progress=progress,
                                       on_checkpoint=lambda rows, initial: save_progress(rows=rows, initial=initial))
    for row in rows:
        row["run"] = run_of.get(row["checkpoint"], "")
    fits = drift_fits(rows)
    summary = {m: {"pooled_r2": f["pooled"]["r2"], "median_task_r2": f["median_task_r2"],
                   "checkpoint_mean_r2": f["checkpoint_mean"]["r2"]} for m, f in fits.items()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "drift.json", {"settings": asdict(settings), "runs": [str(r) for r in runs],
                                           "summary": summary, "fits": fits, "rows": rows})
    header = ["checkpoint", "task", "zero_shot", "score_change", "fv_cosine", "hidden_cosine", "param_distance", "run",
              "zero_shot_fv_cosine", "icl_hidden_cosine"]
    atomic_write_text(out / "drift.csv", "\n".join([",".join(header)] + [",".join(str(r[h]) for h in header) for r in rows]) + "\n")
    plot_drift(rows, fits, out / "drift.png")
    if len(runs) == 1:  # per task over one run's checkpoints (pooled runs have no common order of checkpoints)
        plot_drift_tasks(rows, out / "drift_tasks.png")
    log("[cit analyze] R² of score change on: " + "  ".join(
        f"{m}={v['pooled_r2']:.2f}" if v["pooled_r2"] is not None else f"{m}=-" for m, v in summary.items()))
    result, interventions = {"summary": summary}, None
    if len(runs) == 1:
        interventions = fv_interventions(next_model(checkpoints[-1][2]), tokenizer, general, initial,
                                         last_task, settings, done=done.get("interventions") if done else None,
                                         on_task=lambda state: save_progress(interventions=state), progress=progress)
        atomic_write_json(out / "interventions.json", interventions)
        result["interventions"] = interventions["summary"]
    drift_report(fits, [str(r) for r in runs], interventions, out)
    partial_path.unlink(missing_ok=True)
    return result
