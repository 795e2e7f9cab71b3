"""FV-guided training (FVG, papers.md §2): keep a task's function-vector heads and its FV-steered
output while the model learns something new.

L = L_LM + α_FV · L_FV + α_KL · L_KL, with
- L_FV = Σ_{(l,k)∈A} MSE(h_θ^{(l,k)}(x_p), h_{θ_prev}^{(l,k)}(x_p)) on the FV heads A at the last prompt position p;
- L_KL = KL(p_θ(· | x) ‖ p_{θ_prev + FV}(· | x)) at p with both distributions at temperature T, the frozen
  previous model steered by the task's function vector added at the edit layer — the paper's code's KL
  (its direction, no T² factor, mean over rows), which its α_KL defaults are tuned for;
- optionally (``alpha_kl_all``) the same KL over every answer token of the training rows, the FV added
  at p, summed over a row's tokens and averaged over rows as the paper's code does over all positions;
  prompt and pad positions are masked (the paper's code sums over them too).
The frozen side never changes during a task, so it is computed once for the whole task
(``build_teacher_cache``); each training step needs only the current model's ordinary forward pass,
read at p through hooks (``capture_heads``): no second or third forward pass per step, and no on/off
thresholds on the loss terms.
"""

from __future__ import annotations

import math

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from forgetlab.fv.hooks import add_to_residual, edit_head_inputs
from forgetlab.fv.prompts import PromptBatch
from forgetlab.models.adapter import ModelAdapter

Head = tuple[int, int]


@contextmanager
def capture_heads(adapter: ModelAdapter, heads: Sequence[Head], positions: torch.Tensor | None = None) -> Iterator[dict]:
    """Yields a dict that, after a forward pass, holds ``"heads"``: (B, K, head_dim) outputs of ``heads`` at
    ``positions`` (one index per row; default the last position). Gradients flow through it.

    Setting ``"positions"`` in the dict between passes moves the read, so the hooks can stay in place for a
    whole phase (activation checkpointing recomputes the forward pass in the backward pass, hooks included).
    """
    d = adapter.head_dim
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for k, (layer, head) in enumerate(heads):
        by_layer.setdefault(layer, []).append((k, head))
    store: dict = {}

    def read(layer: int, x: torch.Tensor) -> None:
        where = store.get("positions", positions)
        rows = torch.arange(x.shape[0], device=x.device)
        at = x[rows, where.to(x.device)] if where is not None else x[:, -1]
        parts = store.setdefault("parts", {})
        for k, head in by_layer[layer]:
            parts[k] = at[:, head * d:(head + 1) * d]
        if len(parts) == len(heads):
            store["heads"] = torch.stack([parts.pop(k) for k in range(len(heads))], dim=1)

    with edit_head_inputs(adapter, read, layers=sorted(by_layer)):
        yield store


@dataclass
class TeacherCache:
    """Frozen-model outputs for every training prompt of a task, in the order of its prompts."""

    logits: torch.Tensor   # (N, vocab) at the last prompt position, with the FV added
    heads: torch.Tensor    # (N, K, head_dim) FV-head outputs at the last prompt position, without the FV
    # how well the KL's target agrees with the labels (when the prompts came with their first answer tokens):
    # top-1 rate and mean probability of the first answer token, frozen model without and with the FV
    agreement: dict[str, float] | None = None


