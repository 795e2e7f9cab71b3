"""Each diagnostic run end to end on checkpoint directories: load, compute, write its data (CSV/JSON) and PNG into
a folder, return what it wrote. ``forgetlab analyze ...`` is a thin layer over these; from Python they are the same
commands, and :mod:`forgetlab.experiments.biography_analysis` runs them all on a biography run.

Every checkpoint after the first is refused in one line unless it is of the same model; inputs are checked
before the output folder is made.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from forgetlab.utils.io import file_sha256

Log = Callable[[str], None]


def load_checkpoint(path: Path, like=None):
    """The checkpoint at ``path`` in eval mode, on the GPU when there is one; with ``like`` (a model), refused in one
    line unless it has the same parameters."""
    from forgetlab.analysis.weights import check_same_model
    from forgetlab.models.build import check_checkpoint, load_model

    check_checkpoint(path, "checkpoint")
    model = load_model(path).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    if like is not None:
        check_same_model(like, model, f"checkpoint {path}")
    return model


def load_checkpoint_tokenizer(path: Path):
    from forgetlab.models.build import check_checkpoint, load_tokenizer

    check_checkpoint(path, "checkpoint")
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as err:
        detail = " ".join(str(err).split())[:200]  # transformers' messages span lines; the CLI reports one
        raise ValueError(f"checkpoint {path} has no loadable tokenizer ({detail}); save the tokenizer beside the model") from None


def fingerprint(path: Path) -> list:
    """What identifies a file or checkpoint directory's content cheaply: its resolved path and each file's size and
    modification time (a resumed landscape must not mix the losses of two different models or data files)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist; check the path")
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [str(path), [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]]


def checkpoint_fingerprints(paths: Sequence[Path]) -> list:
    """Each checkpoint checked (one line naming the first that is not one), then its :func:`fingerprint`: what the
    ``settings`` of a resumable or reusable analysis record."""
    from forgetlab.models.build import check_checkpoint

    for path in paths:
        check_checkpoint(path, "checkpoint")
    return [fingerprint(p) for p in paths]


def check_energy(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"--energy {value} must be in (0, 1]")
    return value


def check_positive(value: int, option: str) -> int:
    if value < 1:
        raise ValueError(f"{option} {value} must be at least 1")
    return value


def kept_result(out: Path, data_file: str, files: Sequence[str], settings: dict, log: Log) -> dict | None:
    """The data an earlier call wrote into ``out`` from the same inputs and settings, when it and all its ``files`` are
    there: a rerun (``biography analyze`` after a killed landscape) then loads no checkpoint for it."""
    from forgetlab.utils.io import read_json

    path = Path(out) / data_file
    if path.is_file() and all((Path(out) / f).is_file() for f in files):
        data = read_json(path)
        if data.get("settings") == settings:
            log(f"{path} already holds this analysis of the same checkpoints and settings; kept (delete it to redo)")
            return data
    return None


