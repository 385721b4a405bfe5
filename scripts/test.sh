#!/usr/bin/env bash
# The test suite, on CPU. Creates .venv and installs flan_jax[test] if needed. Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" "test"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=true"
# The CPU backend only: with libtpu installed (the tpu extra) JAX would otherwise also start its TPU plugin in every
# test process, which finds no chip and may print its start-up warnings; TPU topologies still compile ahead of time.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m pytest -q tests "$@"
