#!/bin/bash
# The gpu biography run and its diagnostics (one H200, 2026-11-27): benchmarks/gpu_open_items.sh's bio job, then the
# analyze step once more on the same machine, as the first call's deadline stopped its landscape
# (the QA files it wrote again then had a new mtime, so the grid started afresh; fixed since: data files are
# fingerprinted by content).
R=${1:-runs/bio-gpu}
forgetlab biography run --preset gpu --snapshot-steps 50,100,150,300 --out $R --no-progress   # results.json, config.json, curves.csv (402 s, GPU shared with the ICL build)
forgetlab biography analyze $R --plane 100,150 --grid 21x31 --max-examples 2000 --no-progress  # analysis.json, angles.*, angles_over_training.*, features.*, landscape.json
