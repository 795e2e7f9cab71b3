"""Memory and time of a LoRA training step, and of saving a per-task checkpoint, in the precisions `cit run` offers.

Why: the FV paper's setting is a 7B model with 512 + 128-token rows. Its weights in float32 take 27 GB before
any activation, and merging the adapter into a copy for each task's checkpoint doubled that. Measured side by
side on the same random model of a real shape (no download), the same rows and the same LoRA (r = 8 on q, v):

- float32 weights (the default), bfloat16 weights, and bfloat16 with activation checkpointing;
- the checkpoint of a LoRA model, merged tensor by tensor on the CPU (ours) or as a merged deep copy, and its size
  on disk against the adapter alone (``checkpoint_format=adapter``).

The peak is torch's allocator peak on a GPU, and the resident set (sampled every 5 ms) on a CPU, where it holds the
interpreter and libraries too; so the rise above the memory held before the timed steps (gradients, optimizer
state, activations) is printed beside it. A save is measured by how much memory it adds, and the two checkpoints
are compared tensor by tensor. Each setting runs in a fresh process.

    python benchmarks/bench_cit_memory.py                                   # CPU: a 12-layer d=768 Llama
    python benchmarks/bench_cit_memory.py --shape llama-2-7b --seq 640 --batch 4    # one GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

SETTINGS = {"float32": (torch.float32, False), "bfloat16": (torch.bfloat16, False),
            "bfloat16 + checkpointing": (torch.bfloat16, True)}


class Peak:
    """Peak memory in bytes while the block runs (allocator on CUDA, sampled resident set on a CPU), and
    ``extra``: how far it rose above the memory held when the block began."""

    def __init__(self, device: str):
        self.device, self.bytes, self.start, self._stop = device, 0, 0, threading.Event()

    @property
    def extra(self) -> int:
        return self.bytes - self.start

    def _rss(self) -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.bytes = max(self.bytes, self._rss())
            time.sleep(0.005)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.bytes = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = max(self.bytes, self._rss())


def model_config(shape: str):
    from transformers import LlamaConfig

    from forgetlab.models.zoo import shape_config

    if shape == "small":  # GPT-2-small-sized Llama: 12 layers, d=768, 12 heads (about 110M parameters)
        return LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                           num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048)
    return shape_config(shape)


def one(args) -> dict:
    """One setting in this process: build, train ``steps`` steps, save the checkpoint (ours or a deep copy)."""
    from forgetlab.experiments.cit import CITConfig, save_checkpoint
    from forgetlab.models.build import enable_activation_checkpointing
    from forgetlab.models.lora import wrap_lora
    from forgetlab.models.zoo import random_model
    from forgetlab.train.data import qa_dataset
    from forgetlab.train.trainer import PhaseConfig, train_phase

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, checkpointing = SETTINGS[args.one]
    config = model_config(args.shape)
    model = random_model(config, dtype=dtype, device=device)
    if checkpointing:
        enable_activation_checkpointing(model)
    torch.manual_seed(0)
    lora = CITConfig(world_dir="x", method="lora")
    model = wrap_lora(model, lora.lora_targets, lora.lora_r, lora.lora_alpha, lora.lora_dropout)
    g = torch.Generator().manual_seed(0)
    answer = 16
    prompts = [torch.randint(3, config.vocab_size, (args.seq - answer,), generator=g).tolist() for _ in range(args.batch)]
    answers = [torch.randint(3, config.vocab_size, (answer - 1,), generator=g).tolist() for _ in range(args.batch)]
    data = qa_dataset(prompts, answers, 2, 0)
    cfg = PhaseConfig(lr=1e-4, schedule="constant", max_steps=args.steps, batch_size=args.batch, checkpoint_every=0,
                      weight_decay=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        train_phase(model, data, replace(cfg, max_steps=1), phase="warm-up", state_dir=Path(tmp) / "w", seed=0,
                    log=lambda s: None, progress=False)
        clock = []  # after each optimizer step, the device drained: the steps after the first (which creates the
        # optimizer's state) are the step time, without the phase's set-up

        def tick(step: int) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            clock.append(time.perf_counter())

        with Peak(device) as train_peak:
            train_phase(model, data, cfg, phase="timed", state_dir=Path(tmp) / "t", seed=0, on_step=tick,
                        log=lambda s: None, progress=False)
        with Peak(device) as ours:
            save_checkpoint(model, None, Path(tmp) / "ours", 0, "t", lora)
        with Peak(device) as alone:  # checkpoint_format=adapter: the adapter on its base (named, not read here)
            save_checkpoint(model, None, Path(tmp) / "adapter", 0, "t", replace(lora, checkpoint_format="adapter"), "base")
        saves = {name: sum(f.stat().st_size for f in (Path(tmp) / name).rglob("*") if f.is_file()) / 1e9
                 for name in ("ours", "adapter")}
        saves = {"checkpoint_gb": saves["ours"], "adapter_checkpoint_gb": saves["adapter"]}
        if device == "cuda":  # a CPU's resident set keeps freed pages, so what a save adds is not measurable there
            saves["save_extra_gb"], saves["adapter_save_extra_gb"] = ours.extra / 1e9, alone.extra / 1e9
            try:
                with Peak(device) as copied:
                    copy.deepcopy(model).merge_and_unload().save_pretrained(Path(tmp) / "copy")
                saves["deepcopy_save_extra_gb"] = copied.extra / 1e9
                ours_dir = next((Path(tmp) / "ours").rglob("model.safetensors")).parent  # checkpoints/task-NN-name/
                saves["save_max_rel_diff"] = difference = checkpoint_difference(ours_dir, Path(tmp) / "copy")
                tolerance = 1e-5 if dtype == torch.float32 else 2.0 ** -7  # relative: a float32 or a bf16 rounding
                if difference > tolerance:
                    raise SystemExit(f"{args.one}: our checkpoint differs from the merged deep copy by {difference:.1e} "
                                     f"of the largest weight (tolerance {tolerance:.0e}): no memory figure reported")
            except torch.cuda.OutOfMemoryError:
                saves["deepcopy_save_extra_gb"] = float("inf")  # the copy does not fit beside the model
    return {"setting": args.one, "step_seconds": (clock[-1] - clock[0]) / (len(clock) - 1),
            "train_peak_gb": train_peak.bytes / 1e9,
            "train_rise_gb": train_peak.extra / 1e9, **saves}


def checkpoint_difference(ours: Path, theirs: Path) -> float:
    """Largest |difference| between two saved checkpoints' tensors, relative to their largest |value| (they must
    hold the same names)."""
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict:
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(ours), tensors(theirs)
    if set(a) != set(b):
        raise SystemExit(f"the checkpoints hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    scale = max(float(b[k].float().abs().max()) for k in b) or 1.0
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", help="small | llama-2-7b | llama-3-8b")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row (prompt + 16 answer tokens)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (the step time is over the last steps - 1)")
    parser.add_argument("--one", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args)))
        return
    rows = []
    for setting in SETTINGS:
        cmd = [sys.executable, __file__, "--one", setting, "--shape", args.shape, "--seq", str(args.seq),
               "--batch", str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{args.shape}, {args.batch} rows x {args.seq} tokens, LoRA r=8 on q,v; {device}")
    print(f"{'setting':<26} {'step s':>8} {'training peak GB':>17} {'rise GB':>8} {'checkpoint save adds GB':>24} "
          f"{'(deep copy)':>12} {'checkpoint GB':>14} {'(adapter)':>10}")
    for r in rows:
        saves = "".join(f" {r[k]:>{w}.{d}f}" if k in r else f" {'-':>{w}}"
                        for k, w, d in (("save_extra_gb", 24, 2), ("deepcopy_save_extra_gb", 12, 2),
                                        ("checkpoint_gb", 14, 3), ("adapter_checkpoint_gb", 10, 4)))
        print(f"{r['setting']:<26} {r['step_seconds']:>8.3f} {r['train_peak_gb']:>17.2f} {r['train_rise_gb']:>8.2f}{saves}")
    base, lean = rows[0], rows[-1]
    print(f"training peak, bfloat16 + checkpointing vs float32: {lean['train_peak_gb'] / base['train_peak_gb']:.2f}x "
          f"(step time {lean['step_seconds'] / base['step_seconds']:.2f}x)")
    print(f"a per-task checkpoint on disk, merged vs the adapter alone (checkpoint_format=adapter), float32: "
          f"{base['checkpoint_gb']:.3f} vs {base['adapter_checkpoint_gb']:.4f} GB, "
          f"{base['checkpoint_gb'] / base['adapter_checkpoint_gb']:.0f}x smaller")
    if "save_extra_gb" in base:
        print(f"GPU memory a float32 checkpoint save adds, ours vs a merged deep copy: {base['save_extra_gb']:.2f} vs "
              f"{base['deepcopy_save_extra_gb']:.2f} GB; largest difference between the two checkpoints (relative): "
              f"{base.get('save_max_rel_diff', float('nan')):.1e}")


if __name__ == "__main__":
    main()
