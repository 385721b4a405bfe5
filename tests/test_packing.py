"""Tests for flan_jax.packing: the numpy core, the feature builders, and the seqio feature converters."""
import collections
import itertools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import seqio
import tensorflow as tf

from flan_jax import packing
from flan_jax.packing import (
    BestFitPacker,
    PackedDecoderFeatureConverter,
    PackedEncDecFeatureConverter,
    PackingStats,
    encdec_features,
    pack_examples,
)


def random_examples(n, mean_in=40, mean_tg=8, seed=0, max_in=None, max_tg=None):
  """Distinct (inputs, targets) pairs with lognormal lengths; token ids in [3, 259) (no pad, like ByteVocabulary)."""
  rng = np.random.default_rng(seed)
  lens_in = np.maximum(1, rng.lognormal(np.log(mean_in), 0.7, n).astype(int))
  lens_tg = np.maximum(1, rng.lognormal(np.log(mean_tg), 0.7, n).astype(int))
  if max_in:
    lens_in = np.minimum(lens_in, max_in)
  if max_tg:
    lens_tg = np.minimum(lens_tg, max_tg)
  return [(rng.integers(3, 259, a).astype(np.int32), rng.integers(3, 259, b).astype(np.int32))
          for a, b in zip(lens_in, lens_tg)]


def as_key(inputs, targets):
  return (tuple(int(x) for x in inputs), tuple(int(x) for x in targets))


def multiset(pairs):
  return collections.Counter(as_key(i, t) for i, t in pairs)


def unpack_encdec(features):
  """Recovers the (inputs, targets) segments of one packed enc-dec row from its features."""
  pairs = []
  for seg in range(1, int(max(features["encoder_segment_ids"].max(), features["decoder_segment_ids"].max())) + 1):
    pairs.append((features["encoder_input_tokens"][features["encoder_segment_ids"] == seg],
                  features["decoder_target_tokens"][features["decoder_segment_ids"] == seg]))
  return pairs


# -- core ---------------------------------------------------------------------------------------------------------


def test_every_example_packed_exactly_once_with_counted_truncation():
  examples = random_examples(1500, mean_in=60, mean_tg=12, seed=1)
  lengths = (128, 32)
  stats = PackingStats()
  rows = list(pack_examples(examples, lengths, buffer_size=200, stats=stats))
  expected = multiset((i[:128], t[:32]) for i, t in examples)
  assert multiset(pair for row in rows for pair in row) == expected
  n_over = sum(len(i) > 128 or len(t) > 32 for i, t in examples)
  assert n_over > 0 and stats.truncated == n_over and stats.dropped_overlength == 0
  assert stats.examples_in == stats.examples_packed == len(examples)
  assert stats.rows_out == len(rows) and stats.segments == len(examples)
  for row in rows:
    assert sum(len(i) for i, _ in row) <= 128 and sum(len(t) for _, t in row) <= 32


def test_drop_policy_drops_and_counts_overlength():
  examples = random_examples(800, mean_in=60, mean_tg=12, seed=2)
  stats = PackingStats()
  rows = list(pack_examples(examples, (128, 32), overlength="drop", stats=stats))
  kept = [(i, t) for i, t in examples if len(i) <= 128 and len(t) <= 32]
  assert multiset(pair for row in rows for pair in row) == multiset(kept)
  assert stats.dropped_overlength == len(examples) - len(kept) > 0 and stats.truncated == 0
  with pytest.raises(ValueError, match="overlength"):
    list(pack_examples(examples, (128, 32), overlength="cut"))


def test_empty_examples_are_counted_not_packed():
  empty = np.zeros(0, np.int32)
  stats = PackingStats()
  rows = list(pack_examples([(empty, empty), (np.array([5, 1]), empty), (empty, np.array([4, 1]))], (8, 4),
                            stats=stats))
  assert stats.dropped_empty == 1 and stats.examples_packed == 2 and sum(len(r) for r in rows) == 2


def test_max_segments_per_row_cap():
  examples = random_examples(600, mean_in=4, mean_tg=2, seed=3)
  stats = PackingStats()
  rows = list(pack_examples(examples, (512, 128), max_segments_per_row=5, stats=stats))
  assert max(len(r) for r in rows) == 5 and stats.max_segments_in_a_row == 5
  assert len(rows) >= len(examples) / 5
  uncapped = list(pack_examples(examples, (512, 128)))
  assert max(len(r) for r in uncapped) > 5


