"""Grow a small model that learns in context, on the ICL task world, and test its function vectors.

``build_icl_world`` writes ``world.json``, trains a Llama-shaped model from scratch on k-shot
episodes and instruction episodes of the *general* tasks, saves it as a normal HF checkpoint
(``model/`` with its tokenizer and ``forgetlab_card.json``), scores every general task four ways
(10-shot, instructed zero-shot, bare zero-shot, shuffled-label 10-shot), extracts each task's
function vector (exact CIE) and adds it to the bare and the shuffled prompts (``eval.json``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from forgetlab.eval.icl import accuracy, icl_prompts, icl_scores
from forgetlab.eval.scoring import ALREADY_DONE
from forgetlab.experiments.rundir import record_api_run
from forgetlab.fv.evaluate import sweep_layers
from forgetlab.fv.extract import FVSettings, extract_function_vector
from forgetlab.fv.hooks import add_to_residual
from forgetlab.fv.prompts import batches
from forgetlab.fv.tasks import PromptFormat, counterfactuals, sample_prompts
from forgetlab.models.adapter import adapt
from forgetlab.models.build import ModelConfig, build_model
from forgetlab.models.tokenizers import build_word_tokenizer
from forgetlab.train.checkpoints import save_model_dir
from forgetlab.train.data import IGNORE, TokenDataset
from forgetlab.train.trainer import EvalSchedule, PhaseConfig, train_phase
from forgetlab.utils.io import atomic_write_json, read_json
from forgetlab.worlds.icl import ICLWorld, ICLWorldConfig, WorldTask, generate_icl_world, with_coded_tasks

PRESETS = ("smoke", "cpu", "gpu")


@dataclass(frozen=True)
class ICLCorpusConfig:
    """The pretraining mixture: k-shot episodes and instruction episodes of the general tasks."""

    max_shots: int = field(default=10, metadata={"help": "ICL episodes hold 2..max_shots+1 pairs"})
    instruction_fraction: float = field(default=0.3, metadata={"help": "share of instruction episodes"})
    max_instruction_pairs: int = field(default=3, metadata={"help": "pairs after an instruction (1..this)"})
    block_size: int = field(default=256, metadata={"help": "tokens per packed training row"})
    max_tokens: int = field(default=8_000_000, metadata={"help": "corpus size cap; training loops over it"})


@dataclass(frozen=True)
class ICLBuildConfig:
    preset: str
    seed: int = 0
    world: ICLWorldConfig = field(default_factory=ICLWorldConfig)
    corpus: ICLCorpusConfig = field(default_factory=ICLCorpusConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(architecture="llama", d_model=128, n_layers=4,
                                                                   n_heads=8, max_positions=512))
    train: PhaseConfig = field(default_factory=PhaseConfig)
    eval_prompts: int = field(default=40, metadata={"help": "test queries per task and prompt kind"})
    fv_alphas: tuple[float, ...] = field(default=(1.0, 2.0, 4.0, 8.0),
                                         metadata={"help": "FV scales tried with every layer; the best pair on valid queries is used"})
    fv: FVSettings = field(default_factory=lambda: FVSettings(n_prompts=40, n_cie_prompts=16, batch_size=32))

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown icl-world preset {self.preset!r}; use one of {', '.join(PRESETS)}")
        self.world.validate()
        self.model.validate()
        self.train.validate("train")
        if not 0 <= self.corpus.instruction_fraction <= 1:
            raise ValueError(f"corpus.instruction_fraction={self.corpus.instruction_fraction} must be in [0, 1]")
        if self.corpus.max_shots < 1 or self.corpus.block_size < 32:
            raise ValueError("corpus.max_shots must be >= 1 and corpus.block_size >= 32")


def preset_config(name: str, seed: int = 0) -> ICLBuildConfig:
    if name == "smoke":
        return ICLBuildConfig(
            preset="smoke", seed=seed, world=ICLWorldConfig(seed=seed, n_words=24, n_translate_tasks=2, n_kind_tasks=3,
                                                            n_entity_tasks=1, n_entities=12, n_list_pairs=60),
            model=ModelConfig(architecture="llama", d_model=64, n_layers=2, n_heads=4, max_positions=256),
            corpus=ICLCorpusConfig(max_shots=4, block_size=128),
            train=PhaseConfig(lr=3e-3, max_steps=60, batch_size=16, warmup_steps=5, checkpoint_every=30,
                              eval=EvalSchedule(dense_every=0, every=30)),
            eval_prompts=6, fv=FVSettings(n_prompts=8, n_cie_prompts=4, shots=4, top_k=4, batch_size=16))
    if name == "cpu":
        return ICLBuildConfig(
            preset="cpu", seed=seed, world=replace(ICLWorldConfig(), seed=seed),
            train=PhaseConfig(lr=2e-3, max_steps=2500, batch_size=32, warmup_steps=150, checkpoint_every=250,
                              compile=True, eval=EvalSchedule(dense_every=0, every=250)))
    if name == "gpu":
        return ICLBuildConfig(
            preset="gpu", seed=seed, world=replace(ICLWorldConfig(), seed=seed),
            model=ModelConfig(architecture="llama", d_model=384, n_layers=8, n_heads=8, max_positions=512),
            corpus=ICLCorpusConfig(block_size=512, max_tokens=16_000_000),
            train=PhaseConfig(lr=1e-3, max_steps=5000, batch_size=64, warmup_steps=300, checkpoint_every=1000,
                              compile=True, eval=EvalSchedule(dense_every=0, every=1000)),
            eval_prompts=60, fv=FVSettings(n_prompts=60, n_cie_prompts=20, batch_size=64))
    raise ValueError(f"unknown icl-world preset {name!r}; use one of {', '.join(PRESETS)}")


def world_tokenizer(world: ICLWorld):
    """Word level: every lexicon word, class, letter and number word is one token."""
    return build_word_tokenizer(world.words() + ["Q", "A", ":"])


def episode_tokens(task: WorldTask, pairs: list[tuple[str, str]], vocab: dict[str, int], instruction: bool,
                   label_first: bool) -> tuple[list[int], list[bool]]:
    """``[BOS] (instruction \\n) Q : x \\n A : y \\n \\n ...`` as ids, and which ids carry the loss.

    Built from the vocabulary directly (the tokenizer is word level, so this equals tokenizing the
    text; a test checks it). The loss falls on each answer and the newline that ends it.
    """
    nl, ids, mask = vocab["\n"], [vocab["<bos>"]], [False]
    if instruction:
        words = task.instruction.split()
        ids += [vocab[w] for w in words] + [nl]
        mask += [False] * (len(words) + 1)
    for i, (x, y) in enumerate(pairs):
        head = [vocab["Q"], vocab[":"]] + [vocab[w] for w in x.split()] + [nl, vocab["A"], vocab[":"]]
        answer = [vocab[w] for w in y.split()] + [nl]
        ids += head + answer + [nl]
        on = label_first or i > 0
        mask += [False] * len(head) + [on] * len(answer) + [False]
    return ids, mask


def pretraining_data(world: ICLWorld, tokenizer, corpus: ICLCorpusConfig, n_tokens: int, seed: int) -> TokenDataset:
    """Random episodes of the general tasks, packed into ``block_size`` rows until ``n_tokens``."""
    rng = np.random.default_rng(seed + 17)
    vocab = tokenizer.get_vocab()
    tasks = world.role("general")
    pools = [t.pretraining_pairs(world.config.seed) for t in tasks]
    stream: list[int] = []
    labels: list[bool] = []
    while len(stream) < n_tokens:
        k = int(rng.integers(len(tasks)))
        task, pool = tasks[k], pools[k]
        instruction = rng.random() < corpus.instruction_fraction
        n_pairs = int(rng.integers(1, corpus.max_instruction_pairs + 1)) if instruction else int(rng.integers(2, corpus.max_shots + 2))
        pick = rng.choice(len(pool), size=min(n_pairs, len(pool)), replace=False)
        ids, mask = episode_tokens(task, [pool[i] for i in pick], vocab, instruction, label_first=instruction)
        stream += ids + [tokenizer.eos_token_id]
        labels += mask + [False]
    block = corpus.block_size
    n_rows = len(stream) // block
    ids = torch.tensor(stream[:n_rows * block], dtype=torch.long).view(n_rows, block)
    on = torch.tensor(labels[:n_rows * block], dtype=torch.bool).view(n_rows, block)
    return TokenDataset(ids, torch.where(on, ids, torch.full_like(ids, IGNORE)), torch.ones_like(ids))


def fv_scores(adapter, tokenizer, task: WorldTask, cfg: ICLBuildConfig, out_dir: Path | None) -> dict:
    """Extract the task's FV (exact CIE); for bare and for shuffled prompts pick the layer and scale on valid
    queries, then score on test queries."""
    icl_task = task.as_icl_task()
    result = extract_function_vector(adapter, tokenizer, icl_task, replace(cfg.fv, seed=cfg.world.seed))
    if out_dir is not None:
        result.save(out_dir / task.name)
    device = next(adapter.model.parameters()).device
    few_valid = sample_prompts(icl_task.splits(cfg.world.seed), cfg.eval_prompts, cfg.fv.shots, cfg.seed + 5,
                               query_split="valid", task_name=task.name)
    valid = {"zero_shot_bare": [p.zero_shot() for p in few_valid],
             "shuffled_ten_shot": counterfactuals(few_valid, cfg.seed + 5)}
    prompts = icl_prompts(icl_task, cfg.eval_prompts, cfg.fv.shots, cfg.seed, cfg.world.seed)
    layers = list(range(adapter.n_layers))
    out = {"fv_top_heads": [list(h) for h in result.top_heads]}
    for kind, key in (("zero_shot_bare", "fv_zero_shot"), ("shuffled_ten_shot", "fv_shuffled_ten_shot")):
        valid_batches = list(batches(tokenizer, valid[kind], PromptFormat(), 64, device))
        grid = {alpha: sweep_layers(adapter, valid_batches, result.vector, layers, alpha) for alpha in cfg.fv_alphas}
        alpha, layer = max(((a, l) for a in cfg.fv_alphas for l in layers), key=lambda al: grid[al[0]][al[1]])
        with add_to_residual(adapter, result.vector.to(device), layer, alpha):
            out[key] = accuracy(adapter, tokenizer, prompts[kind])
        out[f"{key}_layer"], out[f"{key}_alpha"] = layer, alpha
        out[f"{key}_valid_by_alpha_layer"] = {str(a): accs for a, accs in grid.items()}
    return out


def summarize(per_task: dict[str, dict], world: ICLWorld) -> dict:
    """Means over general tasks, and separately over tasks with shared and with own inputs."""
    keys = [k for k, v in next(iter(per_task.values())).items() if isinstance(v, float) and not k.endswith("_alpha")]
    groups = {"mean": list(per_task)}
    groups["mean_shared_inputs"] = [t for t in per_task if world.task(t).shared_inputs]
    groups["mean_own_inputs"] = [t for t in per_task if not world.task(t).shared_inputs]
    out = {}
    for name, tasks in groups.items():
        if tasks:
            out[name] = {k: float(np.mean([per_task[t][k] for t in tasks])) for k in keys}
            if "fv_zero_shot" in out[name]:
                gaps = [(per_task[t]["fv_zero_shot"] - per_task[t]["zero_shot_bare"]) /
                        (per_task[t]["ten_shot"] - per_task[t]["zero_shot_bare"])
                        for t in tasks if per_task[t]["ten_shot"] - per_task[t]["zero_shot_bare"] > 0.05]
                out[name]["fv_gap_recovered"] = float(np.mean(gaps)) if gaps else None
    return out


def evaluate_world_model(model, tokenizer, world: ICLWorld, cfg: ICLBuildConfig, fv_dir: Path | None = None,
                         with_fv: bool = True, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """``eval.json``: per general task the four prompt kinds (+ the two FV scores), and means."""
    from tqdm.auto import tqdm

    adapter = adapt(model)
    per_task = {}
    for task in tqdm(world.role("general"), desc="evaluate", disable=not progress, leave=False):
        scores = icl_scores(adapter, tokenizer, task.as_icl_task(), cfg.eval_prompts, cfg.fv.shots, cfg.seed, cfg.world.seed)
        if with_fv:
            scores.update(fv_scores(adapter, tokenizer, task, cfg, fv_dir))
        per_task[task.name] = {"family": task.family, "shared_inputs": task.shared_inputs, **scores}
    summary = summarize(per_task, world)
    m = summary["mean"]
    log("[eval] " + "  ".join(f"{k}={v:.3f}" if v is not None else f"{k}=-" for k, v in m.items()))
    new = new_task_check(adapter, tokenizer, world, cfg)
    if any(new["sequences_known"]):
        log("[eval] new tasks this model already does from their instruction alone: "
            + "; ".join(f"sequence {i}: {', '.join(known)}" for i, known in enumerate(new["sequences_known"]) if known))
    return {"tasks": per_task, **summary, **new}


def new_task_check(adapter, tokenizer, world: ICLWorld, cfg: ICLBuildConfig) -> dict:
    """Instructed zero-shot accuracy of every task reserved for continual tuning, and per sequence the tasks the
    built model already does: whether a reworded instruction reaches a known ability untrained differs between
    builds of one world, and a sequence of tasks already done measures keeping, not learning."""
    scores = {t.name: icl_scores(adapter, tokenizer, t.as_icl_task(), cfg.eval_prompts, cfg.fv.shots, cfg.seed,
                                 cfg.world.seed, kinds=("zero_shot_instruction",))["zero_shot_instruction"]
              for t in world.role("new")}
    known = [[name for name in sequence if 100 * scores[name] >= ALREADY_DONE] for sequence in world.sequences]
    return {"new_tasks_zero_shot_instruction": scores, "sequences_known": known}


def build_icl_world(cfg: ICLBuildConfig, out: Path, *, log: Callable[[str], None] = print, progress: bool = True,
                    device: str | None = None) -> dict:
    """World -> tokenizer -> corpus -> model -> ``eval.json``; resumes training from ``out/state``.

    The training state is removed once ``eval.json`` is written (it holds the optimizer too, several times the
    model's size), so ``eval.json`` without ``state/`` marks a finished build: building it again under the same
    config returns its results without training or scoring anything.
    """
    cfg.validate()
    out = Path(out)
    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    record_api_run(out, cfg)
    if (out / "eval.json").is_file() and (out / "model" / "config.json").is_file() and not (out / "state").exists():
        log(f"[icl-world] {out} holds a finished build of this config; nothing to do (its eval.json stands)")
        return read_json(out / "eval.json")
    world = generate_icl_world(cfg.world)
    world.write(out / "world.json")
    tokenizer = world_tokenizer(world)
    rows = cfg.train.total_steps(1) * cfg.train.batch_size * cfg.train.grad_accum
    n_tokens = min(cfg.corpus.max_tokens, (rows + 1) * cfg.corpus.block_size)
    data = pretraining_data(world, tokenizer, cfg.corpus, n_tokens, cfg.seed)
    log(f"[icl-world] {len(world.tasks)} tasks ({len(world.role('general'))} general), vocabulary {len(tokenizer)}, "
        f"{data.input_ids.numel():,} training tokens")
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                        tokenizer.bos_token_id, cfg.seed).to(device)
    probe = world.role("general")[:: max(1, len(world.role("general")) // 8)]

    def quick_eval() -> dict:
        adapter = adapt(model)
        acc = [icl_scores(adapter, tokenizer, t.as_icl_task(), 8, cfg.fv.shots, cfg.seed, cfg.world.seed,
                          kinds=("ten_shot",))["ten_shot"] for t in probe]
        return {"general": {"em": float(np.mean(acc))}}

    outcome = train_phase(model, data, cfg.train, phase="pretrain", state_dir=out / "state", seed=cfg.seed,
                          evaluate=quick_eval, log=log, progress=progress)
    model.eval()
    train_seconds = outcome.seconds
    save_model_dir(model, tokenizer, out / "model")
    results = evaluate_world_model(model, tokenizer, world, cfg, fv_dir=out / "fv", log=log, progress=progress)
    results.update({"preset": cfg.preset, "seed": cfg.seed, "train_seconds": train_seconds,
                    "seconds": time.perf_counter() - start})
    atomic_write_json(out / "model" / "forgetlab_card.json", {
        "made_by": "forgetlab icl-world build", "config": asdict(cfg), "training_tokens": int(data.input_ids.numel()),
        "train_seconds": train_seconds, "steps": outcome.steps, "general_mean": results["mean"]})
    atomic_write_json(out / "eval.json", results)
    finished = out / "state.finished"  # renamed first: a kill while deleting leaves no half state to resume from
    shutil.rmtree(finished, ignore_errors=True)
    if (out / "state").exists():
        (out / "state").replace(finished)
        shutil.rmtree(finished)
    return results


def reevaluate(out: Path, *, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Score an existing build again (e.g. after changing the evaluation), rewriting ``eval.json``; a world.json
    from before the coded tasks gains them (its model is the same either way)."""
    from transformers import AutoTokenizer

    from forgetlab.experiments.rundir import CONFIG
    from forgetlab.models.build import load_model
    from forgetlab.utils.io import from_jsonable

    out = Path(out)
    if not (out / CONFIG).is_file() or not (out / "model" / "config.json").is_file():
        raise FileNotFoundError(f"{out} is not an icl-world build (no {CONFIG} or model/); run `forgetlab icl-world build` first")
    cfg = from_jsonable(ICLBuildConfig, read_json(out / CONFIG))
    world = ICLWorld.read(out / "world.json")
    completed = with_coded_tasks(world)
    if completed is not world:  # a build from before coded tasks: they join its world.json and are scored too
        completed.write(out / "world.json")
        log(f"[icl-world] added {len(completed.tasks) - len(world.tasks)} coded tasks to {out / 'world.json'}")
        world = completed
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(out / "model").to(device).eval()
    results = evaluate_world_model(model, AutoTokenizer.from_pretrained(str(out / "model")), world, cfg,
                                   fv_dir=out / "fv", log=log, progress=progress)
    previous = read_json(out / "eval.json") if (out / "eval.json").is_file() else {}
    results.update({k: previous[k] for k in ("preset", "seed", "train_seconds") if k in previous})
    atomic_write_json(out / "eval.json", results)
    return results
