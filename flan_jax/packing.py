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
  - `encdec_features` / `lm_features` / `prefix_lm_features`: one row of segments -> seqio feature dict (numpy).
  - `PackedEncDecFeatureConverter`, `PackedLMFeatureConverter`, `PackedPrefixLMFeatureConverter`,
    `PackedDecoderFeatureConverter`: seqio FeatureConverters producing exactly the packed features of their seqio
    counterparts; `converter.stats` accumulates `PackingStats` as the dataset is consumed.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

OVERLENGTH_POLICIES = ("truncate", "drop")
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
    s0 = int(sizes[0])
    s1 = int(sizes[1]) if len(sizes) > 1 else 0
    if s0 > self.capacities[0] or s1 > self.capacities[1] or s0 < 0 or s1 < 0:
      raise ValueError(f"BestFitPacker.push: sizes {tuple(sizes)} do not fit capacities {self.capacities}")
    slot = self._free.pop()
    self._size0[slot] = s0
    self._size1[slot] = s1
    if self._jitter_pos == len(self._jitter):
      self._jitter = self._rng.random(4096) * 1e-7
      self._jitter_pos = 0
    self._score[slot] = s0 * self._weights[0] + s1 * self._weights[1] + self._jitter[self._jitter_pos]
    self._jitter_pos += 1
    self._payload[slot] = payload
    self._serial[slot] = self._next_serial
    self._fifo.append((slot, self._next_serial))
    self._next_serial += 1
    if not self._free:
      return [self._build_row()]
    return []

  def flush(self) -> Iterator[list[Any]]:
    while len(self):
      yield self._build_row()

  # -- internals -------------------------------------------------------------------------------------------

  def _take(self, slot: int) -> Any:
    payload = self._payload[slot]
    self._payload[slot] = None
    self._size0[slot] = _ABSENT
    self._size1[slot] = _ABSENT
    self._serial[slot] = 0
    self._free.append(slot)
    return payload

  def _greedy(self, room0: int, room1: int, room_segments: int):
    """Fills (room0, room1) greedily -> (slots, used0, used1, sizes0); picked slots stay hidden (size0 = ABSENT)."""
    picks, used0, used1 = [], 0, 0
    size0, size1, score = self._size0, self._size1, self._score
    while room_segments > 0 and room0 > 0:
      candidates = np.where((size0 <= room0) & (size1 <= room1), score, -1.0)
      j = int(candidates.argmax())
      if candidates[j] < 0:
        break
      s0, s1 = int(size0[j]), int(size1[j])
      picks.append((j, s0))
      size0[j] = _ABSENT
      room0 -= s0
      room1 -= s1
      used0 += s0
      used1 += s1
      room_segments -= 1
    return [j for j, _ in picks], used0, used1, [s for _, s in picks]

  def _restore(self, slots: list[int], sizes0: list[int]) -> None:
    for j, s0 in zip(slots, sizes0):
      self._size0[j] = s0

  def _build_row(self) -> list[Any]:
    while True:
      seed, serial = self._fifo.popleft()
      if self._serial[seed] == serial:
        break
    room0 = self.capacities[0] - int(self._size0[seed])
    room1 = self.capacities[1] - int(self._size1[seed])
    row = [self._take(seed)]
    room_segments = self.max_segments_per_row - 1
    if room_segments <= 0 or len(self) == 0:
      return row
    best = self._greedy(room0, room1, room_segments)
    if self.lookahead > 1 and best[1] < room0 and best[0]:
      self._restore(best[0], best[3])
      best = self._lookahead(room0, room1, room_segments)
    # Commit: `best` slots are currently hidden; take them out of the buffer.
    for j in best[0]:
      row.append(self._take(j))
    return row

  def _lookahead(self, room0: int, room1: int, room_segments: int):
    """Tries the top-k first completions; returns the best, with its slots hidden (all others visible)."""
    size0, size1, score = self._size0, self._size1, self._score
    candidates = np.where((size0 <= room0) & (size1 <= room1), score, -1.0)
    k = min(self.lookahead, len(candidates))
    top = np.argpartition(-candidates, k - 1)[:k]
    top = top[np.argsort(-candidates[top], kind="stable")]
    best, best_key = None, None
    for first in top:
      first = int(first)
      if candidates[first] < 0:
        break
      s0, s1 = int(size0[first]), int(size1[first])
      size0[first] = _ABSENT
      rest, used0, used1, rest_sizes = self._greedy(room0 - s0, room1 - s1, room_segments - 1)
      slots, sizes = [first] + rest, [s0] + rest_sizes
      self._restore(slots, sizes)
      key = (used0 + s0, used1 + s1)
      if best_key is None or key > best_key:
        best, best_key = (slots, key[0], key[1], sizes), key
        if key[0] == room0:
          break  # perfect encoder fill; nothing can beat it
    size0[best[0]] = _ABSENT  # never None: the first candidate is the greedy's own first pick
    return best


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


