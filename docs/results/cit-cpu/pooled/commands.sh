#!/bin/bash
# checkpoints of several methods and sequences on the ICL-world cpu model, pooled into one FV-drift analysis
W=$1; R=${2:-runs/pool-cpu}; mkdir -p $R
run() { name=$1; seq=$2; shift 2; forgetlab cit run --world $W --sequence $seq --max-train 100 --epochs 10 --out $R/$name --overwrite --no-progress "$@" 2>&1 | grep -a "AP=\|rror"; }
run s0-inclora 0 --method inclora --lr 2e-3
run s0-inclora-fvg 0 --method inclora --lr 2e-3 --fvg
run s0-inclora-fvg-kl1 0 --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=1
run s0-seq 0 --method seq --lr 5e-4
run s0-lwf 0 --method lwf --lr 2e-3
run s0-olora 0 --method olora --lr 2e-3
run s0-replay 0 --method replay --lr 5e-4
run s1-inclora 1 --method inclora --lr 2e-3
run s2-inclora 2 --method inclora --lr 2e-3
t=$(date +%s); forgetlab cit analyze $R/s0-inclora $R/s0-inclora-fvg $R/s0-inclora-fvg-kl1 $R/s0-seq $R/s0-lwf $R/s0-olora $R/s0-replay $R/s1-inclora $R/s2-inclora --out $R/pooled 2>&1 | grep -v "^\[cit analyze\] \|Loading"; echo "analyze took $(( $(date +%s) - t )) s"
