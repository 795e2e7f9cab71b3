"""The one training loop: pretraining, every task of a sequence, and recovery all run through it.

A phase is a fixed number of optimizer steps over a :class:`TokenDataset`. The data order, the
learning rate and the evaluation points are pure functions of the step, so a phase killed at any
point and resumed from its last checkpoint continues exactly as if it had never stopped.
Continual methods act from outside: freezing sets ``requires_grad`` before the phase (only
trainable parameters reach the optimizer), replay changes the dataset, early stopping is ``stop``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from forgetlab.train import distributed
from forgetlab.train.checkpoints import load_training_state, save_training_state
from forgetlab.train.data import IGNORE, TokenDataset

Scores = dict[str, dict[str, float]]  # task -> metric -> value


@dataclass(frozen=True)
class EvalSchedule:
    """Dense evaluation at the start of a phase (where forgetting happens fast), sparse after."""

    dense_every: int = field(default=5, metadata={"help": "evaluate every N steps while step <= dense_until"})
    dense_until: int = field(default=200, metadata={"help": "end of the dense part"})
    every: int = field(default=50, metadata={"help": "evaluate every N steps after that"})

    def due(self, step: int, total: int) -> bool:
        if step in (0, total):
            return True
        if step <= self.dense_until and self.dense_every > 0 and step % self.dense_every == 0:
            return True
        return self.every > 0 and step % self.every == 0


@dataclass(frozen=True)
class PhaseConfig:
    """Optimisation settings of one phase (AdamW, linear warmup then cosine decay)."""

    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to lr * min_lr_ratio"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    schedule: str = field(default="cosine", metadata={"help": "cosine | constant"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (ignored when max_steps > 0)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = derive from epochs"})
    batch_size: int = field(default=32, metadata={"help": "rows per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 disables"})
    checkpoint_every: int = field(default=200, metadata={"help": "save a resumable state every N steps"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training step (fixed shapes: full batches only)"})
    eval: EvalSchedule = field(default_factory=EvalSchedule)

    def validate(self, where: str) -> None:
        for name in ("lr", "min_lr_ratio", "epochs", "weight_decay", "grad_clip"):  # NaN slips through every `x < 0`
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{where}.{name}={getattr(self, name)} is not a finite number; give a finite value")
        if not self.lr > 0:
            raise ValueError(f"{where}.lr={self.lr} must be positive")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"{where}.schedule={self.schedule!r} is unknown; use cosine or constant")
        for name in ("batch_size", "grad_accum"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{where}.{name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"{where}.min_lr_ratio={self.min_lr_ratio} must be in [0, 1] (the floor as a share of lr)")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "checkpoint_every"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{where}.{name}={getattr(self, name)} must not be negative (0 turns it off)")
        if not (self.max_steps >= 0 and self.epochs >= 0) or (self.max_steps == 0 and self.epochs == 0):
            raise ValueError(f"{where}: set a positive epochs or max_steps (got epochs={self.epochs}, max_steps={self.max_steps})")

    def total_micro_batches(self, n_rows: int) -> int:
        """Micro-batches the phase draws: ``max_steps`` whole windows, or ``epochs`` × ⌈rows / batch_size⌉ (the last
        optimizer step then takes only the micro-batches left, so no extra window is trained).

        Phases that draw full batches only (compiled, or several processes) skip each epoch's incomplete batch
        but keep this count, so they make slightly more than ``epochs`` passes (the cpu-demo pretraining 40.7
        for 40); counting their epochs exactly would change the schedule every documented run was measured with."""
        if self.max_steps > 0:
            return self.max_steps * self.grad_accum
        return max(1, math.ceil(self.epochs * micro_batches_per_epoch(n_rows, self.batch_size)))

    def total_steps(self, n_rows: int) -> int:
        return math.ceil(self.total_micro_batches(n_rows) / self.grad_accum)


def lr_at(step: int, total: int, cfg: PhaseConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warmup, then cosine to lr*min_lr_ratio."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def micro_batches_per_epoch(n_rows: int, batch_size: int, drop_last: bool = False) -> int:
    """``drop_last`` skips an epoch's incomplete last batch (unless the rows fill none)."""
    return n_rows // batch_size if drop_last and n_rows >= batch_size else math.ceil(n_rows / batch_size)


