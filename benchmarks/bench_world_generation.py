"""Time building a biography world and generating all its pretraining entries (shuffled corpus).

The budget is 60 s on one core for 200,000 people x 5 entries; this prints the
measured seconds, entries/s and the fraction of that budget used.

    python benchmarks/bench_world_generation.py [--people N]
"""

from __future__ import annotations

import argparse
import time

from forgetlab.worlds.biography import BiographyWorldConfig, generate_world

BUDGET_S = 60.0
BUDGET_PEOPLE = 200_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=BUDGET_PEOPLE, help="pretraining people to generate")
    args = parser.parse_args()

    config = BiographyWorldConfig(n_pretrain_people=args.people)
    t0 = time.perf_counter()
    world = generate_world(config)
    t1 = time.perf_counter()
    entries = world.pretraining_corpus()  # every entry, in the shuffled order the model reads
    t2 = time.perf_counter()

    total = t2 - t0
    # Scale the budget linearly when timing a different population size.
    budget = BUDGET_S * args.people / BUDGET_PEOPLE
    print(f"people={args.people} entries={len(entries)} (entries_per_person={config.entries_per_person})")
    print(f"world (people+pools): {t1 - t0:.2f} s; entries: {t2 - t1:.2f} s; total: {total:.2f} s")
    print(f"entries/s: {len(entries) / total:,.0f}")
    print(f"budget: {budget:.1f} s -> ratio {total / budget:.3f} (<= 1.0 passes)")


if __name__ == "__main__":
    main()