def pack_examples(
    examples: Iterable[tuple[np.ndarray, np.ndarray]],
    lengths: tuple[int, int],
    *,
    buffer_size: int = 1000,
    max_segments_per_row: Optional[int] = None,
    overlength: str = "truncate",
    lookahead: int = 8,
    secondary_weight: float = 1.0,
    seed: int = 0,
    concatenate: bool = False,
    stats: Optional[PackingStats] = None,
) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
  """Packs (inputs, targets) pairs into rows; yields each row as its list of (inputs, targets) segments.

  lengths = (inputs_length, targets_length). Examples longer than that are truncated (prefix kept) or dropped per
  `overlength`; both are counted in `stats`. With concatenate=True (decoder-only / prefix-LM) a segment occupies
  len(inputs) + len(targets) slots of one row of length sum(lengths); otherwise (encoder-decoder) the inputs and
  targets of a row must fit their own lengths jointly.
  """
  if overlength not in OVERLENGTH_POLICIES:
    raise ValueError(f"pack_examples: overlength must be one of {OVERLENGTH_POLICIES}, got {overlength!r}")
  lengths = (int(lengths[0]), int(lengths[1]))
  stats = stats if stats is not None else PackingStats()
  capacities = (sum(lengths),) if concatenate else lengths
  packer = BestFitPacker(
      capacities,
      buffer_size=buffer_size,
      max_segments_per_row=max_segments_per_row,
      lookahead=lookahead,
      secondary_weight=secondary_weight,
      seed=seed,
  )

  def account(row):
    stats.rows_out += 1
    stats.segments += len(row)
    stats.examples_packed += len(row)
    stats.max_segments_in_a_row = max(stats.max_segments_in_a_row, len(row))
    n_in = sum(len(i) for i, _ in row)
    n_tg = sum(len(t) for _, t in row)
    if concatenate:
      stats.decoder_tokens += n_in + n_tg
      stats.decoder_slots += capacities[0]
    else:
      stats.encoder_tokens += n_in
      stats.encoder_slots += lengths[0]
      stats.decoder_tokens += n_tg
      stats.decoder_slots += lengths[1]
    return row

  for inputs, targets in examples:
    stats.examples_in += 1
    kept = _truncate_or_drop(np.asarray(inputs), np.asarray(targets), lengths, overlength, stats)
    if kept is None:
      continue
    sizes = (len(kept[0]) + len(kept[1]),) if concatenate else (len(kept[0]), len(kept[1]))
    for row in packer.push(kept, sizes):
      yield account(row)
  for row in packer.flush():
    yield account(row)


# -- feature builders: one packed row -> seqio model features (numpy int32) --------------------------------------


