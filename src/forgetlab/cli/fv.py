"""``forgetlab fv``: function vectors of any local Hugging Face causal LM (Todd et al.; Jiang et al.)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from forgetlab.cli.errors import user_errors

app = typer.Typer(help="Function vectors: causal indirect effect, top heads, vectors, interventions.", no_args_is_help=True)
console = Console()

ModelDir = Annotated[Path, typer.Option("--model", help="local HF checkpoint directory (with its tokenizer)")]
TaskFile = Annotated[Path, typer.Option("--task", help='JSON array of {"input", "output"} objects')]
Out = Annotated[Path, typer.Option("--out", help="output directory")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")]
Seed = Annotated[int, typer.Option(help="splits, demonstrations and label shuffles")]
Shots = Annotated[int, typer.Option(help="demonstrations per prompt")]
BatchSize = Annotated[int, typer.Option(help="prompts per forward pass")]
Progress = Annotated[bool, typer.Option(help="show progress bars")]


def check_device(device: str) -> None:
    """``cpu``, or a CUDA device this machine has."""
    import re

    import torch

    if device == "cpu":
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"--device {device} is unknown; use auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(match.group(1) or 0) >= count:
        raise ValueError(f"--device {device}: this machine has {count} CUDA device(s); use --device cpu or auto")


def load_for_fv(model_dir: Path, device: str, dtype: str):
    """Model (eval mode) and tokenizer from one local directory; one clear error if it is not one."""
    import torch

    from forgetlab.models.build import check_checkpoint, load_model, load_tokenizer

    check_checkpoint(model_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in dtypes:
        raise ValueError(f"--dtype {dtype} is unknown; use auto, {', '.join(dtypes)}")
    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as err:
        detail = " ".join(str(err).split())  # transformers' messages span lines; the CLI reports one line
        raise ValueError(f"--model {model_dir} has no loadable tokenizer ({detail}); save the tokenizer beside the model") from None
    try:
        model = load_model(model_dir, dtypes[dtype])
    except Exception as err:  # corrupt or mismatched weights: report, don't dump a traceback
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"--model {model_dir}: its weights cannot be loaded ({type(err).__name__}: {detail})") from None
    return model.to(device).eval(), tokenizer


@app.command()
@user_errors
def extract(
    model: ModelDir,
    task: TaskFile,
    out: Out,
    engine: Annotated[str, typer.Option(help="exact (default, exact and fast) | naive (reference) | attribution (approximate)")] = "exact",
    n_prompts: Annotated[int, typer.Option(help="clean prompts for the mean head activations")] = 100,
    n_cie_prompts: Annotated[int, typer.Option(help="shuffled-label prompts the CIE is averaged over")] = 25,
    shots: Shots = 10,
    top_k: Annotated[int, typer.Option(help="heads in the function vector")] = 10,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    max_rows: Annotated[int, typer.Option(help="exact engine: patched rows per step (lower it if memory runs out)")] = 8192,
    device: Device = "auto",
    dtype: Dtype = "auto",
    progress: Progress = True,
    overwrite: Annotated[bool, typer.Option(help="replace an FV of another task or model already in --out")] = False,
) -> None:
    """Compute the CIE of every head, the top heads and the task's function vector."""
    from forgetlab.fv.extract import FVSettings, extract_function_vector
    from forgetlab.fv.tasks import load_task
    from forgetlab.models.adapter import adapt
    from forgetlab.utils.io import read_json

    icl_task = load_task(task)
    if (out / "fv.json").is_file() and not overwrite:  # the same task and model again just refreshes it
        held = read_json(out / "fv.json")
        if not isinstance(held, dict):
            raise ValueError(f"--out {out} holds an fv.json that is not an FV's; pass --overwrite to replace it, or give "
                             "another --out")
        if (held.get("task"), held.get("model")) != (icl_task.name, str(model)):
            raise ValueError(f"--out {out} holds the FV of task {held.get('task')} from {held.get('model')}; pass "
                             "--overwrite to replace it, or give another --out")
    settings = FVSettings(engine=engine, n_prompts=n_prompts, n_cie_prompts=n_cie_prompts, shots=shots, top_k=top_k,
                          seed=seed, batch_size=batch_size, max_rows=max_rows)
    lm, tokenizer = load_for_fv(model, device, dtype)
    result = extract_function_vector(adapt(lm), tokenizer, icl_task, settings, progress=progress, model_name=str(model))
    result.save(out)
    table = Table(title=f"{icl_task.name}: top {top_k} heads ({engine} CIE, {result.seconds:.2f} s)")
    for col in ("rank", "layer", "head", "mean CIE"):
        table.add_column(col, justify="right")
    cie = result.cie
    for rank, (layer, head) in enumerate(result.top_heads, 1):
        table.add_row(str(rank), str(layer), str(head), f"{cie[layer, head]:.3g}")
    console.print(table)
    console.print(f"wrote {out}/fv.json, fv.safetensors, cie_heatmap.png")