def write_angles(a1: Path, a2: Path, b1: Path, b2: Path, out: Path, energy: float = 0.99, log: Log = print) -> dict:
    """Angle between phase B's update (b1 → b2) of every weight matrix and the subspace phase A's (a1 → a2) spanned:
    ``angles.csv``, ``angles.json``, ``angles.png``."""
    from forgetlab.analysis.angles import angle_matrix, update_angles, write_angles_csv
    from forgetlab.report.analysis import plot_angle_heatmap
    from forgetlab.utils.io import atomic_write_json

    settings = {"checkpoints": checkpoint_fingerprints((a1, a2, b1, b2)), "energy": check_energy(energy)}
    if (kept := kept_result(out, "angles.json", ("angles.csv", "angles.png"), settings, log)) is not None:
        return kept
    first = load_checkpoint(a1)
    rows = update_angles(first, *(load_checkpoint(p, first) for p in (a2, b1, b2)), energy=energy)
    out.mkdir(parents=True, exist_ok=True)
    write_angles_csv(rows, out / "angles.csv")
    layers, comps, grid = angle_matrix(rows)
    chance = angle_matrix(rows, "chance_angle_deg")[2]

    def layer_mean(values) -> float | None:  # None for a layer whose matrices all went unchanged (e.g. frozen)
        finite = values[np.isfinite(values)]
        return float(finite.mean()) if len(finite) else None

    by_layer = {str(l): layer_mean(grid[i]) for i, l in enumerate(layers)}
    chance_by_layer = {str(l): layer_mean(np.where(np.isfinite(grid[i]), chance[i], np.nan)) for i, l in enumerate(layers)}
    unchanged = {phase: [f"{r.layer}/{r.component}" for r in rows if getattr(r, f"rank_{phase}") == 0] for phase in "ab"}
    data = {"a1": str(a1), "a2": str(a2), "b1": str(b1), "b2": str(b2), "energy": energy,
            "mean_angle_deg_by_layer": by_layer, "chance_angle_deg_by_layer": chance_by_layer,
            "not_updated": unchanged, "rows": [r.__dict__ for r in rows], "settings": settings}
    atomic_write_json(out / "angles.json", data)
    plot_angle_heatmap(layers, comps, grid, out / "angles.png", title=f"B = {b1.name}→{b2.name} vs A = {a1.name}→{a2.name}",
                       chance=chance, unchanged=angle_matrix(rows, "rank_b")[2] * angle_matrix(rows, "rank_a")[2] == 0)

    def show(means: dict) -> str:
        return "  ".join(f"{k}:{'-' if v is None else f'{v:.1f}'}" for k, v in means.items())

    log(f"mean angle by layer (deg): {show(by_layer)}")
    log(f"chance angle by layer (deg): {show(chance_by_layer)}")
    for phase, names in unchanged.items():
        if names:
            log(f"not updated in phase {phase.upper()} (no angle; frozen?): {', '.join(names)}")
    log(f"wrote {out}/angles.csv, angles.json, angles.png")
    return data


def write_angles_over_training(a1: Path, a2: Path, checkpoints: Sequence[Path], out: Path, energy: float = 0.99,
                               log: Log = print) -> dict:
    """Each window of a later phase (checkpoint k → k+1) against the subspace phase A updated:
    ``angles_over_training.csv``, ``.json`` (per window and component, over layers) and ``.png``."""
    from forgetlab.analysis.angles import COLUMNS, angles_over_training, component_means, csv_cells
    from forgetlab.report.analysis import plot_angles_over_training
    from forgetlab.utils.io import atomic_write_json, atomic_write_text

    energy = check_energy(energy)
    checkpoints = list(checkpoints)
    if len(checkpoints) < 2:
        raise ValueError("--checkpoint: give at least two checkpoints of the later phase (its start, then later ones)")
    settings = {"checkpoints": checkpoint_fingerprints((a1, a2, *checkpoints)), "energy": energy}
    if (kept := kept_result(out, "angles_over_training.json", ("angles_over_training.csv", "angles_over_training.png"),
                            settings, log)) is not None:
        return kept
    first = load_checkpoint(a1)  # every other checkpoint must be of the same model: one line naming the first that is not
    windows = angles_over_training(first, load_checkpoint(a2, first), (load_checkpoint(p, first) for p in checkpoints),
                                   energy)
    names = [f"{b1.name}→{b2.name}" for b1, b2 in zip(checkpoints, checkpoints[1:])]
    means = [component_means(rows) for rows in windows]
    out.mkdir(parents=True, exist_ok=True)
    lines = [",".join(("window", "b1", "b2", *COLUMNS))]
    for k, rows in enumerate(windows):
        lines += [",".join([str(k), str(checkpoints[k]), str(checkpoints[k + 1]), *csv_cells(r)]) for r in rows]
    atomic_write_text(out / "angles_over_training.csv", "\n".join(lines) + "\n")
    data = {"a1": str(a1), "a2": str(a2), "checkpoints": [str(c) for c in checkpoints], "energy": energy,
            "windows": [{"b1": str(checkpoints[k]), "b2": str(checkpoints[k + 1]), "by_component": m}
                        for k, m in enumerate(means)], "settings": settings}
    atomic_write_json(out / "angles_over_training.json", data)
    plot_angles_over_training(names, means, out / "angles_over_training.png", title=f"later windows vs A = {a1.name}→{a2.name}")
    for name, m in zip(names, means):
        log(f"{name}: chance − angle (deg) " + "  ".join(
            f"{c}:{'-' if v['below_chance_deg'] is None else format(v['below_chance_deg'], '.1f')}" for c, v in m.items()))
    log(f"wrote {out}/angles_over_training.csv, angles_over_training.json, angles_over_training.png")
    return data


