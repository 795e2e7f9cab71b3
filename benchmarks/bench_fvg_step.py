"""Cost of an FV-guided training step relative to a plain IncLoRA step (same model, data and batch).

Why: FV-guided training must be cheap enough to run on every task. Here the frozen model's side is
computed once per task (a cached teacher), and the current model's FV heads and prompt-end logits are
read from the ordinary forward pass through hooks, so a step adds only hook reads and two small loss
terms (the reference code runs three forward passes per step: about 3×). Goal: ratio <= 1.3.

    python benchmarks/bench_fvg_step.py --world RUN_DIR [--steps 40]     # an icl-world build
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from transformers import AutoTokenizer

from forgetlab.analysis.recovery import encode_qa
from forgetlab.experiments.cit import CITConfig, _rows, step_terms
from forgetlab.methods.fvg import FVGuidance
from forgetlab.models.adapter import adapt
from forgetlab.models.build import load_model
from forgetlab.models.lora import wrap_lora
from forgetlab.train.data import qa_dataset
from forgetlab.train.trainer import PhaseConfig, train_phase
from forgetlab.worlds.icl import ICLWorld
from forgetlab.worlds.instruction_prompts import WORLD_TEMPLATE, PromptFitter, PromptTemplate
from forgetlab.worlds.instructions import world_sequence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed run")
    args = parser.parse_args()
    world = ICLWorld.read(Path(args.world) / "world.json")
    tokenizer = AutoTokenizer.from_pretrained(Path(args.world) / "model")
    task = world_sequence(world, 0)[0]
    train, _ = task.split(1000, 100)
    rows = _rows(task, train, PromptTemplate(WORLD_TEMPLATE), PromptFitter(tokenizer, CITConfig().max_source_tokens))
    prompts, answers = encode_qa(tokenizer, rows)
    data = qa_dataset(prompts, answers, tokenizer.eos_token_id, tokenizer.pad_token_id)
    cfg = PhaseConfig(lr=1e-3, schedule="constant", max_steps=args.steps, batch_size=args.batch_size, checkpoint_every=0,
                      weight_decay=0.0)
    timings, terms = {}, {}
    for label in ("inclora", "inclora+fvg", "inclora (again)", "inclora+fvg (again)"):
        model = wrap_lora(load_model(Path(args.world) / "model"), CITConfig().lora_targets)  # the paper's LoRA
        extra, hooked = None, contextlib.nullcontext()
        if "fvg" in label:
            adapter = adapt(model)
            start = time.perf_counter()
            guide = FVGuidance(adapter, tokenizer, task.name, [(x, r[0]) for x, r in train], prompts)
            cache_seconds = time.perf_counter() - start
            extra = step_terms(guide, adapter, {})  # what `cit run --fvg` hands the trainer, hooks held as it holds them
            hooked = guide.hooked(adapter)
        with hooked, tempfile.TemporaryDirectory() as state:
            # untimed first steps (first calls of each shape), then the timed ones on the same model
            train_phase(model, data, replace(cfg, max_steps=args.warmup), phase=label, state_dir=Path(state) / "warmup",
                        seed=1, log=lambda s: None, progress=False, extra_loss=extra)
            outcome = train_phase(model, data, cfg, phase=label, state_dir=Path(state) / "timed", seed=0,
                                  log=lambda s: None, progress=False, extra_loss=extra)
        timings[label], terms[label] = outcome.seconds / args.steps, outcome.loss_terms
    plain = min(timings["inclora"], timings["inclora (again)"])
    guided = min(timings["inclora+fvg"], timings["inclora+fvg (again)"])
    print(f"task {task.name}: {len(data)} rows, batch {args.batch_size}, {args.steps} steps each after {args.warmup} "
          f"untimed, best of two runs")
    print("mean loss terms, IncLoRA+FVG (FVG active when fv and kl are not zero): "
          + ", ".join(f"{k} {v:.3g}" for k, v in terms["inclora+fvg"].items()))
    print(f"IncLoRA step {plain * 1000:.1f} ms, IncLoRA+FVG step {guided * 1000:.1f} ms: ratio {guided / plain:.2f} "
          f"(goal <= 1.3); FV extraction + teacher cache once per task: {cache_seconds:.1f} s")


if __name__ == "__main__":
    main()
