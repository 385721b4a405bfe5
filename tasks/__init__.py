"""Task registrations. `import flan_jax.tasks` registers the embedded default collection and the Flan 2021 TFDS collection
(cheap: no dataset is built and TFDS is not imported until data is read).

Collections that need local files register when their directory is configured, through environment variables
(FLAN_JAX_PROMPTSOURCE_DIR, FLAN_JAX_T0_DATA_DIR, FLAN_JAX_NIV2_DIR, FLAN_JAX_COT_DIR) or `flan-jax data` options;
with none set these imports register nothing.
"""
from flan_jax.tasks import default  # noqa: F401
from flan_jax.tasks import default_preference  # noqa: F401  (the embedded preference tasks)
from flan_jax.tasks import flan2021  # noqa: F401
from flan_jax.tasks import cot, niv2, t0  # noqa: F401  (no-ops unless their directories are configured)
from flan_jax.tasks import selfinstruct  # noqa: F401  (no-op unless FLAN_JAX_SELFINSTRUCT_DIR is set)
