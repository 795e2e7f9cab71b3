"""Pretraining throughput: forgetlab's ``train_phase`` on packed blocks vs the stock HF ``Trainer``.

Why: forgetlab trains with its own loop (``forgetlab.train.trainer.train_phase``) on packed sequences
(``pack_texts``: biography entries joined by eos and cut into ``block_size`` blocks), instead of the
usual Hugging Face recipe of one document per example, padded per batch. This script checks that the
own loop earns its keep: it measures *useful* tokens per second (non-padding tokens trained on) of

* ours: ``train_phase`` itself (temporary state dir, no checkpoints, no evaluation, no progress bar)
  on ``pack_texts`` blocks, and
* HF:   ``transformers.Trainer`` with one biography entry (+ eos) per example, padded per batch by
  ``DataCollatorForLanguageModeling(mlm=False)``, report_to="none", no evaluation, no saving,

on the same model shape (a fresh model built with the same seed for each), the same biography corpus,
about the same useful tokens per optimizer step (HF takes as many entries as fill ours' packed rows: a larger
batch alone would raise tokens/s), the same AdamW betas/weight decay/clipping and the same warmup +
cosine-to-min-lr schedule, on the same device and precision (fp32 on CPU, bf16 autocast on CUDA), both
eager or both under ``torch.compile`` (``--compile``; HF's ``torch_compile``); or each as it runs by default
(``--ours-compiled``: ours compiled, as the cpu-demo pretraining runs, against the stock Trainer, eager).
Both runs take ``--warmup`` untimed steps, then ``--steps`` timed ones; the clock is read after an
optimizer step (a global optimizer step hook) and useful tokens are the attention-mask sums of the
timed forward passes (a model forward pre-hook), so both contenders are measured the same way.
Each loop is measured ``--repeats`` times in alternating order; the figure is the median ratio (with its spread).
The goal is ``ratio ours/HF >= 1.2``, judged like for like (both eager or both compiled).

    python benchmarks/bench_pretraining_throughput.py [--preset cpu-demo] [--steps 30] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import os
import platform
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from forgetlab.experiments.presets import preset_config
from forgetlab.models.build import build_model
from forgetlab.models.tokenizers import build_word_tokenizer
from forgetlab.train.data import pack_texts
from forgetlab.train.trainer import PhaseConfig, train_phase
from forgetlab.worlds.biography import generate_world

GOAL = 1.2


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepMeter:
    """Clock and useful-token count over optimizer steps [warmup, warmup + steps) of one run.

    The clock starts right after optimizer step ``warmup`` completes and stops right after step
    ``warmup + steps``; tokens are the attention-mask sums of the forward passes in between.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, warmup: int, steps: int):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.done = 0  # optimizer steps completed
        self.t_start = self.t_end = None
        self.counts: list[torch.Tensor] = []
        self._hooks = [model.register_forward_pre_hook(self._on_forward, with_kwargs=True),
                       register_optimizer_step_post_hook(self._on_step)]

    def _on_forward(self, module, args, kwargs):
        if self.warmup <= self.done < self.warmup + self.steps and module.training:
            mask = kwargs.get("attention_mask")
            if mask is None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                self.counts.append(torch.tensor(ids.numel()))
            else:
                self.counts.append(mask.sum())  # stays on the device: no sync inside the timed loop

    def _on_step(self, optimizer, args, kwargs):
        self.done += 1
        if self.done == self.warmup:
            sync(self.device)
            self.t_start = time.perf_counter()
        elif self.done == self.warmup + self.steps:
            sync(self.device)
            self.t_end = time.perf_counter()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def result(self) -> tuple[float, int]:
        if self.t_start is None or self.t_end is None:
            raise RuntimeError(f"run ended after {self.done} optimizer steps, expected {self.warmup + self.steps}")
        return self.t_end - self.t_start, int(sum(int(c) for c in self.counts))


def run_ours(model, token_lists, eos_id, args, pcfg: PhaseConfig, device, seed: int) -> tuple[float, int]:
    data = pack_texts(token_lists, eos_id, args.block_size)
    meter = StepMeter(model, device, args.warmup, args.steps)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ours-") as state_dir:
            train_phase(model, data, pcfg, phase="bench", state_dir=Path(state_dir), seed=seed,
                        evaluate=None, log=lambda _msg: None, progress=False)
    finally:
        meter.remove()
    return meter.result()


class Documents(torch.utils.data.Dataset):
    """One tokenised biography entry (plus eos) per example: the ordinary corpus-of-documents setup."""

    def __init__(self, token_lists, eos_id: int, max_len: int):
        self.rows = [list(t)[: max_len - 1] + [eos_id] for t in token_lists]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i]}


