#!/usr/bin/env bash
# One-GPU DeepSpeed training of the Wan-1.3B-sized DiT (t2v/models/configs/dit_1.3b.yaml) through the real
# trainer, on a synthetic latent cache of 81x480x832 clips (latents 16x21x60x104, 32,760 tokens) with 512
# T5-XXL-width text tokens: ZeRO-2, then ZeRO-3, bf16, activation checkpointing, EMA, batch 1, STEPS steps
# each, on a machine without network access (about 6-8 minutes on one H100, most of it start-up,
# the final checkpoint and the export).
#
#   OUT=/some/folder bash benchmarks/gpu_deepspeed.sh
#
# Installs only local wheels ($WHEELS/*.whl, default wheels/: deepspeed and what it needs beyond torch,
# diffusers, omegaconf) into /tmp/site. Results: $OUT/gpu_deepspeed.log, $OUT/zero{2,3}_metrics.jsonl and
# $OUT/gpu_deepspeed.json (median step time after warm-up, peak memory, model FLOPs utilisation against the
# GPU's bf16 matrix-product rate measured in the same run). SIZE=tiny runs the same steps with the debug
# models and 17x64x64 clips (on a CPU too), to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_deepspeed.log"
WORK="${WORK:-/tmp/t2v_deepspeed}"
WHEELS="${WHEELS:-wheels}"
STEPS="${STEPS:-16}"
rm -rf "$WORK" && mkdir -p "$WORK"

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    python -m pip install --quiet --upgrade --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl 2>&1 | tail -n 3
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "${SIZE:-real}" = "tiny" ]; then
    DIT=tiny VAE=tiny TEXT_DIM=16 TEXT_LEN=64 FRAMES=17 HEIGHT=64 WIDTH=64
else
    DIT=1.3b VAE=base TEXT_DIM=4096 TEXT_LEN=512 FRAMES=81 HEIGHT=480 WIDTH=832
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$LOG"
if ! python -c "import torch, deepspeed, diffusers, omegaconf; print('torch', torch.__version__, 'deepspeed', \
        deepspeed.__version__, 'diffusers', diffusers.__version__)" 2>&1 | grep -v '^\[' | tee -a "$LOG"; then
    echo "missing packages (see above); their wheels go in $WHEELS" | tee -a "$LOG"
    exit 1
fi

python scripts/make_synthetic_cache.py --out "$WORK/data" --vae "$VAE" --text-dim "$TEXT_DIM" --max-length "$TEXT_LEN" \
    --num 8 --frames "$FRAMES" --height "$HEIGHT" --width "$WIDTH" 2>&1 | grep -v -i 'warn\|it/s' | tee -a "$LOG"
status=${PIPESTATUS[0]}
[ "$status" = 0 ] || exit "$status"

for stage in 2 3; do
    echo "== ZeRO-$stage, $STEPS steps after ${SECONDS}s" | tee -a "$LOG"
    torchrun --standalone --nproc_per_node 1 scripts/train.py --config configs/train/debug.yaml \
        output_dir="$WORK/zero$stage" model.dit="$DIT" model.vae="$WORK/data/vae" \
        model.text_encoder="$WORK/data/text_encoder" model.max_text_length="$TEXT_LEN" model.gradient_checkpointing=true \
        data.source=cache data.cache="$WORK/data/cache" data.frames="$FRAMES" data.height="$HEIGHT" data.width="$WIDTH" \
        data.batch_size=1 data.num_workers=2 distributed.backend=deepspeed distributed.zero_stage="$stage" \
        train.mixed_precision=bf16 train.lr=1.0e-4 train.lr_schedule=constant train.warmup_steps=2 train.ema_decay=0.999 train.max_steps="$STEPS" train.log_every=1 \
        train.ckpt_every=0 train.validate_every=0 flow.dynamic_shift=false flow.shift=5.0 > "$OUT/zero${stage}.log" 2>&1
    echo "ZeRO-$stage exit status $? after ${SECONDS}s" | tee -a "$LOG"
    grep -v -i 'warn\|it/s\]' "$OUT/zero${stage}.log" | tail -n 8 | tee -a "$LOG"
    cp "$WORK/zero$stage/metrics.jsonl" "$OUT/zero${stage}_metrics.jsonl" 2>/dev/null
    cp "$WORK/zero$stage/config.yaml" "$OUT/zero${stage}_config.yaml" 2>/dev/null
    rm -rf "$WORK/zero$stage"  # the final checkpoint and export (~30 GB at the real size): the disk is small
done

python - "$OUT" "$WORK/data/vae" "$DIT" "$FRAMES" "$HEIGHT" "$WIDTH" "$TEXT_LEN" <<'EOF' 2>&1 | grep -v '^\[' | tee -a "$LOG"
import json, os, statistics, sys

import torch

from t2v import bench
from t2v.models.vae import CausalVideoVAE
from t2v.models.vae_utils import latent_channels, vae_scale_factors

out, vae_dir, dit, (frames, height, width, text_len) = *sys.argv[1:4], map(int, sys.argv[4:])
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
vae = CausalVideoVAE.from_pretrained(vae_dir)
temporal, spatial = vae_scale_factors(vae)
latents = (latent_channels(vae), (frames - 1) // temporal + 1, height // spatial, width // spatial)
flops = bench.dit_train_flops(bench.load_preset(f"dit_{dit}"), latents, text_len)
peak = bench.matmul_tflops(device)
rows = []
for stage in (2, 3):
    path = os.path.join(out, f"zero{stage}_metrics.jsonl")
    if not os.path.exists(path):
        continue
    logs = [r for r in map(json.loads, open(path)) if "samples_per_s" in r]
    if not logs:
        continue
    steady = logs[len(logs) // 4:] or logs  # the first quarter is warm-up
    step_s = statistics.median(1.0 / r["samples_per_s"] for r in steady)
    rows.append({"run": f"zero{stage}", "dit": dit, "latents": latents, "text_len": text_len, "steps": len(logs),
                 "step_s": step_s, "peak_mem_mb": max(r["peak_mem_mb"] for r in logs), "model_flops": flops,
                 "matmul_tflops": peak, "mfu": flops / step_s / (peak * 1e12), "final_loss": logs[-1]["loss"],
                 "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    print(json.dumps(rows[-1]))
json.dump(rows, open(os.path.join(out, "gpu_deepspeed.json"), "w"), indent=1)
EOF
