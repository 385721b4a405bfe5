"""Packed rows -> seqio model features (numpy int32, batched over rows for speed).

A row is a list of examples (each a tuple of token arrays); the builders lay them out with segment ids and
per-segment positions, in the feature names seqio's EncDec / LM / PrefixLM converters produce.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _lay_out(rows: Sequence[Sequence[np.ndarray]], length: int):
  """Concatenates each row's segments -> (tokens, segment_ids, positions), each [len(rows), length] int32.

  Segment ids count 1, 2, ... per row (0 = padding); positions restart at 0 in every segment.
  """
  out = np.zeros((3, len(rows), length), np.int32)
  segments = [seg for row in rows for seg in row]
  seg_len = np.fromiter((len(seg) for seg in segments), np.int64, len(segments))
  if not seg_len.sum():
    return out[0], out[1], out[2]
  per_row = np.fromiter((len(row) for row in rows), np.int64, len(rows))
  first_seg_of_row = np.cumsum(per_row) - per_row
  seg_start = np.cumsum(seg_len) - seg_len  # in the flat concatenation of all segments
  seg_row = np.repeat(np.arange(len(rows)), per_row)
  seg_number = np.arange(len(segments)) - np.repeat(first_seg_of_row, per_row) + 1
  seg_offset = seg_row * length + seg_start - seg_start[first_seg_of_row][seg_row]  # flat [R*length] index
  token_seg = np.repeat(np.arange(len(segments)), seg_len)
  position = np.arange(int(seg_len.sum())) - seg_start[token_seg]
  destination = seg_offset[token_seg] + position
  tokens, segment_ids, positions = (x.reshape(-1) for x in out)
  tokens[destination] = np.concatenate(segments)
  segment_ids[destination] = seg_number[token_seg]
  positions[destination] = position
  return out[0], out[1], out[2]


def _autoregressive_inputs(targets: np.ndarray, segment_ids: np.ndarray, bos_id: int) -> np.ndarray:
  """seqio.utils.make_autoregressive_inputs, batched: shift right; bos wherever the segment id changes."""
  shifted = np.full_like(targets, bos_id)
  shifted[:, 1:] = targets[:, :-1]
  previous_ids = np.zeros_like(segment_ids)
  previous_ids[:, 1:] = segment_ids[:, :-1]
  return np.where(segment_ids != previous_ids, np.int32(bos_id), shifted).astype(np.int32)


def encdec_feature_batch(rows, lengths: tuple[int, int], bos_id: int = 0) -> dict[str, np.ndarray]:
  """seqio.EncDecFeatureConverter(pack=True) features [len(rows), length] for rows of (inputs, targets) segments."""
  enc_tokens, enc_ids, enc_pos = _lay_out([[i for i, _ in row] for row in rows], lengths[0])
  dec_tokens, dec_ids, dec_pos = _lay_out([[t for _, t in row] for row in rows], lengths[1])
  return {"encoder_input_tokens": enc_tokens, "encoder_segment_ids": enc_ids, "encoder_positions": enc_pos,
          "decoder_target_tokens": dec_tokens, "decoder_segment_ids": dec_ids, "decoder_positions": dec_pos,
          "decoder_input_tokens": _autoregressive_inputs(dec_tokens, dec_ids, bos_id),
          "decoder_loss_weights": (dec_ids > 0).astype(np.int32)}


def lm_feature_batch(rows, length: int, bos_id: int = 0) -> dict[str, np.ndarray]:
  """seqio.LMFeatureConverter(pack=True) features for rows of target-only segments."""
  tokens, ids, pos = _lay_out(rows, length)
  return {"decoder_target_tokens": tokens, "decoder_segment_ids": ids, "decoder_positions": pos,
          "decoder_input_tokens": _autoregressive_inputs(tokens, ids, bos_id),
          "decoder_loss_weights": (ids > 0).astype(np.int32)}


def prefix_lm_feature_batch(rows, length: int, loss_on_targets_only: bool = True, bos_id: int = 0):
  """seqio.PrefixLMFeatureConverter(pack=True) features: each segment is inputs ++ targets in one decoder row.

  decoder_causal_attention is 1 on the inputs of each segment plus one position (where the last input token is
  read and the first target predicted); the loss is on the targets only unless loss_on_targets_only=False.
  """
  features = lm_feature_batch([[np.concatenate([i, t]) for i, t in row] for row in rows], length, bos_id)
  input_width, _, _ = _lay_out([[np.full(len(i) + len(t), len(i)) for i, t in row] for row in rows], length)
  ids, pos = features["decoder_segment_ids"], features["decoder_positions"]
  features["decoder_causal_attention"] = ((ids > 0) & (pos <= input_width)).astype(np.int32)
  if loss_on_targets_only:
    features["decoder_loss_weights"] = ((ids > 0) & (pos >= input_width)).astype(np.int32)
  return features


def encdec_features(row, lengths: tuple[int, int], bos_id: int = 0) -> dict[str, np.ndarray]:
  """One row of (inputs, targets) segments -> seqio.EncDecFeatureConverter(pack=True) features."""
  return {k: v[0] for k, v in encdec_feature_batch([row], lengths, bos_id).items()}


def lm_features(row, length: int, bos_id: int = 0) -> dict[str, np.ndarray]:
  return {k: v[0] for k, v in lm_feature_batch([row], length, bos_id).items()}


def prefix_lm_features(row, length: int, loss_on_targets_only: bool = True, bos_id: int = 0):
  return {k: v[0] for k, v in prefix_lm_feature_batch([row], length, loss_on_targets_only, bos_id).items()}


# -- seqio FeatureConverters ----------------------------------------------------------------------------------
