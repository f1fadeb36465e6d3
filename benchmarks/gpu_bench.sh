#!/usr/bin/env bash
# The whole GPU benchmark in one go (under 8 minutes), on a machine without network access.
#
#   OUT=/some/folder bash benchmarks/gpu_bench.sh
#
# Installs only local wheels ($WHEELS/*.whl, default wheels/: diffusers, omegaconf, importlib_metadata) into /tmp/site,
# then runs benchmarks/benchmark.py on cuda for shapes, 300m and 1.3b (eager), and, while time is left, the
# 300m DiT pairs again with torch.compile. Results: $OUT/bench_cuda.json, $OUT/bench_cuda_compile.json and
# the printed tables in $OUT/bench_cuda.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
BUDGET=460  # seconds for the whole script, leaving margin under 8 minutes
LOG="$OUT/bench_cuda.log"
WHEELS="${WHEELS:-wheels}"  # a folder of wheels for packages the machine lacks (no network needed)

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    python -m pip install --quiet --upgrade --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl 2>&1 | tail -n 3
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
} 2>&1 | tee "$LOG"
if ! python -c "import diffusers, einops, yaml" 2>> "$LOG"; then
    echo "missing python packages (see $LOG); put their wheels in $WHEELS" | tee -a "$LOG"
    exit 1
fi

# 1. eager: every pair at shapes, 300m and 1.3b
timeout $((BUDGET - SECONDS - 60)) python benchmarks/benchmark.py --device cuda --configs shapes,300m,1.3b \
    --json "$OUT/bench_cuda.json" 2>&1 | grep -v '^USDT' | tee -a "$LOG"
status=${PIPESTATUS[0]}
echo "eager run exit status $status after ${SECONDS}s" | tee -a "$LOG"

# 2. torch.compile on the 300m DiT pairs, only while enough time is left
left=$((BUDGET - SECONDS))
if [ "$left" -gt 90 ]; then
    timeout "$left" python benchmarks/benchmark.py --device cuda --configs 300m --pairs dit_forward,dit_train_step \
        --compile --json "$OUT/bench_cuda_compile.json" 2>&1 | grep -v '^USDT' | tee -a "$LOG"
    echo "compile run exit status ${PIPESTATUS[0]} after ${SECONDS}s" | tee -a "$LOG"
else
    echo "compile run skipped: ${left}s left" | tee -a "$LOG"
fi
exit "$status"
