#!/bin/bash
# cit measurements on the ICL-world cpu model, reworded-task sequence 0: $1 = world build dir (cpu preset), $2 = output folder
W=$1; R=${2:-runs/cit-cpu}; mkdir -p $R
run() { name=$1; shift; t=$(date +%s); forgetlab cit run --world $W --sequence 0 --max-train 100 --epochs 10 --out $R/$name --overwrite --no-progress "$@" 2>&1 | grep -a "AP=\|rror" ; echo "$name took $(( $(date +%s) - t )) s"; }
run inclora --method inclora --lr 2e-3
run inclora_fvg --method inclora --lr 2e-3 --fvg --set save_checkpoints=false
run inclora_fvg_kl1 --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=1 --set save_checkpoints=false
run inclora_fvg_kl0 --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=0 --set save_checkpoints=false
run seq --method seq --lr 5e-4 --set save_checkpoints=false
run lwf --method lwf --lr 2e-3 --set save_checkpoints=false
run olora --method olora --lr 2e-3 --set save_checkpoints=false
run replay --method replay --lr 5e-4 --set save_checkpoints=false
run ewc --method ewc --lr 5e-4 --set save_checkpoints=false
run multitask --method multitask --lr 5e-4 --set save_checkpoints=false
t=$(date +%s); forgetlab cit analyze $R/inclora 2>&1 | grep -v "^\[cit analyze\] task\|Loading" | tail -4; echo "analyze took $(( $(date +%s) - t )) s"
# FVG weights swept (docs/results/cit-cpu/fvg_sweep.json)
for kl in 0 0.1 1 20; do for fv in 0.03 0.1 0.3 3; do
  run fv${fv}-kl${kl} --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_fv=$fv --set fvg_config.alpha_kl=$kl --set save_checkpoints=false
done; done
# every task's FV from the initial model, as the paper's code does (docs/results/cit-cpu/inclora_fvg_initial_fv_kl*.json)
for kl in 20 1 0; do
  run inclora_fvg_initial_fv_kl$kl --method inclora --lr 2e-3 --fvg --set fvg_config.fv_source=initial --set fvg_config.alpha_kl=$kl --set save_checkpoints=false
done
# one universal head set (top-10 by CIE averaged over the sequence's tasks on the initial model), as the paper's code
for kl in 20 0; do
  run inclora_fvg_universal_kl$kl --method inclora --lr 2e-3 --fvg --set fvg_config.fv_source=initial --set fvg_config.heads=universal --set fvg_config.alpha_kl=$kl --set save_checkpoints=false
done
# reworded sequences 1 and 2: IncLoRA (from pooled/commands.sh) and IncLoRA + FVG at alpha_kl=1 (seq{1,2}_*.json)
for s in 1 2; do forgetlab cit run --world $W --sequence $s --max-train 100 --epochs 10 --method inclora --lr 2e-3 --fvg \
  --set fvg_config.alpha_kl=1 --set save_checkpoints=false --out $R/s$s-inclora-fvg-kl1 --overwrite --no-progress 2>&1 | grep -a "AP=\|rror"; done
# reworded sequence 1 trained longer (40 epochs), IncLoRA and FVG weights, seeds 0, 1 and 2 (seq1_e40_*.json)
for seed in 0 1 2; do p=""; [ $seed != 0 ] && p=seed${seed}_
  for v in "inclora" "inclora_kl0.1 --fvg --set fvg_config.alpha_kl=0.1" "inclora_kl0 --fvg --set fvg_config.alpha_kl=0" \
           "inclora_kl1 --fvg --set fvg_config.alpha_kl=1" "inclora_fv01kl1 --fvg --set fvg_config.alpha_kl=1 --set fvg_config.alpha_fv=0.1"; do
    set -- $v; n=$1; shift; [ $seed != 0 ] && [ $n = inclora_kl1 -o $n = inclora_fv01kl1 ] && continue; [ $seed = 2 ] && [ $n = inclora_kl0 ] && continue
    forgetlab cit run --world $W --sequence 1 --max-train 100 --epochs 40 --method inclora --lr 2e-3 --seed $seed "$@" \
      --set save_checkpoints=false --out $R/seq1_e40_$p$n --overwrite --no-progress 2>&1 | grep -a "AP=\|rror"
  done
