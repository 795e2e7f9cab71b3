"""Continual instruction tuning: learn a sequence of instruction tasks, score every task after each one.

The FV paper's setting (papers.md §2) on the ICL world's sequences (offline default) or
natural-instructions task files, with the baselines behind one ``method`` switch:

- full fine-tuning: ``seq``, ``replay`` (earlier tasks' rows mixed in), ``ewc`` (diagonal Fisher
  penalty), ``multitask`` (all tasks at once: the upper bound);
- LoRA: ``lora`` (one adapter through the sequence), ``inclora`` (the previous adapter merged, a
  fresh one per task), ``lwf`` (IncLoRA + KL to the previous model, which is the merged model with
  the new adapter switched off, so no copy is kept) and ``olora`` (IncLoRA + orthogonality of the new
  adapter's input subspace to the earlier adapters').

After the initial model and after every task: each task's test score (ROUGE-L or option accuracy,
×100; the score matrix R) and the general abilities GP (instructed zero-shot) and IP (5-shot in
context), on the ICL world's general tasks or on ``general`` task files.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from forgetlab.analysis.recovery import encode_qa
from forgetlab.eval.generation import generate
from forgetlab.eval.scoring import ALREADY_DONE, score
from forgetlab.experiments.rundir import CONFIG, check_same_config, config_differences, record_api_run
from forgetlab.fv.tasks import ICLTask
from forgetlab.methods.fvg import (FVGConfig, FVGuidance, over_universal_heads, saved_function_vectors,
                                   task_function_vector)
from forgetlab.methods.regularizers import OLORA_PENALTIES, diagonal_fisher, ewc_penalty, lora_orthogonality, lwf_loss
from forgetlab.methods.replay import mix_replay
from forgetlab.metrics.cl import cl_summary
from forgetlab.models.lora import check_lora_targets, lora_a_matrices, merged_lora_weights, wrap_lora
from forgetlab.train import distributed
from forgetlab.train.checkpoints import load_between_phases, save_between_phases, save_model_dir
from forgetlab.train.data import concat, qa_dataset
from forgetlab.train.trainer import EvalSchedule, PhaseConfig, train_phase
from forgetlab.utils.io import atomic_write_json, read_json, to_jsonable
from forgetlab.worlds.instruction_prompts import (NI_TEMPLATE, WORLD_TEMPLATE, PromptFitter, PromptTemplate,
                                                 middle_cut)
from forgetlab.worlds.instructions import (InstructionTask, coded_sequence, definition_of, from_world_task, load_task_file,
                                          ni_sequence, question, world_sequence)

METHODS = ("seq", "lora", "inclora", "replay", "ewc", "lwf", "olora", "multitask")
ANSWER_ENDS = ("auto", "eos", "newline")
FINETUNE_MODES = ("full", "lora", "inclora")  # inclora: merge the last adapter, start a new one per task
DEFAULT_MODE = {"seq": "full", "replay": "full", "ewc": "full", "multitask": "full", "lora": "lora",
                "inclora": "inclora", "lwf": "inclora", "olora": "inclora"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# settings that one method alone reads: set away from its default on another method, it would be silently ignored
METHOD_SETTINGS = {"replay": ("replay",), "ewc": ("ewc_strength", "ewc_batches"),
                   "lwf": ("lwf_strength", "lwf_temperature"), "olora": ("olora_strength", "olora_penalty")}
LORA_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
FVG_SETTINGS_READ_WITHOUT_FVG = ("prompt_tokens",)  # `cit analyze` cuts general task files' FV prompts to it
CHECKPOINT_FORMATS = ("merged", "adapter")


@dataclass(frozen=True)
class CITConfig:
    preset: str = "custom"
    seed: int = 0
    world_dir: str = field(default="", metadata={"help": "an icl-world build (model + world.json)"})
    model: str = field(default="", metadata={"help": "HF checkpoint; default: the world's model"})
    sequence: str = field(default="0", metadata={"help": "world sequence index, world task names a,b,c or new; NI-Seq-G1|"
                                                          "C1|M1 or task names a,b,c (in tasks_dir); task files a.json,b.jsonl"})
    tasks_dir: str = field(default="", metadata={"help": "natural-instructions tasks/ folder for NI sequences"})
    template: str = field(default="", metadata={"help": "prompt template with {input} and usually {definition}; default "
                                                      "by source (task files: the FV paper's, which also ends a "
                                                      "definition or input without final punctuation with '.')"})
    answer_end: str = field(default="auto", metadata={"help": "what ends each training answer: eos | newline | auto "
                                                             "(newline for ICL-world sequences, whose answers end with "
                                                             "one and whose scoring cuts there; eos otherwise)"})
    n_train: int = 1000
    n_test: int = 100
    max_source_tokens: int = 512
    max_target_tokens: int = 128
    method: str = field(default="seq", metadata={"help": " | ".join(METHODS)})
    finetune: str = field(default="", metadata={"help": "full | lora | inclora; default by method (replay, ewc and "
                                                        "multitask may run on LoRA too)"})
    general: str = field(default="", metadata={"help": "general sets as task files a.json,b.jsonl (GP/IP); "
                                                       "default: the ICL world's general tasks"})
    replay: float = field(default=0.2, metadata={"help": "replay: earlier tasks' rows mixed in, as a fraction of the task"})
    ewc_strength: float = field(default=1000.0, metadata={"help": "ewc: weight of the Fisher penalty (its useful size depends on the "
                                                                  "model: compare results.json train_loss ewc with lm)"})
    ewc_batches: int = field(default=8, metadata={"help": "ewc: batches for each task's diagonal Fisher"})
    lwf_strength: float = field(default=1.0, metadata={"help": "lwf: weight of the KL to the previous model"})
    lwf_temperature: float = 2.0
    olora_strength: float = field(default=0.5, metadata={"help": "olora: weight of the orthogonality penalty"})
    olora_penalty: str = field(default="squared", metadata={"help": "olora: squared (Σ‖A_prev A_newᵀ‖²_F, the paper's "
                                                                    "equation) | abs (Σ|A_prev A_newᵀ|, O-LoRA's "
                                                                    "released code, for which strength 0.5 was tuned)"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16: the weights the model is loaded in; "
                                                          "bfloat16 halves a 7B base model (LoRA adapters stay float32)"})
    train: PhaseConfig = field(default_factory=lambda: PhaseConfig(
        lr=1e-4, schedule="constant", epochs=10, batch_size=8, grad_accum=4, weight_decay=0.0, checkpoint_every=0,
        eval=EvalSchedule(dense_every=0, every=0)))
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass "
                                                                         "(a 7B model's long prompts fit in less memory)"})
    max_new_tokens: int = field(default=0, metadata={"help": "generation budget when scoring; 0: per task, its longest "
                                                              "reference in tokens + 1, at least 16 and at most "
                                                              "max_target_tokens"})
    score_train_rows: int = field(default=100, metadata={"help": "after each task, also score its first N training rows "
                                                                 "(0: off): far above the test score = answers memorised, "
                                                                 "not the task learned"})
    general_prompts: int = 20
    save_checkpoints: bool = field(default=True, metadata={"help": "keep the (LoRA-merged) model after every task "
                                                                    "in checkpoints/ (for `forgetlab cit analyze`)"})
    checkpoint_format: str = field(default="merged", metadata={"help": "a LoRA run's per-task checkpoints: merged (a "
                                                                       "plain HF checkpoint each) | adapter (the task's "
                                                                       "adapter alone, a PEFT directory on the previous "
                                                                       "checkpoint: megabytes, not a 7B model's 13 GB)"})
    fvg: bool = field(default=False, metadata={"help": "add FV-guided training (FV consistency + FV-guided KL)"})
    fvg_config: FVGConfig = field(default_factory=FVGConfig)

    @property
    def mode(self) -> str:
        return self.finetune or DEFAULT_MODE.get(self.method, "full")

    def validate(self) -> None:
        for name in ("replay", "ewc_strength", "lwf_strength", "lwf_temperature", "olora_strength", "lora_dropout"):
            if not math.isfinite(getattr(self, name)):  # NaN slips through every `x < 0`
                raise ValueError(f"{name}={getattr(self, name)} is not a finite number; give a finite value")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if self.finetune and self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune={self.finetune!r} is unknown; use one of {', '.join(FINETUNE_MODES)}")
        if self.finetune and self.method not in ("replay", "ewc", "multitask") and self.finetune != DEFAULT_MODE[self.method]:
            raise ValueError(f"finetune={self.finetune!r} contradicts method={self.method!r}; finetune applies to "
                             "replay, ewc and multitask")
        if self.method == "ewc" and self.mode == "inclora":
            raise ValueError("ewc with finetune=inclora has no parameters shared between tasks (each adapter is new); "
                             "use finetune=lora or full")
        if not self.world_dir and not self.tasks_dir and ".json" not in self.sequence:
            raise ValueError("give --world DIR (an icl-world build), --tasks-dir DIR (natural-instructions tasks/) "
                             "or --sequence a.json,b.json (task files)")
        if not self.world_dir and not self.model:
            raise ValueError("natural-instructions sequences need --model DIR")
        if self.answer_end not in ANSWER_ENDS:
            raise ValueError(f"answer_end={self.answer_end!r} is unknown; use one of {', '.join(ANSWER_ENDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        if self.olora_penalty not in OLORA_PENALTIES:
            raise ValueError(f"olora_penalty={self.olora_penalty!r} is unknown; use one of {', '.join(OLORA_PENALTIES)}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format={self.checkpoint_format!r} is unknown; use one of "
                             f"{', '.join(CHECKPOINT_FORMATS)}")
        if self.checkpoint_format == "adapter" and self.mode == "full":
            raise ValueError(f"checkpoint_format=adapter: method {self.method!r} fine-tunes every weight, so its "
                             "checkpoints have no adapter to save alone; use checkpoint_format=merged")
        flags = {"n_train": "--max-train", "n_test": "--max-test"}
        for name in ("n_train", "n_test", "max_source_tokens", "max_target_tokens", "lora_r", "lora_alpha", "ewc_batches",
                     "general_prompts"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{flags[name]} {getattr(self, name)} must be positive" if name in flags else
                                 f"{name}={getattr(self, name)} must be positive")
        if self.seed < 0:
            raise ValueError(f"--seed {self.seed} must not be negative")
        if not 0 <= self.replay <= 1:
            raise ValueError(f"replay={self.replay} must be a fraction in [0, 1] of the task's rows")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        for name in ("ewc_strength", "lwf_strength", "olora_strength", "score_train_rows"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must not be negative")
        if not self.lwf_temperature > 0:
            raise ValueError(f"lwf_temperature={self.lwf_temperature} must be positive (the paper's is 2)")
        if not self.max_new_tokens >= 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be positive, or 0 for a budget from each task's "
                             "longest reference")
        self.fvg_config.validate()
        self.train.validate("train")
        self._check_settings_apply()

    def _check_settings_apply(self) -> None:
        """A setting the run would not read, set away from its default, is refused: ``--method seq --set lora_r=16``
        would otherwise train and report a run that never used it."""
        changed = {key for key, _, _ in config_differences(to_jsonable(CITConfig()), to_jsonable(self))}
        for method, names in METHOD_SETTINGS.items():
            for name in names:
                if name in changed and self.method != method:
                    raise ValueError(f"{name}={getattr(self, name)} applies to --method {method} only, and this run "
                                     f"is --method {self.method}; drop the setting or change the method")
        for name in LORA_SETTINGS:
            if name in changed and self.mode == "full":
                raise ValueError(f"{name}={getattr(self, name)} applies to LoRA runs, and --method {self.method} "
                                 "fine-tunes every weight; drop the setting, or use a LoRA method (lora, inclora, "
                                 "lwf, olora, or finetune=lora)")
        if self.fvg and self.method == "multitask":
            raise ValueError("--fvg guides each task's training by the model before it, and multitask trains every task "
                             "at once from the initial model; drop --fvg")
        unread = sorted(key.removeprefix("fvg_config.") for key in changed if key.startswith("fvg_config.")
                        and key.removeprefix("fvg_config.") not in FVG_SETTINGS_READ_WITHOUT_FVG)
        if unread and not self.fvg:
            raise ValueError(f"fvg_config.{unread[0]}={getattr(self.fvg_config, unread[0])} is set but FVG is off: add "
                             "--fvg to use it, or drop the setting")


def load_sequence(cfg: CITConfig) -> tuple[list[InstructionTask], object | None]:
    """The tasks of the sequence and, for the ICL world, the world (for the general abilities)."""
    tasks, world = _sequence_tasks(cfg)
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # each task's checkpoint, resume state and column of R are named by it
        raise ValueError(f"--sequence {cfg.sequence!r} names {', '.join(repeated)} more than once; give each task once")
    return tasks, world


def _sequence_tasks(cfg: CITConfig) -> tuple[list[InstructionTask], object | None]:
    if cfg.world_dir:
        from forgetlab.worlds.icl import ICLWorld

        world = ICLWorld.read(Path(cfg.world_dir) / "world.json")
        if cfg.sequence.isdigit():
            return world_sequence(world, int(cfg.sequence)), world
        if cfg.sequence.startswith("coded:") and cfg.sequence[6:].isdigit():
            return coded_sequence(world, int(cfg.sequence[6:])), world
        if cfg.sequence == "new":
            return [from_world_task(world.task(n), world.config.seed) for n in new_to_model(Path(cfg.world_dir), world)], world
        names = [n.strip() for n in cfg.sequence.split(",") if n.strip()]
        unknown = [n for n in names if n not in {t.name for t in world.tasks}]
        if not names or unknown:
            raise ValueError(f"--sequence {cfg.sequence!r}: give a sequence number 0..{len(world.sequences) - 1}, coded:K, "
                             f"new or task names of the ICL world ({', '.join(unknown) or 'none given'} unknown; see world.json)")
        return [from_world_task(world.task(n), world.config.seed) for n in names], world
    parts = [n.strip() for n in cfg.sequence.split(",") if n.strip()]
    if parts and all(p.endswith((".json", ".jsonl")) for p in parts):
        return [load_task_file(p) for p in parts], None
    return ni_sequence(cfg.tasks_dir, cfg.sequence if cfg.sequence.startswith("NI-Seq-") else parts), None


def new_to_model(world_dir: Path, world) -> list[str]:
    """``--sequence new``: the tasks of the world's sequences that its built model does not already do from their
    instruction alone (``eval.json``), in the sequences' order, as many as a sequence holds. Which reworded
    instructions a model already follows differs between builds of one world."""
    path = world_dir / "eval.json"
    scores = read_json(path).get("new_tasks_zero_shot_instruction") if path.is_file() else None
    if scores is None:
        raise ValueError(f"--sequence new: {path} has no new_tasks_zero_shot_instruction; score the build first with "
                         f"`forgetlab icl-world evaluate --out {world_dir}`")
    candidates = list(dict.fromkeys(name for sequence in world.sequences for name in sequence))
    names = [n for n in candidates if 100 * scores.get(n, 1.0) < ALREADY_DONE][:world.config.sequence_length]
    if not names:
        raise ValueError(f"--sequence new: the model in {world_dir} already does every task of the world's sequences "
                         "from its instruction; name other world tasks with --sequence a,b,c")
    return names


def _rows(task: InstructionTask, instances, template: PromptTemplate, fit: PromptFitter,
          draw: np.random.Generator | None = None) -> list[dict]:
    """Prompt, answer and references of each instance. The answer is its first reference, or with ``draw`` one
    drawn at random, as the FV paper's collator trains on a random one of an instance's outputs."""
    return [{"prompt": fit.prompt(template, definition_of(task, inst), inst[0], f"task {task.name!r}"),
             "answer": " " + (inst[1][int(draw.integers(len(inst[1])))] if draw is not None else inst[1][0]),
             "references": inst[1]} for inst in instances]


def reference_draw(task: InstructionTask, seed: int) -> np.random.Generator:
    """The seeded draw of a task's training answers: the same for a task wherever it stands in a sequence, and on
    resume."""
    return np.random.default_rng([seed, zlib.crc32(task.name.encode())])


def _encode(tokenizer, rows: list[dict], cfg: CITConfig) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and answer ids of rows whose prompts fit already; answers keep their first ``max_target_tokens``."""
    prompts, answers = encode_qa(tokenizer, rows)
    return prompts, [a[:cfg.max_target_tokens] for a in answers]