def write_landscape(theta0: Path, theta1: Path, theta2: Path, data: Mapping[str, Path], out: Path, *,
                    trajectory: Sequence[Path] | None = None, grid: tuple[int, int] = (21, 31),
                    alpha_range: tuple[float, float] | None = (-1.0, 7.0),
                    beta_range: tuple[float, float] | None = (-1.0, 12.0),
                    orthogonalize: bool = False, filter_normalize: bool = False, max_examples: int = 2000,
                    progress: bool = True, log: Log = print) -> dict:
    """Task losses (``data``: task name → QA JSONL) on the plane through theta0 spanned by d1 = theta1 − theta0 and
    d2 = theta2 − theta1, with the trajectory projected: ``landscape.json``, ``landscape.png``. A range of None
    (``auto``) spans the trajectory's projections with a quarter of their extent to spare, so the grid's points fall
    where the path runs. The grid is saved row by row (``landscape.partial.json``), so the same call after a kill
    computes only the missing rows."""
    import forgetlab.analysis.landscape as ls
    from forgetlab.analysis.recovery import encode_qa, read_qa_rows
    from forgetlab.models.tokenizers import pad_id
    from forgetlab.report.analysis import plot_landscape
    from forgetlab.train.data import qa_dataset
    from forgetlab.utils.io import atomic_write_json, read_json

    n_a, n_b = grid
    if n_a < 2 or n_b < 2:
        raise ValueError(f"--grid {n_a}x{n_b}: need at least 2 points per axis")
    for name, given in (("alpha-range", alpha_range), ("beta-range", beta_range)):
        if given is not None and not given[0] < given[1]:
            raise ValueError(f"--{name} {given[0]:g},{given[1]:g}: LOW must be below HIGH (or auto)")
    tasks = {name: read_qa_rows(path)[:check_positive(max_examples, "--max-examples")] for name, path in data.items()}
    points = list(trajectory) if trajectory else [theta0, theta1, theta2]  # drawn in the order given
    # what decides the losses: a killed grid resumes from its last finished row, a finished one is only redrawn (a bad
    # trajectory checkpoint is named now, not after the grid); QA files by content, as commands write them anew
    settings = {"checkpoints": checkpoint_fingerprints((theta0, theta1, theta2)),
                "data": {name: file_sha256(path) for name, path in data.items()},
                "max_examples": max_examples, "grid": [n_a, n_b],
                "alpha_range": list(alpha_range) if alpha_range else "auto",
                "beta_range": list(beta_range) if beta_range else "auto",
                "orthogonalize": orthogonalize, "filter_normalize": filter_normalize,
                "trajectory": checkpoint_fingerprints(points)}
    if (out / "landscape.json").is_file() and read_json(out / "landscape.json").get("settings") == settings:
        log(f"{out}/landscape.json already holds this grid; redrawing landscape.png only")
        return redraw_landscape(out)
    model = load_checkpoint(theta0)
    tok = load_checkpoint_tokenizer(theta0)
    pad = pad_id(tok)
    datasets = {name: qa_dataset(*encode_qa(tok, rows), tok.eos_token_id, pad) for name, rows in tasks.items()}
    p0 = ls.parameters_of(model)
    d1, d2 = ls.directions(p0, *(ls.parameters_of(load_checkpoint(p, model)) for p in (theta1, theta2)),
                           orthogonalize, filter_normalize, ls.filter_axes(model))  # θ1, θ2 freed once d1, d2 exist
    task_losses = {name: (lambda m, d=d: ls.dataset_loss(m, d)) for name, d in datasets.items()}
    # the trajectory first: an auto range needs its projection; each checkpoint's own losses are the exact values
    # along the path, not read off the plane. One checkpoint in memory at a time (a long path of a big model would
    # not fit all at once)
    path_losses = []

    def along_path():
        for point in points:
            checkpoint = load_checkpoint(point, model)
            path_losses.append({name: fn(checkpoint) for name, fn in task_losses.items()})
            params = ls.parameters_of(checkpoint)
            del checkpoint
            yield params
            del params

    coords = ls.project(p0, d1, d2, along_path())
    alphas, betas = (np.linspace(*(given or ls.span_with_margin(coords[:, axis])), n)
                     for given, axis, n in ((alpha_range, 0, n_a), (beta_range, 1, n_b)))
    partial_path = out / "landscape.partial.json"
    partial = read_json(partial_path) if partial_path.is_file() else {}
    done, earlier_seconds = {}, 0.0
    if partial.get("settings") == settings and set(partial.get("losses", {})) == set(tasks):
        done, earlier_seconds = partial["losses"], partial["seconds"]
        log(f"resuming the grid after row {partial['rows_done']} of {n_b} ({partial_path})")
    elif partial:
        log(f"{partial_path} is a grid of other checkpoints, data or settings; starting afresh")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def save_rows(rows_done: int, grid_so_far: dict) -> None:
        atomic_write_json(partial_path, {"settings": settings, "rows_done": rows_done,
                                         "seconds": earlier_seconds + time.perf_counter() - started,
                                         "losses": {k: v[:rows_done].tolist() for k, v in grid_so_far.items()}})

    result = ls.loss_grid(model, p0, d1, d2, alphas, betas, task_losses, progress, done=done, on_row=save_rows)
    seconds = earlier_seconds + time.perf_counter() - started
    labels = [p.name for p in points]
    device = str(next(model.parameters()).device)
    written = {
        "theta0": str(theta0), "theta1": str(theta1), "theta2": str(theta2), "orthogonalize": orthogonalize,
        "filter_normalize": filter_normalize, "alphas": alphas.tolist(), "betas": betas.tolist(),
        "losses": {k: v.tolist() for k, v in result.losses.items()},
        "trajectory": [{"checkpoint": str(p), "alpha": float(a), "beta": float(b), "losses": losses}
                       for p, (a, b), losses in zip(points, coords, path_losses)],
        "examples": {name: len(d) for name, d in datasets.items()},
        "device": device, "grid_seconds": seconds, "grid_points_per_s": n_a * n_b / seconds,
        "resumed_after_row": len(next(iter(done.values()))) if done else 0, "settings": settings}
    atomic_write_json(out / "landscape.json", written)
    plot_landscape(alphas, betas, result.losses, out / "landscape.png", coords, labels)
    partial_path.unlink(missing_ok=True)
    log(f"landscape: {n_a} x {n_b} grid x {len(datasets)} tasks in {seconds:.1f} s ({n_a * n_b / seconds:.2f} points/s) "
        f"on {device}")
    log("along the trajectory: " + "; ".join(
        f"{label} " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()) for label, losses in zip(labels, path_losses)))
    log(f"wrote {out}/landscape.json, landscape.png")
    return written