done
# its FV drift and interventions (seq1_e40_analysis/): the same IncLoRA run with checkpoints, then cit analyze
forgetlab cit run --world $W --sequence 1 --max-train 100 --epochs 40 --method inclora --lr 2e-3 --out $R/seq1_e40_ckpt --overwrite --no-progress
forgetlab cit analyze $R/seq1_e40_ckpt
# EWC strength sweep (ewc_sweep/ewc_<strength>.json; train_loss shows the penalty against the LM loss)
for s in 1e3 1e4 1e5 1e6 1e7 1e8 1e9 1e10; do run ewc_sweep/ewc_$s --method ewc --lr 5e-4 --set save_checkpoints=false --set ewc_strength=$s; done
# an 8-layer cpu world model (icl_cpu_8layer_eval.json, 38 min to build) and its 40-epoch sequence-1 IncLoRA run with drift (seq1_e40_8layer/)
forgetlab icl-world build --preset cpu --set model.n_layers=8 --out runs/icl-cpu8 --no-progress
forgetlab cit run --world runs/icl-cpu8 --sequence 1 --max-train 100 --epochs 40 --method inclora --lr 2e-3 --out runs/cit-cpu8/seq1_e40_ckpt --overwrite --no-progress
forgetlab cit analyze runs/cit-cpu8/seq1_e40_ckpt
# on the 8-layer model: FVG at alpha_KL 0.1 and 1, IncLoRA and FVG alpha_KL=0.1 on seed 1 (seq1_e40_8layer/*.json), drift pooled over four runs (pooled/)
run8() { name=$1; shift; forgetlab cit run --world runs/icl-cpu8 --sequence 1 --max-train 100 --epochs 40 --method inclora --lr 2e-3 --out runs/cit-cpu8/$name --overwrite --no-progress "$@" 2>&1 | grep -a "AP=\|rror"; }
run8 seq1_e40_kl0.1 --fvg --set fvg_config.alpha_kl=0.1
run8 seq1_e40_kl1 --fvg --set fvg_config.alpha_kl=1
run8 seq1_e40_seed1 --seed 1
run8 seq1_e40_seed1_kl0.1 --seed 1 --fvg --set fvg_config.alpha_kl=0.1 --set save_checkpoints=false
forgetlab cit analyze runs/cit-cpu8/seq1_e40_ckpt runs/cit-cpu8/seq1_e40_kl0.1 runs/cit-cpu8/seq1_e40_kl1 runs/cit-cpu8/seq1_e40_seed1 --out runs/cit-cpu8/pooled
# FV drift and interventions of the seed-1 IncLoRA run (seq1_e40_seed1_analysis/)
forgetlab cit run --world $W --sequence 1 --max-train 100 --epochs 40 --method inclora --lr 2e-3 --seed 1 --out $R/seq1_e40_seed1_ckpt --overwrite --no-progress
forgetlab cit analyze $R/seq1_e40_seed1_ckpt
# every baseline on the 40-epoch sequence 1, alone and with FVG at alpha_KL=0.1 (seq1_e40_baselines/), $W = the 4-layer cpu world
b() { name=$1; shift; forgetlab cit run --world $W --sequence 1 --max-train 100 --epochs 40 --seed 0 --set save_checkpoints=false \
  --out $R/seq1_e40_baselines/$name --overwrite --no-progress "$@" 2>&1 | grep -a "AP=\|rror"; }
for m in "seq --lr 5e-4" "lwf --lr 2e-3" "olora --lr 2e-3" "replay --lr 5e-4" "ewc --lr 5e-4 --set ewc_strength=1e8"; do
  set -- $m; n=$1; [ $n = ewc ] && n=ewc1e8
  b $n --method $m; b ${n}_fvg --method $m --fvg --set fvg_config.alpha_kl=0.1
