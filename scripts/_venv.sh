# Sourced by scripts/*.sh: create .venv in the repo if missing and install flan_jax (editable) with the given extras.
# Versions as tested: constraints.txt. Re-installs only when setup.py or constraints.txt changed, so repeated runs
# start at once.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
EXTRAS="${1:-}"
if [ ! -x .venv/bin/python ]; then
  echo "[flan_jax] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
STAMP=".venv/.flan_jax_install_$(cat setup.py constraints.txt | sha1sum | cut -c1-12)_${EXTRAS:-none}"
if [ ! -f "$STAMP" ]; then
  echo "[flan_jax] installing flan_jax${EXTRAS:+[$EXTRAS]} into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
  touch "$STAMP"
fi
export TF_CPP_MIN_LOG_LEVEL=3 TF_ENABLE_ONEDNN_OPTS=0 PYTHONUNBUFFERED=1
export PATH="$REPO/.venv/bin:$PATH"
