"""Recovery of any checkpoint of a biography run (papers.md section 4, spurious share)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from forgetlab.experiments.biography import BiographyExperiment
from forgetlab.experiments.config import BiographyRunConfig
from forgetlab.experiments.rundir import CONFIG
from forgetlab.metrics.cl import share_or_none
from forgetlab.models.build import check_checkpoint, load_model
from forgetlab.utils.io import atomic_write_json, config_hash, from_jsonable, read_json


def load_run_config(run_dir: Path) -> BiographyRunConfig:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ValueError(f"--run {run_dir} has no {CONFIG}; pass the directory of a 'forgetlab biography run'")
    return from_jsonable(BiographyRunConfig, read_json(path))


def check_same_vocabulary(model_dir: Path, model, tokenizer, run_dir: Path) -> None:
    """Refuse a checkpoint of another world: its token ids would not mean the run's words (a smaller vocabulary
    fails on an index, a larger one scores garbage without a word)."""
    from transformers import AutoTokenizer

    if any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        same = AutoTokenizer.from_pretrained(str(model_dir)).get_vocab() == tokenizer.get_vocab()
    else:
        same = model.get_input_embeddings().num_embeddings >= len(tokenizer)
    if not same:
        raise ValueError(f"--model {model_dir} does not share the vocabulary of the run in {run_dir}; recover a "
                         "checkpoint of that run (or of a run of the same world and seed)")


def recover_checkpoint(model_dir: Path, run_dir: Path, *, out: Path | None = None, cache_dir: Path | None = None,
                       log: Callable[[str], None] = print) -> dict:
    """Score ``model_dir`` on held-out task-0 people, re-align it briefly, score again; write recovery.json."""
    check_checkpoint(model_dir)
    cfg = load_run_config(run_dir)
    exp = BiographyExperiment(cfg, cache_dir, log, progress=True)
    model = load_model(model_dir)
    check_same_vocabulary(Path(model_dir), model, exp.tokenizer, run_dir)
    current = exp.full_eval(model, ["task0"])["task0"]["em"]
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    # the run's whole config is in the key: the same checkpoint re-aligned on another run's world is another phase
    key = config_hash(str(Path(model_dir).resolve()), stamp, cfg)
    phase = exp.recovery(SimpleNamespace(model_dir=Path(model_dir)), key)
    recovered = phase.info["final"]["task0"]["em"]
    results_path = Path(run_dir) / "results.json"
    before = read_json(results_path)["task0_before"] if results_path.is_file() else None
    result = {"model": str(model_dir), "before": before, "current": current, "recovered": recovered,
              "spurious_share": share_or_none(before, current, recovered),
              "recovery_steps": phase.info["steps"]}
    atomic_write_json(Path(out or run_dir) / "recovery.json", result)
    return result
