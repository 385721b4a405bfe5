"""Offline references for 2-D packing (inputs and targets each have a row capacity): what a packer could reach.

- `sum_lower_bound`: no packing uses fewer rows than max(ceil(sum inputs / Li), ceil(sum targets / Lt)). Loose for
  2-D packing (it ignores that the two dimensions must fit in the same rows).
- `first_fit_decreasing`: the classic offline heuristic over the WHOLE stream (no buffer, no order to keep): sort
  the examples by decreasing size, put each into the first row with room in both dimensions. It is tried with three
  sort keys (inputs/Li + targets/Lt, inputs, targets) and the fewest rows are kept.
Pure numpy, no TF/seqio: used by the packing suite and its test.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def sum_lower_bound(sizes: np.ndarray, capacities: Sequence[int]) -> int:
  """Fewest rows any packing of `sizes` [n, 2] into rows of `capacities` (Li, Lt) could use."""
  sizes = np.asarray(sizes, np.int64)
  return int(max(-(-sizes[:, d].sum() // int(c)) for d, c in enumerate(capacities) if c))


def first_fit(sizes: np.ndarray, capacities: Sequence[int], order: np.ndarray) -> int:
  """Rows used by first-fit over `sizes` [n, 2] visited in `order`."""
  caps = np.asarray(capacities, np.int64)
  room = np.empty((len(sizes), 2), np.int64)  # at most one row per example
  rows = 0
  for i in order:
    s0, s1 = int(sizes[i, 0]), int(sizes[i, 1])
    if s0 > caps[0] or s1 > caps[1]:
      raise ValueError(f"first_fit: example {i} of sizes ({s0}, {s1}) exceeds the capacities {tuple(caps)}")
    fits = np.flatnonzero((room[:rows, 0] >= s0) & (room[:rows, 1] >= s1)) if rows else ()
    if len(fits):
      room[fits[0]] -= (s0, s1)
    else:
      room[rows] = (caps[0] - s0, caps[1] - s1)
      rows += 1
  return rows


def first_fit_decreasing(sizes: np.ndarray, capacities: Sequence[int]) -> int:
  """Fewest rows of offline first-fit-decreasing over three sort keys (see the module doc)."""
  sizes = np.asarray(sizes, np.int64).reshape(len(sizes), 2)
  li, lt = (float(c) for c in capacities)
  keys = (sizes[:, 0] / li + sizes[:, 1] / lt, sizes[:, 0], sizes[:, 1])
  # argsort of -key is stable: equal keys keep stream order, so the result is deterministic.
  return min(first_fit(sizes, capacities, np.argsort(-np.asarray(k, float), kind="stable")) for k in keys)
