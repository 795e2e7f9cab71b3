#!/bin/bash
# cit measurements on the ICL-world gpu model, reworded-task sequence 0 (one H200; the device script ran these
# in this order until its time ran out): $1 = output folder
R=${1:-runs/cit-gpu}; W=$R/icl; mkdir -p $R
forgetlab icl-world build --preset gpu --out $W --no-progress          # icl_eval.json = $W/eval.json
run() { name=$1; shift; forgetlab cit run --world $W --sequence 0 --max-train 100 --epochs 10 --out $R/$name --overwrite --no-progress "$@" 2>&1 | grep -a "AP=\|rror"; }
run inclora --method inclora --lr 2e-3                                   # inclora.json
run inclora_fvg --method inclora --lr 2e-3 --fvg                         # inclora_fvg.json
forgetlab cit analyze $R/inclora                                         # drift.*, interventions.json
run inclora_fvg_initial --method inclora --lr 2e-3 --fvg --set fvg_config.fv_source=initial     # inclora_fvg_initial_fv_kl20.json
run inclora_fvg_universal --method inclora --lr 2e-3 --fvg --set fvg_config.fv_source=initial --set fvg_config.heads=universal  # inclora_fvg_universal_kl20.json
run inclora_fvg_kl1 --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=1                # inclora_fvg_kl1.json