@app.command()
@user_errors
def evaluate(
    model: ModelDir,
    task: TaskFile,
    fv: Annotated[Path, typer.Option("--fv", help="directory written by `forgetlab fv extract`")],
    out: Out,
    layer: Annotated[Optional[int], typer.Option(help="edit layer for the generation scores \\[default: best of the sweep]")] = None,
    alpha: Annotated[float, typer.Option(help="scale of the added vector; negative subtracts it")] = 1.0,
    n_prompts: Annotated[int, typer.Option(help="test queries")] = 50,
    shots: Shots = 10,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Zero-shot and shuffled few-shot accuracy with and without the function vector, swept over layers."""
    from forgetlab.fv.evaluate import FVEvalSettings, evaluate_function_vector
    from forgetlab.fv.extract import FunctionVectorResult
    from forgetlab.fv.tasks import load_task
    from forgetlab.models.adapter import adapt
    from forgetlab.report.fv import plot_layer_sweep
    from forgetlab.utils.io import atomic_write_json

    if not math.isfinite(alpha):  # float() reads nan and inf; no scale of the vector means them
        raise ValueError(f"--alpha {alpha} is not a finite number; give a scale such as 1 (negative subtracts the vector)")
    icl_task = load_task(task)
    saved = FunctionVectorResult.load(fv)
    lm, tokenizer = load_for_fv(model, device, dtype)
    adapter = adapt(lm)
    saved.check_fits(adapter, f"the FV in {fv}")
    settings = FVEvalSettings(n_prompts=n_prompts, shots=shots, layer=layer, alpha=alpha, seed=seed, batch_size=batch_size)
    result = evaluate_function_vector(adapter, tokenizer, icl_task, saved.vector, settings)
    result["fv"] = str(fv)
    atomic_write_json(out / "fv_eval.json", result)
    plot_layer_sweep(result["zero_shot_fv_top1_by_layer"], result["zero_shot_valid_top1"], out / "fv_layer_sweep.png",
                     title=f"{icl_task.name}: zero-shot + FV (valid queries)")
    table = Table(title=f"{icl_task.name}: function vector at layer {result['edit_layer']} (alpha {alpha})")
    for col in ("prompt", "top-1 first token", "generated match"):
        table.add_column(col, justify="right" if col != "prompt" else "left")
    for key, label in (("few_shot", f"{shots}-shot"), ("zero_shot", "zero-shot"), ("zero_shot_fv", "zero-shot + FV"),
                       ("shuffled", f"shuffled {shots}-shot"), ("shuffled_fv", f"shuffled {shots}-shot + FV")):
        table.add_row(label, f"{result[key]['top1']:.3f}", f"{result[key]['string_match']:.3f}")
    console.print(table)
    console.print(f"wrote {out}/fv_eval.json, fv_layer_sweep.png")


@app.command()
@user_errors
def universal(
    fv_dirs: Annotated[list[Path], typer.Argument(help="directories written by `forgetlab fv extract`, one per task")],
    out: Out,
    top_k: Annotated[int, typer.Option(help="universal heads to keep")] = 10,
    model: Annotated[Optional[Path], typer.Option("--model", help="the model the FVs came from: also rebuild every "
                                                                 "task's FV over the universal heads")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Heads whose CIE is highest averaged over tasks (Todd et al.'s universal heads), and each task's FV over them."""
    import torch

    from forgetlab.fv.extract import FunctionVectorResult, save_tensors
    from forgetlab.fv.vectors import function_vector, universal_heads
    from forgetlab.report.fv import plot_cie_heatmap
    from forgetlab.utils.io import atomic_write_json

    results = [FunctionVectorResult.load(d) for d in fv_dirs]
    shapes = {(r.n_layers, r.n_heads, r.head_dim) for r in results}
    if len(shapes) > 1:
        raise ValueError(f"the FVs come from models of different shapes {sorted(shapes)} (layers, heads, head size); "
                         "universal heads need extractions from one model")
    names = [r.task for r in results]
    if len(set(names)) < len(names):
        raise ValueError(f"task {next(n for n in names if names.count(n) > 1)!r} is given twice; pass one extraction per task")
    heads = universal_heads([r.cie_per_prompt for r in results], top_k)
    mean_cie = torch.stack([r.cie_per_prompt.mean(0) for r in results]).mean(0)
    written = ["universal.json", "universal_cie.png"]
    vectors = None
    if model is not None:  # loaded and checked before --out is created: a bad model leaves nothing behind
        from forgetlab.models.adapter import adapt

        lm, _ = load_for_fv(model, device, dtype)
        adapter = adapt(lm)
        results[0].check_fits(adapter, f"the FV in {fv_dirs[0]}")
        vectors = {r.task: function_vector(adapter, r.mean_activations, heads).cpu().contiguous() for r in results}
    out.mkdir(parents=True, exist_ok=True)
    # as fv.json does, universal.json goes last and names the tensors it belongs with (load_universal_fvs checks it);
    # a run without --model removes the FVs an earlier run left, so they are never read as this run's
    digest = None
    if vectors is not None:
        digest = save_tensors(vectors, out / "universal_fvs.safetensors")
        written.append("universal_fvs.safetensors")
    else:
        (out / "universal_fvs.safetensors").unlink(missing_ok=True)
    plot_cie_heatmap(mean_cie, heads, out / "universal_cie.png", title=f"CIE averaged over {len(results)} tasks")
    atomic_write_json(out / "universal.json", {"tensors_sha256": digest, "tasks": [r.task for r in results],
                                               "fv_dirs": [str(d) for d in fv_dirs], "top_k": top_k,
                                               "heads": [list(h) for h in heads], "mean_cie": mean_cie.tolist(),
                                               "model": str(model or "")})
    console.print(f"universal heads (layer, head): {' '.join(f'({l},{h})' for l, h in heads)}")
    console.print(f"wrote {', '.join(f'{out}/{name}' if i == 0 else name for i, name in enumerate(written))}")
