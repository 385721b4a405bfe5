import sys

from flan_jax.train.main import main

sys.exit(main())
