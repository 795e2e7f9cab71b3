#!/bin/bash
# cit measurements on the ICL-world gpu model rebuilt with the current code (answers end where scoring cuts), coded
# sequence 1, every method and `cit analyze` on one build (one H200, 2026-11-27, one device call of 371 s:
# `bash benchmarks/gpu_open_items.sh` with its defaults, SEQ=coded:1 CIT="--max-train 100 --epochs 20"; the runs in
# five lanes side by side, so their times are taken with the GPU shared). The files of an earlier build's two runs
# (IncLoRA, IncLoRA + FVG at alpha_KL = 1) are in first_build/.
R=${1:-runs/cit-gpu-coded1}; W=$R/icl; mkdir -p $R
forgetlab icl-world build --preset gpu --out $W --no-progress                                   # icl_eval.json = $W/eval.json
python benchmarks/bench_fvg_step.py --world $W --steps 40                                       # bench_fvg_step.txt
run() { name=$1; shift; forgetlab cit run --world $W --sequence coded:1 --max-train 100 --epochs 20 --out $R/$name --overwrite --no-progress "$@"; }
run inclora --method inclora --lr 2e-3                                                          # inclora.json, inclora_scores.png
forgetlab cit analyze $R/inclora                                                                # drift.*, interventions.json
run inclora_fvg_kl1 --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=1 --set save_checkpoints=false   # inclora_fvg_kl1.json
run inclora_fvg --method inclora --lr 2e-3 --fvg --set save_checkpoints=false                   # inclora_fvg.json (alpha_KL = 20)
run seq --method seq --lr 5e-4 --set save_checkpoints=false
run lwf --method lwf --lr 2e-3 --set save_checkpoints=false
run olora --method olora --lr 2e-3 --set save_checkpoints=false
run replay --method replay --lr 5e-4 --set save_checkpoints=false
run ewc1e8 --method ewc --lr 5e-4 --set ewc_strength=1e8 --set save_checkpoints=false
run multitask --method multitask --lr 5e-4 --set save_checkpoints=false
forgetlab cit compare $R/inclora $R/inclora_fvg_kl1 $R/inclora_fvg $R/seq $R/lwf $R/olora $R/replay $R/ewc1e8 $R/multitask --out $R/compare   # compare.md, compare.json