done
b multitask --method multitask --lr 5e-4
b seq_fvg_fv0.1 --method seq --lr 5e-4 --fvg --set fvg_config.alpha_kl=0.1 --set fvg_config.alpha_fv=0.1
b seq_fvg_kl0 --method seq --lr 5e-4 --fvg --set fvg_config.alpha_kl=0
b seq_fvg_kl0.01 --method seq --lr 5e-4 --fvg --set fvg_config.alpha_kl=0.01
b ewc1e8_fvg_kl0.01 --method ewc --lr 5e-4 --set ewc_strength=1e8 --fvg --set fvg_config.alpha_kl=0.01
# replay on IncLoRA (alone and with FVG), LoRA with one adapter, EWC on that adapter at three strengths
b replay_inclora --method replay --set finetune=inclora --lr 2e-3
b replay_inclora_fvg --method replay --set finetune=inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=0.1
b lora --method lora --lr 2e-3
for s in 1e6 1e7 1e8; do b ewc_lora$s --method ewc --set finetune=lora --lr 2e-3 --set ewc_strength=$s; done
b ewc_lora1e7_fvg --method ewc --set finetune=lora --lr 2e-3 --set ewc_strength=1e7 --fvg --set fvg_config.alpha_kl=0.1
# SEQ at lr 1e-4, alone and with FVG
b seq_lr1e-4 --method seq --lr 1e-4
b seq_lr1e-4_fvg --method seq --lr 1e-4 --fvg --set fvg_config.alpha_kl=0.1
# SEQ alone and with FVG on seed 1
b seed1_seq --method seq --lr 5e-4 --seed 1
b seed1_seq_fvg --method seq --lr 5e-4 --seed 1 --fvg --set fvg_config.alpha_kl=0.1
# LwF, O-LoRA and replay on IncLoRA, alone and with FVG, on seed 1
for m in "lwf --lr 2e-3" "olora --lr 2e-3" "replay --set finetune=inclora --lr 2e-3"; do
  set -- $m; n=$1; [ $n = replay ] && n=replay_inclora
  b seed1_$n --method $m --seed 1; b seed1_${n}_fvg --method $m --seed 1 --fvg --set fvg_config.alpha_kl=0.1
done
# a fresh build of the cpu world (icl_cpu_eval_rebuild.json; same code and preset, torch 2.13.0, transformers 5.24.0) and,
# on it, why FVG keeps full fine-tuning from learning: LoRA on q,v against LoRA on every linear layer or with lm_head,
# full fine-tuning with FVG's terms one by one, seeds 0 and 1 (rebuild_seq1_e40/; train_loss[k].train_rows = score on
# the task's own training rows, fvg_target = the KL target's agreement with the labels)
forgetlab icl-world build --preset cpu --out runs/icl-cpu --no-progress
c() { name=$1; shift; forgetlab cit run --world runs/icl-cpu --sequence 1 --max-train 100 --epochs 40 --set save_checkpoints=false \
  --out runs/fvg-cap/$name --overwrite --no-progress "$@" 2>&1 | grep -a "AP=\|rror"; }
ALL="[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
for seed in 0 1; do p=""; [ $seed = 1 ] && p=seed1_
  c ${p}inclora --seed $seed --method inclora --lr 2e-3
  c ${p}inclora_fvg --seed $seed --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=0.1
  c ${p}seq --seed $seed --method seq --lr 5e-4
  c ${p}seq_fvg --seed $seed --method seq --lr 5e-4 --fvg --set fvg_config.alpha_kl=0.1
  c ${p}inclora_all --seed $seed --method inclora --lr 2e-3 --set lora_targets=$ALL
  c ${p}inclora_all_fvg --seed $seed --method inclora --lr 2e-3 --set lora_targets=$ALL --fvg --set fvg_config.alpha_kl=0.1
done
c inclora_head_fvg --seed 0 --method inclora --lr 2e-3 --set "lora_targets=[q_proj,v_proj,lm_head]" --fvg --set fvg_config.alpha_kl=0.1
c seq_fvg_kl0 --seed 0 --method seq --lr 5e-4 --fvg --set fvg_config.alpha_kl=0
c seq_fvg_kl0.01 --seed 0 --method seq --lr 5e-4 --fvg --set fvg_config.alpha_kl=0.01
# on the rebuild: FV drift and interventions of the seed-0 IncLoRA run (rebuild_seq1_e40/drift.*, interventions.json)
forgetlab cit run --world runs/icl-cpu --sequence 1 --max-train 100 --epochs 40 --method inclora --lr 2e-3 --out runs/fvg-cap/inclora_ckpt --overwrite --no-progress
forgetlab cit analyze runs/fvg-cap/inclora_ckpt
# on the rebuild: a sequence of the three reworded tasks it does not already do, IncLoRA and FVG (alpha_KL 0.1, 1), seeds 0 and 1, drift (rebuild_new3/)
S=reworded_partner_red,reworded_translate_gold,reworded_partner_blue
n3() { name=$1; shift; forgetlab cit run --world runs/icl-cpu --sequence $S --max-train 100 --epochs 40 --out runs/new3/$name --overwrite --no-progress "$@" 2>&1 | grep -a "AP=\|rror"; }
for seed in 0 1; do p=""; [ $seed = 1 ] && p=seed1_
  n3 ${p}inclora --seed $seed --method inclora --lr 2e-3
  n3 ${p}inclora_fvg --seed $seed --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=0.1 --set save_checkpoints=false
  n3 ${p}inclora_fvg_kl1 --seed $seed --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=1 --set save_checkpoints=false