def answer_agreement(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of (N, vocab) logits: is the first answer token the top prediction, and its probability."""
    return logits.argmax(-1) == targets, logits.float().softmax(-1).gather(1, targets[:, None])[:, 0]


@torch.no_grad()
def answer_logits_cache(adapter: ModelAdapter, data, prompt_lengths: torch.Tensor, vector: torch.Tensor, layer: int,
                        alpha: float = 1.0, batch_size: int = 32) -> list[torch.Tensor]:
    """The frozen model's logits at every answer token of each training row (bf16, on the CPU), the FV
    added at the row's prompt end: the teacher of the answer-token KL, computed once per task."""
    from forgetlab.train.data import IGNORE

    was_training = adapter.model.training
    adapter.model.eval()
    device = next(adapter.model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(data), batch_size):
        rows = torch.arange(start, min(len(data), start + batch_size))
        batch = {k: v.to(device) for k, v in data.batch(rows).items()}
        keep = batch.pop("labels")[:, 1:] != IGNORE
        with add_to_residual(adapter, vector.to(device), layer, alpha, positions=prompt_lengths[rows] - 1):
            logits = adapter.model(**batch).logits[:, :-1]
        out += [logits[i][keep[i]].to(torch.bfloat16).cpu() for i in range(len(rows))]
    adapter.model.train(was_training)
    return out


@torch.no_grad()
def build_teacher_cache(adapter: ModelAdapter, batches: Iterable[PromptBatch], vector: torch.Tensor, layer: int,
                        heads: Sequence[Head], alpha: float = 1.0) -> TeacherCache:
    """One pass over the task's zero-shot prompts with the frozen previous model.

    The FV edit sits at ``layer`` (above or below the FV heads), so head outputs are read in a plain
    pass and the steered logits in a second pass over the same prompts — once per task, not per step.
    """
    was_training = adapter.model.training
    adapter.model.eval()
    logits, acts, stats = [], [], []
    for batch in batches:
        with capture_heads(adapter, heads) as got:
            plain = adapter.model(**batch.model_inputs()).logits[:, -1]
        acts.append(got["heads"].float().cpu())
        with add_to_residual(adapter, vector.to(batch.input_ids.device), layer, alpha):
            logits.append(adapter.model(**batch.model_inputs()).logits[:, -1].float().cpu())
        if stats is not None and (batch.targets >= 0).all():
            targets = batch.targets.cpu()
            stats.append((*answer_agreement(plain.float().cpu(), targets), *answer_agreement(logits[-1], targets)))
        else:
            stats = None  # a batch without its answers: no agreement for the task
    adapter.model.train(was_training)
    agreement = None
    if stats:
        columns = [torch.cat([row[i] for row in stats]).float().mean().item() for i in range(4)]
        agreement = dict(zip(("frozen_top1", "frozen_p_answer", "frozen_fv_top1", "frozen_fv_p_answer"), columns))
    return TeacherCache(torch.cat(logits), torch.cat(acts), agreement)


def fvg_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
           n_rows: int | None = None) -> torch.Tensor:
    """KL(softmax(student/T) ‖ softmax(teacher/T)) summed over the positions given (..., vocab) and divided
    by ``n_rows`` (default: one row per position, so a mean): the FV paper's KL, no T² factor."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    total = (log_q.exp() * (log_q - log_p)).sum()
    rows = n_rows if n_rows is not None else max(1, student_logits[..., 0].numel())
    return total / max(1, rows)


def fv_consistency(current: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """Σ over FV heads of the mean squared difference of their outputs, (B, K, d) each."""
    return (current.float() - frozen.to(current.device).float()).pow(2).mean(dim=(0, 2)).sum()


def fvg_terms(current_logits_at_p: torch.Tensor, current_heads: torch.Tensor, cache: TeacherCache, rows: torch.Tensor,
              temperature: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_FV, L_KL) for the training rows ``rows`` of the task (indices into the cache)."""
    cached = rows.cpu()
    l_fv = fv_consistency(current_heads, cache.heads[cached])
    l_kl = fvg_kl(current_logits_at_p, cache.logits[cached].to(current_logits_at_p.device), temperature)
    return l_fv, l_kl