def redraw_landscape(out: Path) -> dict:
    """Draw ``out/landscape.png`` again from ``out/landscape.json`` (a finished grid, or one computed before the figure
    changed); returns the JSON's content."""
    from forgetlab.report.analysis import plot_landscape
    from forgetlab.utils.io import read_json

    written = read_json(Path(out) / "landscape.json")
    path = written["trajectory"]
    plot_landscape(np.array(written["alphas"]), np.array(written["betas"]),
                   {task: np.array(grid) for task, grid in written["losses"].items()}, Path(out) / "landscape.png",
                   np.array([[p["alpha"], p["beta"]] for p in path]), [Path(p["checkpoint"]).name for p in path])
    return written


def write_features(checkpoints: Sequence[Path], prompts: Path, out: Path, max_prompts: int = 500, scatter_layer: int = 1,
                   log: Log = print) -> dict:
    """Per layer: PC1 angle and mean shift of last-token features, each checkpoint against the first:
    ``features.csv``, ``features.json``, ``features.png``, ``features_scatter.png``."""
    from forgetlab.analysis.features import feature_shift, last_token_features, pca_scatter
    from forgetlab.analysis.recovery import encode_qa, read_qa_rows
    from forgetlab.models.tokenizers import pad_id
    from forgetlab.report.analysis import plot_feature_scatter, plot_feature_shift
    from forgetlab.utils.io import atomic_write_json, atomic_write_text

    checkpoints = list(checkpoints)
    if len(checkpoints) < 2:
        raise ValueError("--checkpoint: give at least two checkpoints (the first is the reference)")
    fingerprints = checkpoint_fingerprints(checkpoints)
    rows = read_qa_rows(prompts)[:check_positive(max_prompts, "--max-prompts")]
    settings = {"checkpoints": fingerprints, "prompts": file_sha256(prompts), "max_prompts": max_prompts,
                "scatter_layer": scatter_layer}
    if (kept := kept_result(out, "features.json", ("features.csv", "features.png", "features_scatter.png"), settings,
                            log)) is not None:
        return kept
    tok = load_checkpoint_tokenizer(checkpoints[0])
    ids, _ = encode_qa(tok, rows)
    pad = pad_id(tok)
    first = load_checkpoint(checkpoints[0])
    feats = [last_token_features(first, ids, pad)]
    feats += [last_token_features(load_checkpoint(c, first), ids, pad) for c in checkpoints[1:]]
    if not 0 <= scatter_layer < feats[0].shape[0]:
        raise ValueError(f"--scatter-layer {scatter_layer} is out of range; the models have layers 0..{feats[0].shape[0] - 1}")
    pairs = {f"{checkpoints[0].name}→{c.name}": feature_shift(feats[0], f) for c, f in zip(checkpoints[1:], feats[1:])}
    out.mkdir(parents=True, exist_ok=True)
    lines = ["pair,layer,pc1_angle_deg,mean_shift,shift_vs_pc1_angle_deg"]
    fmt = lambda v: "" if v is None else f"{v:.6g}"  # noqa: E731
    lines += [f"{pair},{r['layer']},{fmt(r['pc1_angle_deg'])},{fmt(r['mean_shift'])},{fmt(r['shift_vs_pc1_angle_deg'])}"
              for pair, rows in pairs.items() for r in rows]
    atomic_write_text(out / "features.csv", "\n".join(lines) + "\n")
    data = {"checkpoints": [str(c) for c in checkpoints], "pairs": pairs, "settings": settings}
    atomic_write_json(out / "features.json", data)
    plot_feature_shift(pairs, out / "features.png")
    plot_feature_scatter(pca_scatter(feats[0][scatter_layer], [f[scatter_layer] for f in feats[1:]]),
                         [c.name for c in checkpoints], out / "features_scatter.png", title=f"layer {scatter_layer}")
    log(f"wrote {out}/features.csv, features.json, features.png, features_scatter.png")
    return data


