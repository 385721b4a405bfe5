"""Nested parameter dicts <-> flat {'a/b/c': leaf} maps (the path convention of T5X checkpoints, our
converters and PEFT targeting)."""
from __future__ import annotations

from typing import Any, Mapping


def flatten(tree: Mapping, prefix: str = '') -> dict:
    """Nested dict -> {'a/b/c': leaf}."""
    flat = {}
    for key, value in tree.items():
        path = f'{prefix}/{key}' if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
    """{'a/b/c': leaf} -> nested dict."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split('/')
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree
