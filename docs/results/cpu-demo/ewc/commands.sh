#!/bin/bash
# EWC on the cpu-demo seed-0 build with the per-example Fisher: strengths 1e4, 1e5, 1e6
R=${1:-runs/ewc}; mkdir -p $R  # $2: a cache dir holding the seed-0 cpu-demo pretraining and task 0
for S in 1e4 1e5 1e6; do
  t=$(date +%s); forgetlab biography run --preset cpu-demo --seed 0 --method ewc --ewc-strength $S --cache-dir ${2:-~/.cache/forgetlab} --out $R/bio-$S --overwrite --no-progress > $R/bio-$S.log 2>&1; echo "bio ewc $S $(( $(date +%s) - t )) s"
  python -c "import json;r=json.load(open('$R/bio-$S/results.json'));print({k:round(r[k],3) for k in ('task0_before','task0_min_during_task1','task0_after_task1','task1_after','task0_recovered','spurious_share')}, r['task1_steps'])"
done
echo done
