"""Checking imported parameters against a model config: every tensor's name, shape and dtype.

Every importer (T5X, HF T5, HF Llama/Qwen2/Gemma, our own training checkpoints) funnels through `check_params` or
`check_names`, so a checkpoint that does not fit its config fails at import with one line naming the first mismatch,
both shapes or dtypes, and when a single config field explains it, the field to change. A mismatch found later, inside
a jitted step, would name neither the parameter nor the config.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from flan_jax import models as model_api
from flan_jax.utils.tree_paths import flatten

_SHOWN = 8   # problems listed after the first: enough to see a pattern, short enough for one line
_LAYER = re.compile(r'^(.*?)(?:layers_|layers\.|block\.)(\d+)[./]')


def expected_specs(config) -> dict:
    """{flat path: (shape tuple, numpy dtype)} of a model config, from the model's own parameter table."""
    return {path: (tuple(s.shape), np.dtype(s.dtype)) for path, s in flatten(model_api.param_shapes(config)).items()}


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def problems(flat: Mapping[str, Any], expected: Mapping[str, tuple], *, check_dtype: bool = True) -> list:
    """(kind, path, message) for each mismatch: missing, then unexpected, then wrong shape, then wrong dtype."""
    found = []
    found += [('missing', p, f'{p}: missing (expected {expected[p][0]})') for p in sorted(set(expected) - set(flat))]
    found += [('unexpected', p, f'{p}: unexpected (not in the config)') for p in sorted(set(flat) - set(expected))]
    common = sorted(set(expected) & set(flat))
    found += [('shape', p, f'{p}: got {tuple(np.shape(flat[p]))}, expected {expected[p][0]}') for p in common
              if tuple(np.shape(flat[p])) != expected[p][0]]
    if check_dtype:
        found += [('dtype', p, f'{p}: got dtype {_dtype_name(flat[p].dtype)}, expected {_dtype_name(expected[p][1])}')
                  for p in common if np.dtype(flat[p].dtype) != expected[p][1]]
    return found


def _candidates(config, kind: str, path: str, flat: Mapping, expected: Mapping) -> dict:
    """{config field: values worth trying} for the first mismatch (whose shape or key set a single field could fix)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    ints = {k: v for k, v in fields.items() if type(v) is int and v > 0}
    if kind == 'dtype':
        return {'param_dtype': [_dtype_name(flat[path].dtype)]}
    if kind == 'shape':
        got, want = tuple(np.shape(flat[path])), expected[path][0]
        diffs = [(g, w) for g, w in zip(got, want) if g != w] if len(got) == len(want) else []
        # A dimension is a field's value or a product of it with others (heads * head_dim): scale the field by it.
        return {k: sorted({g for g, _ in diffs} | {g * v // w for g, w in diffs if (g * v) % w == 0}) for k, v in
                ints.items()}
    layer_counts = {}
    for name in flat:
        if m := _LAYER.match(name):
            layer_counts[m.group(1)] = max(layer_counts.get(m.group(1), 0), int(m.group(2)) + 1)
    flips = {k: [not v] for k, v in fields.items() if type(v) is bool}
    return {**{k: sorted(set(layer_counts.values())) for k in ints}, **flips}


def config_hint(config, fits: Callable[[Any], bool], candidates: Mapping[str, Iterable],
                rename: Optional[Mapping[str, str]] = None) -> str:
    """' (set FIELD=VALUE in the config)' when one or two single-field changes make `fits` true; '' otherwise."""
    found = []
    for field, values in candidates.items():
        for value in values:
            if value == getattr(config, field):
                continue
            try:
                if fits(dataclasses.replace(config, **{field: value})):
                    found.append(f'{(rename or {}).get(field, field)}={value}')
            except (ValueError, TypeError, KeyError, AssertionError):   # an impossible config: not a hint
                continue
    if not found or len(found) > 2:
        return ''
    return f' (set {" or ".join(found)} in the config)'


def raise_first(source: str, target: str, found: list, hint: str = '') -> None:
    """One line: the first problem (with its hint), then a count and a few of the others; target names what the
    parameters were checked against."""
    if not found:
        return
    first = found[0][2] + hint
    rest = [m for _, _, m in found[1:]]
    more = ''
    if rest:
        shown = '; '.join(rest[:_SHOWN]) + (f'; ... {len(rest) - _SHOWN} more' if len(rest) > _SHOWN else '')
        more = f' [{len(rest)} more: {shown}]'
    raise ValueError(f'{source} does not match {target}: {first}{more}')


def check_params(flat: Mapping[str, Any], config, *, source: str, check_dtype: bool = True,
                 rename: Optional[Mapping[str, str]] = None) -> None:
    """Raise one ValueError (one line) naming the first missing, unexpected, mis-shaped or mis-typed parameter of
    `flat` ({path: array}) against `config`. rename: config field -> the key the user edits (an HF config.json's)."""
    expected = expected_specs(config)
    found = problems(flat, expected, check_dtype=check_dtype)
    if not found:
        return
    kind, path, _ = found[0]

    def fits(candidate) -> bool:
        want = expected_specs(candidate)
        if kind in ('missing', 'unexpected'):
            return set(want) == set(flat)
        if kind == 'dtype':
            return want[path][1] == np.dtype(flat[path].dtype)
        return path in want and want[path][0] == tuple(np.shape(flat[path]))

    hint = config_hint(config, fits, _candidates(config, kind, path, flat, expected), rename)
    raise_first(source, type(config).__name__, found, hint)


def check_names(present: Iterable[str], names_for: Callable[[Any], Iterable[str]], config, *, source: str,
                ignored: Callable[[str], bool] = lambda name: False,
                rename: Optional[Mapping[str, str]] = None) -> None:
    """Like check_params for names in a foreign checkpoint's own scheme (HF's): names_for(config) are those expected."""
    present = {n for n in present if not ignored(n)}
    wanted = set(names_for(config))
    found = [('missing', n, f'{n}: missing') for n in sorted(wanted - present)]
    found += [('unexpected', n, f'{n}: unexpected (not in the config)') for n in sorted(present - wanted)]
    if not found:
        return
    candidates = _candidates(config, 'missing', '', dict.fromkeys(present), {})
    hint = config_hint(config, lambda c: set(names_for(c)) == present, candidates, rename)
    raise_first(source, type(config).__name__, found, hint)
