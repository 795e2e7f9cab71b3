#!/usr/bin/env bash
# GPU measurements of issues 6 and 7, as one device call of at most 10 minutes (one H100 or H200):
#   cit  the ICL-world `gpu` model, the FVG step's cost on it (bench_fvg_step.py), then the methods on coded
#        sequence 1 (no task known at the start) in five lanes side by side: IncLoRA and `cit analyze` of it (FV
#        drift, interventions), FVG, and every baseline: issue 7's gpu table (docs/cit-results.md; measured on
#        2026-11-27 in 371 s on one H200, docs/results/cit-gpu-coded1/). The default job.
#   bio  the `gpu` biography run with task-1 snapshots, then `biography analyze` on it (update angles, also window by
#        window, feature shift, and the loss landscape, timed); measured on 2026-11-27 (docs/diagnostics-results.md).
# Jobs named together share the GPU. Neither starts a step past the deadline, and a step running then is stopped, so
# the call ends in time with whatever finished. OUT gets results.tgz (no checkpoints), bio.log, cit.log and a
# cit-<lane>.log per lane. A landscape
# the deadline stops still returns the grid rows it finished (bio/analysis/landscape/landscape.partial.json).
#
# Once, here (the device image lacks these pure-Python packages and cannot fetch; .whl/ travels with `carry`):
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps -d .whl nltk==3.9.1 && pip wheel --no-deps -w .whl rouge-score==0.1.2
# The device call: command "bash benchmarks/gpu_open_items.sh", carry [".whl"], timeout_s 600.
# CIT overrides the cit runs' size options (default "--max-train 100 --epochs 20"), SEQ the sequence (default coded:1).
# JOBS picks the jobs, which run side by side (default "cit"). Opt-in, each a call of its own if device time
# remains (both hold a 7B model): JOBS=mem, the memory benchmark's GPU rows; JOBS=cie, the CIE table's missing figures.
# The same steps at toy sizes on a CPU (a check of the script, not of any figure):
#   SMOKE=1 bash benchmarks/gpu_open_items.sh /tmp/gpu-dry
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/gpu-open-items}}
WORK=${WORK:-/tmp/forgetlab-gpu}
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK" && rm -f "$OUT"/*.log "$OUT/results.tgz"  # no stale logs in the summary
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

if [ "${SMOKE:-0}" = 1 ]; then
  BIO=smoke; SNAP=5,10,20,30; P0=10; P1=20; GRID=3x3; ROWS=40; ICL=smoke; CIT="--max-train 24 --max-test 4 --epochs 1"; MEM="--steps 1"
  CIE="--device cpu --prompts 4 --naive-prompts 1"; CIE_SHAPES=cpu-12l; FVG_STEP="--steps 2"; DEADLINE=${DEADLINE:-3000}
else
  BIO=gpu; SNAP=50,100,150,300; P0=100; P1=150; GRID=21x31; ROWS=2000; ICL=gpu; CIT=${CIT:-"--max-train 100 --epochs 20"}; MEM="--shape llama-2-7b --seq 640 --batch 4"
  CIE="--device cuda --dtype bfloat16 --prompts 25 --naive-prompts 1"; CIE_SHAPES="llama-2-7b llama-3-8b"; FVG_STEP="--steps 40"; DEADLINE=${DEADLINE:-540}
fi
# lanes run side by side on the device's 16 cores: a few threads each instead of 16 apiece
[ "${SMOKE:-0}" = 1 ] || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}
START=$(date +%s)
left() { echo $(( DEADLINE - $(date +%s) + START )); }
# one command: skipped past the deadline, stopped at it; prints how long it took
timed() {
  local name=$1 t=$(date +%s); shift
  if [ "$(left)" -le 20 ]; then echo "[$name] skipped: deadline"; return 1; fi
  timeout "$(left)" "$@"; local rc=$?
  echo "[$name] rc=$rc in $(( $(date +%s) - t )) s"; return $rc
}
step() { local name=$1; shift; timed "$name" python3 -m forgetlab "$@"; }
# one benchmark script: its output also kept in WORK/NAME.txt
# (several JOBS run side by side: the timing is then taken with the GPU shared, and its output says so)
bench() {
  local name=$1; shift
  [ "$(echo ${JOBS:-cit} | wc -w)" -gt 1 ] && echo "NOTE: timed with the GPU shared by the jobs ${JOBS}; not a figure to report" > "$WORK/$name.txt"
  timed "$name" python3 "$@" >> "$WORK/$name.txt" 2>&1; local rc=$?; cat "$WORK/$name.txt"; return $rc
}

