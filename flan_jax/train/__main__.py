import os
import sys

# Quiet TensorFlow (input pipeline only) before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from flan_jax.utils.runtime_env import reexec_with_tuned_malloc, skip_absent_accelerators

reexec_with_tuned_malloc(["-m", "flan_jax.train", *sys.argv[1:]])
skip_absent_accelerators()

from flan_jax.cli.train import main  # noqa: E402

sys.exit(main())
