import os
import sys

# Quiet TensorFlow (input pipeline only) before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from flan_jax.train.main import main

sys.exit(main())
