"""Does function-vector drift explain forgetting? (FV paper, findings ii and iii; papers.md §2)

For a run's checkpoints (the initial model first) and a set of general ICL tasks, every checkpoint
gets, per task: the task's FV rebuilt from that checkpoint's mean head activations over the
*initial* model's top heads, its cosine to the initial FV, the task's instructed zero-shot score,
the same heads' summed output at the end of the zero-shot prompt (the function the bare instruction
activates; its cosine to the initial model's), and the controls: the cosine of the mean last hidden
state at the end of the zero-shot prompts (the state the answer is read from: a strict control), the same
at the end of the in-context prompts the FV is averaged over (the same inputs as the FV), and the L2
distance of all parameters from the initial ones. A least-squares line of the score change on each
measure gives its R²: FV similarity should explain the drops, the controls should not.

The interventions: on the last checkpoint, add a forgotten task's *original* FV (layer and scale
chosen on valid queries) and, separately, subtract the FV of the task trained last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from forgetlab.eval.icl import accuracy, icl_prompts
from forgetlab.fv.evaluate import sweep_layers
from forgetlab.fv.extract import FVSettings, extract_function_vector
from forgetlab.fv.hooks import add_to_residual, edit_head_inputs
from forgetlab.fv.prompts import batches
from forgetlab.fv.tasks import ICLPrompt, ICLTask, PromptFormat, sample_prompts
from forgetlab.fv.vectors import cosine, function_vector
from forgetlab.models.adapter import ModelAdapter, adapt

MEASURES = ("fv_cosine", "zero_shot_fv_cosine", "hidden_cosine", "icl_hidden_cosine", "param_distance")


@dataclass(frozen=True)
class DriftSettings:
    n_prompts: int = field(default=32, metadata={"help": "clean 10-shot prompts for each FV's mean activations"})
    eval_prompts: int = field(default=40, metadata={"help": "test queries per task for the zero-shot score"})
    shots: int = 10
    top_k: int = 10
    alphas: tuple[float, ...] = field(default=(1.0, 2.0, 4.0), metadata={"help": "FV scales tried in interventions"})
    min_drop: float = field(default=0.05, metadata={"help": "a task counts as forgotten when its score fell this much"})
    seed: int = 0

    def validate(self) -> None:
        for name in ("n_prompts", "eval_prompts", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.shots < 2:
            raise ValueError(f"shots={self.shots}: the CIE shuffles at least 2 demonstrations")
        if not self.alphas:
            raise ValueError("alphas: give at least one FV scale for the interventions")
        if not 0 < self.min_drop <= 1:  # 0 would count unchanged tasks and divide their recovery by ~0
            raise ValueError(f"min_drop={self.min_drop} must be in (0, 1]: the accuracy fall that counts as forgotten")

    def shots_for(self, task: ICLTask) -> int:
        """``shots``, or fewer for a task with fewer training pairs (its demonstrations come from them)."""
        return max(2, min(self.shots, len(task.splits(self.seed).train) - 1))  # the CIE needs 2 to shuffle

    def extraction(self, adapter: ModelAdapter, shots: int | None = None) -> FVSettings:
        """The FV extraction these settings imply for a model (top-k capped by its heads)."""
        return FVSettings(n_prompts=self.n_prompts, n_cie_prompts=max(1, self.n_prompts // 2),
                          shots=self.shots if shots is None else shots,
                          top_k=min(self.top_k, adapter.n_layers * adapter.n_heads), seed=self.seed)


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least squares y ≈ a·x + b and R² = 1 − SS_res/SS_tot (None when y or x does not vary, or with fewer than 3
    points, through which a line always passes: R² 1 for every measure says nothing)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"slope": None, "intercept": None, "r2": None, "n": int(len(x))}
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    r2 = 1.0 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2, "n": int(len(x))}


def in_context_prompts(task: ICLTask, settings: DriftSettings) -> list[ICLPrompt]:
    """The clean few-shot prompts an FV is averaged over (the same ones `extract_function_vector` samples)."""
    return sample_prompts(task.splits(settings.seed), settings.n_prompts, settings.shots_for(task), settings.seed,
                          task_name=task.name)


def fv_with_heads(adapter: ModelAdapter, tokenizer, task: ICLTask, heads,
                  settings: DriftSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's FV in this model over fixed heads (fresh mean activations, no new CIE), and from the same
    pass the mean last hidden state at the end of those in-context prompts (the same-input control)."""
    _, state, vector = prompt_end_readings(adapter, tokenizer, in_context_prompts(task, settings), heads)
    return vector, state


