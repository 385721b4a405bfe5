"""The PEFT benchmark suite (scripts/bench/peft.py): its synthetic packed batches and its quick path on tiny shapes."""
import math
import os
import sys

import numpy as np
import pytest

from flan_jax import models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import bench  # noqa: E402
from bench import peft as peft_bench  # noqa: E402

TINY_SHAPE = peft_bench.Shape(batch=2, lengths=(32, 16), segments=2, rounds=1, prompt_length=4)
TINY_CASES = [("t5_tiny", models.T5Config(vocab_size=61, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                                          num_encoder_layers=1, num_decoder_layers=1)),
              ("dec_tiny", models.DecoderConfig(vocab_size=61, emb_dim=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                                head_dim=8, mlp_dim=48))]
TINY_METHODS = ("lora", "prompt")


def test_synthetic_batches_are_packed_rows_with_per_segment_shifts():
  enc = peft_bench.encdec_batch(peft_bench.Shape(batch=2, lengths=(9, 7), segments=2), vocab_size=50)
  assert enc["encoder_segment_ids"][0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 0]
  assert enc["decoder_positions"][1].tolist() == [0, 1, 2, 0, 1, 2, 0]
  targets, inputs = enc["decoder_target_tokens"][0], enc["decoder_input_tokens"][0]
  assert inputs.tolist() == [0, targets[0], targets[1], 0, targets[3], targets[4], 0]  # BOS at each segment start
  assert enc["encoder_input_tokens"][0, -1] == 0 and np.all(enc["encoder_input_tokens"][0, :-1] > 0)
  dec = peft_bench.prefix_lm_batch(peft_bench.Shape(batch=1, lengths=(6, 2), segments=2), vocab_size=50)
  # Segments of 4: inputs are 6 // 2 = 3 tokens, attended bidirectionally up to the first target's position.
  assert dec["decoder_causal_attention"][0].tolist() == [1, 1, 1, 1, 1, 1, 1, 1]
  assert dec["decoder_loss_weights"][0].tolist() == [0, 0, 0, 1, 0, 0, 0, 1]


@pytest.fixture(scope="module")
def tiny_rows():
  # One method per family keeps the compiles (the cost here) to four.
  return [r for case, method in zip(TINY_CASES, TINY_METHODS)
          for r in peft_bench.run(quick=True, cases_override=[case], shape=TINY_SHAPE, methods=(method,))]


@pytest.mark.slow  # 9-12 s (four compiles) at load 2-3 on 2 cores
def test_quick_path_returns_well_formed_rows_for_every_case_method_and_figure(tiny_rows):
  names = {r["name"] for r in tiny_rows}
  for (label, _), method in zip(TINY_CASES, TINY_METHODS):
    prefix = f"{label}_b2_32_16"
    assert {f"{prefix}_full_s_per_step", f"{prefix}_full_step_memory_mb", f"{prefix}_full_opt_state_mb"} <= names
    for figure in ("s_per_step", "step_memory_mb", "temp_mb", "opt_state_mb", "trainable_params"):
      assert f"{prefix}_{method}_{figure} (vs full)" in names
  for r in tiny_rows:
    assert set(bench.ROW_KEYS) <= set(r) and r["suite"] == "peft"
    assert math.isfinite(r["ours"]) and r["ours"] > 0, r
    if r["baseline"] is not None:
      assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"])


@pytest.mark.slow  # 9-12 s (four compiles) at load 2-3 on 2 cores
def test_peft_trains_fewer_parameters_in_less_step_memory(tiny_rows):
  by_name = {r["name"]: r for r in tiny_rows}
  for (label, config), method in zip(TINY_CASES, TINY_METHODS):
    prefix = f"{label}_b2_32_16"
    trainable = by_name[f"{prefix}_{method}_trainable_params (vs full)"]
    assert trainable["baseline"] == models.count_params(config) and trainable["ratio"] < 0.5
    # No gradient or update of the base: the step's live buffers are below full finetuning's.
    assert by_name[f"{prefix}_{method}_step_memory_mb (vs full)"]["ratio"] < 1.0
  # 4 prompt vectors of width 32: 128 float32 second moments plus Adafactor's counters.
  assert by_name["dec_tiny_b2_32_16_prompt_opt_state_mb (vs full)"]["ours"] * 1e6 < 1000
