"""Best-fit sequence packing for encoder-decoder and decoder-only models.

seqio packs next-fit: one open row, closed as soon as the next example does not fit, which leaves 20-30% of the
encoder slots as padding on Flan-like length mixes. Here a bounded buffer of examples (default 1000) is kept, and
each packed row is built as follows:

  1. the row is seeded with the OLDEST example in the buffer (so output order follows input order, every example
     waits at most `buffer_size` rows, and short examples are not clustered together);
  2. the row is completed greedily with the buffer example of highest score that still fits the remaining room in
     BOTH dimensions (inputs and targets), score = inputs/Li + secondary_weight * targets/Lt;
  3. with `lookahead` > 1 the first completion step tries the top-`lookahead` candidates, finishes each greedily,
     and keeps the completion that fills most encoder (then decoder) slots.

The buffer is refilled after every row, so memory is bounded by `buffer_size` examples plus one batch of rows.
Ties are broken by a per-example random jitter drawn from `seed`, so packing is deterministic given the seed.

Layers (each usable without the ones below):
  - `BestFitPacker`: sizes + opaque payloads -> rows of payloads (pure numpy, no seqio/TF).
  - `pack_examples`: (inputs, targets) arrays -> rows, with truncate/drop of over-length examples and `PackingStats`.
  - `encdec_feature_batch` / `lm_feature_batch` / `prefix_lm_feature_batch`: packed rows -> seqio feature arrays
    [rows, length] (numpy); `encdec_features` etc. do one row.
  - `PackedEncDecFeatureConverter`, `PackedLMFeatureConverter`, `PackedPrefixLMFeatureConverter`,
    `PackedDecoderFeatureConverter`: seqio FeatureConverters producing exactly the packed features of their seqio
    counterparts; `converter.stats` accumulates `PackingStats` as the dataset is consumed.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from flan_jax.packing.features import (  # noqa: F401 (the feature builders are part of this module's API)
    encdec_feature_batch, lm_feature_batch, prefix_lm_feature_batch, encdec_features, lm_features, prefix_lm_features)

OVERLENGTH_POLICIES = ("truncate", "drop")
# Placeholder token of a prompt-tuning slot (`prompt_slots`): any non-zero id; the model replaces its embedding.
PROMPT_SLOT_ID = 1
_ABSENT = np.iinfo(np.int64).max // 4  # size of an empty buffer slot: never fits


@dataclasses.dataclass
class PackingStats:
  """Counters accumulated while packing; `as_dict()` gives the figures a trainer logs."""

  examples_in: int = 0
  examples_packed: int = 0
  truncated: int = 0  # examples with at least one feature cut to its length (still packed)
  dropped_overlength: int = 0  # examples dropped because overlength='drop'
  dropped_empty: int = 0  # examples with no tokens at all (nothing to pack)
  rows_out: int = 0
  segments: int = 0
  max_segments_in_a_row: int = 0
  encoder_tokens: int = 0
  encoder_slots: int = 0
  decoder_tokens: int = 0
  decoder_slots: int = 0

  @property
  def encoder_fill(self) -> float:
    return self.encoder_tokens / self.encoder_slots if self.encoder_slots else 0.0

  @property
  def decoder_fill(self) -> float:
    return self.decoder_tokens / self.decoder_slots if self.decoder_slots else 0.0

  @property
  def segments_per_row(self) -> float:
    return self.segments / self.rows_out if self.rows_out else 0.0

  def as_dict(self) -> dict[str, float]:
    d = dataclasses.asdict(self)
    if self.encoder_slots:
      d["encoder_fill"] = self.encoder_fill
    if self.decoder_slots:
      d["decoder_fill"] = self.decoder_fill
    d["segments_per_row"] = self.segments_per_row
    return d

  def reset(self) -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, 0)


class BestFitPacker:
  """Streaming best-fit packer over a bounded buffer; 2 size dimensions (use capacity 0 for an unused one).

  push(payload, sizes) returns the rows completed by that push (lists of payloads, seed first); flush() drains the
  buffer at the end of the stream. Sizes must already fit the capacities (truncate or drop before pushing).
  """

  def __init__(
      self,
      capacities: Sequence[int],
      *,
      buffer_size: int = 1000,
      max_segments_per_row: Optional[int] = None,
      lookahead: int = 8,
      secondary_weight: float = 1.0,
      seed: int = 0,
  ):
    if len(capacities) not in (1, 2):
      raise ValueError(f"BestFitPacker: capacities must have 1 or 2 entries, got {capacities!r}")
    caps = [int(c) for c in capacities] + [0] * (2 - len(capacities))
    if caps[0] <= 0 or caps[1] < 0:
      raise ValueError(f"BestFitPacker: capacities must be positive, got {capacities!r}")
    if buffer_size < 1:
      raise ValueError(f"BestFitPacker: buffer_size must be >= 1, got {buffer_size}")
    if max_segments_per_row is not None and max_segments_per_row < 1:
      raise ValueError(f"BestFitPacker: max_segments_per_row must be >= 1 or None, got {max_segments_per_row}")
    if lookahead < 1:
      raise ValueError(f"BestFitPacker: lookahead must be >= 1, got {lookahead}")
    self.capacities = tuple(caps)
    self.buffer_size = buffer_size
    self.max_segments_per_row = max_segments_per_row or 1 << 30
    self.lookahead = lookahead
    self._weights = (1.0 / caps[0], secondary_weight / caps[1] if caps[1] else 0.0)
    self._rng = np.random.default_rng(seed)
    self._size0 = np.full(buffer_size, _ABSENT, np.int64)
    self._size1 = np.full(buffer_size, _ABSENT, np.int64)
    self._score = np.full(buffer_size, -1.0)
    self._payload: list[Any] = [None] * buffer_size
    self._serial = np.zeros(buffer_size, np.int64)  # invalidates stale FIFO entries of reused slots
    self._free = list(range(buffer_size - 1, -1, -1))
    self._fifo: collections.deque[tuple[int, int]] = collections.deque()
    self._next_serial = 1
    self._jitter = self._rng.random(4096) * 1e-7  # tie-breaks between equal scores, refreshed in blocks
    self._jitter_pos = 0

  def __len__(self) -> int:
    return self.buffer_size - len(self._free)

  def push(self, payload: Any, sizes: Sequence[int]) -> list[list[Any]]:
    s0, s1 = int(sizes[0]), int(sizes[1]) if len(sizes) > 1 else 0
    if not (0 <= s0 <= self.capacities[0] and 0 <= s1 <= self.capacities[1]):
      raise ValueError(f"BestFitPacker.push: sizes {tuple(sizes)} do not fit capacities {self.capacities}")
    slot = self._free.pop()
    if self._jitter_pos == len(self._jitter):
      self._jitter, self._jitter_pos = self._rng.random(4096) * 1e-7, 0
    self._size0[slot], self._size1[slot] = s0, s1
    self._score[slot] = s0 * self._weights[0] + s1 * self._weights[1] + self._jitter[self._jitter_pos]
    self._jitter_pos += 1
    self._payload[slot] = payload
    self._serial[slot] = self._next_serial
    self._fifo.append((slot, self._next_serial))
    self._next_serial += 1
    return [] if self._free else [self._build_row()]

  def flush(self) -> Iterator[list[Any]]:
    while len(self):
      yield self._build_row()

  def _take(self, slot: int) -> Any:
    payload, self._payload[slot] = self._payload[slot], None
    self._size0[slot] = self._size1[slot] = _ABSENT
    self._serial[slot] = 0
    self._free.append(slot)
    return payload

  def _build_row(self) -> list[Any]:
    while True:  # the oldest live example seeds the row (FIFO entries of taken slots are stale)
      seed, serial = self._fifo.popleft()
      if self._serial[seed] == serial:
        break
    room0 = self.capacities[0] - int(self._size0[seed])
    room1 = self.capacities[1] - int(self._size1[seed])
    row = [self._take(seed)]
    fits = np.flatnonzero((self._size0 <= room0) & (self._size1 <= room1))
    if self.max_segments_per_row == 1 or not len(fits):
      return row
    # Candidates by decreasing score: the first that fits is the best fit, and since the room only shrinks, a
    # completion is one forward scan. Lookahead forces each of the top-k candidates in turn as the first pick.
    order = fits[np.argsort(-self._score[fits])]  # jitter: no ties
    size0, size1 = self._size0[order], self._size1[order]
    best, best_used = None, (-1, -1)
    for first in range(min(self.lookahead, len(order))):
      picks, used = _complete(size0, size1, room0, room1, self.max_segments_per_row - 1, first)
      if used > best_used:
        best, best_used = picks, used
        if used[0] == room0:
          break  # perfect encoder fill: nothing can beat it
    row.extend(self._take(int(order[i])) for i in best)
    return row


def _complete(size0, size1, room0, room1, max_picks, first):
  """Greedy completion over score-sorted candidates with `first` forced in; returns (indices, (used0, used1))."""
  picks = [first]
  used0, used1 = int(size0[first]), int(size1[first])
  room0, room1 = room0 - used0, room1 - used1
  start = 0
  while len(picks) < max_picks and (room0 > 0 or room1 > 0) and start < len(size0):
    ok = (size0[start:] <= room0) & (size1[start:] <= room1)
    if start <= first:
      ok[first - start] = False
    i = int(ok.argmax())
    if not ok[i]:
      break
    i += start
    picks.append(i)
    s0, s1 = int(size0[i]), int(size1[i])
    room0, room1, used0, used1 = room0 - s0, room1 - s1, used0 + s0, used1 + s1
    start = i + 1
  return picks, (used0, used1)


def _truncate_or_drop(
    inputs: np.ndarray, targets: np.ndarray, lengths: tuple[int, int], overlength: str, stats: PackingStats
) -> Optional[tuple[np.ndarray, np.ndarray]]:
  if len(inputs) > lengths[0] or len(targets) > lengths[1]:
    if overlength == "drop":
      stats.dropped_overlength += 1
      return None
    stats.truncated += 1
    inputs, targets = inputs[: lengths[0]], targets[: lengths[1]]
  if len(inputs) == 0 and len(targets) == 0:
    stats.dropped_empty += 1
    return None
  return inputs, targets


class ExamplePacker:
  """pack_examples as an object: add() returns the rows one example completed, flush() drains the buffer.

  It holds only plain data (the BestFitPacker, its numpy buffers and RNG, the stats), so an input pipeline can
  pickle it to resume mid-stream exactly where it stopped. Arguments as for pack_examples.
  """

  def __init__(self, lengths: tuple[int, int], *, buffer_size: int = 1000, max_segments_per_row: Optional[int] = None,
               overlength: str = "truncate", lookahead: int = 8, secondary_weight: float = 1.0, seed: int = 0,
               concatenate: bool = False, stats: Optional[PackingStats] = None, prompt_slots: int = 0):
    if overlength not in OVERLENGTH_POLICIES:
      raise ValueError(f"pack_examples: overlength must be one of {OVERLENGTH_POLICIES}, got {overlength!r}")
    self.lengths = (int(lengths[0]), int(lengths[1]))
    if prompt_slots < 0 or (prompt_slots and prompt_slots >= self.lengths[0]):
      raise ValueError(f"pack_examples: prompt_slots={prompt_slots} (the prompt-tuning prompt_length) must leave room "
                       f"for inputs in the inputs length {self.lengths[0]}")
    self.prompt_slots = int(prompt_slots)
    self.stats = stats if stats is not None else PackingStats()
    self.overlength, self.concatenate = overlength, concatenate
    self.capacities = (sum(self.lengths),) if concatenate else self.lengths
    self.packer = BestFitPacker(self.capacities, buffer_size=buffer_size, max_segments_per_row=max_segments_per_row,
                                lookahead=lookahead, secondary_weight=secondary_weight, seed=seed)

  def _account(self, row):
    stats = self.stats
    stats.rows_out += 1
    stats.segments += len(row)
    stats.examples_packed += len(row)
    stats.max_segments_in_a_row = max(stats.max_segments_in_a_row, len(row))
    n_in, n_tg = sum(len(i) for i, _ in row), sum(len(t) for _, t in row)
    if self.concatenate:
      stats.decoder_tokens += n_in + n_tg
      stats.decoder_slots += self.capacities[0]
    else:
      stats.encoder_tokens += n_in
      stats.encoder_slots += self.lengths[0]
      stats.decoder_tokens += n_tg
      stats.decoder_slots += self.lengths[1]
    return row

  def add(self, inputs, targets) -> list:
    self.stats.examples_in += 1
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    if getattr(self, "prompt_slots", 0) and (len(inputs) or len(targets)):
      # Prompt tuning: the slots lead the inputs, so truncation cuts (and counts) real input tokens only.
      inputs = np.concatenate([np.full(self.prompt_slots, PROMPT_SLOT_ID, inputs.dtype), inputs])
    kept = _truncate_or_drop(inputs, targets, self.lengths, self.overlength, self.stats)
    if kept is None:
      return []
    sizes = (len(kept[0]) + len(kept[1]),) if self.concatenate else (len(kept[0]), len(kept[1]))
    return [self._account(row) for row in self.packer.push(kept, sizes)]

  def flush(self) -> list:
    return [self._account(row) for row in self.packer.flush()]


def pack_examples(
    examples: Iterable[tuple[np.ndarray, np.ndarray]],
    lengths: tuple[int, int],
    **options,
) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
  """Packs (inputs, targets) pairs into rows; yields each row as its list of (inputs, targets) segments.

  lengths = (inputs_length, targets_length). Examples longer than that are truncated (prefix kept) or dropped per
  `overlength`; both are counted in `stats`. With concatenate=True (decoder-only / prefix-LM) a segment occupies
  len(inputs) + len(targets) slots of one row of length sum(lengths); otherwise (encoder-decoder) the inputs and
  targets of a row must fit their own lengths jointly. Options: those of ExamplePacker (buffer_size,
  max_segments_per_row, overlength, lookahead, secondary_weight, seed, concatenate, stats, prompt_slots: that many
  PROMPT_SLOT_ID placeholders put before every example's inputs, for prompt tuning).
  """
  packer = ExamplePacker(lengths, **options)
  for inputs, targets in examples:
    yield from packer.add(inputs, targets)
  yield from packer.flush()


class _BestFitPackingMixin:
  """Replaces seqio's next-fit packing by `pack_examples`; pack=False keeps the parent's plain padding."""

  def _init_packing(self, buffer_size, max_segments_per_row, overlength, lookahead, secondary_weight, seed,
                    read_batch_size, rows_per_yield, prompt_slots=0):
    if overlength not in OVERLENGTH_POLICIES:
      raise ValueError(f"{type(self).__name__}: overlength must be one of {OVERLENGTH_POLICIES}, got {overlength!r}")
    BestFitPacker((1,), buffer_size=buffer_size, max_segments_per_row=max_segments_per_row, lookahead=lookahead)
    # The keyword arguments of pack_examples; the native input pipeline packs with them too.
    self.packing_options = dict(buffer_size=buffer_size, max_segments_per_row=max_segments_per_row,
                                overlength=overlength, lookahead=lookahead, secondary_weight=secondary_weight,
                                seed=seed)
    if prompt_slots:
      self.packing_options["prompt_slots"] = int(prompt_slots)
    self._read_batch_size = read_batch_size
    self._rows_per_yield = rows_per_yield
    self.stats = PackingStats()  # replaced by a fresh object per converted dataset

  @staticmethod
  def _seqio_options(seqio_kwargs) -> dict:
    """seqio converter arguments: packing on; seqio's length check off while packing, since over-length examples
    must reach the packer, which truncates or drops and counts them (the packed rows' shapes are fixed by the
    output signature of _best_fit_pack)."""
    pack = seqio_kwargs.get("pack", True)
    return {"pack": True, "apply_length_check": not pack, **seqio_kwargs}

  def _best_fit_pack(self, ds, keys, lengths, concatenate, rows_to_features, model_lengths):
    stats = PackingStats()
    self.stats = stats
    options = dict(self.packing_options)
    source = ds.map(lambda ex: {k: ex[k] for k in keys}, num_parallel_calls=tf.data.AUTOTUNE)
    source = source.ragged_batch(self._read_batch_size).map(
        lambda b: {k: (b[k].flat_values, b[k].row_lengths()) for k in keys}).prefetch(2)

    def examples():
      for batch in source.as_numpy_iterator():
        columns = []
        for k in keys:
          values, row_lengths = batch[k]
          ends = np.cumsum(row_lengths).tolist()
          columns.append([values[e - n:e] for e, n in zip(ends, row_lengths.tolist())])
        if len(keys) == 1:  # targets only (LM): no inputs
          columns.insert(0, [values[:0]] * len(columns[0]))
        yield from zip(*columns)

    def feature_batches():
      buffered = []
      for row in pack_examples(examples(), lengths, concatenate=concatenate, stats=stats, **options):
        buffered.append(row)
        if len(buffered) == self._rows_per_yield:
          yield rows_to_features(buffered)
          buffered = []
      if buffered:
        yield rows_to_features(buffered)

    signature = {k: tf.TensorSpec([None, n], tf.int32) for k, n in model_lengths.items()}
    return tf.data.Dataset.from_generator(feature_batches, output_signature=signature).unbatch()


class PackedEncDecFeatureConverter(_BestFitPackingMixin, seqio.EncDecFeatureConverter):
  """seqio.EncDecFeatureConverter(pack=True) features, packed best-fit (see module docstring); `.stats` counts."""

  def __init__(self, *, buffer_size: int = 1000, max_segments_per_row: Optional[int] = None,
               overlength: str = "truncate", lookahead: int = 8, secondary_weight: float = 1.0, seed: int = 0,
               read_batch_size: int = 256, rows_per_yield: int = 32, prompt_slots: int = 0, **seqio_kwargs):
    super().__init__(**self._seqio_options(seqio_kwargs))
    self._init_packing(buffer_size, max_segments_per_row, overlength, lookahead, secondary_weight, seed,
                       read_batch_size, rows_per_yield, prompt_slots)

  def _convert_features(self, ds, task_feature_lengths):
    if not self.pack:
      return super()._convert_features(ds, task_feature_lengths)
    lengths = (task_feature_lengths["inputs"], task_feature_lengths["targets"])
    return self._best_fit_pack(ds, ("inputs", "targets"), lengths, False,
                               lambda rows: encdec_feature_batch(rows, lengths, self.bos_id),
                               self.get_model_feature_lengths(task_feature_lengths))


class PackedLMFeatureConverter(_BestFitPackingMixin, seqio.LMFeatureConverter):
  """seqio.LMFeatureConverter(pack=True) features (targets only), packed best-fit."""

  def __init__(self, *, buffer_size: int = 1000, max_segments_per_row: Optional[int] = None,
               overlength: str = "truncate", lookahead: int = 8, seed: int = 0, read_batch_size: int = 256,
               rows_per_yield: int = 32, **seqio_kwargs):
    super().__init__(**self._seqio_options(seqio_kwargs))
    self._init_packing(buffer_size, max_segments_per_row, overlength, lookahead, 0.0, seed, read_batch_size,
                       rows_per_yield)

  def _convert_features(self, ds, task_feature_lengths):
    if not self.pack:
      return super()._convert_features(ds, task_feature_lengths)
    length = task_feature_lengths["targets"]
    return self._best_fit_pack(ds, ("targets",), (0, length), True,
                               lambda rows: lm_feature_batch([[t for _, t in r] for r in rows], length, self.bos_id),
                               self.get_model_feature_lengths(task_feature_lengths))


class PackedPrefixLMFeatureConverter(_BestFitPackingMixin, seqio.PrefixLMFeatureConverter):
  """seqio.PrefixLMFeatureConverter(pack=True) features (inputs ++ targets per segment), packed best-fit."""

  def __init__(self, *, loss_on_targets_only: bool = True, buffer_size: int = 1000,
               max_segments_per_row: Optional[int] = None, overlength: str = "truncate", lookahead: int = 8,
               seed: int = 0, read_batch_size: int = 256, rows_per_yield: int = 32, prompt_slots: int = 0,
               **seqio_kwargs):
    super().__init__(loss_on_targets_only=loss_on_targets_only, **self._seqio_options(seqio_kwargs))
    self._init_packing(buffer_size, max_segments_per_row, overlength, lookahead, 0.0, seed, read_batch_size,
                       rows_per_yield, prompt_slots)

  def _convert_features(self, ds, task_feature_lengths):
    if not self.pack:
      return super()._convert_features(ds, task_feature_lengths)
    lengths = (task_feature_lengths["inputs"], task_feature_lengths["targets"])
    row_length = sum(lengths)
    return self._best_fit_pack(
        ds, ("inputs", "targets"), lengths, True,
        lambda rows: prefix_lm_feature_batch(rows, row_length, self.loss_on_targets_only, self.bos_id),
        self.get_model_feature_lengths(task_feature_lengths))


class PackedDecoderFeatureConverter(seqio.DecoderFeatureConverter):
  """seqio.DecoderFeatureConverter with best-fit packing: prefix-LM when "inputs" has a length, else LM.

  ("suffixes" still goes to seqio's own PrefixSuffixLM converter.) `.stats` is the last used converter's.
  """

  def __init__(self, *, loss_on_targets_only: bool = True, bos_id: int = 0, **packing_kwargs):
    super().__init__(loss_on_targets_only=loss_on_targets_only, pack=True, bos_id=bos_id)
    self.prefixlm_feature_converter = PackedPrefixLMFeatureConverter(
        loss_on_targets_only=loss_on_targets_only, bos_id=bos_id, **packing_kwargs)
    self.strictlm_feature_converter = PackedLMFeatureConverter(bos_id=bos_id, **packing_kwargs)
    self._last_used = self.strictlm_feature_converter

  def __call__(self, ds, task_feature_lengths):
    if "inputs" in task_feature_lengths and "suffixes" not in task_feature_lengths:
      self._last_used = self.prefixlm_feature_converter
    elif "suffixes" not in task_feature_lengths:
      self._last_used = self.strictlm_feature_converter
    return super().__call__(ds, task_feature_lengths)

  @property
  def stats(self) -> PackingStats:
    return self._last_used.stats