def _segment_layout(seg_lengths: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Segment ids (1-based, 0 = padding) and positions (restart at 0 per segment) for consecutive segments."""
  seg_lengths = np.asarray(seg_lengths, np.int64)
  used = int(seg_lengths.sum())
  segment_ids = np.zeros(length, np.int32)
  positions = np.zeros(length, np.int32)
  segment_ids[:used] = np.repeat(np.arange(1, len(seg_lengths) + 1, dtype=np.int32), seg_lengths)
  starts = np.cumsum(seg_lengths) - seg_lengths
  positions[:used] = np.arange(used) - np.repeat(starts, seg_lengths)
  return segment_ids, positions


def _concat_padded(parts: Sequence[np.ndarray], length: int) -> np.ndarray:
  out = np.zeros(length, np.int32)
  if parts:
    flat = np.concatenate(parts)
    out[: len(flat)] = flat
  return out


def _shift_right_within_segments(tokens: np.ndarray, positions: np.ndarray, bos_id: int) -> np.ndarray:
  shifted = np.empty_like(tokens)
  shifted[0] = bos_id
  shifted[1:] = tokens[:-1]
  shifted[positions == 0] = bos_id  # each segment starts fresh (padding positions are 0 too: stays bos/pad)
  return shifted


def encdec_features(
    row: Sequence[tuple[np.ndarray, np.ndarray]], lengths: tuple[int, int], bos_id: int = 0
) -> dict[str, np.ndarray]:
  """seqio.EncDecFeatureConverter(pack=True) features for one row of (inputs, targets) segments."""
  enc_len, dec_len = lengths
  enc_seg, enc_pos = _segment_layout([len(i) for i, _ in row], enc_len)
  dec_seg, dec_pos = _segment_layout([len(t) for _, t in row], dec_len)
  dec_target = _concat_padded([t for _, t in row], dec_len)
  return {
      "encoder_input_tokens": _concat_padded([i for i, _ in row], enc_len),
      "encoder_segment_ids": enc_seg,
      "encoder_positions": enc_pos,
      "decoder_target_tokens": dec_target,
      "decoder_input_tokens": _shift_right_within_segments(dec_target, dec_pos, bos_id),
      "decoder_segment_ids": dec_seg,
      "decoder_positions": dec_pos,
      "decoder_loss_weights": (dec_seg > 0).astype(np.int32),
  }


def lm_features(row: Sequence[np.ndarray], length: int, bos_id: int = 0) -> dict[str, np.ndarray]:
  """seqio.LMFeatureConverter(pack=True) features for one row of target-only segments."""
  seg, pos = _segment_layout([len(t) for t in row], length)
  target = _concat_padded(list(row), length)
  return {
      "decoder_target_tokens": target,
      "decoder_input_tokens": _shift_right_within_segments(target, pos, bos_id),
      "decoder_loss_weights": (seg > 0).astype(np.int32),
      "decoder_segment_ids": seg,
      "decoder_positions": pos,
  }


def prefix_lm_features(
    row: Sequence[tuple[np.ndarray, np.ndarray]], length: int, loss_on_targets_only: bool = True, bos_id: int = 0
) -> dict[str, np.ndarray]:
  """seqio.PrefixLMFeatureConverter(pack=True) features: each segment is inputs ++ targets in one decoder row.

  decoder_causal_attention is 1 on the inputs of each segment plus one position (where the last input token is
  read and the first target is predicted); loss is on targets only unless loss_on_targets_only=False.
  """
  seg_lengths = [len(i) + len(t) for i, t in row]
  seg, pos = _segment_layout(seg_lengths, length)
  target = _concat_padded([np.concatenate([i, t]) for i, t in row], length)
  input_widths = np.zeros(length, np.int64)
  used = sum(seg_lengths)
  input_widths[:used] = np.repeat([len(i) for i, _ in row], seg_lengths)
  non_padding = seg > 0
  loss = non_padding & (pos >= input_widths) if loss_on_targets_only else non_padding
  return {
      "decoder_target_tokens": target,
      "decoder_input_tokens": _shift_right_within_segments(target, pos, bos_id),
      "decoder_loss_weights": loss.astype(np.int32),
      "decoder_segment_ids": seg,
      "decoder_positions": pos,
      "decoder_causal_attention": (non_padding & (pos < input_widths + 1)).astype(np.int32),
  }


# -- seqio FeatureConverters ----------------------------------------------------------------------------------


class _BestFitPackingMixin:
  """Replaces seqio's next-fit packing by `pack_examples`; pack=False keeps the parent's plain padding."""

  def _init_packing(self, buffer_size, max_segments_per_row, overlength, lookahead, secondary_weight, seed,
                    read_batch_size, rows_per_yield):
    if overlength not in OVERLENGTH_POLICIES:
      raise ValueError(f"{type(self).__name__}: overlength must be one of {OVERLENGTH_POLICIES}, got {overlength!r}")
    BestFitPacker((1,), buffer_size=buffer_size, max_segments_per_row=max_segments_per_row, lookahead=lookahead)
    self._packing_options = dict(buffer_size=buffer_size, max_segments_per_row=max_segments_per_row,
                                 overlength=overlength, lookahead=lookahead, secondary_weight=secondary_weight,
                                 seed=seed)
    self._read_batch_size = read_batch_size
    self._rows_per_yield = rows_per_yield
    self.stats = PackingStats()  # replaced by a fresh object per converted dataset

  def _validate_dataset(self, ds, expected_features, expected_lengths, strict, error_label):
    if self.pack and error_label == "input_validation":
      expected_lengths = {}  # over-length examples reach the packer, which truncates or drops and counts them
    return super()._validate_dataset(ds, expected_features, expected_lengths, strict, error_label)

  def _best_fit_pack(self, ds, keys, lengths, concatenate, row_to_features, model_lengths):
    stats = PackingStats()
    self.stats = stats
    options = dict(self._packing_options)
    source = ds.map(lambda ex: {k: ex[k] for k in keys}, num_parallel_calls=tf.data.AUTOTUNE)
    source = source.ragged_batch(self._read_batch_size).map(
        lambda b: {k: (b[k].flat_values, b[k].row_lengths()) for k in keys}).prefetch(2)

    def examples():
      for batch in source.as_numpy_iterator():
        columns = []
        for k in keys:
          values, row_lengths = batch[k]
          columns.append(np.split(values, np.cumsum(row_lengths)[:-1]))
        if len(keys) == 1:  # targets only (LM): no inputs
          columns.insert(0, [values[:0]] * len(columns[0]))
        yield from zip(*columns)

    def feature_batches():
      buffered = []
      for row in pack_examples(examples(), lengths, concatenate=concatenate, stats=stats, **options):
        buffered.append(row_to_features(row))
        if len(buffered) == self._rows_per_yield:
          yield {k: np.stack([r[k] for r in buffered]) for k in model_lengths}
          buffered = []
      if buffered:
        yield {k: np.stack([r[k] for r in buffered]) for k in model_lengths}

    signature = {k: tf.TensorSpec([None, n], tf.int32) for k, n in model_lengths.items()}
    return tf.data.Dataset.from_generator(feature_batches, output_signature=signature).unbatch()


class PackedEncDecFeatureConverter(_BestFitPackingMixin, seqio.EncDecFeatureConverter):
  """seqio.EncDecFeatureConverter(pack=True) features, packed best-fit (see module docstring); `.stats` counts."""

  def __init__(self, *, buffer_size: int = 1000, max_segments_per_row: Optional[int] = None,
               overlength: str = "truncate", lookahead: int = 8, secondary_weight: float = 1.0, seed: int = 0,
               read_batch_size: int = 256, rows_per_yield: int = 32, **seqio_kwargs):
    super().__init__(**{"pack": True, **seqio_kwargs})
    self._init_packing(buffer_size, max_segments_per_row, overlength, lookahead, secondary_weight, seed,
                       read_batch_size, rows_per_yield)

  def _convert_features(self, ds, task_feature_lengths):
    if not self.pack:
      return super()._convert_features(ds, task_feature_lengths)
    lengths = (task_feature_lengths["inputs"], task_feature_lengths["targets"])
    return self._best_fit_pack(ds, ("inputs", "targets"), lengths, False,
                               lambda row: encdec_features(row, lengths, self.bos_id),
                               self.get_model_feature_lengths(task_feature_lengths))


class PackedLMFeatureConverter(_BestFitPackingMixin, seqio.LMFeatureConverter):
  """seqio.LMFeatureConverter(pack=True) features (targets only), packed best-fit."""

  def __init__(self, *, buffer_size: int = 1000, max_segments_per_row: Optional[int] = None,
               overlength: str = "truncate", lookahead: int = 8, seed: int = 0, read_batch_size: int = 256,
               rows_per_yield: int = 32, **seqio_kwargs):
    super().__init__(**{"pack": True, **seqio_kwargs})
    self._init_packing(buffer_size, max_segments_per_row, overlength, lookahead, 0.0, seed, read_batch_size,
                       rows_per_yield)

  def _convert_features(self, ds, task_feature_lengths):
    if not self.pack:
      return super()._convert_features(ds, task_feature_lengths)
    length = task_feature_lengths["targets"]
    return self._best_fit_pack(ds, ("targets",), (0, length), True,
                               lambda row: lm_features([t for _, t in row], length, self.bos_id),
                               self.get_model_feature_lengths(task_feature_lengths))


class PackedPrefixLMFeatureConverter(_BestFitPackingMixin, seqio.PrefixLMFeatureConverter):
  """seqio.PrefixLMFeatureConverter(pack=True) features (inputs ++ targets per segment), packed best-fit."""

  def __init__(self, *, loss_on_targets_only: bool = True, buffer_size: int = 1000,
               max_segments_per_row: Optional[int] = None, overlength: str = "truncate", lookahead: int = 8,
               seed: int = 0, read_batch_size: int = 256, rows_per_yield: int = 32, **seqio_kwargs):
    super().__init__(loss_on_targets_only=loss_on_targets_only, **{"pack": True, **seqio_kwargs})
    self._init_packing(buffer_size, max_segments_per_row, overlength, lookahead, 0.0, seed, read_batch_size,
                       rows_per_yield)

  def _convert_features(self, ds, task_feature_lengths):
    if not self.pack:
      return super()._convert_features(ds, task_feature_lengths)
    lengths = (task_feature_lengths["inputs"], task_feature_lengths["targets"])
    row_length = sum(lengths)
    return self._best_fit_pack(
        ds, ("inputs", "targets"), lengths, True,
        lambda row: prefix_lm_features(row, row_length, self.loss_on_targets_only, self.bos_id),
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
