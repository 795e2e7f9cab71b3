"""Causal indirect effect: the ``exact`` engine vs the ``naive`` reference (and ``attribution``).

Why: the CIE of every head needs one patched forward pass per (layer, head, prompt) in the reference
(25,625 passes for a 7B Llama task). The exact engine gets the same numbers from one cached pass plus
one single-token step holding every patch as a row. This script runs the engines side by side on the
same model and the same shuffled-label 10-shot prompts, prints seconds per prompt and the ratio, and
checks that exact and naive agree (max abs difference, identical top-10 heads) in float32: on the timed runs
when they are float32, otherwise on a float32 copy of the model (``--check-dtype``; bf16 rounds the two
engines differently). No ratio is printed when the float32 results disagree.

Two ratios: ``exact`` is timed on the prompts batched (how a task's CIE is computed) and ``exact_single`` on
one prompt at a time, the engine's own gain without the batching the reference lacks.

Goals (issue "Function vectors ... 100x faster"): CPU, 12-layer model: exact >= 30x naive.
GPU, random Llama-2-7B shape, bf16, ~100-token prompts: exact >= 100x naive (<= 0.4 s per prompt).

    python benchmarks/bench_cie_engines.py                                 # CPU, 12-layer Llama
    python benchmarks/bench_cie_engines.py --shape llama-2-7b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from forgetlab.fv.cie import causal_indirect_effect, mean_head_activations
from forgetlab.fv.prompts import batches
from forgetlab.fv.tasks import ICLTask, PromptFormat, counterfactuals, sample_prompts
from forgetlab.fv.vectors import top_heads
from forgetlab.models.adapter import adapt
from forgetlab.models.tokenizers import build_bpe_tokenizer
from forgetlab.models.zoo import random_model, shape_config, tiny_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def synthetic_task(n: int = 400, seed: int = 0) -> ICLTask:
    """A word -> reversed-word task over seeded pseudo-words (no data files needed)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnoprstuvw"))
    words = sorted({"".join(rng.choice(letters, size=rng.integers(3, 7))) for _ in range(n * 2)})[:n]
    return ICLTask.from_pairs("reverse", [(w, w[::-1]) for w in words])


