import sys

from flan_jax.train.preference.main import main

sys.exit(main())
