"""The spurious-forgetting experiment on the synthetic biography world (papers.md section 3).

pretrain on biographies -> task 0 (QA on half the pretrained people, tested on the other half:
knowledge extraction) -> tasks 1..N (QA on new people, under the chosen continual method) ->
recovery (one epoch of task-0 QA on half of its training people, tested on the held-out people),
plus the same recovery from the pretrained-only model as a control. Every phase is cached by the
hash of its configuration, so runs that differ only in later phases share the earlier ones.
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from forgetlab.eval.exact_match import QAResult, greedy_exact_match
from forgetlab.eval.recall import find_span, span_recall
from forgetlab.experiments.config import BiographyRunConfig
from forgetlab.experiments.phases import PhaseStore, default_cache_dir
from forgetlab.experiments.rundir import prepare_run_dir, publish_checkpoint
from forgetlab.methods import freeze_parameters, mix_replay
from forgetlab.methods.freeze import bottom_layers
from forgetlab.methods.regularizers import diagonal_fisher, ewc_penalty
from forgetlab.metrics.cl import cl_summary, share_or_none
from forgetlab.models.build import build_model, load_model, load_tokenizer
from forgetlab.models.tokenizers import build_word_tokenizer
from forgetlab.train import distributed
from forgetlab.train.checkpoints import save_model_dir
from forgetlab.train.data import TokenDataset, concat, pack_texts, qa_dataset
from forgetlab.train.trainer import PhaseConfig, train_phase
from forgetlab.utils.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, code_fingerprint, config_hash
from forgetlab.worlds.biography import ATTRIBUTES, BiographyWorld, QAExample, generate_world

# Cached phases are keyed by their config *and* by the code that computes them: editing any of these modules
# retrains the phases instead of handing back ones an older version computed (the methods' code only keys
# the task phases that use it).
PHASE_CODE = code_fingerprint("forgetlab.experiments.biography", "forgetlab.train.trainer", "forgetlab.train.data",
                              "forgetlab.models.build", "forgetlab.models.tokenizers", "forgetlab.worlds.biography",
                              "forgetlab.worlds.biography_templates", "forgetlab.worlds.names",
                              "forgetlab.eval.exact_match", "forgetlab.eval.recall")
METHOD_CODE = code_fingerprint("forgetlab.methods.freeze", "forgetlab.methods.replay", "forgetlab.methods.regularizers")
SNAPSHOTS = "snapshots"  # inside a phase's cache folder: models saved at cfg.snapshot_steps


def phase_key(*parts) -> str:
    """A cached phase's key: its config and code, and the number of processes that train it when more than
    one (a phase trained data-parallel differs from a one-process one by rounding and per-shard token weighting)."""
    n = distributed.world_size()
    return config_hash(*parts, *((("processes", n),) if n > 1 else ()))


@dataclass
class QASet:
    """Tokenised questions of one task, with the attribute of each question."""

    prompts: list[list[int]]
    answers: list[list[int]]
    attributes: list[str]

    def sample(self, n: int, seed: int) -> "QASet":
        if n >= len(self.prompts):
            return self
        rows = sorted(random.Random(seed).sample(range(len(self.prompts)), n))
        return QASet([self.prompts[i] for i in rows], [self.answers[i] for i in rows], [self.attributes[i] for i in rows])


def encode_qa(examples: list[QAExample], tokenizer) -> QASet:
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    return QASet(prompts, answers, [e.attribute for e in examples])


def _named_before(tokens: list[int], start: int, name: list[int], period: int) -> bool:
    """Does the sentence holding position ``start`` name the person before it (else the value is unaskable)."""
    begin = max((i + 1 for i in range(start) if tokens[i] == period), default=0)
    return any(tokens[i : i + len(name)] == name for i in range(begin, start - len(name) + 1))


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class BiographyExperiment:
    """Holds the world, tokenizer and QA sets of one configuration; runs and caches its phases."""

    def __init__(self, cfg: BiographyRunConfig, cache_dir: Path | None = None, log: Callable[[str], None] = print,
                 progress: bool = True):
        cfg.validate()
        self.cfg, self.log, self.progress = cfg, log, progress
        self.device = pick_device()
        self.world: BiographyWorld = generate_world(cfg.world)
        self.tokenizer = self._tokenizer()
        self.eos, self.pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self.store = PhaseStore(cache_dir or default_cache_dir(), log)
        splits = self.world.splits
        self.n_tasks = cfg.world.n_new_tasks
        self.qa = {"task0_train": encode_qa(self.world.qa_examples(splits["task0_train"]), self.tokenizer),
                   "task0": encode_qa(self.world.qa_examples(splits["task0_test"]), self.tokenizer)}
        for k in range(1, self.n_tasks + 1):
            self.qa[f"task{k}"] = encode_qa(self.world.qa_examples(splits[f"task{k}"]), self.tokenizer)
        half = splits["task0_train"][: len(splits["task0_train"]) // 2]
        self.qa["recovery_train"] = encode_qa(self.world.qa_examples(half), self.tokenizer)
        self.eval_sets = {k: v.sample(cfg.eval.max_questions, cfg.seed + i) for i, (k, v) in enumerate(self.qa.items())}
        self.recall_set = self._recall_set(splits["task0_test"])

    def _recall_set(self, person_ids: list[int]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """First biography entry of held-out task-0 people and the token span of each attribute value."""
        n_people = max(1, self.cfg.eval.max_questions // len(ATTRIBUTES))
        ids = sorted(random.Random(self.cfg.seed).sample(person_ids, min(n_people, len(person_ids))))
        k = self.cfg.world.entries_per_person
        entries = self.world.biography_entries(ids)[::k]
        tokens = self.tokenizer(entries, add_special_tokens=False)["input_ids"]
        period = self.tokenizer.convert_tokens_to_ids(".")
        sequences, spans = [], []
        for pid, toks in zip(ids, tokens):
            person = self.world.people[pid]
            name = self.tokenizer(" " + person.full_name, add_special_tokens=False)["input_ids"]
            values = self.tokenizer([" " + person.value(a) for a in ATTRIBUTES], add_special_tokens=False)["input_ids"]
            found = [s for s in (find_span(toks, v) for v in values) if s and _named_before(toks, s[0], name, period)]
            if found:
                sequences.append(toks)
                spans.append(found)
        return sequences, spans

    def recall(self, model) -> float:
        """Share of held-out task-0 attribute values the model still completes in its own biographies (under
        several processes each reads its share of the biographies)."""
        sequences, spans = self.recall_set
        mine = distributed.share(range(len(sequences)))
        hits = span_recall(model, [sequences[i] for i in mine], [spans[i] for i in mine], pad_id=self.pad,
                           batch_size=self.cfg.eval.batch_size)
        hits = distributed.gather_shares(hits, len(sequences))
        flat = [h for row in hits for h in row]
        return sum(flat) / len(flat) if flat else float("nan")

    def _tokenizer(self):
        """The world's word-level tokenizer, or the tokenizer saved with a local starting checkpoint."""
        if not self.cfg.model.checkpoint:
            return build_word_tokenizer(self.world.word_list())
        tokenizer = load_tokenizer(self.cfg.model.checkpoint)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of model.checkpoint={self.cfg.model.checkpoint} has no eos token; "
                             "set one and save it with the checkpoint")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    # -- data and evaluation -------------------------------------------------------------
    def train_set(self, name: str) -> TokenDataset:
        qa = self.qa[name]
        return qa_dataset(qa.prompts, qa.answers, self.eos, self.pad)

    def _exact_match(self, model, qa: QASet) -> QAResult:
        """Exact match per question; under several processes each decides its share and all get every answer."""
        mine = distributed.share(range(len(qa.prompts)))
        res = greedy_exact_match(model, [qa.prompts[i] for i in mine], [qa.answers[i] for i in mine], eos_id=self.eos,
                                 pad_id=self.pad, batch_size=self.cfg.eval.batch_size)
        n = len(qa.prompts)
        return QAResult(distributed.gather_shares(res.exact, n), distributed.gather_shares(res.first_token, n))

    def score(self, model, qa: QASet) -> dict[str, float]:
        res = self._exact_match(model, qa)
        return {"em": res.em, "first_token": res.first_token_acc}

    def full_eval(self, model, tasks: list[str]) -> dict[str, dict[str, float]]:
        """Every question of each task, with exact match per attribute."""
        out = {}
        for t in tasks:
            qa = self.qa[t]
            res = self._exact_match(model, qa)
            scores = {"em": res.em, "first_token": res.first_token_acc}
            for a in ATTRIBUTES:
                hits = [ok for ok, attr in zip(res.exact, qa.attributes) if attr == a]
                if hits:
                    scores[f"em_{a}"] = sum(hits) / len(hits)
            out[t] = scores
        if "task0" in tasks and not self.cfg.model.checkpoint:
            out["task0"]["recall"] = self.recall(model)
        return out

    def step_eval(self, tasks: list[str]) -> Callable[[], dict]:
        def evaluate(model) -> dict:
            return {t: self.score(model, self.eval_sets[t]) for t in tasks}
        return evaluate

    def all_tasks(self) -> list[str]:
        return ["task0"] + [f"task{k}" for k in range(1, self.n_tasks + 1)]

    # -- phases --------------------------------------------------------------------------
    def _phase(self, name: str, key: str, start: Callable[[], torch.nn.Module], data: Callable[[], TokenDataset],
               pcfg: PhaseConfig, tasks: list[str], stop: Callable[[dict], bool] | None = None,
               prepare: Callable[[torch.nn.Module], dict] | None = None, snapshots: tuple[int, ...] = (),
               penalty: Callable[[torch.nn.Module], Callable[[], torch.Tensor]] | None = None):
        """``prepare(model)`` runs before training (e.g. freezing) and returns info to keep; ``penalty(model)``
        returns a loss term added at every step (e.g. EWC), built once from the starting model."""
        def train(state_dir: Path):
            model = start().to(self.device)
            extra = prepare(model) if prepare else {}
            term = penalty(model) if penalty else None
            evaluate = self.step_eval(tasks)

            def on_step(step: int) -> None:
                if step in snapshots and distributed.is_main():
                    save_model_dir(model, self.tokenizer, state_dir.parent / SNAPSHOTS / f"step-{step}")

            # the phase's own random stream (dropout), so a run resumed at a phase boundary in a fresh process draws
            # what the uninterrupted one drew; a resume inside the phase restores the saved stream instead
            torch.manual_seed(zlib.crc32(f"{self.cfg.seed}:{name}".encode()))
            outcome = train_phase(model, data(), pcfg, phase=name, state_dir=state_dir, seed=self.cfg.seed,
                                  evaluate=lambda: evaluate(model), stop=stop, log=self.log, progress=self.progress,
                                  on_step=on_step if snapshots else None,
                                  extra_loss=(lambda rows, batch, run_forward: (run_forward(), {"ewc": term()})[1]) if term else None)
            for p in model.parameters():
                p.requires_grad_(True)
            info = {"steps": outcome.steps, "stopped_early": outcome.stopped_early, "seconds": outcome.seconds,
                    "loss_terms": outcome.loss_terms,
                    "final": self.full_eval(model, self.all_tasks()), **extra}
            return model, outcome.rows, info
        return self.store.run(name, key, train, self.tokenizer)

    def pretrain(self):
        cfg = self.cfg
        key = phase_key("pretrain", PHASE_CODE, cfg.world, cfg.model, cfg.block_size, cfg.pretrain, cfg.eval, cfg.seed)

        def data() -> TokenDataset:
            entries = self.world.pretraining_corpus()
            ids = self.tokenizer(entries, add_special_tokens=False)["input_ids"]
            return pack_texts(ids, self.eos, cfg.block_size)

        def start():
            t = self.tokenizer
            return build_model(cfg.model, len(t), t.pad_token_id, t.eos_token_id, t.bos_token_id, cfg.seed)
        return self._phase("pretrain", key, start, data, cfg.pretrain, tasks=[]), key

    def task0(self, pre, pre_key: str):
        key = phase_key("task0", pre_key, self.cfg.task0)
        return self._phase("task0", key, lambda: load_model(pre.model_dir), lambda: self.train_set("task0_train"),
                           self.cfg.task0, tasks=["task0"]), key

    def new_task(self, k: int, prev, prev_key: str):
        cfg, method = self.cfg, self.cfg.method
        key = phase_key(f"task{k}", prev_key, METHOD_CODE, cfg.task, method,
                          *([cfg.snapshot_steps] if cfg.snapshot_steps else []))

        def data() -> TokenDataset:
            current = self.train_set(f"task{k}")
            if method.replay <= 0:
                return current
            old = concat([self.train_set("task0_train")] + [self.train_set(f"task{j}") for j in range(1, k)], self.pad)
            return mix_replay(current, old, method.replay, cfg.seed + k, self.pad)

        def prepare(model) -> dict:
            if method.name != "freeze":
                return {"frozen": []}
            return {"frozen": freeze_parameters(model, bottom_layers(method.freeze_layers), method.freeze_embedding)}

        def ewc(model) -> Callable[[], torch.Tensor]:
            """Diagonal Fisher of the starting model on earlier tasks' rows, anchored at the starting weights."""
            old = concat([self.train_set("task0_train")] + [self.train_set(f"task{j}") for j in range(1, k)], self.pad)
            size = cfg.task.batch_size
            order = torch.randperm(len(old), generator=torch.Generator().manual_seed(cfg.seed + k))
            batches = [{n: t.to(self.device) for n, t in old.batch(order[i:i + size]).items()}
                       for i in range(0, min(len(old), method.ewc_batches * size), size)]
            fisher = diagonal_fisher(model, batches)
            anchor = {n: p.detach().clone() for n, p in model.named_parameters() if n in fisher}
            return lambda: ewc_penalty(model, fisher, anchor, method.ewc_strength)

        stop = None
        if method.early_stop > 0:
            stop = lambda scores: scores[f"task{k}"]["em"] >= method.early_stop  # noqa: E731
        tasks = ["task0"] + [f"task{j}" for j in range(1, k + 1)]
        return self._phase(f"task{k}", key, lambda: load_model(prev.model_dir), data, cfg.task, tasks, stop, prepare,
                           snapshots=cfg.snapshot_steps, penalty=ewc if method.name == "ewc" else None), key

    def recovery(self, source, source_key: str, name: str = "recovery"):
        """One short re-alignment on task-0 QA of half its training people, scored on held-out people."""
        key = phase_key("recovery", PHASE_CODE, source_key, self.cfg.recovery)
        return self._phase(name, key, lambda: load_model(source.model_dir), lambda: self.train_set("recovery_train"),
                           self.cfg.recovery, tasks=["task0"])


