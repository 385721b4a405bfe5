"""The offline packing references of the packing benchmark (scripts/bench/_bounds.py)."""
import numpy as np
import pytest

from scripts.bench import _bounds


def test_sum_lower_bound_takes_the_tighter_dimension():
  sizes = np.array([[6, 1], [6, 1], [6, 9]])  # inputs need ceil(18/10)=2 rows, targets ceil(11/10)=2
  assert _bounds.sum_lower_bound(sizes, (10, 10)) == 2
  assert _bounds.sum_lower_bound(sizes, (10, 5)) == 3  # targets: ceil(11/5)


def test_first_fit_decreasing_beats_first_fit_in_stream_order():
  # Stream order 3,3,7,7 at capacity 10: first fit pairs the 3s and leaves each 7 alone (3 rows); sorted, 7+3 twice.
  sizes = np.array([[3, 0], [3, 0], [7, 0], [7, 0]])
  assert _bounds.first_fit(sizes, (10, 1), np.arange(4)) == 3
  assert _bounds.first_fit_decreasing(sizes, (10, 1)) == 2


def test_first_fit_needs_room_in_both_dimensions():
  sizes = np.array([[2, 5], [2, 5], [2, 5]])  # inputs fit 5 per row, targets only 2
  assert _bounds.first_fit_decreasing(sizes, (10, 10)) == 2
  assert _bounds.sum_lower_bound(sizes, (10, 10)) == 2


def test_ffd_is_never_below_the_lower_bound_on_random_streams():
  rng = np.random.default_rng(0)
  sizes = np.stack([rng.integers(1, 1025, 300), rng.integers(1, 257, 300)], axis=1)
  ffd, lower = _bounds.first_fit_decreasing(sizes, (1024, 256)), _bounds.sum_lower_bound(sizes, (1024, 256))
  assert lower <= ffd <= len(sizes)


def test_oversized_example_is_an_error():
  with pytest.raises(ValueError, match="exceeds the capacities"):
    _bounds.first_fit(np.array([[11, 0]]), (10, 1), np.arange(1))