def test_deterministic_given_seed_and_seed_matters():
  # Equal lengths everywhere: only the seeded tie-break decides which example fills which row.
  rng = np.random.default_rng(0)
  examples = [(rng.integers(3, 259, 10).astype(np.int32), rng.integers(3, 259, 3).astype(np.int32))
              for _ in range(300)]

  def run(seed):
    return [[as_key(*pair) for pair in row] for row in pack_examples(examples, (40, 12), buffer_size=50, seed=seed)]

  assert run(7) == run(7)
  assert run(7) != run(8)


def test_rows_follow_input_order_with_bounded_wait():
  examples = random_examples(3000, mean_in=60, mean_tg=10, seed=4, max_in=256, max_tg=64)
  index = {as_key(*ex): n for n, ex in enumerate(examples)}
  buffer_size = 100
  rows = list(pack_examples(examples, (256, 64), buffer_size=buffer_size))
  row_of = {}
  for r, row in enumerate(rows):
    for pair in row:
      row_of[index[as_key(*pair)]] = r
  # Each row consumes the oldest buffered example, so nothing waits more than buffer_size rows after arrival.
  rows_per_example = len(rows) / len(examples)
  for n, r in row_of.items():
    assert r <= n * rows_per_example + buffer_size + 5
  # Short examples are not held back to the end (or clustered at the start): compare mean relative output rank.
  lens = np.array([len(i) for i, _ in examples])
  rel = np.array([row_of[n] / len(rows) - n / len(examples) for n in range(len(examples))])
  short, long_ = rel[lens <= np.quantile(lens, 0.25)], rel[lens >= np.quantile(lens, 0.75)]
  assert abs(short.mean() - long_.mean()) < 0.03


def test_streaming_with_bounded_buffer_on_infinite_input():
  rng = np.random.default_rng(5)
  endless = ((rng.integers(3, 259, 20).astype(np.int32), rng.integers(3, 259, 5).astype(np.int32))
             for _ in itertools.count())
  packer_rows = list(itertools.islice(pack_examples(endless, (100, 25), buffer_size=64), 10))
  assert len(packer_rows) == 10 and all(len(r) == 5 for r in packer_rows)  # 5 x 20 fills 100 exactly


def test_best_fit_beats_seqio_next_fit_fill():
  examples = random_examples(3000, mean_in=190, mean_tg=12, seed=6, max_in=1024, max_tg=256)
  stats = PackingStats()
  ours = list(pack_examples(examples, (1024, 256), stats=stats))
  # Next-fit reference (seqio's rule, ignoring its per-window flush, which only adds rows).
  rows, room_in, room_tg = 0, -1, -1
  for i, t in examples:
    if len(i) > room_in or len(t) > room_tg:
      rows, room_in, room_tg = rows + 1, 1024, 256
    room_in, room_tg = room_in - len(i), room_tg - len(t)
  assert len(ours) < rows
  assert stats.encoder_fill > 0.97


def test_packer_validates_arguments():
  with pytest.raises(ValueError, match="capacities"):
    BestFitPacker((0, 5))
  with pytest.raises(ValueError, match="max_segments_per_row"):
    BestFitPacker((5, 5), max_segments_per_row=0)
  with pytest.raises(ValueError, match="do not fit"):
    BestFitPacker((5, 5)).push("x", (6, 1))


# -- feature builders -------------------------------------------------------------------------------------------


def test_encdec_features_shift_positions_and_segments():
  examples = random_examples(400, mean_in=30, mean_tg=6, seed=7, max_in=64, max_tg=16)
  recovered = []
  for row in pack_examples(examples, (64, 16), buffer_size=50):
    f = encdec_features(row, (64, 16))
    assert all(v.dtype == np.int32 for v in f.values())
    dec_seg, dec_pos = f["decoder_segment_ids"], f["decoder_positions"]
    for seg in range(1, len(row) + 1):
      for side in ("encoder", "decoder"):
        pos = f[f"{side}_positions"][f[f"{side}_segment_ids"] == seg]
        np.testing.assert_array_equal(pos, np.arange(len(pos)))  # restart at 0 in every segment
      tgt = f["decoder_target_tokens"][dec_seg == seg]
      np.testing.assert_array_equal(f["decoder_input_tokens"][dec_seg == seg], np.concatenate([[0], tgt[:-1]]))
    pad = dec_seg == 0
    assert not f["decoder_input_tokens"][pad].any() and not dec_pos[pad].any()
    np.testing.assert_array_equal(f["decoder_loss_weights"], (~pad).astype(np.int32))
    recovered.extend(unpack_encdec(f))
  # Same segment id on both sides belongs to the same example.
  assert multiset(recovered) == multiset(examples)


