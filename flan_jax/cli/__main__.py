import sys

from flan_jax.cli import main

sys.exit(main())