def micro_batch_rows(micro: int, n_rows: int, batch_size: int, seed: int, drop_last: bool = False) -> torch.Tensor:
    """Rows of micro-batch ``micro``: a fresh seeded permutation per epoch, no row twice in an epoch.

    ``drop_last`` skips an epoch's incomplete last batch, so every batch has the same shape.
    """
    epoch, pos = divmod(micro, micro_batches_per_epoch(n_rows, batch_size, drop_last))
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * batch_size : (pos + 1) * batch_size]


def labelled_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens a causal LM's loss averages over: the labels after the shift, not IGNORE."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def make_optimizer(model: torch.nn.Module, cfg: PhaseConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; no weight decay on vectors (norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: everything is frozen; freeze fewer layers")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=next(model.parameters()).is_cuda or None)


@dataclass
class PhaseOutcome:
    steps: int
    rows: list[dict] = field(default_factory=list)  # curves rows: phase, step, task, metric, value
    stopped_early: bool = False
    seconds: float = 0.0
    loss_terms: dict[str, float] = field(default_factory=dict)  # mean per micro-batch: "lm" and each extra term


class TermSums:
    """Running sums of named loss terms, kept on the device (no synchronisation per step) and read once.

    They show how much each regulariser weighs against ``lm``: one orders of magnitude below it whose run
    scores like the run without it (e.g. EWC at a strength its Fisher makes inert) is doing nothing.
    """

    def __init__(self, saved: dict[str, list[float]] | None = None):
        self.sums: dict[str, torch.Tensor | float] = {k: v[0] for k, v in (saved or {}).items()}
        self.counts: dict[str, int] = {k: int(v[1]) for k, v in (saved or {}).items()}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def state(self) -> dict[str, list[float]]:
        return {k: [float(v), self.counts[k]] for k, v in self.sums.items()}

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.counts[k] for k, v in self.sums.items()}