def test_lm_and_prefix_lm_features_match_seqio_docstring_examples():
  row = [(np.array([7, 8, 5, 1]), np.array([3, 9, 1])), (np.array([8, 4, 9, 3, 1]), np.array([4, 1]))]
  f = packing.prefix_lm_features(row, 15)
  np.testing.assert_array_equal(f["decoder_causal_attention"], [1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(f["decoder_loss_weights"], [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(f["decoder_input_tokens"], [0, 7, 8, 5, 1, 3, 9, 0, 8, 4, 9, 3, 1, 4, 0])
  assert packing.prefix_lm_features(row, 15, loss_on_targets_only=False)["decoder_loss_weights"].sum() == 14
  g = packing.lm_features([np.array([3, 9, 1]), np.array([4, 1])], 6)
  np.testing.assert_array_equal(g["decoder_input_tokens"], [0, 3, 9, 0, 4, 0])
  np.testing.assert_array_equal(g["decoder_segment_ids"], [1, 1, 1, 2, 2, 0])


# -- seqio integration ------------------------------------------------------------------------------------------


def _tf_dataset(examples):
  return tf.data.Dataset.from_generator(
      lambda: ({"inputs": i, "targets": t} for i, t in examples),
      output_signature={"inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)})


@pytest.fixture(scope="module")
def tiny_task():
  vocab = seqio.ByteVocabulary()
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]

  def source_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    rng = np.random.default_rng(0)
    rows = [(" ".join(rng.choice(words, rng.integers(1, 12))), str(rng.choice(words))) for _ in range(120)]
    return tf.data.Dataset.from_tensor_slices({"inputs": [r[0] for r in rows], "targets": [r[1] for r in rows]})

  name = "test_packing_tiny_task"
  seqio.TaskRegistry.remove(name)
  features = {k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")}
  seqio.TaskRegistry.add(name, seqio.FunctionDataSource(source_fn, splits=["train"]),
                         preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
                         output_features=features)
  yield name
  seqio.TaskRegistry.remove(name)


def test_converter_in_seqio_get_dataset_matches_encdec_features(tiny_task):
  lengths = {"inputs": 64, "targets": 16}
  ref_conv = seqio.EncDecFeatureConverter(pack=True)
  conv = PackedEncDecFeatureConverter(buffer_size=50)
  ours = seqio.get_dataset(tiny_task, lengths, feature_converter=conv, shuffle=False)
  ref = seqio.get_dataset(tiny_task, lengths, feature_converter=ref_conv, shuffle=False)
  assert ours.element_spec == ref.element_spec  # same keys, dtypes (int32), static shapes
  ours_rows, ref_rows = list(ours.as_numpy_iterator()), list(ref.as_numpy_iterator())
  recovered = [p for f in ours_rows for p in unpack_encdec(f)]
  assert multiset(recovered) == multiset(p for f in ref_rows for p in unpack_encdec(f))
  assert conv.stats.examples_in == len(recovered) == 120 and conv.stats.rows_out == len(ours_rows)
  assert len(ours_rows) <= len(ref_rows)
  assert conv.stats.encoder_fill == pytest.approx(np.mean([(f["encoder_segment_ids"] > 0).mean() for f in ours_rows]))


def test_converter_counts_overlength_it_receives(tiny_task):
  # With trim_output_features=False seqio passes over-length examples through; seqio's own converter would fail.
  lengths = {"inputs": 24, "targets": 8}
  for policy in ("drop", "truncate"):
    conv = PackedEncDecFeatureConverter(overlength=policy)
    ds = seqio.get_dataset(tiny_task, lengths, feature_converter=conv, shuffle=False, trim_output_features=False)
    rows = list(ds.as_numpy_iterator())
    n_segments = sum(len(unpack_encdec(f)) for f in rows)
    counted = conv.stats.dropped_overlength if policy == "drop" else conv.stats.truncated
    assert counted > 0 and conv.stats.examples_in == 120
    assert n_segments == 120 - conv.stats.dropped_overlength


def test_converter_pack_false_falls_back_to_padding():
  examples = random_examples(5, mean_in=6, mean_tg=3, seed=8, max_in=16, max_tg=8)
  rows = list(PackedEncDecFeatureConverter(pack=False)(_tf_dataset(examples), {"inputs": 16, "targets": 8})
              .as_numpy_iterator())
  assert len(rows) == 5 and "encoder_segment_ids" not in rows[0]


@pytest.mark.parametrize("with_inputs", [True, False])
def test_decoder_converter_matches_seqio_feature_spec(with_inputs):
  examples = random_examples(200, mean_in=10, mean_tg=5, seed=9, max_in=32, max_tg=16)
  lengths = {"inputs": 32, "targets": 16} if with_inputs else {"targets": 16}
  ds = _tf_dataset(examples)
  if not with_inputs:
    ds = ds.map(lambda ex: {"targets": ex["targets"]})
  conv = PackedDecoderFeatureConverter(buffer_size=40)
  ours = conv(ds, lengths)
  assert ours.element_spec == seqio.DecoderFeatureConverter(pack=True)(ds, lengths).element_spec
  rows = list(ours.as_numpy_iterator())
  row_length = sum(lengths.values())
  got = collections.Counter()
  for f in rows:
    for seg in range(1, f["decoder_segment_ids"].max() + 1):
      mask = f["decoder_segment_ids"] == seg
      got[tuple(f["decoder_target_tokens"][mask])] += 1
      if with_inputs:  # loss exactly on the targets part; causal attention covers inputs + 1
        n_targets = int(f["decoder_loss_weights"][mask].sum())
        assert f["decoder_causal_attention"][mask].sum() == mask.sum() - n_targets + 1
  want = collections.Counter(tuple(np.concatenate([i, t]) if with_inputs else t) for i, t in examples)
  assert got == want and all(f["decoder_target_tokens"].shape == (row_length,) for f in rows)
  assert conv.stats.examples_in == 200 and conv.stats.decoder_fill > 0.9


@pytest.mark.parametrize("bos_id", [0, 3])
def test_encdec_converter_equals_seqio_when_packings_coincide(bos_id):
  # Two examples that share one row: both packers must then emit identical features (bos at each segment start
  # and at the first padding position, exactly like seqio.utils.make_autoregressive_inputs).
  examples = [(np.array([7, 8, 5, 1], np.int32), np.array([3, 9, 1], np.int32)),
              (np.array([8, 4, 9, 3, 1], np.int32), np.array([4, 1], np.int32))]
  lengths = {"inputs": 10, "targets": 7}
  ours = list(PackedEncDecFeatureConverter(bos_id=bos_id)(_tf_dataset(examples), lengths).as_numpy_iterator())
  ref = list(seqio.EncDecFeatureConverter(pack=True, bos_id=bos_id)(_tf_dataset(examples), lengths)
             .as_numpy_iterator())
  assert len(ours) == len(ref) == 1 and ours[0].keys() == ref[0].keys()
  for key in ref[0]:
    np.testing.assert_array_equal(ours[0][key], ref[0][key], err_msg=key)


def test_stats_accumulate_as_the_dataset_is_consumed():
  examples = random_examples(3000, mean_in=40, mean_tg=8, seed=10, max_in=128, max_tg=32)
  conv = PackedEncDecFeatureConverter(buffer_size=100, read_batch_size=64, rows_per_yield=4)
  iterator = conv(_tf_dataset(examples), {"inputs": 128, "targets": 32}).as_numpy_iterator()
  for _ in range(5):
    next(iterator)
  partial = conv.stats.examples_in
  assert 0 < partial < len(examples)  # streaming: only what was needed (plus prefetch) has been read
  rest = sum(1 for _ in iterator)
  assert conv.stats.examples_in == len(examples) and conv.stats.rows_out == rest + 5
  assert set(conv.stats.as_dict()) >= {"encoder_fill", "decoder_fill", "segments_per_row", "truncated", "dropped_overlength"}