def write_recovery(checkpoints: Sequence[Path], fit: Path, eval_: Path, out: Path, *, before: float | None = None,
                   before_checkpoint: Path | None = None, lr: float = 2e-4, epochs: float = 1.0, batch_size: int = 32,
                   seed: int = 0, progress: bool = True, log: Log = print) -> dict:
    """Current vs recovered old-task exact match per checkpoint, and the spurious share of the drop:
    ``recovery.json``, ``recovery.png``."""
    from dataclasses import replace

    from forgetlab.analysis.recovery import DEFAULT_RECOVERY, encode_qa, read_qa_rows, recovery_table
    from forgetlab.eval.exact_match import greedy_exact_match
    from forgetlab.models.tokenizers import pad_id
    from forgetlab.report.analysis import plot_recovery
    from forgetlab.utils.io import atomic_write_json

    fit_rows, eval_rows = read_qa_rows(fit), read_qa_rows(eval_)
    overlap = {r["prompt"] for r in fit_rows} & {r["prompt"] for r in eval_rows}
    if overlap:
        raise ValueError(f"--fit and --eval share {len(overlap)} prompts; recovery must be scored on held-out rows")
    if before is not None and not 0 <= before <= 1:
        raise ValueError(f"--before {before} must be an exact-match fraction in [0, 1]")
    if before is None and before_checkpoint is not None:
        tok = load_checkpoint_tokenizer(before_checkpoint)
        before = greedy_exact_match(load_checkpoint(before_checkpoint), *encode_qa(tok, eval_rows),
                                    eos_id=tok.eos_token_id, pad_id=pad_id(tok)).em
    cfg = replace(DEFAULT_RECOVERY, lr=lr, epochs=epochs, batch_size=batch_size)
    cfg.validate("recovery")
    rows = recovery_table(list(checkpoints), fit_rows, eval_rows, before, cfg, seed, progress, log)
    data = {"fit": str(fit), "eval": str(eval_), "before": before, "lr": lr, "epochs": epochs, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "recovery.json", data)
    plot_recovery(rows, out / "recovery.png")
    for r in rows:
        share = "-" if r["spurious_share"] is None else f"{r['spurious_share']:.2f}"
        log(f"{r['checkpoint']}: current {r['current']:.3f}  recovered {r['recovered']:.3f}  spurious share {share}")
    log(f"wrote {out}/recovery.json, recovery.png")
    return data