def timed(device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu-12l", help="cpu-12l (Llama d=256, 12 layers, 8 heads) | llama-2-7b | llama-3-8b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--prompts", type=int, default=8, help="prompts timed for exact and attribution")
    parser.add_argument("--naive-prompts", type=int, default=2, help="prompts timed for naive (it is slow)")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--max-rows", type=int, default=8192, help="exact engine: patched rows per step")
    parser.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary of the prompt tokenizer")
    parser.add_argument("--check-dtype", default="float32", choices=["", *DTYPES],
                        help="compare exact vs naive in this dtype when the timed dtype differs ('' skips it)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest float32 |exact - naive| allowed, relative to the largest |CIE|")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one exact run and stop")
    args = parser.parse_args()

    device = torch.device(args.device)
    task = synthetic_task()
    fmt = PromptFormat()
    tokenizer = build_bpe_tokenizer([f"Q: {x}\nA: {y}\n\n" for x, y in task.pairs], vocab_size=args.vocab)
    if args.shape == "cpu-12l":
        config = tiny_config("llama", len(tokenizer), n_layers=12, n_heads=8, d_model=256)
    else:
        config = shape_config(args.shape)
    model = random_model(config, seed=0, dtype=DTYPES[args.dtype], device=device)
    adapter = adapt(model)
    splits = task.splits(0)
    clean = sample_prompts(splits, 32, 10, seed=0)
    shuffled = counterfactuals(sample_prompts(splits, max(args.prompts, args.naive_prompts), 10, seed=1))
    lengths = [len(b) for b in [tokenizer(fmt.text(p))["input_ids"] for p in shuffled]]
    mean_acts = mean_head_activations(adapter, batches(tokenizer, clean, fmt, 16, device))

    def run(engine: str, prompts, batch_size: int):
        return causal_indirect_effect(adapter, list(batches(tokenizer, prompts, fmt, batch_size, device)), mean_acts, engine,
                                      max_rows=args.max_rows)

    # Warm-up with the timed shapes: the first call of a shape pays for kernel selection and allocator growth.
    for engine, n, bs in (("exact", args.prompts, args.batch_size), ("attribution", args.prompts, args.batch_size),
                          ("exact", 1, 1), ("naive", 1, 1)):
        run(engine, shuffled[:n], bs)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            _, seconds = timed(device, lambda: run("exact", shuffled[:args.prompts], args.batch_size))
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(f"exact, {args.prompts} prompts: {seconds:.3f} s")
        print(prof.key_averages().table(sort_by=key, row_limit=25))
        return
    rows, cie = {}, {}
    for name, engine, n, bs in (("exact", "exact", args.prompts, args.batch_size),
                                ("exact_single", "exact", args.naive_prompts, 1),
                                ("attribution", "attribution", args.prompts, args.batch_size),
                                ("naive", "naive", args.naive_prompts, 1)):
        cie[name], seconds = timed(device, lambda: run(engine, shuffled[:n], bs))
        rows[name] = {"prompts": n, "batch_size": min(bs, n), "seconds_per_prompt": seconds / n}
    k = min(10, adapter.n_layers * adapter.n_heads)
    n_naive = args.naive_prompts
    ref = cie["naive"]
    for engine in ("exact", "exact_single", "attribution"):
        rows[engine]["ratio_vs_naive"] = rows["naive"]["seconds_per_prompt"] / rows[engine]["seconds_per_prompt"]
        same = cie[engine][:n_naive]
        rows[engine]["max_abs_diff_vs_naive"] = float((same - ref).abs().max())
        rows[engine]["top10_identical"] = top_heads(same, k) == top_heads(ref, k)
        rows[engine]["top10_overlap"] = len(set(top_heads(same, k)) & set(top_heads(ref, k)))
    result = {"shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": args.dtype, "layers": adapter.n_layers, "heads": adapter.n_heads,
              "mean_prompt_tokens": float(np.mean(lengths)), "engines": rows, "max_abs_cie_naive": float(ref.abs().max())}
    if args.dtype == "float32":
        exact, naive = cie["exact"][:n_naive], ref
    elif args.check_dtype:
        model.to(DTYPES[args.check_dtype])
        # the batch the timing ran (left-padded rows and all), so a bug only in padded rows cannot pass the check
        exact = run("exact", shuffled[:args.prompts], args.batch_size)[:n_naive]
        naive = run("naive", shuffled[:n_naive], 1)
    if args.dtype == "float32" or args.check_dtype:
        result["check"] = {"dtype": args.check_dtype or args.dtype, "max_abs_diff": float((exact - naive).abs().max()),
                           "max_abs_cie": float(naive.abs().max()), "top10_identical": top_heads(exact, k) == top_heads(naive, k)}
        result["check"]["agree"] = result["check"]["max_abs_diff"] <= args.tolerance * result["check"]["max_abs_cie"]
    print(f"{args.shape} on {result['device']} ({args.dtype}), {adapter.n_layers} layers x {adapter.n_heads} heads, "
          f"prompts of {result['mean_prompt_tokens']:.0f} tokens")
    if args.json:  # kept also when the check fails, to look at
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if "check" in result:
        check = result["check"]
        print(f"check in {check['dtype']}: max|exact-naive| = {check['max_abs_diff']:.2e} (max|CIE| {check['max_abs_cie']:.2e}), "
              f"top-10 identical: {check['top10_identical']}")
        if not check["agree"]:
            print(f"the engines disagree by more than {args.tolerance:g} of the largest CIE: no ratio reported")
            raise SystemExit(1)
    else:
        print("exact vs naive not checked in float32 (--check-dtype ''): the ratios below are unchecked")
    print(f"{'engine':<13} {'batch':>5} {'s/prompt':>10} {'ratio':>8} {'max|diff|':>10} {'top10 same':>10}")
    for engine, row in rows.items():
        print(f"{engine:<13} {row['batch_size']:>5} {row['seconds_per_prompt']:>10.4f} {row.get('ratio_vs_naive', 1.0):>7.1f}x "
              f"{row.get('max_abs_diff_vs_naive', 0.0):>10.2e} {str(row.get('top10_identical', '-')):>10}")


if __name__ == "__main__":
    main()