def new_token_budget(tokenizer, rows: list[dict], cfg: CITConfig) -> int:
    """``max_new_tokens``, or with 0 the task's longest reference in tokens + 1 (its end), at least 16 (room for
    "The answer is B") and at most ``max_target_tokens`` (what training shows of an answer)."""
    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    longest = max(len(tokenizer.encode(" " + ref, add_special_tokens=False)) for r in rows for ref in r["references"])
    return min(cfg.max_target_tokens, max(16, longest + 1))


def task_score(model, tokenizer, rows: list[dict], cfg: CITConfig) -> float:
    prompts, _ = _encode(tokenizer, rows, cfg)
    predictions = generate(model, tokenizer, prompts, new_token_budget(tokenizer, rows, cfg),
                           skip_blank_lines=answer_end(cfg) == "eos")
    return float(np.mean([score(p, r["references"]) for p, r in zip(predictions, rows)]))


def general_abilities(model, tokenizer, world, cfg: CITConfig) -> dict[str, float]:
    """GP: instructed zero-shot, IP: 5-shot in context, mean over the world's general tasks, ×100.

    Under several processes each scores its share of the tasks and all get every score back.
    """
    from forgetlab.eval.icl import icl_scores
    from forgetlab.models.adapter import adapt

    adapter = adapt(model)
    general = world.role("general")
    mine = []
    for task in distributed.share(general):
        icl = task.as_icl_task()
        mine.append((icl_scores(adapter, tokenizer, icl, cfg.general_prompts, 0, cfg.seed, world.config.seed,
                                ("zero_shot_instruction",))["zero_shot_instruction"],
                     icl_scores(adapter, tokenizer, icl, cfg.general_prompts, 5, cfg.seed, world.config.seed,
                                ("ten_shot",))["ten_shot"]))
    gp, ip = zip(*distributed.gather_shares(mine, len(general)))
    return {"gp": 100 * float(np.mean(gp)), "ip": 100 * float(np.mean(ip))}


