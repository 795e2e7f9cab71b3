#!/bin/bash
# cit measurements on the ICL-world gpu model, composition sequence (one H200; docs/cit-results.md, first table).
# Measured before two loss fixes (FVG's KL direction and T² factor, EWC's per-example Fisher) and while every
# training answer ended with eos, so this code no longer reproduces the FVG and EWC rows; kept as the record.
# $1 = output folder; the file names in this folder are the runs' results.json.
R=${1:-runs/cit-gpu}; W=$R/icl; mkdir -p $R
forgetlab icl-world build --preset gpu --out $W --no-progress
SEQ=sub_4,translate_green_of_partner_red,pick_alpha_last,capitalize_first,first_letter_of_partner_blue
run() { name=$1; shift; forgetlab cit run --world $W --sequence $SEQ --max-train 100 --epochs 5 --out $R/$name --overwrite --no-progress "$@" 2>&1 | grep -a "AP=\|rror"; }
run inclora_plain --method inclora --lr 2e-3       # inclora_plain.json
run inclora_fvg --method inclora --lr 2e-3 --fvg   # inclora_fvg.json
run lwf --method lwf --lr 2e-3                     # lwf.json
run olora --method olora --lr 2e-3                 # olora.json
run seq --method seq --lr 5e-4                     # seq.json
run ewc --method ewc --lr 5e-4                     # ewc.json
run replay --method replay --lr 5e-4               # replay.json
forgetlab cit analyze $R/inclora_plain             # drift.*, interventions.json