def run_biography(cfg: BiographyRunConfig, out: Path, *, cache_dir: Path | None = None, resume: bool = False,
                  overwrite: bool = False, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run (or resume) the whole experiment; write config, curves, checkpoints, results and a figure."""
    t0 = time.perf_counter()
    cfg.validate()
    out = Path(out)
    distributed.main_first(lambda: prepare_run_dir(out, cfg, resume=resume, overwrite=overwrite, log=log))
    exp = BiographyExperiment(cfg, cache_dir, log, progress)
    pre, pre_key = exp.pretrain()
    t0_phase, key = exp.task0(pre, pre_key)
    phases = {"pretrain": pre, "task0": t0_phase}
    last = t0_phase
    for k in range(1, exp.n_tasks + 1):
        last, key = exp.new_task(k, last, key)
        phases[f"task{k}"] = last
    phases["recovery"] = exp.recovery(last, key)
    phases["recovery_control"] = exp.recovery(pre, pre_key, name="recovery_control")

    rows = [r for p in phases.values() for r in p.rows]
    results = summarize(cfg, phases, rows, exp.n_tasks, seconds=time.perf_counter() - t0)
    if not distributed.is_main():  # several processes (torchrun): all trained, the main one writes
        return results
    for name, phase in phases.items():
        publish_checkpoint(phase.model_dir, out / "checkpoints" / name)
        for snap in sorted((phase.model_dir.parent / SNAPSHOTS).glob("step-*")):
            publish_checkpoint(snap, out / "checkpoints" / f"{name}-{snap.name}")
    atomic_write_text(out / "curves.csv", "phase,step,task,metric,value\n" + "".join(
        f"{r['phase']},{r['step']},{r['task']},{r['metric']},{r['value']:.6g}\n" for r in rows))
    atomic_write_jsonl(out / "metrics.jsonl", rows)
    atomic_write_json(out / "results.json", results)
    from forgetlab.report.biography import plot_curves  # matplotlib only when writing figures
    from forgetlab.report.markdown import biography_report

    plot_curves(rows, results, out / "curves.png")
    biography_report(results, out)
    return results


def summarize(cfg: BiographyRunConfig, phases: dict, rows: list[dict], n_tasks: int, seconds: float) -> dict:
    """The results.json contract: fractions in [0, 1] plus method, preset, seed, seconds."""
    before = phases["task0"].info["final"]["task0"]["em"]
    during = [r["value"] for r in rows if r["phase"] == "task1" and r["task"] == "task0" and r["metric"] == "em"]
    final = phases[f"task{n_tasks}"].info["final"]
    recovered = phases["recovery"].info["final"]["task0"]["em"]
    tasks = ["task0"] + [f"task{k}" for k in range(1, n_tasks + 1)]
    order = ["pretrain", "task0"] + [f"task{k}" for k in range(1, n_tasks + 1)]
    matrix = [[phases[p].info["final"][t]["em"] for t in tasks] for p in order]
    m = cfg.method
    return {
        "task0_before": before,
        "task0_min_during_task1": min(during) if during else phases["task1"].info["final"]["task0"]["em"],
        "task0_after_task1": phases["task1"].info["final"]["task0"]["em"],
        "task0_final": final["task0"]["em"],  # after the last new task: where recovery starts
        "task1_after": phases["task1"].info["final"]["task1"]["em"],
        "task0_recovered": recovered,
        "task0_recovery_control": phases["recovery_control"].info["final"]["task0"]["em"],
        "spurious_share": share_or_none(before, final["task0"]["em"], recovered),
        "method": m.name, "freeze_layers": m.freeze_layers, "replay": m.replay, "early_stop": m.early_stop,
        "ewc_strength": m.ewc_strength,
        "preset": cfg.preset, "seed": cfg.seed, "seconds": seconds,
        "task1_steps": phases["task1"].info["steps"],
        "task0_recall": {name: p.info["final"]["task0"].get("recall") for name, p in phases.items()},
        "loss_terms": {name: p.info.get("loss_terms", {}) for name, p in phases.items()},
        "per_attribute_after_task1": {k: v for k, v in phases["task1"].info["final"]["task0"].items() if k.startswith("em_")},
        "score_matrix": {"rows": order, "tasks": tasks, "R": matrix, "metrics": cl_summary(matrix)},
    }
