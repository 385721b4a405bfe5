"""Checkpoint import/export: T5X (legacy msgpack+TensorStore, orbax) and Hugging Face T5.

Conversion lives in the `convert` submodule (`flan_jax.checkpoints.convert.convert` / `.main`); it is not
re-exported here so that `flan_jax.checkpoints.convert` keeps naming the module.
"""
from flan_jax.checkpoints.hf import export_hf, load_hf
from flan_jax.checkpoints.t5x import infer_config, load_t5x, save_orbax_params, save_t5x_legacy

__all__ = ['export_hf', 'infer_config', 'load_hf', 'load_t5x', 'save_orbax_params', 'save_t5x_legacy']
