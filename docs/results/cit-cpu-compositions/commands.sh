#!/bin/bash
# composition sequence on the ICL-world cpu model, seven methods with checkpoints, pooled drift analysis
W=$1; R=${2:-runs/cit-cpu-compositions}; mkdir -p $R
SEQ=sub_4,translate_green_of_partner_red,pick_alpha_last,capitalize_first,first_letter_of_partner_blue
run() { name=$1; shift; forgetlab cit run --world $W --sequence $SEQ --max-train 100 --epochs 5 --out $R/$name --overwrite --no-progress "$@" 2>&1 | grep -a "AP=\|rror" | sed "s/^/$name /"; }
run inclora --method inclora --lr 2e-3
run inclora_fvg --method inclora --lr 2e-3 --fvg
run seq --method seq --lr 5e-4
run lwf --method lwf --lr 2e-3
run olora --method olora --lr 2e-3
run replay --method replay --lr 5e-4
run ewc --method ewc --lr 5e-4
t=$(date +%s); forgetlab cit analyze $R/inclora $R/inclora_fvg $R/seq $R/lwf $R/olora $R/replay $R/ewc --out $R/pooled 2>&1 | grep -v "^\[cit analyze\] \|Loading"; echo "analyze took $(( $(date +%s) - t )) s"
t=$(date +%s); forgetlab cit analyze $R/inclora 2>&1 | grep -v "^\[cit analyze\] \|Loading" | tail -4; echo "single analyze took $(( $(date +%s) - t )) s"
# FVG weights on this sequence, seeds 0 and 1 (inclora_fvg_{kl1,kl0,fv01kl1}.json, seed1_*.json)
for seed in 0 1; do p=""; [ $seed = 1 ] && p=seed1_
  [ $seed = 1 ] && run ${p}inclora --method inclora --lr 2e-3 --seed 1 --set save_checkpoints=false
  run ${p}inclora_fvg_kl1 --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=1 --seed $seed --set save_checkpoints=false
  run ${p}inclora_fvg_kl0 --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=0 --seed $seed --set save_checkpoints=false
  run ${p}inclora_fvg_fv01kl1 --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=1 --set fvg_config.alpha_fv=0.1 --seed $seed --set save_checkpoints=false
done