def general_files(cfg: CITConfig) -> list[InstructionTask]:
    """The ``general`` task files (comma-separated ``.json``/``.jsonl`` paths), loaded."""
    return [load_task_file(f.strip()) for f in cfg.general.split(",") if f.strip()]


def general_test_split(task: InstructionTask, cfg: CITConfig, shots: int = 5) -> tuple[list, list]:
    """A general set's IP demonstrations (its first ``shots`` instances) and its test instances (its last ones)."""
    pool, test = task.split(len(task.instances), cfg.n_test)
    if len(pool) < shots:
        raise ValueError(f"general set {task.name!r} has {len(pool)} instances besides its test set; "
                         f"the 5-shot prompts need {shots}")
    return pool[:shots], test


def general_rows(task: InstructionTask, cfg: CITConfig, template: PromptTemplate, fit: PromptFitter,
                 shots: int = 5) -> tuple[list[dict], list[dict]]:
    """A general set given as a task file: GP rows (the template, zero-shot) and IP rows (``shots`` worked
    instances from the start of the file as ``Input:/Output:`` pairs, no definition; a row with its own
    instruction shows it before its input) on its test instances. An IP prompt too long for ``max_source_tokens``
    loses demonstrations from the last one on before its query is cut."""
    demos, test = general_test_split(task, cfg, shots)
    blocks = [f"Input: {question(task, inst)}\nOutput: {inst[1][0]}\n\n" for inst in demos]

    def render(text: str, n: int) -> str:
        return "".join(blocks[:n]) + f"Input: {text}\nOutput:"

    ip = []
    for inst in test:
        query = question(task, inst)
        kept = next((n for n in range(shots, 0, -1) if fit.fits(render(query, n))), 0)
        cut = query if kept else fit.shorten(query, lambda text: render(text, 0))  # no demonstration left: cut the query
        if cut is None:
            raise ValueError(f"general set {task.name!r}: 'Input: … Output:' alone takes more than "
                             f"max_source_tokens={cfg.max_source_tokens} tokens; raise max_source_tokens")
        ip.append({"prompt": render(cut, kept), "answer": " " + inst[1][0], "references": inst[1]})
    return _rows(task, test, template, fit), ip


