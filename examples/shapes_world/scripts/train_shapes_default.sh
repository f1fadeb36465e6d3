#!/usr/bin/env bash
# Reproduce the shipped Shapes World default model from nothing:
#   bash examples/shapes_world/scripts/train_shapes_default.sh [RUN_DIR]
# 1. the causal VAE on rendered clips, 2. its decoder fine-tuned with the encoder frozen (same latents),
# 3. that decoder fine-tuned further with the detail term (one-pixel features), 4. once more with a heavier
# detail term, 5. the DiT on clips rendered and encoded by the frozen VAE with MiniLM text, 6. its cool-down
# (learning rate decayed to 0), then a second and a third cool-down on fresh clips, 7. the video-text retriever
# used as the evaluation judge, 8. the fp16 pipeline folder (thrice-cooled DiT + last decoder) in
# t2v/assets/default_model
# (SHIP=0 skips it). Each stage resumes from its last checkpoint when rerun, and a finished stage is skipped.
# Extra key=value overrides per stage: VAE_ARGS, DECODER_ARGS, DETAIL_ARGS, DETAIL2_ARGS, DIT_ARGS,
# COOLDOWN_ARGS, COOLDOWN2_ARGS, COOLDOWN3_ARGS, RETRIEVER_ARGS. RETRIEVER=0 skips stage 7.
# Runs on CUDA when available (minutes on one H100), otherwise on the CPU, where the DiT stages compile their
# blocks (train.compile; DIT_COMPILE=false turns it off, DIT_COMPILE=true turns it on for CUDA).
set -euo pipefail
cd "$(dirname "$0")/../../.."
WORLD=examples/shapes_world  # its recipe configs and scripts, from the repository root
RUN=${1:-runs/shapes_default}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
echo "[shapes] run folder $RUN, device $DEVICE"
DIT_COMPILE=${DIT_COMPILE:-$([ "$DEVICE" = cpu ] && echo true || echo false)}

if [ ! -f "$RUN/vae/vae/config.json" ]; then
  echo "[shapes] 1/8 VAE"
  python scripts/train_vae.py --config "$WORLD/configs/shapes_vae.yaml" output_dir="$RUN/vae" resume=latest ${VAE_ARGS:-}
fi
if [ ! -f "$RUN/vae_decoder/vae/config.json" ]; then
  echo "[shapes] 2/8 VAE decoder fine-tune"
  python scripts/train_vae.py --config "$WORLD/configs/shapes_vae_decoder.yaml" output_dir="$RUN/vae_decoder" \
    model.vae="$RUN/vae/vae" resume=latest ${DECODER_ARGS:-}
fi
if [ ! -f "$RUN/vae_decoder_detail/vae/config.json" ]; then
  echo "[shapes] 3/8 VAE decoder detail fine-tune"
  python scripts/train_vae.py --config "$WORLD/configs/shapes_vae_decoder_detail.yaml" \
    output_dir="$RUN/vae_decoder_detail" model.vae="$RUN/vae_decoder/vae" resume=latest ${DETAIL_ARGS:-}
fi
if [ ! -f "$RUN/vae_decoder_detail2/vae/config.json" ]; then
  echo "[shapes] 4/8 VAE decoder second detail fine-tune"
  python scripts/train_vae.py --config "$WORLD/configs/shapes_vae_decoder_detail2.yaml" \
    output_dir="$RUN/vae_decoder_detail2" model.vae="$RUN/vae_decoder_detail/vae" resume=latest ${DETAIL2_ARGS:-}
fi
if [ ! -f "$RUN/dit/pipeline/model_index.json" ]; then
  echo "[shapes] 5/8 DiT"
  python scripts/train.py --config "$WORLD/configs/shapes_dit.yaml" output_dir="$RUN/dit" model.vae="$RUN/vae/vae" \
    train.compile="$DIT_COMPILE" resume=latest ${DIT_ARGS:-}
fi
if [ ! -f "$RUN/dit_cooldown/pipeline/model_index.json" ]; then
  echo "[shapes] 6/8 DiT cool-down"
  python scripts/train.py --config "$WORLD/configs/shapes_dit_cooldown.yaml" output_dir="$RUN/dit_cooldown" \
    model.dit="$RUN/dit/pipeline/transformer" model.vae="$RUN/vae/vae" train.compile="$DIT_COMPILE" resume=latest \
    ${COOLDOWN_ARGS:-}
fi
if [ ! -f "$RUN/dit_cooldown2/pipeline/model_index.json" ]; then
  echo "[shapes] 6/8 DiT second cool-down"
  python scripts/train.py --config "$WORLD/configs/shapes_dit_cooldown2.yaml" output_dir="$RUN/dit_cooldown2" \
    model.dit="$RUN/dit_cooldown/pipeline/transformer" model.vae="$RUN/vae/vae" train.compile="$DIT_COMPILE" \
    resume=latest ${COOLDOWN2_ARGS:-}
fi
if [ ! -f "$RUN/dit_cooldown3/pipeline/model_index.json" ]; then
  echo "[shapes] 6/8 DiT third cool-down"
  python scripts/train.py --config "$WORLD/configs/shapes_dit_cooldown3.yaml" output_dir="$RUN/dit_cooldown3" \
    model.dit="$RUN/dit_cooldown2/pipeline/transformer" model.vae="$RUN/vae/vae" train.compile="$DIT_COMPILE" \
    resume=latest ${COOLDOWN3_ARGS:-}
fi
if [ "${RETRIEVER:-1}" = "1" ] && [ ! -f "$RUN/retriever/model/retriever.json" ]; then
  echo "[shapes] 7/8 retriever"
  python scripts/train_retriever.py --config examples/shapes_world/configs/shapes_retriever.yaml output_dir="$RUN/retriever" \
    resume=latest ${RETRIEVER_ARGS:-}
fi
if [ "${SHIP:-1}" = "1" ]; then
  echo "[shapes] 8/8 ship"
  python "$WORLD/scripts/ship_default.py" --pipeline "$RUN/dit_cooldown3/pipeline" --vae "$RUN/vae_decoder_detail2/vae" \
    --guidance 3 --shift 3 --out t2v/assets/default_model
  if [ -f "$RUN/retriever/model/retriever.json" ]; then
    rm -rf t2v/assets/shapes_retriever && cp -r "$RUN/retriever/model" t2v/assets/shapes_retriever
  fi
fi
echo "[shapes] done"
