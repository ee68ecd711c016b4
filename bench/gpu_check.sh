#!/usr/bin/env bash
# The GPU table of issue 19 in one run, each part bounded (about 8 minutes on one H100):
#   bash bench/gpu_check.sh [OUT_DIR]
# 1. bench/scale.py at the published sizes (random bf16 weights) for sd35m, flux1dev, qwen_image and wan (14B):
#    rollout vs the diffusers pipeline, training MFU, memory fit, options side by side (sd35m also times
#    torch.compile). Tables to stdout, JSON and logs to OUT_DIR (default bench_out/).
# 2. FSDP2 on one GPU (configs/accelerate/fsdp2_sd3_1gpu.yaml): `flowrl train` of a tiny SD3 under FSDP2 against
#    the same run without it; the final LoRA weights must agree.
# 3. DeepSpeed: whether it imports, and that the loop refuses it in one line (it does not drive its engine).
# CPU check of this script (tests/test_bench_scale.py): DEVICE=cpu SCALE=tiny MODELS=sd35m EXTRA="--repeats 1" LIMIT_FACTOR=10.
# Exit status: the number of parts that failed (0: all ran).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-bench_out}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-real}
MODELS=${MODELS:-sd35m flux1dev qwen_image wan}
EXTRA=${EXTRA:-}
FACTOR=${LIMIT_FACTOR:-1}  # multiplies every part's time limit (a loaded CPU needs more)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
failed=0

part() {  # part NAME SECONDS COMMAND...: run bounded, log to OUT/NAME.log, print its stdout
    local name=$1 limit=$(($2 * FACTOR))
    shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s (limit $limit s)"
    cat "$OUT/$name.out"
    if [ "$rc" -ne 0 ]; then
        failed=$((failed + 1))
        tail -n 8 "$OUT/$name.log"
    fi
}

for m in $MODELS; do
    case $m in  # seconds per model on one H100: build (random init on the GPU) + every measure
        sd35m) limit=150; opts="--compile" ;;
        flux1dev) limit=100; opts="" ;;
        qwen_image) limit=130; opts="" ;;
        *) limit=90; opts="" ;;
    esac
    [ "$DEVICE" = cpu ] && opts=""  # compiling on a CPU takes minutes and says nothing about a GPU
    # shellcheck disable=SC2086
    part "scale_$m" "$limit" python bench/scale.py --model "$m" --device "$DEVICE" --scale "$SCALE" \
        --out "$OUT/scale_$m.json" $opts $EXTRA
done

if [ "$DEVICE" != cpu ]; then
    part fsdp2_one_gpu 120 bash -c '
        set -e
        d="$1"
        python -m flowrl.cli make-tiny sd3 "$d/model" >/dev/null
        common="configs/tiny_sd3.yaml model.path=$d/model model.device=cuda max_steps=2 checkpoint_every=2 eval_every=100 eval.at_start=false train.tracker=none"
        python -m flowrl.cli train $common output_dir="$d/plain" >"$d/plain.log" 2>&1
        accelerate launch --config_file configs/accelerate/fsdp2_sd3_1gpu.yaml -m flowrl.cli train $common \
            output_dir="$d/fsdp2" >"$d/fsdp2.log" 2>&1
        python - "$d" <<EOF
import sys
from pathlib import Path
from safetensors.torch import load_file
d = Path(sys.argv[1])
last = lambda run: sorted((d / run / "checkpoints").glob("step-*"))[-1] / "weights.safetensors"
a, b = load_file(str(last("plain"))), load_file(str(last("fsdp2")))
assert set(a) == set(b), "FSDP2 saved other weights"
diff = max(float((a[k] - b[k]).abs().max()) for k in a)
moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
print(f"FSDP2 (1 GPU) vs plain: {len(a)} LoRA tensors, max |diff| {diff:.3g} (largest LoRA B {moved:.3g})")
assert diff <= 1e-3 * max(moved, 1e-6), "FSDP2 trained other weights"
EOF
    ' _ "$OUT/fsdp2"
fi

part deepspeed 60 bash -c '
    python -c "import deepspeed; print(\"deepspeed\", deepspeed.__version__, \"imports\")" 2>/dev/null \
        || echo "deepspeed: not installed (pip install deepspeed on the GPU box to try a ZeRO config)"
    env ACCELERATE_USE_DEEPSPEED=true python -m flowrl.cli train configs/tiny_sd3.yaml output_dir="$1/ds" 2>&1 \
        | grep "flowrl: error:" | head -1
    test "${PIPESTATUS[0]}" = 2
' _ "$OUT"

echo "== $failed part(s) failed; JSON and logs in $OUT/"
exit "$failed"