def checkpoint_dir(out: Path, index: int, name: str) -> Path:
    """``checkpoints/task-<k>-<name>/``, the model after the sequence's task ``index`` (0-based)."""
    return out / "checkpoints" / f"task-{index + 1:02d}-{name}"


def save_checkpoint(model, tokenizer, out: Path, index: int, name: str, cfg: CITConfig, adapter_base: str = "") -> None:
    """The model after a task: a plain HF checkpoint (a LoRA model's adapter merged into the saved weights), or with
    ``checkpoint_format=adapter`` only the LoRA adapter, as a PEFT directory whose base is ``adapter_base`` (the
    previous task's checkpoint, relative, for IncLoRA; the initial model otherwise), so that loading it
    (:func:`forgetlab.models.build.load_model`) merges the chain and gives the model the merged format would."""
    lora, final = cfg.mode != "full", checkpoint_dir(out, index, name)
    if not (lora and cfg.checkpoint_format == "adapter"):
        weights = merged_lora_weights(model) if lora else None
        save_model_dir(model.get_base_model() if lora else model, tokenizer, final, state_dict=weights)
        return
    from forgetlab.utils.io import fresh_tmp_dir, replace_dir

    tmp = fresh_tmp_dir(final)
    config = model.peft_config[model.active_adapter]
    named = config.base_model_name_or_path
    config.base_model_name_or_path = adapter_base
    try:  # the adapter's config and weights only (no run resizes the vocabulary: the embeddings are the base's)
        model.save_pretrained(str(tmp), save_embedding_layers=False)
    finally:
        config.base_model_name_or_path = named
    (tmp / "README.md").unlink(missing_ok=True)  # PEFT's blank model card
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    replace_dir(tmp, final)