done
forgetlab cit analyze runs/new3/inclora
forgetlab cit analyze runs/new3/seed1_inclora                                              # rebuild_new3/seed1/
forgetlab cit analyze runs/new3/inclora runs/new3/seed1_inclora --out runs/new3/pooled      # rebuild_new3/pooled/
for seed in 0 1; do p=""; [ $seed = 1 ] && p=seed1_; for kl in 0.03 0.3; do   # rebuild_new3/*inclora_fvg_kl0.03|0.3.json
  n3 ${p}inclora_fvg_kl$kl --seed $seed --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=$kl --set save_checkpoints=false
done; done
# the rebuild again with the coded tasks (same model: eval.json's general figures identical; icl_cpu_eval_rebuild.json now
# also scores the coded tasks), then sequence 1's abilities asked by coded instructions (rebuild_coded1/): IncLoRA and FVG at
# alpha_KL 0.1 and 1 on seeds 0-2, drift of the seed-0 and seed-1 IncLoRA runs, the other baselines on seed 0 (baselines/)
forgetlab icl-world build --preset cpu --out runs/icl-cpu --overwrite
c() { name=$1; shift; forgetlab cit run --world runs/icl-cpu --sequence coded:1 --max-train 100 --epochs 40 \
  --out runs/coded/$name --overwrite --no-progress "$@" 2>&1 | grep -a "AP=\|rror"; }
for seed in 0 1 2; do p=""; [ $seed != 0 ] && p=seed${seed}_
  c ${p}inclora --seed $seed --method inclora --lr 2e-3
  c ${p}inclora_fvg --seed $seed --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=0.1 --set save_checkpoints=false
  c ${p}inclora_fvg_kl1 --seed $seed --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=1 --set save_checkpoints=false
done
forgetlab cit analyze runs/coded/inclora
forgetlab cit analyze runs/coded/seed1_inclora                                              # rebuild_coded1/seed1/
# (both analyses rerun on 2026-11-27 after the third control, icl_hidden_cosine, was added: ~2.5 min each, every other
#  figure and interventions.json unchanged)
for m in "lwf --lr 2e-3" "olora --lr 2e-3" "replay --set finetune=inclora --lr 2e-3" "seq --lr 5e-4"; do
  set -- $m; n=$1; [ $n = replay ] && n=replay_inclora
  c baselines/$n --method $m --set save_checkpoints=false
  c baselines/${n}_fvg_kl1 --method $m --set save_checkpoints=false --fvg --set fvg_config.alpha_kl=1
done
c baselines/multitask --method multitask --set finetune=inclora --lr 2e-3 --set save_checkpoints=false
# coded sequences 0 and 2, seeds 0 and 1: IncLoRA and FVG at alpha_KL 1 (rebuild_coded1/other_sequences/)
o() { name=$1; shift; forgetlab cit run --world runs/icl-cpu --max-train 100 --epochs 40 --set save_checkpoints=false \
  --out runs/coded/other_sequences/$name --overwrite --no-progress "$@" 2>&1 | grep -a "AP=\|rror"; }
for k in 0 2; do for seed in 0 1; do
  o seq${k}_s${seed}_inclora --sequence coded:$k --seed $seed --method inclora --lr 2e-3
  o seq${k}_s${seed}_inclora_fvg_kl1 --sequence coded:$k --seed $seed --method inclora --lr 2e-3 --fvg --set fvg_config.alpha_kl=1
done; done
# FV drift pooled over the three seeds' IncLoRA runs on coded sequence 1 (rebuild_coded1/pooled_seeds/, 59 s), and
# the same seed-0 analysis with 128 prompts per FV (median R² per task of FV cosine 0.75; not kept)
forgetlab cit analyze runs/coded/inclora runs/coded/seed1_inclora runs/coded/seed2_inclora --out runs/coded/pooled_seeds --no-progress
forgetlab cit analyze runs/coded/inclora --prompts 128 --out runs/coded/drift128 --no-progress