@contextmanager
def reproducible_kernels(on: bool) -> Iterator[None]:
    """Deterministic algorithms while compiled CPU kernels run, restored after.

    Inductor's CPU kernels otherwise accumulate some gradients (the embedding's scatter-add) in a
    thread-dependent order, so one seed gave a different model on every run (extraction 0.72-0.81).
    """
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def train_phase(
    model: torch.nn.Module,
    data: TokenDataset,
    cfg: PhaseConfig,
    *,
    phase: str,
    state_dir: Path,
    seed: int,
    evaluate: Callable[[], Scores] | None = None,
    stop: Callable[[Scores], bool] | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    extra_loss: Callable[[torch.Tensor, dict, Callable[[], object]], torch.Tensor | Mapping[str, torch.Tensor]] | None = None,
) -> PhaseOutcome:
    """Train ``model`` in place for one phase; resumes from ``state_dir`` if a state is there.

    ``on_step(step)`` runs after every optimizer step (e.g. to save snapshots for the analyses).
    ``extra_loss(rows, batch, run_forward)`` lets a method add loss terms: it gets the micro-batch's row
    indices, the batch itself (on the device, with ``labels``) and a function that runs the usual
    forward pass (so hooks can be set around it) and returns the model outputs; it returns the terms
    to add to ``outputs.loss``, one tensor or a dict of named ones. ``outcome.loss_terms`` holds the
    mean of ``lm`` (``outputs.loss``) and of each named term (``extra`` for a bare tensor) per micro-batch.

    The LM loss of an optimizer step is the mean over all labelled tokens of its micro-batches (on all
    processes), so accumulation gives the gradient one batch of the same rows would; method terms are
    averaged over the step's micro-batches. A loss that is not finite stops the phase with one line.

    Launched on several processes (:mod:`forgetlab.train.distributed`), the model runs under
    ``DistributedDataParallel``: every micro-batch is the one a single process would draw (complete batches
    only), each process takes its interleaved share of its rows, and the gradients are averaged; only the
    main process saves the resumable state.
    """
    device = next(model.parameters()).device
    world, rank = distributed.world_size(), distributed.rank()
    distributed.check_batch_split(cfg.batch_size)
    drop_last = cfg.compile or world > 1
    total, micro_total = cfg.total_steps(len(data)), cfg.total_micro_batches(len(data))
    optimizer = make_optimizer(model, cfg)
    outcome = PhaseOutcome(steps=0)
    start = 0
    state = load_training_state(state_dir, model, optimizer)
    if state is not None:
        start, outcome.rows, outcome.seconds = state["step"], state["rows"], state["seconds"]
        log(f"[{phase}] resuming at step {start}/{total}")
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    t0 = time.perf_counter() - outcome.seconds
    losses: list[float] = list(state["pending_losses"]) if state else []  # since the last evaluation
    terms = TermSums(state.get("loss_terms") if state else None)

    def run_eval(step: int) -> bool:
        if evaluate is None:
            return False
        model.eval()
        scores = evaluate()
        model.train()
        if losses:
            scores.setdefault("train", {})["loss"] = sum(losses) / len(losses)
            losses.clear()
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                outcome.rows.append({"phase": phase, "step": step, "task": task, "metric": metric, "value": float(value)})
        shown = "  ".join(f"{t}/{m}={v:.3f}" for t, ms in scores.items() for m, v in ms.items() if m in ("em", "loss"))
        log(f"[{phase}] step {step:>6}/{total}  {shown}")
        return distributed.agree(stop is not None and stop(scores))

    # Compiling fuses the many small element-wise kernels of a small model (about 1.8x on a CPU);
    # the compiled wrapper shares the model's parameters, so checkpoints and evaluation are unchanged.
    parallel = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        parallel = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = parallel or model
    forward = torch.compile(forward) if cfg.compile else forward
    with reproducible_kernels(cfg.compile and device.type == "cpu"):
        model.train()
        stopped = start == 0 and cfg.eval.due(0, total) and run_eval(0)
        bar = tqdm(total=total, initial=start, desc=phase, disable=not progress, leave=False, dynamic_ncols=True)
        step = start
        while step < total and not stopped:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            window = range(step * cfg.grad_accum, min((step + 1) * cfg.grad_accum, micro_total))
            shares = [micro_batch_rows(m, len(data), cfg.batch_size, seed, drop_last=drop_last)[rank::world] for m in window]
            micro_batches = [data.batch(rows) for rows in shares]
            # the LM loss is the mean over every labelled token of the step (all its micro-batches, all processes), as
            # one batch of that size would give: a micro-batch's token mean weighs by its share of those tokens
            counts = [labelled_tokens(b) for b in micro_batches]
            if 0 in counts:
                raise ValueError(f"[{phase}] a micro-batch of step {step + 1} has no token to learn (every row's labels "
                                 "are ignored): give every training row an answer")
            step_tokens = distributed.total(sum(counts))
            step_loss = torch.zeros((), device=device)
            for k, (rows, cpu_batch, count) in enumerate(zip(shares, micro_batches, counts)):
                batch = {name: t.to(device) for name, t in cpu_batch.items()}
                # several processes: gradients are averaged once per step, at its last micro-batch
                sync = parallel.no_sync() if parallel is not None and k + 1 < len(window) else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        if extra_loss is None:
                            lm, named = forward(**batch).loss, {}
                        else:
                            outputs = {}

                            def run_forward(batch=batch, outputs=outputs):  # the one forward pass, whoever asks first
                                if "out" not in outputs:
                                    outputs["out"] = forward(**batch)
                                return outputs["out"]

                            extra = extra_loss(rows, batch, run_forward)
                            named = dict(extra) if isinstance(extra, Mapping) else {"extra": extra}
                            lm = run_forward().loss
                        # DDP averages gradients over processes, hence the factor world
                        loss = lm * (count * world / step_tokens) + sum(named.values()) / len(window)  # terms: per micro-batch
                    loss.backward()
                    step_loss += loss.detach()
                    for name, value in {"lm": lm, **named}.items():
                        terms.add(name, value)
                if evaluate is not None:
                    losses.append(float(lm.detach() + sum(v.detach() for v in named.values())))
            if not torch.isfinite(step_loss):
                raise ValueError(f"[{phase}] the training loss became {step_loss.item()} at step {step + 1}; lower the "
                                 "learning rate or check the method's settings (the run can --resume from its last saved step)")
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if on_step is not None:
                on_step(step)
            bar.update(1)
            if losses and progress:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if cfg.eval.due(step, total):
                stopped = run_eval(step)
                if stopped:
                    log(f"[{phase}] early stop at step {step}")
            if (step < total and not stopped and cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
                    and distributed.is_main()):
                save_training_state(state_dir, model, optimizer, step=step, rows=outcome.rows, seconds=time.perf_counter() - t0,
                                    pending_losses=losses, loss_terms=terms.state())
        bar.close()
    outcome.steps, outcome.stopped_early = step, bool(stopped)
    outcome.seconds = time.perf_counter() - t0
    outcome.loss_terms = terms.means()
    return outcome
