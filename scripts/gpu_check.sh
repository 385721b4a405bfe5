#!/usr/bin/env bash
# One-shot GPU check: T5 1.1 base and large (packed 1024/256) and the Llama 3.2 1B decoder shape (prefix-LM rows of
# 1280), bf16: step time, tokens/s and MFU against the measured bf16 matmul peak and the card's datasheet dense bf16
# peak; then cuDNN fused attention with bias vs XLA.
#
#   scripts/gpu_check.sh [DIR]          # on the GPU host (jax[cuda]; TensorFlow and seqio not needed)
#   scripts/gpu_check.sh export [DIR]   # phase 1 on a CPU host with the full install: writes DIR/packed_1024_256.npz
#                                       # and DIR/prefix_lm_1280.npz
#
# The GPU host has no TensorFlow/seqio, so the packed rows (~3 MB, 1024 rows) come from phase 1: run it on a CPU host
# and copy DIR over, or run this script where both are installed (it exports first when DIR has no rows). DIR
# defaults to $FLAN_GPU_CHECK_DIR or /tmp/flan_jax_gpu_check. Phase 2 stops after 8 minutes (GPU_CHECK_TIMEOUT_S).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TF_CPP_MIN_LOG_LEVEL=3
PY=${PYTHON:-python}

if [[ "${1:-}" == "export" ]]; then
  exec "$PY" scripts/bench/_gpu_check.py --export "${2:-${FLAN_GPU_CHECK_DIR:-/tmp/flan_jax_gpu_check}}"
fi
DIR=${1:-${FLAN_GPU_CHECK_DIR:-/tmp/flan_jax_gpu_check}}
if [[ ! -f "$DIR/packed_1024_256.npz" ]]; then
  if "$PY" -c "import tensorflow, seqio" 2>/dev/null; then
    "$PY" scripts/bench/_gpu_check.py --export "$DIR"
  else
    echo "gpu_check: no $DIR/packed_1024_256.npz and no TensorFlow/seqio here." >&2
    echo "  Run 'scripts/gpu_check.sh export $DIR' on a CPU host with the full install and copy $DIR here." >&2
    exit 2
  fi
fi
"$PY" -c "import jax; print('devices:', jax.devices())"
exec timeout "${GPU_CHECK_TIMEOUT_S:-480}" "$PY" scripts/bench/_gpu_check.py --from-npz "$DIR" ${GPU_CHECK_ARGS:-}
