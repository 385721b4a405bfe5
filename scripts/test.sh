#!/usr/bin/env bash
# The test suite, on CPU. Creates .venv and installs flan_jax[test] if needed. Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" "test"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=true"
exec python -m pytest -q tests "$@"