def resumable_weights(model, cfg: CITConfig) -> dict[str, torch.Tensor]:
    """The weights a resumed run cannot take from the initial model: every one after full fine-tuning; with LoRA the
    adapter and the layers it adapts (IncLoRA merges into them), not the frozen rest (most of a 7B model's 13 GB)."""
    weights = model.state_dict()
    if cfg.mode == "full":
        return weights
    changed = (".lora_", ".base_layer.") if cfg.mode == "inclora" else (".lora_",)  # one adapter, never merged: the
    return {k: v for k, v in weights.items() if any(part in k for part in changed)}  # base stays the initial one


def model_files(model_dir: str) -> list | None:
    """Name, size and a digest of sampled bytes of each file of a local model directory (None for a hub name)."""
    from forgetlab.utils.io import sampled_sha256

    path = Path(model_dir)
    if not path.is_dir():
        return None
    return [[p.name, p.stat().st_size, sampled_sha256(p)] for p in sorted(path.iterdir()) if p.is_file()]


def check_same_model_files(out: Path, model_dir: str, writes: bool) -> None:
    """A LoRA run keeps only what it trains and merges in ``state/``; a resume reads the frozen rest from ``--model``
    again, so the files there are recorded when the run starts and must be the same when it resumes."""
    recorded, now = out / "state" / "model_files.json", model_files(model_dir)
    if now is None:
        return
    if recorded.is_file():
        if read_json(recorded) != now:
            raise ValueError(f"the model at {model_dir} is not the one this run started from (its files differ); resume "
                             "with that model, or start again with --overwrite")
    elif writes:
        recorded.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(recorded, now)


