"""Vocabulary rows of a checkpoint in another id order (flan_jax.data.vocabularies.hf keeps T5's pad 0 / EOS 1 by
swapping ids of HF vocabularies): the permutation and its application to every parameter axis named 'vocab'."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import jax
from flan_jax import models
from flan_jax.data.vocabularies.hf import order_from_swaps  # noqa: F401  (part of this module's API)


def inverse(order: np.ndarray) -> np.ndarray:
    return np.argsort(np.asarray(order))


def reorder_vocabulary_rows(config, params: dict, order: np.ndarray) -> dict:
    """params with every 'vocab' axis (embedding rows, untied output columns) permuted by `order` (new index ->
    old); `inverse(order)` puts them back. Rows past len(order) (a model vocab_size padded beyond the tokenizer's)
    stay where they are."""

    order = np.asarray(order, np.int64)

    def one(axes, value):
        if 'vocab' not in axes:
            return value
        axis = axes.index('vocab')
        if value.shape[axis] < len(order):
            raise ValueError(f'model vocab_size {value.shape[axis]} is smaller than the tokenizer\'s {len(order)}')
        full = np.concatenate([order, np.arange(len(order), value.shape[axis])])
        return np.take(np.asarray(value), full, axis=axis)
    return jax.tree.map(one, models.param_logical_axes(config), params, is_leaf=lambda x: isinstance(x, tuple))


