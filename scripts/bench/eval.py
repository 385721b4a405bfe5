"""Eval suite: rank-classification examples/s, ours (encode each input once, score its options in one decoder batch)
vs naive per-option scoring (every (input, option) pair re-encodes its input), on the same model and data.

Data: 64 examples x 4 options (GPU: 512 examples), inputs on the Flan-like length stream (lognormal mean 190, sigma
0.5) 0-padded to 256 tokens, options of 1-8 tokens + EOS padded to 16; scored 16 examples per call (64 on GPU).
Model: T5 1.1 small shape (vocab 32128), float32, random weights (--quick: 2 encoder + 2 decoder layers and 32
examples; GPU: base in bfloat16). Both scorers are jitted and warmed up; they alternate for 3 rounds (quick 2) and
each keeps its fastest round.
The two must agree: the console prints the largest score difference and the argmax agreement.
"""
from __future__ import annotations

import numpy as np

from bench import common, row

SUITE = "eval"
INPUT_LENGTH = 256
OPTION_LENGTH = 16
NUM_OPTIONS = 4


def make_data(num_examples: int, vocab_limit: int, seed: int = 0):
  """(inputs [N, 256], options [N, 4, 16]) int32 arrays; every sequence ends with EOS (1), 0 = padding."""
  rng = np.random.default_rng(seed)
  lens = common.lognormal_lengths(num_examples, common.FLAN_LIKE_MEAN_INPUTS, common.FLAN_LIKE_SIGMA, INPUT_LENGTH,
                                  rng)
  inputs = np.zeros((num_examples, INPUT_LENGTH), np.int32)
  options = np.zeros((num_examples, NUM_OPTIONS, OPTION_LENGTH), np.int32)
  for n, length in enumerate(lens):
    inputs[n, :length] = rng.integers(3, vocab_limit, length)
    inputs[n, length - 1] = 1
    for k in range(NUM_OPTIONS):
      option_len = int(rng.integers(1, 9))
      options[n, k, :option_len] = rng.integers(3, vocab_limit, option_len)
      options[n, k, option_len] = 1
  return inputs, options


def score_all(fn, config, params, inputs, options, batch_size):
  """Scores all examples in batches with `fn` (a jitted scorer); returns [N, K] numpy scores (blocking)."""
  import jax

  out = [fn(config, params, inputs[i:i + batch_size], options[i:i + batch_size])
         for i in range(0, len(inputs), batch_size)]
  return np.concatenate([np.asarray(jax.block_until_ready(o)) for o in out])


def run(quick: bool) -> list[dict]:
  import jax

  from flan_jax.evaluation import scoring
  from flan_jax import models as model_api

  on_gpu = common.platform_name() == "gpu"
  if on_gpu:
    label, config, num_examples, batch_size = "t5_base", model_api.T5Config.preset("base", dtype="bfloat16"), 512, 64
  elif quick:
    label, config = "t5_small_2l", model_api.T5Config.preset("small", num_encoder_layers=2, num_decoder_layers=2)
    num_examples, batch_size = 32, 16
  else:
    label, config, num_examples, batch_size = "t5_small", model_api.T5Config.preset("small"), 64, 16
  params = model_api.init_params(config, jax.random.PRNGKey(0))
  inputs, options = make_data(num_examples, min(config.vocab_size, 32000))

  candidates = {
      "ours": lambda: score_all(scoring.rank_classification_scores, config, params, inputs, options, batch_size),
      "naive": lambda: score_all(scoring.rank_classification_scores_naive, config, params, inputs, options,
                                 batch_size),
  }
  ours_scores, naive_scores = candidates["ours"](), candidates["naive"]()  # compile + warm-up
  diff = float(np.max(np.abs(ours_scores - naive_scores)))
  agree = float(np.mean(ours_scores.argmax(-1) == naive_scores.argmax(-1)))
  seconds = common.interleaved(candidates, repeats=2 if quick else 3)
  print(f"[eval] {label}: s per pass min/median/max ours {common.spread(seconds['ours'])}, naive "
        f"{common.spread(seconds['naive'])}; max |score diff| {diff:.2e}, argmax agreement {agree:.3f}; "
        f"load {common.load_average()}", flush=True)
  device = "gpu" if on_gpu else "cpu"
  tag = "bf16" if config.dtype == "bfloat16" else "fp32"
  name = f"{label}_{device}_{tag}_rank_classification_{num_examples}x{NUM_OPTIONS}_examples_per_s"
  return [row(SUITE, name, num_examples / common.best(seconds["ours"]),
              num_examples / common.best(seconds["naive"]), "examples/s")]