def run_hf(model, tokenizer, token_lists, eos_id, args, pcfg: PhaseConfig, device, seed: int) -> tuple[float, int]:
    """``pcfg.batch_size`` is HF's own: entries per step, chosen by the caller to match ours' tokens per step."""
    from transformers import DataCollatorForLanguageModeling, PrinterCallback, Trainer, TrainingArguments

    dataset = Documents(token_lists, eos_id, args.block_size)
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as out_dir:
        targs = TrainingArguments(
            output_dir=out_dir, report_to="none", eval_strategy="no", save_strategy="no", logging_strategy="no",
            disable_tqdm=True, max_steps=pcfg.max_steps, per_device_train_batch_size=pcfg.batch_size,
            gradient_accumulation_steps=pcfg.grad_accum, learning_rate=pcfg.lr, warmup_steps=pcfg.warmup_steps,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": pcfg.min_lr_ratio},
            weight_decay=pcfg.weight_decay, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=pcfg.grad_clip,
            bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(), use_cpu=device.type != "cuda",
            seed=seed, dataloader_num_workers=0, torch_compile=pcfg.compile,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator)
        trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
        meter = StepMeter(trainer.model, device, args.warmup, args.steps)
        try:
            trainer.train()
        finally:
            meter.remove()
    return meter.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-demo", help="world and model sizes (forgetlab presets)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before the clock starts")
    parser.add_argument("--batch-size", type=int, default=0, help="rows per optimizer step (0 = the preset's)")
    parser.add_argument("--block-size", type=int, default=0, help="packed block length for ours (0 = the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements of each loop, in alternating order (the median ratio is the figure)")
    parser.add_argument("--compile", action="store_true", help="both loops under torch.compile (default: both eager)")
    parser.add_argument("--ours-compiled", action="store_true",
                        help="each loop as it runs by default: ours compiled (as the cpu-demo pretraining runs it), "
                             "the stock Trainer eager (its torch_compile=False default)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    if args.compile and args.ours_compiled:
        parser.error("--compile (both compiled) and --ours-compiled (only ours) contradict each other; pass one")

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    cfg = preset_config(args.preset, seed=args.seed)
    args.batch_size = args.batch_size or cfg.pretrain.batch_size
    args.block_size = args.block_size or cfg.block_size
    if args.block_size > cfg.model.max_positions:
        parser.error(f"--block-size {args.block_size} exceeds the model's max_positions={cfg.model.max_positions}")
    # The preset's pretraining optimisation (lr, warmup, cosine floor, AdamW, clipping), cut to the run length.
    pcfg = replace(cfg.pretrain, max_steps=args.warmup + args.steps, batch_size=args.batch_size, grad_accum=1,
                   checkpoint_every=0, compile=args.compile or args.ours_compiled)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    world = generate_world(cfg.world)
    tokenizer = build_word_tokenizer(world.word_list())
    entries = world.biography_entries(world.splits["pretrain"])
    token_lists = tokenizer(entries, add_special_tokens=False)["input_ids"]
    eos, pad, bos = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    lengths = [len(t) + 1 for t in token_lists]
    hf_batch = max(1, round(args.batch_size * args.block_size / (sum(lengths) / len(lengths))))  # same tokens per step

    def fresh_model():
        return build_model(cfg.model, len(tokenizer), pad, eos, bos, args.seed).to(device)

    mode = "both compiled" if args.compile else "ours compiled, HF eager" if args.ours_compiled else "both eager"
    precision = "bf16 autocast" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    print(f"device: {device_name(device)}  [{device.type}, {precision}, torch threads={torch.get_num_threads()}]")
    print(f"preset={args.preset}  model={cfg.model.architecture} d={cfg.model.d_model} L={cfg.model.n_layers}  "
          f"entries={len(entries)} (tokens+eos: mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)})  "
          f"ours: {args.batch_size} rows of {args.block_size} per step; HF: {hf_batch} entries per step  "
          f"steps={args.steps} after {args.warmup} warmup  {mode}  "
          f"lr={pcfg.lr} warmup_steps={pcfg.warmup_steps} cosine->x{pcfg.min_lr_ratio}")

    def measure_ours():
        return run_ours(fresh_model(), token_lists, eos, args, pcfg, device, args.seed)

    def measure_hf():
        return run_hf(fresh_model(), tokenizer, token_lists, eos, args,
                      replace(pcfg, batch_size=hf_batch, compile=args.compile), device, args.seed)

    # the order alternates between repeats, so neither loop always runs on the cooler (or the busier) machine
    print(f"{'repeat':<8}{'loop':<28}{'seconds':>10}{'useful tokens':>16}{'per step':>10}{'tokens/s':>12}")
    ratios = []
    for k in range(max(1, args.repeats)):
        first, second = (measure_ours, measure_hf) if k % 2 == 0 else (measure_hf, measure_ours)
        a, b = first(), second()
        (ours_s, ours_tok), (hf_s, hf_tok) = (a, b) if k % 2 == 0 else (b, a)
        for name, sec, tok in (("ours (train_phase, packed)", ours_s, ours_tok), ("HF Trainer (padded docs)", hf_s, hf_tok)):
            print(f"{k + 1:<8}{name:<28}{sec:>10.2f}{tok:>16,}{tok / args.steps:>10,.0f}{tok / sec:>12,.0f}")
        ratios.append((ours_tok / ours_s) / (hf_tok / hf_s))
    ratio = statistics.median(ratios)
    verdict = ("met" if ratio >= GOAL else "NOT met") if not args.ours_compiled else \
        "not judged: ours compiled against HF eager is not like for like"
    print(f"ratio ours/HF = {ratio:.2f}, median of {len(ratios)} (min {min(ratios):.2f}, max {max(ratios):.2f})  "
          f"(goal >= {GOAL}: {verdict})")
    if hasattr(os, "getloadavg"):
        print(f"load average at end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
