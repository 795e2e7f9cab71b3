#!/bin/bash
# cit measurements on the ICL-world gpu model rebuilt with the current code (answers end where scoring cuts), coded
# sequence 1 (one H200, 2026-11-27; benchmarks/gpu_open_items.sh with SEQ=coded:1 CIT="--max-train 100 --epochs 20";
# the device time ended after these two runs, the FVG one rerun on the same machine after the first call's deadline)
R=${1:-runs/cit-gpu-coded1}; W=$R/icl; mkdir -p $R
forgetlab icl-world build --preset gpu --out $W --no-progress                                   # icl_eval.json = $W/eval.json
run() { name=$1; shift; forgetlab cit run --world $W --sequence coded:1 --max-train 100 --epochs 20 --out $R/$name --overwrite --no-progress "$@"; }
run inclora --method inclora --lr 2e-3                                                          # inclora.json, inclora_scores.png
run inclora_fvg_kl1 --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=1 --set save_checkpoints=false   # inclora_fvg_kl1.json