bio() {
  step bio-run biography run --preset $BIO --snapshot-steps $SNAP --out "$WORK/bio" --no-progress || return
  # every diagnostic of the run: angles (whole, then window by window), feature shift, and last the landscape on the
  # plane of docs/diagnostics-results.md (through task-1 step P0, d1 = step P1 - step P0, d2 = end - step P1), which
  # the deadline may stop: its finished rows stay in analysis/landscape/landscape.partial.json
  step bio-analyze biography analyze "$WORK/bio" --plane $P0,$P1 --grid $GRID --max-examples $ROWS --no-progress
}

cit() {
  local W=$WORK/icl R=$WORK/cit
  step icl-build icl-world build --preset $ICL --out "$W" --no-progress || return
  # coded:N: sequence N's abilities asked by coded instructions, which no build already does; SEQ=new takes the
  # sequences' reworded tasks this build does not already do, SEQ=N the world's sequence N
  local seq=${SEQ:-coded:1}
  run() { local name=$1; shift; step "cit-$name" cit run --world "$W" --sequence "$seq" $CIT --out "$R/$name" --overwrite --no-progress "$@"; }
  # the FVG step's cost against a plain IncLoRA step on this model, alone on the GPU (README's row has only the cpu figure)
  bench bench_fvg_step benchmarks/bench_fvg_step.py --world "$W" $FVG_STEP
  # then five lanes side by side, at most two runs in each (small models leave the GPU and the 16 cores mostly idle one
  # run at a time), each with its own log; IncLoRA and its analysis first in theirs
  { run inclora --method inclora --lr 2e-3 && step cit-analyze cit analyze "$R/inclora"; } > "$OUT/cit-inclora.log" 2>&1 &
  { run inclora_fvg_kl1 --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=1 --set save_checkpoints=false
    run inclora_fvg --method inclora --lr 2e-3 --fvg --set save_checkpoints=false; } > "$OUT/cit-fvg.log" 2>&1 &
  { run seq --method seq --lr 5e-4 --set save_checkpoints=false
    run lwf --method lwf --lr 2e-3 --set save_checkpoints=false; } > "$OUT/cit-baselines1.log" 2>&1 &
  { run olora --method olora --lr 2e-3 --set save_checkpoints=false
    run replay --method replay --lr 5e-4 --set save_checkpoints=false; } > "$OUT/cit-baselines2.log" 2>&1 &
  { run ewc1e8 --method ewc --lr 5e-4 --set ewc_strength=1e8 --set save_checkpoints=false
    run multitask --method multitask --lr 5e-4 --set save_checkpoints=false; } > "$OUT/cit-baselines3.log" 2>&1 &
  wait
  # every finished run against IncLoRA: the share of its GP/IP drops kept, the FP change, the FVG target
  local finished=$(ls -d "$R"/*/results.json 2>/dev/null | xargs -r -n1 dirname | grep -v '/inclora$')
  [ -f "$R/inclora/results.json" ] && [ -n "$finished" ] && python3 -m forgetlab cit compare "$R/inclora" $finished --out "$R/compare"
}

# opt-in (JOBS=mem): bench_cit_memory's GPU rows at a 7B shape, for a second call if device time remains
mem() {
  bench bench_cit_memory benchmarks/bench_cit_memory.py $MEM
}

# opt-in (JOBS=cie): the CIE engines at 7B shapes again, now with the exact engine one prompt at a time beside the
# batched one and the float32 agreement check of both shapes (README's GPU table lacks these)
cie() {
  for shape in $CIE_SHAPES; do
    bench "cie_$shape" benchmarks/bench_cie_engines.py $CIE --shape "$shape" --json "$WORK/cie_$shape.json"
  done
}

(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU") > "$WORK/device.txt"
for job in ${JOBS:-cit}; do $job > "$OUT/$job.log" 2>&1 & done
wait
tar czf "$OUT/results.tgz" -C "$WORK" --exclude=checkpoints --exclude=state --exclude=cache --exclude='*.safetensors' \
  --exclude='*.pt' --exclude=pretrain.txt --exclude='qa_*.jsonl' .
grep -h "^NOTE\|^\[\|AP=\|chance − angle\|landscape:\|along the trajectory\|peak\|GB\|^exact\|^naive\|^attribution\|^check in\|disagree\|ratio\|^| " "$OUT"/*.log
echo "total $(( $(date +%s) - START )) s; results in $OUT/results.tgz ($(du -h "$OUT/results.tgz" | cut -f1))"
