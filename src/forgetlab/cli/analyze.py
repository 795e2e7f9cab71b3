"""``forgetlab analyze``: spurious-forgetting diagnostics for any Hugging Face checkpoints."""

from __future__ import annotations

import time
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


def _load(path: Path, like=None):
    """The checkpoint at ``path``, on the GPU when there is one; with ``like`` (a model), refused in one line unless
    it has the same parameters."""
    import torch

    from forgetlab.analysis.weights import check_same_model
    from forgetlab.models.build import check_checkpoint, load_model

    check_checkpoint(path, "checkpoint")
    model = load_model(path).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    if like is not None:
        check_same_model(like, model, f"checkpoint {path}")
    return model


def _tokenizer(path: Path):
    from forgetlab.models.build import check_checkpoint, load_tokenizer

    check_checkpoint(path, "checkpoint")
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as err:
        detail = " ".join(str(err).split())[:200]  # transformers' messages span lines; the CLI reports one
        raise ValueError(f"checkpoint {path} has no loadable tokenizer ({detail}); save the tokenizer beside the model") from None


def _fingerprint(path: Path) -> list:
    """What identifies a file or checkpoint directory's content cheaply: its resolved path and each file's size and
    modification time (a resumed landscape must not mix the losses of two different models or data files)."""
    path = path.resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [str(path), [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]]


def _energy(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"--energy {value} must be in (0, 1]")
    return value


def _positive(value: int, option: str) -> int:
    if value < 1:
        raise ValueError(f"{option} {value} must be at least 1")
    return value


