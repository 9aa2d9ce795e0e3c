#!/usr/bin/env bash
# What the CPU tests of the framework integrations cannot run, on one GPU node
# (docs/integrations.md, "GPU runs"). Not run yet: record its output there with the card named.
#
#   TORCHTITAN_REPO=/path/to/torchtitan-v0.3.0 OUT=/tmp/integrations bash bench/integrations_gpu.sh
#
# 1. torchtitan's real Trainer (FlexAttention, CUDA graphs on, FSDP2 over NPROC GPUs) with the
#    documented command: 20 steps with checkpoints at 10 and 20 (A); the step-10 checkpoint copied
#    into a fresh dump folder and resumed to 20 (B); the same with torch AdamW (C, the baseline).
#    Record: the loss lines of A and B for steps 11-20 (equal when no group is cut: the debug
#    model's rows are multiples of 32), torchtitan's "memory" lines of A and C, the checkpoint
#    sizes (du -sb of step-20 in A and C).
#    TORCHTITAN_REPO: a torchtitan 0.3.0 checkout; the wheel lacks tests/assets (the tokenizer and
#    the c4_test data set that llama3_debugmodel reads), so the runs start from that directory.
#    torchtitan 0.3.0 wants torch >= 2.14 (torch.distributed.set_timeout after step 1,
#    torch.distributed.fsdp.DataParallelMeshDims on import); integrations_gpu_device.sh patches older.
# 2. The Accelerate, HF Trainer and Lightning examples of docs/integrations.md on CUDA, without the
#    CPU adaptations of the tests (torchrun; Lightning starts its own processes and its example
#    asks for devices=2: on a node with fewer GPUs it runs with devices and data_parallel_size set
#    to the GPU count (LIGHTNING_DEVICES overrides), which the script prints; no GPU: skipped).
#    Record: that each trains and writes its checkpoint, and the losses printed.
# Environment: NPROC (GPUs, default 1), OUT (default ./integrations_gpu_out), PARTS (which of
# "torchtitan accelerate hf-trainer lightning" to run, default all), RUN_TIMEOUT (seconds per
# torchrun/python run, default none), LIGHTNING_DEVICES. On the device machine:
# bench/integrations_gpu_device.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
NPROC=${NPROC:-1}
OUT=$(mkdir -p "${OUT:-./integrations_gpu_out}" && cd "${OUT:-./integrations_gpu_out}" && pwd)
PARTS=" ${PARTS:-torchtitan accelerate hf-trainer lightning} "
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
TO=()  # the time limit of each run
if [ -n "${RUN_TIMEOUT:-}" ]; then TO=(timeout -k 20 "$RUN_TIMEOUT"); fi

if [[ $PARTS == *" torchtitan "* ]]; then
    TT=${TORCHTITAN_REPO:?set TORCHTITAN_REPO to a torchtitan 0.3.0 checkout (for tests/assets)}

    # The documented command, read from the doc so that this script runs what the doc says.
    mapfile -t TT_ARGS < <(cd "$HERE/tests" &&
        python -c 'import doc_examples as d; print(*d.command_args("torchtitan-command", "torchtitan.train"), sep="\n")')

    titan() {  # titan DUMP_FOLDER EXTRA_ARGS...
        local dump=$1; shift
        (cd "$TT" && "${TO[@]}" torchrun --nproc_per_node "$NPROC" -m torchtitan.train "${TT_ARGS[@]}" \
            --training.steps 20 --checkpoint.interval 10 --dump_folder "$dump" "$@") 2>&1
    }

    echo "== torchtitan A: 20 steps, checkpoints at 10 and 20"
    titan "$OUT/tt_a" | tee "$OUT/tt_a.log"
    echo "== torchtitan B: resume from step 10"
    mkdir -p "$OUT/tt_b/checkpoint"
    cp -r "$OUT/tt_a/checkpoint/step-10" "$OUT/tt_b/checkpoint/"
    titan "$OUT/tt_b" | tee "$OUT/tt_b.log"
    echo "== torchtitan C: torch AdamW baseline (no override)"
    mapfile -t BASE < <(printf '%s\n' "${TT_ARGS[@]}" | grep -v -e '^--override.imports$' -e 'flash_optimizers')
    (cd "$TT" && "${TO[@]}" torchrun --nproc_per_node "$NPROC" -m torchtitan.train "${BASE[@]}" --training.steps 20 \
        --checkpoint.interval 10 --dump_folder "$OUT/tt_c") 2>&1 | tee "$OUT/tt_c.log"
    for x in a b c; do
        echo "-- $x: losses and memory"
        grep -E "step: *[0-9]+ .*loss" "$OUT/tt_$x.log" | tail -10 || true
        grep -iE "memory" "$OUT/tt_$x.log" | tail -2 || true
    done
    du -sb "$OUT/tt_a/checkpoint/step-20" "$OUT/tt_c/checkpoint/step-20" || true
fi

echo "== docs examples on CUDA"
for name in accelerate hf-trainer lightning; do
    [[ $PARTS == *" $name "* ]] || continue
    dir="$OUT/example_$name"
    mkdir -p "$dir"
    (cd "$HERE/tests" && python -c "from doc_examples import example; print(example('$name'))") >"$dir/train.py"
    if [ "$name" = lightning ]; then
        gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
        devices=${LIGHTNING_DEVICES:-$((gpus < 2 ? gpus : 2))}
        if [ "$devices" -lt 1 ]; then
            echo "lightning: skipped: needs a GPU (torch sees $gpus)"
            continue
        fi
        if [ "$devices" != 2 ]; then  # the example asks for 2 GPUs: run it on the ones there are
            sed -i -E "s/\b(devices|data_parallel_size)=2,/\1=$devices,/g" "$dir/train.py"
            if ! grep -q "devices=$devices, strategy=ModelParallelStrategy(data_parallel_size=$devices," "$dir/train.py"; then
                echo "lightning: skipped: needs 2 GPUs (torch sees $gpus) and the example's devices=2 was not found to adapt"
                continue
            fi
            echo "lightning: the example asks for devices=2; run with devices=$devices, data_parallel_size=$devices ($gpus GPU(s))"
        fi
        (cd "$dir" && "${TO[@]}" python train.py) 2>&1 | tee "$dir/log"
    else
        (cd "$dir" && "${TO[@]}" torchrun --nproc_per_node "$NPROC" train.py) 2>&1 | tee "$dir/log"
    fi
done