@dataclass(frozen=True)
class FVGConfig:
    """Defaults of the paper's code: α_FV = 1, α_KL = 20 at the last prompt position, T = 2."""

    alpha_fv: float = 1.0
    alpha_kl: float = 20.0
    alpha_kl_all: float = 0.0  # KL over the answer tokens (row sums); the paper's code puts 0.1–0.5 on all positions
    temperature: float = 2.0
    layer: int = -1        # edit layer; -1: n_layers // 3
    scale: float = 1.0     # the FV is added as scale · FV (the paper adds it once)
    top_k: int = 10
    shots: int = 10
    n_prompts: int = 32    # clean prompts for the mean activations; the CIE uses half as many
    # "previous": each task's FV (heads and vector) from the model before the task; "initial": from the
    # model before any training, as the paper's code does (it extracts every task's FV from the base model once)
    fv_source: str = "previous"
    # "task": each task's own top-k heads; "universal": the top-k heads by CIE averaged over the sequence's
    # tasks (with fv_source="initial"), shared by every task, as the paper's code uses one fixed head set
    heads: str = "task"
    # FVs read from files instead: DIR/<task>/ as `forgetlab fv extract` writes them, e.g. OUT/fv/ of an earlier
    # run with fv_source="initial" (the paper extracts them once and reuses them); it overrides fv_source
    fv_dir: str = ""
    # the length an FV's in-context prompt may reach (its shots + 1 inputs share it; longer inputs are cut): 0 takes
    # the run's max_source_tokens (cheap, but cuts inputs of about 46 tokens); a model's context keeps long inputs
    prompt_tokens: int = 0

    def validate(self) -> None:
        """One line for a setting FVG cannot run with (``--set fvg_config.NAME=...``)."""
        for name in ("alpha_fv", "alpha_kl", "alpha_kl_all"):
            if not 0 <= getattr(self, name) < math.inf:  # written so that NaN fails too
                raise ValueError(f"fvg_config.{name}={getattr(self, name)} must be a finite number, not negative")
        if not math.isfinite(self.scale):
            raise ValueError(f"fvg_config.scale={self.scale} must be a finite number (the FV is added as scale · FV)")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"fvg_config.temperature={self.temperature} must be positive (the paper's is 2)")
        for name in ("top_k", "n_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"fvg_config.{name}={getattr(self, name)} is too small; use 1 or more")
        if self.shots < 2:
            raise ValueError(f"fvg_config.shots={self.shots} is too small (the CIE shuffles at least 2 demonstrations)")
        if self.prompt_tokens < 0:
            raise ValueError(f"fvg_config.prompt_tokens={self.prompt_tokens}: give a token count, or 0 for max_source_tokens")
        if self.layer < -1:
            raise ValueError(f"fvg_config.layer={self.layer}: give a layer index, or -1 for n_layers // 3")
        if self.fv_source not in FV_SOURCES:
            raise ValueError(f"fvg_config.fv_source={self.fv_source!r} is unknown; use one of {', '.join(FV_SOURCES)}")
        if self.heads not in HEAD_SETS:
            raise ValueError(f"fvg_config.heads={self.heads!r} is unknown; use one of {', '.join(HEAD_SETS)}")
        if self.heads == "universal" and self.fv_source != "initial" and not self.fv_dir:
            raise ValueError("fvg_config.heads=universal ranks heads over every task of the sequence on the initial model; "
                             "add --set fvg_config.fv_source=initial")


FV_SOURCES = ("previous", "initial")
HEAD_SETS = ("task", "universal")


def over_universal_heads(adapter: ModelAdapter, results: dict, k: int) -> dict:
    """Each task's FV rebuilt over the heads with the highest CIE averaged over all the tasks (tasks weighted
    equally): ``{task: FunctionVectorResult}`` in, the same with shared ``top_heads`` and their vectors out."""
    from dataclasses import replace

    from forgetlab.fv.vectors import function_vector, universal_heads

    heads = universal_heads([r.cie_per_prompt for r in results.values()], k)
    return {name: replace(r, top_heads=heads, vector=function_vector(adapter, r.mean_activations, heads))
            for name, r in results.items()}


def saved_function_vectors(fv_dir: str | Path, task_names: Sequence[str]) -> dict:
    """``{task: FunctionVectorResult}`` read from ``fv_dir/<task>/``; one clear error naming a missing task."""
    from forgetlab.fv.extract import FunctionVectorResult

    out = {}
    for name in task_names:
        folder = Path(fv_dir) / name
        if not (folder / "fv.json").is_file():
            raise FileNotFoundError(f"fvg_config.fv_dir {fv_dir} has no FV for task {name} (no {folder}/fv.json); run once "
                                    "with --set fvg_config.fv_source=initial, which writes OUT/fv/<task>/, or extract it "
                                    f"with `forgetlab fv extract --out {folder}`")
        out[name] = FunctionVectorResult.load(folder)
    return out


def task_function_vector(adapter: ModelAdapter, tokenizer, task_name: str, pairs: Sequence[tuple[str, str]],
                         cfg: FVGConfig = FVGConfig()):
    """The task's FV in this model (exact CIE engine), with FVG's extraction settings."""
    from forgetlab.fv.extract import FVSettings, extract_function_vector
    from forgetlab.fv.tasks import ICLTask

    task = ICLTask.from_pairs(task_name, pairs)
    shots = max(2, min(cfg.shots, len(task.splits(0).train)))  # below 2 the extraction refuses: nothing to shuffle
    top_k = min(cfg.top_k, adapter.n_layers * adapter.n_heads)
    settings = FVSettings(n_prompts=cfg.n_prompts, n_cie_prompts=max(1, cfg.n_prompts // 2), shots=shots, top_k=top_k)
    return extract_function_vector(adapter, tokenizer, task, settings)


class FVGuidance:
    """FV-guided training for one task: built from the model *before* the task, then gives the loss terms.

    ``fv`` (a :class:`FunctionVectorResult`) is the task's FV extracted elsewhere (``fv_source="initial"``);
    without it the FV is extracted from ``adapter``'s model.
    """

    def __init__(self, adapter: ModelAdapter, tokenizer, task_name: str, pairs: Sequence[tuple[str, str]],
                 train_prompts: Sequence[Sequence[int]], cfg: FVGConfig = FVGConfig(), train_data=None, fv=None):
        from forgetlab.eval.exact_match import left_pad
        from forgetlab.models.tokenizers import pad_id

        if fv is not None:
            fv.check_fits(adapter, f"the FV of {task_name}")
        self.fv = fv if fv is not None else task_function_vector(adapter, tokenizer, task_name, pairs, cfg)
        self.cfg = cfg
        self.layer = cfg.layer if cfg.layer >= 0 else adapter.n_layers // 3
        self.heads = self.fv.top_heads
        pad = pad_id(tokenizer)
        device = next(adapter.model.parameters()).device
        self.last = torch.tensor([len(p) - 1 for p in train_prompts])  # the last prompt token in a right-padded row
        # the first answer token of each row (known when the rows come along), to score the KL's target
        first = torch.full((len(train_prompts),), -1, dtype=torch.long)
        if train_data is not None and len(train_data) == len(train_prompts):
            first = train_data.input_ids[torch.arange(len(first)), self.last + 1]
        batches = []
        for start in range(0, len(train_prompts), 32):
            ids, mask = left_pad(train_prompts[start:start + 32], pad)
            batches.append(PromptBatch(ids.to(device), mask.to(device), first[start:start + 32]))
        self.cache = build_teacher_cache(adapter, batches, self.fv.vector, self.layer, self.heads, cfg.scale)
        self.answers = None
        self.hooks: dict | None = None
        if cfg.alpha_kl_all:
            if train_data is None or len(train_data) != len(train_prompts):
                raise ValueError("alpha_kl_all needs the task's training rows (train_data), one per training prompt")
            self.answers = answer_logits_cache(adapter, train_data, self.last + 1, self.fv.vector, self.layer, cfg.scale)

    @contextmanager
    def hooked(self, adapter: ModelAdapter) -> Iterator[None]:
        """Keep the FV heads' read hooks in place for a whole phase, so that activation checkpointing, which
        reruns the forward pass during the backward pass, meets the same hooks as the forward pass did."""
        with capture_heads(adapter, self.heads) as self.hooks:
            try:
                yield
            finally:
                self.hooks = None

    def loss(self, adapter: ModelAdapter, rows: torch.Tensor, batch: dict, run_forward) -> dict[str, torch.Tensor]:
        """The weighted terms ``fv`` = α_FV · L_FV and ``kl`` = α_KL · L_KL (plus ``kl_all`` with the
        all-position KL) from the ordinary forward pass of the current model, read at the prompt end.

        Rows past this task's own (earlier tasks' rows mixed in by replay) carry no FVG terms.
        """
        rows = rows.cpu()
        mine = rows < len(self.last)
        positions = torch.where(mine, self.last[rows.clamp(max=len(self.last) - 1)], 0)
        if self.hooks is not None:  # installed for the whole phase (see ``hooked``)
            got = self.hooks
            got.clear()
            got["positions"] = positions
            out = run_forward()
        else:
            with capture_heads(adapter, self.heads, positions) as got:
                out = run_forward()
        names = ("fv", "kl", "kl_all") if self.answers is not None else ("fv", "kl")
        if not mine.any():
            return {name: out.logits.new_zeros(()) for name in names}
        logits = out.logits[torch.arange(len(rows), device=out.logits.device), positions.to(out.logits.device)]
        keep = mine.to(logits.device)
        l_fv, l_kl = fvg_terms(logits[keep], got["heads"][keep], self.cache, rows[mine], self.cfg.temperature)
        terms = {"fv": self.cfg.alpha_fv * l_fv, "kl": self.cfg.alpha_kl * l_kl}
        if self.answers is not None:
            terms["kl_all"] = self.cfg.alpha_kl_all * self.answer_kl(out.logits, batch["labels"], rows, mine)
        return terms

    def answer_kl(self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
        """KL to the cached FV-steered teacher over the answer tokens of this task's rows in the batch
        (summed over each row's answer tokens, averaged over the rows)."""
        from forgetlab.train.data import IGNORE

        answer = (labels[:, 1:] != IGNORE) & mine.to(labels.device)[:, None]
        student = logits[:, :-1][answer.to(logits.device)]
        teacher = torch.cat([self.answers[int(r)] for r in rows[mine]]).to(student.device)
        return fvg_kl(student, teacher, self.cfg.temperature, n_rows=int(mine.sum()))