def _parse_range(text: str, name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} {text!r}: expected LOW,HIGH such as -1,7") from None
    if not low < high:
        raise ValueError(f"--{name} {text!r}: LOW must be below HIGH")
    return low, high


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
    import numpy as np

    from forgetlab.analysis.angles import angle_matrix, update_angles, write_angles_csv
    from forgetlab.report.analysis import plot_angle_heatmap
    from forgetlab.utils.io import atomic_write_json

    rows = update_angles(*(_load(p) for p in (a1, a2, b1, b2)), energy=_energy(energy))
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
    atomic_write_json(out / "angles.json", {"a1": str(a1), "a2": str(a2), "b1": str(b1), "b2": str(b2), "energy": energy,
                                            "mean_angle_deg_by_layer": by_layer, "chance_angle_deg_by_layer": chance_by_layer,
                                            "not_updated": unchanged, "rows": [r.__dict__ for r in rows]})
    plot_angle_heatmap(layers, comps, grid, out / "angles.png", title=f"B = {b1.name}→{b2.name} vs A = {a1.name}→{a2.name}",
                       chance=chance, unchanged=angle_matrix(rows, "rank_b")[2] * angle_matrix(rows, "rank_a")[2] == 0)

    def show(means: dict) -> str:
        return "  ".join(f"{k}:{'-' if v is None else f'{v:.1f}'}" for k, v in means.items())

    console.print(f"mean angle by layer (deg): {show(by_layer)}")
    console.print(f"chance angle by layer (deg): {show(chance_by_layer)}")
    for phase, names in unchanged.items():
        if names:
            console.print(f"not updated in phase {phase.upper()} (no angle; frozen?): {', '.join(names)}")
    console.print(f"wrote {out}/angles.csv, angles.json, angles.png")


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
    from forgetlab.analysis.angles import COLUMNS, angles_over_training, component_means, csv_cells
    from forgetlab.report.analysis import plot_angles_over_training
    from forgetlab.utils.io import atomic_write_json, atomic_write_text

    energy = _energy(energy)
    if len(checkpoint) < 2:
        raise ValueError("--checkpoint: give at least two checkpoints of the later phase (its start, then later ones)")
    first = _load(a1)  # every other checkpoint must be of the same model: one line naming the first that is not
    windows = angles_over_training(first, _load(a2, first), (_load(p, first) for p in checkpoint), energy)
    names = [f"{b1.name}→{b2.name}" for b1, b2 in zip(checkpoint, checkpoint[1:])]
    means = [component_means(rows) for rows in windows]
    out.mkdir(parents=True, exist_ok=True)
    lines = [",".join(("window", "b1", "b2", *COLUMNS))]
    for k, rows in enumerate(windows):
        lines += [",".join([str(k), str(checkpoint[k]), str(checkpoint[k + 1]), *csv_cells(r)]) for r in rows]
    atomic_write_text(out / "angles_over_training.csv", "\n".join(lines) + "\n")
    atomic_write_json(out / "angles_over_training.json", {
        "a1": str(a1), "a2": str(a2), "checkpoints": [str(c) for c in checkpoint], "energy": energy,
        "windows": [{"b1": str(checkpoint[k]), "b2": str(checkpoint[k + 1]), "by_component": m} for k, m in enumerate(means)]})
    plot_angles_over_training(names, means, out / "angles_over_training.png", title=f"later windows vs A = {a1.name}→{a2.name}")
    for name, m in zip(names, means):
        console.print(f"{name}: chance − angle (deg) " + "  ".join(
            f"{c}:{'-' if v['below_chance_deg'] is None else format(v['below_chance_deg'], '.1f')}" for c, v in m.items()))
    console.print(f"wrote {out}/angles_over_training.csv, angles_over_training.json, angles_over_training.png")


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
    alpha_range: Annotated[str, typer.Option(help="range along d1")] = "-1,7",
    beta_range: Annotated[str, typer.Option(help="range along d2")] = "-1,12",
    orthogonalize: Annotated[bool, typer.Option(help="make d2 orthogonal to d1")] = False,
    filter_normalize: Annotated[bool, typer.Option(help="rescale each output unit of the directions to the weights' "
                                                        "(Li et al.; before --orthogonalize)")] = False,
    max_examples: Annotated[int, typer.Option(help="QA rows per task used for the loss")] = 2000,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Task losses on the plane through theta0 spanned by (theta1 - theta0, theta2 - theta1), with a trajectory."""
    import numpy as np

    from forgetlab.analysis.landscape import dataset_loss, directions, filter_axes, loss_grid, parameters_of, project
    from forgetlab.analysis.recovery import encode_qa, read_qa_rows
    from forgetlab.report.analysis import plot_landscape
    from forgetlab.models.tokenizers import pad_id
    from forgetlab.train.data import qa_dataset
    from forgetlab.utils.io import atomic_write_json, read_json

    try:
        n_a, n_b = (int(v) for v in grid.lower().split("x"))
    except ValueError:
        raise ValueError(f"--grid {grid!r}: expected AxB such as 41x61") from None
    if n_a < 2 or n_b < 2:
        raise ValueError(f"--grid {grid!r}: need at least 2 points per axis")
    (a_lo, a_hi), (b_lo, b_hi) = _parse_range(alpha_range, "alpha-range"), _parse_range(beta_range, "beta-range")
    tasks, files = {}, {}
    for item in data:
        if "=" not in item:
            raise ValueError(f"--data {item!r}: expected NAME=FILE, e.g. --data task0=qa_task0_test.jsonl")
        name, path = item.split("=", 1)
        if name in tasks:
            raise ValueError(f"--data {item!r}: the task name {name!r} is given twice; name each task once")
        tasks[name], files[name] = read_qa_rows(path)[:_positive(max_examples, "--max-examples")], Path(path)
    model = _load(theta0)
    tok = _tokenizer(theta0)
    pad = pad_id(tok)
    datasets = {name: qa_dataset(*encode_qa(tok, rows), tok.eos_token_id, pad) for name, rows in tasks.items()}
    p0, p1, p2 = parameters_of(model), parameters_of(_load(theta1, model)), parameters_of(_load(theta2, model))
    d1, d2 = directions(p0, p1, p2, orthogonalize, filter_normalize, filter_axes(model))
    alphas, betas = np.linspace(a_lo, a_hi, n_a), np.linspace(b_lo, b_hi, n_b)
    task_losses = {name: (lambda m, d=d: dataset_loss(m, d)) for name, d in datasets.items()}
    # a killed grid resumes from its last finished row, if nothing that decides the losses has changed
    settings = {"checkpoints": [_fingerprint(p) for p in (theta0, theta1, theta2)],
                "data": {name: _fingerprint(path) for name, path in files.items()},
                "max_examples": max_examples, "alphas": alphas.tolist(), "betas": betas.tolist(),
                "orthogonalize": orthogonalize, "filter_normalize": filter_normalize}
    partial_path = out / "landscape.partial.json"
    partial = read_json(partial_path) if partial_path.is_file() else {}
    done, earlier_seconds = {}, 0.0
    if partial.get("settings") == settings and set(partial.get("losses", {})) == set(tasks):
        done, earlier_seconds = partial["losses"], partial["seconds"]
        console.print(f"resuming the grid after row {partial['rows_done']} of {n_b} ({partial_path})")
    elif partial:
        console.print(f"{partial_path} is a grid of other checkpoints, data or settings; starting afresh")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def save_rows(rows_done: int, grid_so_far: dict) -> None:
        atomic_write_json(partial_path, {"settings": settings, "rows_done": rows_done,
                                         "seconds": earlier_seconds + time.perf_counter() - started,
                                         "losses": {k: v[:rows_done].tolist() for k, v in grid_so_far.items()}})

    result = loss_grid(model, p0, d1, d2, alphas, betas, task_losses, progress, done=done, on_row=save_rows)
    seconds = earlier_seconds + time.perf_counter() - started
    points = list(trajectory) if trajectory else [theta0, theta1, theta2]  # drawn in the order given
    # each trajectory checkpoint's own losses: the exact values along the path, not read off the plane
    params, path_losses = [], []
    for point in points:
        checkpoint = _load(point, model)
        params.append(parameters_of(checkpoint))
        path_losses.append({name: fn(checkpoint) for name, fn in task_losses.items()})
        del checkpoint
    coords = project(p0, d1, d2, params)
    labels = [p.name for p in points]
    device = str(next(model.parameters()).device)
    atomic_write_json(out / "landscape.json", {
        "theta0": str(theta0), "theta1": str(theta1), "theta2": str(theta2), "orthogonalize": orthogonalize,
        "filter_normalize": filter_normalize, "alphas": alphas.tolist(), "betas": betas.tolist(),
        "losses": {k: v.tolist() for k, v in result.losses.items()},
        "trajectory": [{"checkpoint": str(p), "alpha": float(a), "beta": float(b), "losses": losses}
                       for p, (a, b), losses in zip(points, coords, path_losses)],
        "examples": {name: len(d) for name, d in datasets.items()},
        "device": device, "grid_seconds": seconds, "grid_points_per_s": n_a * n_b / seconds,
        "resumed_after_row": len(next(iter(done.values()))) if done else 0})
    plot_landscape(alphas, betas, result.losses, out / "landscape.png", coords, labels)
    partial_path.unlink(missing_ok=True)
    console.print(f"landscape: {n_a} x {n_b} grid x {len(datasets)} tasks in {seconds:.1f} s "
                  f"({n_a * n_b / seconds:.2f} points/s) on {device}")
    console.print("along the trajectory: " + "; ".join(
        f"{label} " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()) for label, losses in zip(labels, path_losses)))
    console.print(f"wrote {out}/landscape.json, landscape.png")


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
    from forgetlab.analysis.features import feature_shift, last_token_features, pca_scatter
    from forgetlab.analysis.recovery import encode_qa, read_qa_rows
    from forgetlab.report.analysis import plot_feature_scatter, plot_feature_shift
    from forgetlab.models.tokenizers import pad_id
    from forgetlab.utils.io import atomic_write_json, atomic_write_text

    if len(checkpoint) < 2:
        raise ValueError("--checkpoint: give at least two checkpoints (the first is the reference)")
    tok = _tokenizer(checkpoint[0])
    ids, _ = encode_qa(tok, read_qa_rows(prompts)[:_positive(max_prompts, "--max-prompts")])
    pad = pad_id(tok)
    first = _load(checkpoint[0])
    feats = [last_token_features(first, ids, pad)]
    feats += [last_token_features(_load(c, first), ids, pad) for c in checkpoint[1:]]
    if not 0 <= scatter_layer < feats[0].shape[0]:
        raise ValueError(f"--scatter-layer {scatter_layer} is out of range; the models have layers 0..{feats[0].shape[0] - 1}")
    pairs = {f"{checkpoint[0].name}→{c.name}": feature_shift(feats[0], f) for c, f in zip(checkpoint[1:], feats[1:])}
    out.mkdir(parents=True, exist_ok=True)
    lines = ["pair,layer,pc1_angle_deg,mean_shift,shift_vs_pc1_angle_deg"]
    fmt = lambda v: "" if v is None else f"{v:.6g}"  # noqa: E731
    lines += [f"{pair},{r['layer']},{fmt(r['pc1_angle_deg'])},{fmt(r['mean_shift'])},{fmt(r['shift_vs_pc1_angle_deg'])}"
              for pair, rows in pairs.items() for r in rows]
    atomic_write_text(out / "features.csv", "\n".join(lines) + "\n")
    atomic_write_json(out / "features.json", {"checkpoints": [str(c) for c in checkpoint], "pairs": pairs})
    plot_feature_shift(pairs, out / "features.png")
    plot_feature_scatter(pca_scatter(feats[0][scatter_layer], [f[scatter_layer] for f in feats[1:]]),
                         [c.name for c in checkpoint], out / "features_scatter.png", title=f"layer {scatter_layer}")
    console.print(f"wrote {out}/features.csv, features.json, features.png, features_scatter.png")


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
) -> None:
    """Current vs recovered old-task exact match per checkpoint, and the spurious share of the drop."""
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
        tok = _tokenizer(before_checkpoint)
        pad = pad_id(tok)
        before = greedy_exact_match(_load(before_checkpoint), *encode_qa(tok, eval_rows), eos_id=tok.eos_token_id, pad_id=pad).em
    cfg = replace(DEFAULT_RECOVERY, lr=lr, epochs=epochs, batch_size=batch_size)
    cfg.validate("recovery")
    rows = recovery_table(checkpoint, fit_rows, eval_rows, before, cfg, seed)
    atomic_write_json(out / "recovery.json", {"fit": str(fit), "eval": str(eval_), "before": before, "lr": lr,
                                              "epochs": epochs, "rows": rows})
    plot_recovery(rows, out / "recovery.png")
    for r in rows:
        share = "-" if r["spurious_share"] is None else f"{r['spurious_share']:.2f}"
        console.print(f"{r['checkpoint']}: current {r['current']:.3f}  recovered {r['recovered']:.3f}  spurious share {share}")
    console.print(f"wrote {out}/recovery.json, recovery.png")
