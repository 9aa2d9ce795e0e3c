#!/usr/bin/env bash
# Peak memory and tokens/s of the 8B-class GPT through the trainer, one `flashoptim-dist train`
# per case (docs/PERFORMANCE.md, "8B-class GPT through the trainer"). Each case is NAME=OVERRIDES
# with the overrides joined by commas; the log of each case goes to $OUT/NAME.log (or /tmp).
#
#   bash bench/train8b.sh flash=optim.name=FlashAdamW,optim.gradient_release=false \
#                         release=optim.name=FlashAdamW,optim.gradient_release=true,model.loss_chunks=8
#
# Environment: NPROC (ranks, default 2), STEPS (default 5), SEQ (tokens per sequence, 4096),
# PYTHON (default python).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: train8b.sh NAME=KEY=VALUE[,KEY=VALUE...] ..." >&2; exit 2; }
nproc=${NPROC:-2}
out=${OUT:-/tmp}
common=(--config configs/llama8b_finetune_fsdp2.yaml model.source=gpt model.path=null model.preset=8b
        model.activation_checkpointing=true data.source=stdlib data.tokenizer=bytes
        "data.seq_len=${SEQ:-4096}" data.micro_batch_size=1 "data.global_batch_size=$nproc"
        "data.eval_sequences=$nproc" "train.steps=${STEPS:-5}" train.log_every=1 train.eval_every=1000
        train.ckpt_every=0 optim.warmup_steps=0 "dist.nproc_per_node=$nproc" train.progress=false)
for case in "$@"; do
    name=${case%%=*}
    IFS=, read -r -a overrides <<<"${case#*=}"
    start=$(date +%s)
    rc=0
    ${PYTHON:-python} -m flashoptim_dist.train train "${common[@]}" "train.out_dir=/tmp/train8b/$name" \
        "${overrides[@]}" >"$out/$name.log" 2>&1 || rc=$?
    echo "== $name (rc $rc, $(( $(date +%s) - start )) s): ${overrides[*]}"
    grep -E "^step [0-9]+/" "$out/$name.log" | tail -4 || tail -5 "$out/$name.log"
done
