"""Forgetting diagnostics at the paper's model size: update angles and landscape throughput.

Why: the spurious-forgetting analyses run on 160M-parameter checkpoints (Pythia-160m shape). Goals from
the issue: all weight-update angles between two phase pairs in <= 60 s; a 41 x 61 landscape over two
tasks of 2,000 QA examples each in <= 10 minutes (GPU). This script builds four random models of that
shape (the work does not depend on the values), times ``update_angles`` (matrices/s) and a small
landscape grid (grid points/s, QA rows/s), and prints the projected time of the paper's grid.

    python benchmarks/bench_analysis.py [--device cuda] [--rows 64] [--grid 2x2] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPTNeoXConfig

from forgetlab.analysis.angles import update_angles
from forgetlab.analysis.landscape import dataset_loss, directions, loss_grid, parameters_of
from forgetlab.analysis.weights import weight_matrices
from forgetlab.models.zoo import random_model
from forgetlab.train.data import qa_dataset


def pythia_160m() -> GPTNeoXConfig:
    return GPTNeoXConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=64, help="QA rows per task for the timed landscape points")
    parser.add_argument("--grid", default="2x2", help="timed grid (the paper's is 41x61)")
    parser.add_argument("--batch-size", type=int, default=256, help="QA rows per forward pass")
    args = parser.parse_args()
    config = pythia_160m()
    models = [random_model(config, seed=s, device=args.device) for s in range(4)]
    n_params = sum(p.numel() for p in models[0].parameters())
    mats = [weight_matrices(m) for m in models]
    # untimed first calls (solver and kernel setup on a GPU): one matrix's angles, one grid point below
    first = next(iter(mats[0]))
    update_angles(*({first: m[first]} for m in mats), device=args.device)
    sync(args.device)
    start = time.perf_counter()
    rows = update_angles(*mats, device=args.device)
    sync(args.device)
    angle_seconds = time.perf_counter() - start
    print(f"Pythia-160m shape ({n_params / 1e6:.0f}M parameters) on {args.device}")
    print(f"update angles: {len(rows)} matrices in {angle_seconds:.1f} s ({len(rows) / angle_seconds:.2f} matrices/s); "
          f"goal <= 60 s: {angle_seconds / 60:.2f} of the budget")

    g = torch.Generator().manual_seed(0)
    data = {}
    for task in ("task0", "task1"):
        prompts = [torch.randint(5, 50000, (20,), generator=g).tolist() for _ in range(args.rows)]
        answers = [torch.randint(5, 50000, (3,), generator=g).tolist() for _ in range(args.rows)]
        data[task] = qa_dataset(prompts, answers, eos_id=0, pad_id=1)
    p0, p1, p2 = (parameters_of(m) for m in models[:3])
    d1, d2 = directions(p0, p1, p2)
    n_a, n_b = (int(v) for v in args.grid.split("x"))
    losses = {t: (lambda m, d=d: dataset_loss(m, d, args.batch_size)) for t, d in data.items()}
    loss_grid(models[0], p0, d1, d2, [0.0], [0.0], losses)  # untimed first point
    sync(args.device)
    start = time.perf_counter()
    loss_grid(models[0], p0, d1, d2, [0.1 * i for i in range(n_a)], [0.1 * j for j in range(n_b)], losses)
    sync(args.device)
    grid_seconds = time.perf_counter() - start
    points = n_a * n_b
    per_row = grid_seconds / (points * 2 * args.rows)  # includes setting the weights, so the projection is an upper bound
    paper = 41 * 61 * 2 * 2000 * per_row
    print(f"landscape: {points} grid points x 2 tasks x {args.rows} rows in {grid_seconds:.1f} s "
          f"({points / grid_seconds:.3f} points/s, {points * 2 * args.rows / grid_seconds:.0f} QA rows/s)")
    print(f"projected 41 x 61 grid x 2 tasks x 2,000 rows: {paper / 60:.1f} min (goal <= 10 min on a GPU)")


if __name__ == "__main__":
    main()