@torch.no_grad()
def prompt_end_readings(adapter: ModelAdapter, tokenizer, prompts: list[ICLPrompt], heads) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One pass over prompts, three readings at the prompt end: first-token accuracy; the mean last-layer
    hidden state (the hidden-state controls); and the heads' summed mean output. Over in-context prompts the
    last is the FV itself; over zero-shot prompts it asks what the bare instruction makes the FV heads carry
    (the paper's "function activation" from the input), which is what a zero-shot score depends on."""
    device = next(adapter.model.parameters()).device
    acts = torch.zeros(adapter.n_layers, adapter.n_heads * adapter.head_dim, dtype=torch.float64)
    state = torch.zeros(adapter.hidden_size, dtype=torch.float64)
    hits, n = 0, 0

    def read(layer: int, x: torch.Tensor) -> None:
        acts[layer] += x[:, -1].double().sum(0).cpu()

    with edit_head_inputs(adapter, read, layers=sorted({layer for layer, _ in heads})):
        for batch in batches(tokenizer, prompts, PromptFormat(), 64, device):
            out = adapter.model(**batch.model_inputs(), output_hidden_states=True)
            hits += int((out.logits[:, -1].argmax(-1) == batch.targets).sum())
            state += out.hidden_states[-1][:, -1].double().sum(0).cpu()
            n += len(batch)
    mean_acts = (acts / n).float().view(adapter.n_layers, adapter.n_heads, adapter.head_dim)
    return hits / n, state / n, function_vector(adapter, mean_acts, heads)


def parameter_distance(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """‖θ − θ_ref‖₂ over all parameters (names must match: LoRA merged first)."""
    total = 0.0
    for name, p in model.named_parameters():
        if name not in reference:
            raise ValueError(f"parameter {name} is not in the reference model; merge LoRA adapters before comparing")
        total += float((p.detach().double().cpu() - reference[name].double()).pow(2).sum())
    return total ** 0.5


def zero_shot_prompts(task: ICLTask, settings: DriftSettings, split: str = "test") -> list[ICLPrompt]:
    shots = settings.shots_for(task)
    if split == "test":
        return icl_prompts(task, settings.eval_prompts, shots, settings.seed, settings.seed)["zero_shot_instruction"]
    few = sample_prompts(task.splits(settings.seed), settings.eval_prompts, shots, settings.seed + 5,
                         query_split=split, task_name=task.name)
    return [p.zero_shot().with_instruction(task.instruction) for p in few]


def drift_measurements(checkpoints: Iterable[tuple[str, torch.nn.Module | Callable[[], torch.nn.Module]]], tokenizer,
                       tasks: Sequence[ICLTask], settings: DriftSettings = DriftSettings(), *, done: dict | None = None,
                       on_checkpoint: Callable[[list[dict], dict], None] | None = None,
                       progress: bool = False) -> tuple[list[dict], dict]:
    """One row per (checkpoint, task); also the initial model's FVs (for the interventions).

    ``checkpoints`` yields (label, model) with the initial model first; a model may be given as a function that
    loads it, so that a run's checkpoints are loaded one at a time and a resumed analysis loads none it has done.
    ``done``: ``{"rows", "initial"}`` as ``on_checkpoint`` last received them (called after each checkpoint) —
    their checkpoints are skipped; the initial model is still loaded, as the parameter distances start from it.
    """
    rows: list[dict] = list(done["rows"]) if done else []
    initial: dict = dict(done["initial"]) if done else {}
    finished = {r["checkpoint"] for r in rows}
    reference: dict[str, torch.Tensor] = {}
    for index, (label, model) in enumerate(checkpoints):
        if index > 0 and label in finished:
            continue
        model = model if isinstance(model, torch.nn.Module) else model()
        model.eval()
        adapter = adapt(model)
        if index == 0:
            reference = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
            if label in finished:
                continue
        distance = parameter_distance(model, reference)
        for task in tqdm(tasks, desc=label, disable=not progress, leave=False):
            prompts = zero_shot_prompts(task, settings)
            if index == 0:
                result = extract_function_vector(adapter, tokenizer, task, settings.extraction(adapter, settings.shots_for(task)))
                initial[task.name] = {"fv": result.vector, "heads": result.top_heads}
            heads = initial[task.name]["heads"]
            vector, icl_state = fv_with_heads(adapter, tokenizer, task, heads, settings)
            score, state, activated = prompt_end_readings(adapter, tokenizer, prompts, heads)
            if index == 0:
                initial[task.name].update(state=state, icl_state=icl_state, score=score, zero_shot_fv=activated,
                                          fv_fixed_heads=vector)
            ref = initial[task.name]
            rows.append({"checkpoint": label, "index": index, "task": task.name, "zero_shot": score,
                         "score_change": score - ref["score"], "fv_cosine": cosine(vector, ref["fv_fixed_heads"]),
                         "zero_shot_fv_cosine": cosine(activated, ref["zero_shot_fv"]),
                         "hidden_cosine": cosine(state, ref["state"]),
                         "icl_hidden_cosine": cosine(icl_state, ref["icl_state"]), "param_distance": distance})
        del model, adapter
        if on_checkpoint is not None:
            on_checkpoint(rows, initial)
    return rows, initial


def drift_fits(rows: list[dict]) -> dict:
    """Per measure: the pooled fit of score change on the measure over every later checkpoint and task,
    the per-task fits (checkpoints of one task, the initial model included), and the fit over checkpoints
    of the mean score change on the mean measure (averaged over the tasks: how far each model drifted)."""
    later = [r for r in rows if r["index"] > 0]
    checkpoints = sorted({r["checkpoint"] for r in later})
    out = {}
    for measure in MEASURES:
        per_task = {}
        for task in sorted({r["task"] for r in rows}):
            mine = [r for r in rows if r["task"] == task]
            per_task[task] = linear_fit([r[measure] for r in mine], [r["zero_shot"] for r in mine])
        r2s = [f["r2"] for f in per_task.values() if f["r2"] is not None]
        means = [(np.mean([r[measure] for r in later if r["checkpoint"] == c]),
                  np.mean([r["score_change"] for r in later if r["checkpoint"] == c])) for c in checkpoints]
        out[measure] = {"pooled": linear_fit([r[measure] for r in later], [r["score_change"] for r in later]),
                        "median_task_r2": float(np.median(r2s)) if r2s else None, "per_task": per_task,
                        "checkpoint_mean": linear_fit([m for m, _ in means], [c for _, c in means])}
    return out


def _best_edit(adapter: ModelAdapter, tokenizer, vector: torch.Tensor, prompts: list[ICLPrompt],
               alphas: Sequence[float]) -> tuple[int, float]:
    device = next(adapter.model.parameters()).device
    valid = list(batches(tokenizer, prompts, PromptFormat(), 64, device))
    layers = list(range(adapter.n_layers))
    grid = {a: sweep_layers(adapter, valid, vector, layers, a) for a in alphas}
    alpha, layer = max(((a, l) for a in alphas for l in layers), key=lambda al: grid[al[0]][al[1]])
    return layer, alpha


def fv_interventions(model: torch.nn.Module, tokenizer, tasks: Sequence[ICLTask], initial: dict,
                     last_task: ICLTask | None, settings: DriftSettings = DriftSettings(), *, done: dict | None = None,
                     on_task: Callable[[dict], None] | None = None, progress: bool = False) -> dict:
    """On the final model: each forgotten task's score with its original FV added, and with the FV of the
    task trained last subtracted; layer and scale chosen on valid queries, scored on test queries.

    ``done``: the state ``on_task`` last received (called after the last task's FV and after each task) —
    its tasks are not measured again, so an analysis killed here resumes (each task sweeps every layer and scale).
    """
    model.eval()
    adapter = adapt(model)
    device = next(model.parameters()).device
    out: dict = dict(done["tasks"]) if done else {}
    last_fv = done.get("last_fv") if done else None
    if last_task is not None and last_fv is None:
        last_fv = extract_function_vector(adapter, tokenizer, last_task,
                                          settings.extraction(adapter, settings.shots_for(last_task))).vector
        if on_task is not None:
            on_task({"tasks": out, "last_fv": last_fv})
    for task in tqdm(tasks, desc="interventions", disable=not progress, leave=False):
        if task.name in out:
            continue
        before = initial[task.name]["score"]
        test, valid = zero_shot_prompts(task, settings), zero_shot_prompts(task, settings, "valid")
        after = accuracy(adapter, tokenizer, test)
        # both are hit counts over the same queries: a fall of exactly min_drop counts, whatever its rounding
        row = {"initial": before, "final": after, "forgotten": before - after >= settings.min_drop - 1e-9}
        if row["forgotten"]:
            fv = initial[task.name]["fv"]
            layer, alpha = _best_edit(adapter, tokenizer, fv, valid, settings.alphas)
            with add_to_residual(adapter, fv.to(device), layer, alpha):
                row["add_original_fv"] = accuracy(adapter, tokenizer, test)
            row["add_layer"], row["add_alpha"] = layer, alpha
            row["add_recovered"] = (row["add_original_fv"] - after) / (before - after)
            if last_fv is not None:
                layer, alpha = _best_edit(adapter, tokenizer, last_fv, valid, [-a for a in settings.alphas])
                with add_to_residual(adapter, last_fv.to(device), layer, alpha):
                    row["subtract_last_task_fv"] = accuracy(adapter, tokenizer, test)
                row["subtract_layer"], row["subtract_alpha"] = layer, alpha
                row["subtract_recovered"] = (row["subtract_last_task_fv"] - after) / (before - after)
        out[task.name] = row
        if on_task is not None:
            on_task({"tasks": out, "last_fv": last_fv})
    out = {task.name: out[task.name] for task in tasks}  # the tasks' order, however many runs it took
    forgotten = [r for r in out.values() if r["forgotten"]]
    summary = {"forgotten_tasks": len(forgotten), "min_drop": settings.min_drop}
    for key, edited in (("add_recovered", "add_original_fv"), ("subtract_recovered", "subtract_last_task_fv")):
        rows = [r for r in forgotten if key in r]
        summary[f"mean_{key}"] = float(np.mean([r[key] for r in rows])) if rows else None
        # the points won back over the points lost, all tasks together: a task that fell little weighs little
        lost = sum(r["initial"] - r["final"] for r in rows)
        summary[f"pooled_{key}"] = sum(r[edited] - r["final"] for r in rows) / lost if rows else None
    return {"tasks": out, "summary": summary}
