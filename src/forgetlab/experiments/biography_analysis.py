"""Every spurious-forgetting diagnostic of one biography run in one call (``forgetlab biography analyze RUN``).

The run directory already holds what the analyses need: its checkpoints (pretrain, task0, task1 and the task-1
snapshots of ``--snapshot-steps``) and its config, from which the world, and so its QA files, is generated again
exactly. The paper's pictures then follow without assembling paths by hand: update angles (task 1 against task 0's
update subspace, whole and window by window), the feature shift along task 1, and the loss landscape on the plane
the paper draws (through task-1 step 100, d1 = step 150 − step 100, d2 = end − step 150). Recovery is part of the
run itself (``results.json``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from forgetlab.analysis.outputs import (check_energy, check_positive, write_angles, write_angles_over_training,
                                        write_features, write_landscape)
from forgetlab.experiments.recover import load_run_config
from forgetlab.models.build import check_checkpoint
from forgetlab.report.markdown import analysis_report
from forgetlab.utils.io import atomic_write_json
from forgetlab.worlds.biography import generate_world, write_qa_files

PAPER_PLANE = (100, 150)  # task-1 steps of the SF paper's landscape plane


def task1_snapshots(run_dir: Path) -> dict[int, Path]:
    """The run's task-1 snapshots by step (``checkpoints/task1-step-N``)."""
    found = {}
    for path in (Path(run_dir) / "checkpoints").glob("task1-step-*"):
        match = re.fullmatch(r"task1-step-(\d+)", path.name)
        if match and (path / "config.json").is_file():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def analyze_biography_run(run_dir: Path, out: Path | None = None, *, grid: tuple[int, int] = (21, 21),
                          max_examples: int = 1000, plane: tuple[int, int] | None = None, energy: float = 0.99,
                          max_prompts: int = 500, landscape_range: str = "paper", progress: bool = True,
                          log: Callable[[str], None] = print) -> dict:
    """Angles, angles over training, features and the landscape of a finished biography run, each into its own
    folder of ``out`` (default ``RUN/analysis``), with ``analysis.json`` listing them and the settings used.

    ``plane`` names the two task-1 snapshot steps (A, B) of the landscape: through step A, d1 = step B − step A,
    d2 = end − step B; by default the paper's (100, 150) when both were kept, else the last two snapshots. Without
    two snapshots the landscape is skipped, and without any the angles over training too (said in the log).
    ``landscape_range``: ``paper`` (its [−1, 7] × [−1, 12]) or ``auto`` (the trajectory's span, a quarter to spare).
    """
    if landscape_range not in ("paper", "auto"):
        raise ValueError(f"--landscape-range {landscape_range!r}: use paper or auto")
    # each analysis checks its own options only when it starts, after the ones before it have written their files and
    # spent minutes: an option that cannot work is refused here, before anything is loaded or written
    if min(grid) < 2:
        raise ValueError(f"--grid {grid[0]}x{grid[1]}: need at least 2 points per axis, such as 21x21")
    check_energy(energy)
    check_positive(max_examples, "--max-examples")
    check_positive(max_prompts, "--max-prompts")
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished `forgetlab biography run` directory (no results.json)")
    cfg = load_run_config(run_dir)
    ckpt = run_dir / "checkpoints"
    for name in ("pretrain", "task0", "task1"):
        check_checkpoint(ckpt / name, "checkpoint")
    snapshots = task1_snapshots(run_dir)
    if plane is not None:
        missing = [step for step in plane if step not in snapshots]
        if missing or not plane[0] < plane[1]:
            raise ValueError(f"--plane {plane[0]},{plane[1]}: needs two task-1 snapshot steps in increasing order; this "
                             f"run kept {', '.join(map(str, snapshots)) or 'none'} (biography run --snapshot-steps)")
    elif all(step in snapshots for step in PAPER_PLANE):
        plane = PAPER_PLANE
    elif len(snapshots) >= 2:
        plane = tuple(list(snapshots)[-2:])
    out = Path(out) if out is not None else run_dir / "analysis"
    qa = write_qa_files(generate_world(cfg.world), out / "data")
    later = [ckpt / "task0", *snapshots.values(), ckpt / "task1"]  # task 1 in training order
    done: dict[str, dict] = {}
    log("[analyze] update angles: task 1 (task0 → task1) against task 0's update (pretrain → task0)")
    done["angles"] = write_angles(ckpt / "pretrain", ckpt / "task0", ckpt / "task0", ckpt / "task1", out / "angles",
                                  energy, log=log)
    if snapshots:
        log("[analyze] update angles window by window along task 1")
        done["angles-over-training"] = write_angles_over_training(ckpt / "pretrain", ckpt / "task0", later,
                                                                  out / "angles-over-training", energy, log=log)
    else:
        log("[analyze] angles over training skipped: the run kept no task-1 snapshots (--snapshot-steps)")
    log("[analyze] feature shift along task 1 on task-0 test questions")
    done["features"] = write_features(later, qa["qa_task0_test"], out / "features", max_prompts, log=log)
    if plane is not None:
        log(f"[analyze] loss landscape through task-1 step {plane[0]}, d1 = step {plane[1]} − step {plane[0]}, "
            f"d2 = end − step {plane[1]}")
        done["landscape"] = write_landscape(snapshots[plane[0]], snapshots[plane[1]], ckpt / "task1",
                                            {"task0": qa["qa_task0_test"], "task1": qa["qa_task1"]}, out / "landscape",
                                            trajectory=later, grid=grid, max_examples=max_examples, progress=progress,
                                            log=log, **({"alpha_range": None, "beta_range": None}
                                                        if landscape_range == "auto" else {}))
    else:
        log("[analyze] loss landscape skipped: it needs two task-1 snapshots (--snapshot-steps, e.g. 100,150)")
    atomic_write_json(out / "analysis.json", {
        "run": str(run_dir), "analyses": {name: str(out / name) for name in done},
        "settings": {"grid": list(grid), "max_examples": max_examples, "plane": list(plane) if plane else None,
                     "energy": energy, "max_prompts": max_prompts, "snapshots": list(snapshots),
                     "landscape_range": landscape_range}})
    analysis_report(done, out)
    log(f"wrote {', '.join(done)}, analysis.json and analysis.md into {out}")
    return done