def _pack(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Method state (EWC's Fisher and anchor, O-LoRA's earlier A matrices) as one flat tensor dict."""
    return {f"{group}::{name}": t for group, tensors in groups.items() for name, t in tensors.items()}


def _unpack(tensors: dict[str, torch.Tensor], group: str, device) -> dict[str, torch.Tensor]:
    prefix = f"{group}::"
    return {k[len(prefix):]: t.to(device) for k, t in tensors.items() if k.startswith(prefix)}


def _template(cfg: CITConfig, world) -> PromptTemplate:
    if cfg.template:
        return PromptTemplate(cfg.template)
    return PromptTemplate(WORLD_TEMPLATE) if world is not None else PromptTemplate(NI_TEMPLATE, punctuate=True)


def answer_end(cfg: CITConfig) -> str:
    """``eos`` or ``newline``: ``auto`` is newline for ICL-world sequences and eos otherwise."""
    return cfg.answer_end if cfg.answer_end != "auto" else ("newline" if cfg.world_dir else "eos")


def answer_end_ids(cfg: CITConfig, tokenizer) -> list[int]:
    """The tokens that end every training answer.

    They must be what the model emits to stop and what generation is cut at: an ICL-world model ends
    each answer with a newline and never learned eos, so an eos target teaches it to run on past the
    answer (a task it already did at 100 then scores 50).
    """
    if answer_end(cfg) == "eos":
        return [tokenizer.eos_token_id]
    ids = tokenizer.encode("\n", add_special_tokens=False)
    if not ids:
        raise ValueError("answer_end=newline: this tokenizer has no token for a newline; use --set answer_end=eos")
    return ids


def initial_model_dir(cfg: CITConfig) -> str:
    """The model a run starts from (``--model``, else the ICL world's), checked to be a loadable checkpoint."""
    from forgetlab.models.build import check_checkpoint

    model_dir = cfg.model or str(Path(cfg.world_dir) / "model")
    check_checkpoint(model_dir, "model")
    return model_dir


def check_inputs(cfg: CITConfig) -> None:
    """Everything a run reads, checked before its directory is touched, so bad input writes nothing: the
    sequence's task files and their test splits, the general sets, the model directory and, on the model built
    on the meta device (no weights read, no memory even for a 7B model), the LoRA target modules and the shape
    of FVs read from ``fvg_config.fv_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from forgetlab.models.build import config_source

    cfg.validate()
    distributed.check_batch_split(cfg.train.batch_size)
    tasks, world = load_sequence(cfg)
    for task in tasks:
        task.split(cfg.n_train, cfg.n_test, cfg.seed)
    _template(cfg, world).check("--set template")
    for task in general_files(cfg):
        general_test_split(task, cfg)
    model_dir = initial_model_dir(cfg)
    if cfg.world_dir and cfg.model:
        _check_world_vocabulary(model_dir, Path(cfg.world_dir) / "model")
    if cfg.fvg and not cfg.fvg_config.fv_dir:
        for task in tasks:
            _check_fv_extractable(task, cfg)
    if cfg.mode != "full" or cfg.fvg:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_source(model_dir)))
        if cfg.mode != "full":
            check_lora_targets(model, cfg.lora_targets)
        if cfg.fvg:
            from forgetlab.models.adapter import adapt

            adapter = adapt(model)
            if cfg.fvg_config.layer >= adapter.n_layers:
                raise ValueError(f"fvg_config.layer={cfg.fvg_config.layer} is out of range: the model has "
                                 f"{adapter.n_layers} layers (0..{adapter.n_layers - 1}; -1 picks n_layers // 3)")
            if cfg.fvg_config.fv_dir:
                for name, fv in saved_function_vectors(cfg.fvg_config.fv_dir, [t.name for t in tasks]).items():
                    fv.check_fits(adapter, f"the FV of {name} in fvg_config.fv_dir")


def _check_world_vocabulary(model_dir: str, world_model: Path) -> None:
    """An ICL world's prompts are written in its tokenizer's words: another model of the world must share them,
    or every unknown word reads as the same token (a foreign model then "answers" <unk> with <unk>)."""
    from forgetlab.models.build import load_tokenizer

    theirs, ours = (load_tokenizer(d).get_vocab() for d in (model_dir, world_model))
    if theirs != ours:
        raise ValueError(f"--model {model_dir} has another vocabulary ({len(theirs)} tokens) than the ICL world's model "
                         f"({len(ours)} tokens, {world_model}); use a model trained on this world")


def _check_fv_extractable(task, cfg: CITConfig) -> None:
    """FVG extracts each task's FV from its training rows (split 70/21/9 into demonstrations, test and queries, as
    :func:`forgetlab.methods.fvg.task_function_vector` does): too few rows is refused here, before any work."""
    from forgetlab.fv.tasks import sample_prompts

    train, _ = task.split(cfg.n_train, cfg.n_test, cfg.seed)
    splits = ICLTask.from_pairs(task.name, [(x, refs[0]) for x, refs in train]).splits(0)
    try:
        sample_prompts(splits, 1, max(2, min(cfg.fvg_config.shots, len(splits.train))), task_name=task.name)
    except ValueError as err:
        raise ValueError(f"--fvg cannot extract a function vector from {len(train)} training rows of task "
                         f"{task.name!r} ({err}); raise --max-train") from None


def fv_pairs(tokenizer, train, cfg: CITConfig) -> list[tuple[str, str]]:
    """A task's (input, first reference) pairs for its FV's in-context prompts, each input cut to its share (one of
    ``fvg_config.shots`` + 1 parts) of ``fvg_config.prompt_tokens``, by default ``max_source_tokens``: ten
    demonstrations of a long review or article would make prompts of thousands of tokens, past a 7B model's context
    and costly in the CIE. Short inputs (the ICL world's, most classification tasks') are kept whole."""
    return cut_inputs(tokenizer, [(x, refs[0]) for x, refs in train], cfg, cfg.fvg_config.shots)


def cut_inputs(tokenizer, pairs: Sequence[tuple[str, str]], cfg: CITConfig, shots: int) -> list[tuple[str, str]]:
    """Each input cut in its middle (:func:`middle_cut`) to its share (one of ``shots`` + 1) of the in-context prompt's
    budget, ``fvg_config.prompt_tokens`` or else ``max_source_tokens``."""
    budget = max(8, (cfg.fvg_config.prompt_tokens or cfg.max_source_tokens) // (shots + 1))
    return [(middle_cut(tokenizer, x, budget), y) for x, y in pairs]


def step_terms(guide, adapter, penalties: dict) -> Callable:
    """The trainer's ``extra_loss`` of a ``cit`` task: FVG's terms (read through its hooks) and the method's penalties,
    all from the micro-batch's one forward pass (``run_forward`` runs the model the first time it is asked only)."""
    def extra(rows, batch, run_forward):
        terms = guide.loss(adapter, rows, batch, run_forward) if guide is not None else {}
        outputs = run_forward()
        return {**terms, **{name: term(batch, outputs) for name, term in penalties.items()}}

    return extra


def run_cit(cfg: CITConfig, out: Path, *, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train the sequence; write ``results.json`` (R, metrics, GP/IP), ``scores.png`` and the final ``model/``.

    After every task the model, the scores so far and the method's state are kept in ``state/``, so a
    killed run started again on the same ``out`` (``forgetlab cit run --resume``) goes on after the last
    finished task with the same result; ``--set train.checkpoint_every=N`` also resumes inside a task.
    """
    from forgetlab.models.build import enable_activation_checkpointing, load_model, load_tokenizer

    cfg.validate()
    start = time.perf_counter()
    out = Path(out)
    writes = distributed.is_main()  # several processes (torchrun): all compute, the main one writes
    if (out / CONFIG).is_file():
        check_same_config(out, cfg)  # a directory holding a run of another config is refused, finished or not
    if (out / "results.json").is_file() and (out / "model" / "config.json").is_file():
        log(f"[cit] {out} is a finished run; nothing to resume")
        return read_json(out / "results.json")
    tasks, world = load_sequence(cfg)
    if writes:
        record_api_run(out, cfg)
    template = _template(cfg, world)
    model_dir = initial_model_dir(cfg)
    initial_dir = str(Path(model_dir).resolve()) if Path(model_dir).exists() else model_dir  # adapter checkpoints' base
    if cfg.mode != "full":
        check_same_model_files(out, model_dir, writes)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_dir, DTYPES[cfg.dtype]).to(device)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    splits = [task.split(cfg.n_train, cfg.n_test, cfg.seed) for task in tasks]
    fit = PromptFitter(tokenizer, cfg.max_source_tokens)
    test_rows = [_rows(t, test, template, fit) for t, (_, test) in zip(tasks, splits)]
    general_sets = [general_rows(task, cfg, template, fit) for task in general_files(cfg)]

    def with_lora(model):  # a fresh adapter with the run's settings
        return wrap_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)

    def general_scores() -> dict:
        if general_sets:
            return {"gp": float(np.mean([task_score(model, tokenizer, gp, cfg) for gp, _ in general_sets])),
                    "ip": float(np.mean([task_score(model, tokenizer, ip, cfg) for _, ip in general_sets]))}
        return general_abilities(model, tokenizer, world, cfg) if world is not None else {}

    def evaluate_all(label: str) -> tuple[list[float], dict]:
        scores = [task_score(model, tokenizer, rows, cfg) for rows in test_rows]
        general = general_scores()
        log(f"[cit] {label}: " + "  ".join(f"{t.name}={s:.1f}" for t, s in zip(tasks, scores))
            + "".join(f"  {k.upper()}={v:.1f}" for k, v in general.items()))
        return scores, general

    end_ids = answer_end_ids(cfg, tokenizer)

    def task_data(task, train) -> object:
        prompts, answers = _encode(tokenizer, _rows(task, train, template, fit, reference_draw(task, cfg.seed)), cfg)
        return qa_dataset(prompts, [a + end_ids for a in answers], None, tokenizer.pad_token_id), prompts

    R, general, train_loss = [], [], []  # train_loss: per phase, the mean of each loss term
    sequential = [] if cfg.method == "multitask" else list(zip(tasks, splits))
    seen_data: list = []                 # earlier tasks' training rows (replay)
    fisher, anchor = None, None          # accumulated diagonal Fisher and the weights after the last task (ewc)
    earlier_a: dict[str, list[torch.Tensor]] = {}  # earlier tasks' LoRA A matrices per module (olora)
    first = 0
    initial_fvs = {}  # fv_source="initial" or fv_dir: every task's FV fixed before any training (also on resume)
    if cfg.fvg and (cfg.fvg_config.fv_dir or cfg.fvg_config.fv_source == "initial") and sequential:
        from forgetlab.models.adapter import adapt

        untrained = adapt(model)
        if cfg.fvg_config.fv_dir:
            initial_fvs = saved_function_vectors(cfg.fvg_config.fv_dir, [t.name for t, _ in sequential])
        else:
            initial_fvs = {t.name: task_function_vector(untrained, tokenizer, t.name, fv_pairs(tokenizer, train, cfg),
                                                        cfg.fvg_config) for t, (train, _) in sequential}
            for name, fv in initial_fvs.items() if writes else ():
                fv.save(out / "fv" / name)  # for later runs: --set fvg_config.fv_dir=OUT/fv
        if cfg.fvg_config.heads == "universal":
            k = len(next(iter(initial_fvs.values())).top_heads)  # top_k, capped by the model's heads
            initial_fvs = over_universal_heads(untrained, initial_fvs, k)
    saved = load_between_phases(out / "state") if sequential else None
    if saved is not None:  # a killed run: the model and method state after its last finished task
        meta, weights, tensors = saved
        first, R, general, train_loss = meta["completed"], meta["R"], meta["general"], meta.get("train_loss", [])
        start -= meta["seconds"]
        if cfg.mode != "full":
            model = with_lora(model)  # the same modules as when it was saved; the weights come next
        loaded = model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)
        wrong = loaded.unexpected_keys + sorted(set(loaded.missing_keys) & set(resumable_weights(model, cfg)))
        if wrong:
            raise ValueError(f"{out}/state does not hold this run's model (e.g. {wrong[0]}); start the run again with "
                             "--overwrite")
        fisher, anchor = _unpack(tensors, "fisher", device) or None, _unpack(tensors, "anchor", device) or None
        earlier_a = {name: [a] for name, a in _unpack(tensors, "olora", device).items()}  # saved concatenated
        seen_data = [task_data(t, train)[0] for t, (train, _) in sequential[:first]] if cfg.method == "replay" else []
        log(f"[cit] resuming after task {first}/{len(sequential)} ({sequential[first - 1][0].name})")
    else:
        scores, gen = evaluate_all("initial")
        R.append(scores)
        general.append(gen)
        known = known_at_start(tasks, scores)
        if known:
            log(f"[cit] note: the initial model already scores >= {ALREADY_DONE:g} on {', '.join(known)}: "
                "training on them keeps a known task rather than learning a new one (results.json known_at_start)")
    if cfg.method == "multitask":  # one phase over every task's rows; R repeats the joint model's scores
        if cfg.mode != "full":
            torch.manual_seed(cfg.seed)
            model = with_lora(model)
        joint = concat([task_data(t, train)[0] for t, (train, _) in zip(tasks, splits)], tokenizer.pad_token_id)
        outcome = train_phase(model, joint, cfg.train, phase="multitask", state_dir=out / "state" / "multitask",
                              seed=cfg.seed, log=log, progress=progress)
        train_loss.append({"task": "multitask", "steps": outcome.steps, **outcome.loss_terms})
        scores, gen = evaluate_all(f"after all tasks jointly ({outcome.steps} steps)")
        R += [scores] * len(tasks)
        general += [gen] * len(tasks)
        if cfg.save_checkpoints and writes:
            save_checkpoint(model, tokenizer, out, len(tasks) - 1, "multitask", cfg, initial_dir)
    for k, (task, (train, _)) in enumerate(sequential):
        if k < first:
            continue
        if cfg.mode == "inclora" and k > 0:
            for name, a in lora_a_matrices(model).items():
                earlier_a.setdefault(name, []).append(a.detach().clone())
            model = model.merge_and_unload()
        torch.manual_seed(cfg.seed + k)  # a new adapter's A and dropout masks: same seed, same run, resumed or not
        if cfg.mode == "inclora" or (cfg.mode == "lora" and k == 0):
            model = with_lora(model)
        data, prompts = task_data(task, train)
        task_rows = data
        if cfg.method == "replay" and seen_data:
            data = mix_replay(data, concat(seen_data, tokenizer.pad_token_id), cfg.replay, cfg.seed + k, tokenizer.pad_token_id)
        penalties = {}  # name -> term (batch, outputs) -> loss added after the ordinary forward pass
        if cfg.method == "ewc" and fisher is not None:
            penalties["ewc"] = lambda batch, outputs, f=fisher, a=anchor: ewc_penalty(model, f, a, cfg.ewc_strength)
        if cfg.method == "lwf" and k > 0:
            penalties["lwf"] = lambda batch, outputs: cfg.lwf_strength * lwf_loss(model, batch, outputs.logits,
                                                                                  cfg.lwf_temperature)
        if cfg.method == "olora" and earlier_a:
            current = lora_a_matrices(model)
            penalties["olora"] = lambda batch, outputs, c=current: cfg.olora_strength * lora_orthogonality(
                [torch.cat(earlier_a[n]) for n in c], list(c.values()), cfg.olora_penalty)
        guide = adapter = None
        if cfg.fvg:  # the frozen side comes from the model before this task, computed once
            from forgetlab.models.adapter import adapt

            adapter = adapt(model)
            guide = FVGuidance(adapter, tokenizer, task.name, fv_pairs(tokenizer, train, cfg), prompts, cfg.fvg_config,
                               train_data=task_rows, fv=initial_fvs.get(task.name))
            model.train()

        with guide.hooked(adapter) if guide is not None else contextlib.nullcontext():
            outcome = train_phase(model, data, cfg.train, phase=task.name, state_dir=out / "state" / task.name,
                                  seed=cfg.seed + k, log=log, progress=progress,
                                  extra_loss=step_terms(guide, adapter, penalties) if guide is not None or penalties else None)
        seen_data.append(task_rows)
        entry = {"task": task.name, "steps": outcome.steps, **outcome.loss_terms}
        if guide is not None and guide.cache.agreement is not None:
            entry["fvg_target"] = guide.cache.agreement  # does the KL's target give the label? (see FVG in the README)
        if cfg.score_train_rows > 0:
            fitted = _rows(task, train[:cfg.score_train_rows], template, fit)
            entry["train_rows"] = {"n": len(fitted), "score": task_score(model, tokenizer, fitted, cfg)}
        train_loss.append(entry)
        if cfg.method == "ewc":
            size = cfg.train.batch_size
            batches = [{n: t.to(device) for n, t in task_rows.batch(torch.arange(i, min(len(task_rows), i + size))).items()}
                       for i in range(0, len(task_rows), size)][:cfg.ewc_batches]
            new = diagonal_fisher(model, batches)
            fisher = new if fisher is None else {n: fisher[n] + new[n] for n in new}
            anchor = {n: p.detach().clone() for n, p in model.named_parameters() if n in fisher}
        losses = ", ".join(f"{name} {value:.3g}" for name, value in outcome.loss_terms.items())
        scores, gen = evaluate_all(f"after {task.name} ({outcome.steps} steps; mean loss {losses})")
        R.append(scores)
        general.append(gen)
        if cfg.save_checkpoints and writes:  # an IncLoRA adapter sits on the model the earlier ones merged into
            base = f"../{checkpoint_dir(out, k - 1, sequential[k - 1][0].name).name}" if cfg.mode == "inclora" and k else ""
            save_checkpoint(model, tokenizer, out, k, task.name, cfg, base or initial_dir)
        if k + 1 < len(sequential) and writes:
            olora = {name: torch.cat(mats) for name, mats in earlier_a.items()}  # the penalty only reads them joined
            method_state = _pack({"fisher": fisher or {}, "anchor": anchor or {}, "olora": olora})
            save_between_phases(out / "state", resumable_weights(model, cfg), method_state,
                                {"completed": k + 1, "R": R, "general": general, "train_loss": train_loss,
                                 "seconds": time.perf_counter() - start})
    if cfg.mode != "full":
        model = model.merge_and_unload()
    results = summarize(cfg, tasks, R, general)
    results["train_loss"] = train_loss
    results["seconds"] = time.perf_counter() - start
    if not writes:
        return results
    from forgetlab.report.cit import plot_score_matrix
    from forgetlab.report.markdown import cit_report

    save_model_dir(model, tokenizer, out / "model")  # the model after the last task (LoRA merged)
    atomic_write_json(out / "config.json", asdict(cfg))
    plot_score_matrix(np.array(R), [t.name for t in tasks], out / "scores.png")
    cit_report(results, out)
    atomic_write_json(out / "results.json", results)  # last: its presence marks a finished run
    shutil.rmtree(out / "state", ignore_errors=True)  # model/ and results.json replace the between-task state
    return results


def known_at_start(tasks: Sequence[InstructionTask], initial_scores: Sequence[float]) -> list[str]:
    """The sequence's tasks that the initial model already does: AP and FP on them measure keeping, not learning,
    and whether a sequence's tasks are new can differ between builds of the same world model."""
    return [t.name for t, score in zip(tasks, initial_scores) if score >= ALREADY_DONE]


def summarize(cfg: CITConfig, tasks: list[InstructionTask], R: list[list[float]], general: list[dict]) -> dict:
    """The results.json contract (0–100 scale): method, fvg, initial/final GP and IP, AP, FP, forget, R,
    plus the matrix metrics (ACC, BWT in GEM and TRACE variants, FWT, Chaudhry forgetting) and FP against the
    initial model's mean score on the same tasks (``initial_tasks_mean``, ``FP_gain``)."""
    metrics = cl_summary(np.array(R))
    if cfg.method == "multitask":  # R repeats one jointly trained model: no score "before training on task k", and
        metrics["fwt"] = metrics["avg_incremental_acc"] = math.nan  # no incremental accuracy (null in results.json)
    out = {"preset": cfg.preset, "seed": cfg.seed, "method": cfg.method, "fvg": cfg.fvg, "tasks": [t.name for t in tasks],
           "R": R, "AP": metrics.pop("ap"), "FP": metrics.pop("fp"), "forget": metrics.pop("forget"), **metrics,
           "known_at_start": known_at_start(tasks, R[0]), "initial_tasks_mean": float(np.mean(R[0]))}
    out["FP_gain"] = out["FP"] - out["initial_tasks_mean"]  # what the sequence taught, net of what it forgot
    if general and general[0]:
        out["initial"] = {"GP": general[0]["gp"], "IP": general[0]["ip"]}
        out["final"] = {"GP": general[-1]["gp"], "IP": general[-1]["ip"]}
        out["GP_drop"] = general[0]["gp"] - general[-1]["gp"]
        out["IP_drop"] = general[0]["ip"] - general[-1]["ip"]
        out["general_after_each_task"] = [{"GP": g["gp"], "IP": g["ip"]} for g in general]
    return out
