"""QLoRA (models/quant.py, peft/qlora.gin): qwix quantization of the frozen base, its error bounds, the quantized
frozen layout, a forward close to the full-precision base, and training that lowers the loss on tiny_test."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix")

from flan_jax import models  # noqa: E402
from flan_jax.cli import train as train_main  # noqa: E402
from flan_jax.models import quant  # noqa: E402
from flan_jax.utils import tree_paths  # noqa: E402
from flan_jax.train import (checkpointing, compile as compile_lib, optim, partitioning, peft_state,  # noqa: E402
                            restore, state as state_lib, step as step_lib)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin_configs", "runs", "tiny_test.gin")
QLORA = os.path.join(REPO, "gin_configs", "peft", "qlora.gin")
QUICK = ("--gin.EVAL_MIXTURE_OR_TASK_NAME=None", "--gin.BEST_METRIC=None", "--gin.train.peak_tflops=1.0",
         "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2", "--gin.LOG_PERIOD=1")


def _config(model_dir, *extra, peft_gin=QLORA, base=None):
    files = [f"--gin_file={TINY}"] + ([f"--gin_file={peft_gin}"] if peft_gin else [])
    base_flag = [f"--gin.INIT_CHECKPOINT='{base}'"] if base else []
    return train_main._configured([*files, f"--gin.MODEL_DIR='{model_dir}'", *QUICK, *base_flag, *extra])[1]


def _mode(mode):
    return f"--gin.PeftConfig.base_quantization='{mode}'"


def _per_element_scale(q, shape):
    return jnp.repeat(q["scale"], shape[0] // q["scale"].shape[0], axis=0)


@pytest.mark.parametrize("mode,dtype,scale_rows", [("int8", jnp.int8, 1), ("int4", jnp.int4, 4)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_integer_codes_are_within_half_a_scale_of_every_weight(mode, dtype, scale_rows, sign):
    """Absmax rounding: |dequant(q) - w| <= scale / 2 per element (the extreme element included, which rounds to
    +-(2^(b-1) - 0.5) and is clipped into the code range). int8 per output channel, int4 per 64 input rows."""
    w = sign * jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (256, 48))) * 0.05
    q = quant.quantize(w, mode)
    assert q["qvalue"].dtype == dtype and q["scale"].shape == (scale_rows, 48)
    err = jnp.abs(quant.dequantize(q) - w)
    assert bool(jnp.all(err <= _per_element_scale(q, w.shape) * (0.5 + 1e-5)))
    assert float(err.max()) > 0.4 * float(q["scale"].min())   # the bound is reached, not vacuous


def test_nf4_is_within_half_a_code_gap_of_every_weight():
    """NF4: indices into 16 NormalFloat codes in [-1, 1], scale = the group's absmax; the error is at most half the
    widest gap between neighbouring codes times the scale."""
    w = jax.random.normal(jax.random.PRNGKey(1), (128, 32)) * 0.05
    q = quant.quantize(w, "nf4")
    assert q["qvalue"].dtype == jnp.uint4 and q["scale"].shape == (2, 32)
    codes = quant.dequantize({"qvalue": jnp.arange(16, dtype=jnp.uint4)[:, None], "scale": jnp.ones((1, 1))})[:, 0]
    assert float(codes.min()) == -1.0 and float(codes.max()) == 1.0 and bool(jnp.all(jnp.diff(codes) > 0))
    half_gap = float(jnp.diff(codes).max()) / 2
    err = jnp.abs(quant.dequantize(q) - w)
    assert bool(jnp.all(err <= _per_element_scale(q, w.shape) * half_gap * (1 + 1e-5)))


def test_dequantize_in_the_compute_dtype_and_bytes_of_4_bit_codes():
    w = jax.random.normal(jax.random.PRNGKey(2), (128, 64)).astype(jnp.bfloat16)
    q = quant.quantize(w, "int4")
    assert q["scale"].dtype == jnp.bfloat16 and quant.dequantize(q, jnp.float32).dtype == jnp.float32
    assert quant.nbytes(q) == 128 * 64 // 2 + 2 * 64 * 2   # half a byte per code + bfloat16 scales


def _tiny(mode=None, method="lora"):
    cfg = _config("unused", peft_gin=None).model
    peft = models.PeftConfig(method=method, base_quantization=mode)
    return cfg, dataclasses.replace(cfg, peft=peft)


def _batch():
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 100, (2, 8))
    return {"encoder_input_tokens": rng.integers(2, 100, (2, 16)), "decoder_target_tokens": targets,
            "decoder_input_tokens": np.asarray(models.shift_right(jnp.asarray(targets))),
            "decoder_loss_weights": np.ones((2, 8), np.float32)}


@pytest.mark.parametrize("mode,tolerance", [("int8", 0.02), ("int4", 0.25), ("nf4", 0.2)])
def test_forward_on_the_quantized_base_is_close_to_full_precision(mode, tolerance):
    """Logits of the tiny T5 (random init) on its quantized base: RMS error relative to the logits' RMS below 2%
    (int8), 25% (int4), 20% (NF4); a LoRA with B = 0 on top changes nothing (the model starts as the quantized base)."""
    base_cfg, cfg = _tiny(mode)
    params = models.init_params(base_cfg, jax.random.PRNGKey(0))
    full = models.forward(base_cfg, params, _batch())
    quantized = quant.quantize_tree(params, mode)
    assert quant.is_quantized(quantized["encoder"]["layers_0"]["attention"]["query"]["kernel"])
    assert not quant.is_quantized(quantized["decoder"]["logits_dense"]["kernel"])
    logits = models.forward(base_cfg, quantized, _batch())
    rel = float(jnp.sqrt(jnp.mean((logits - full) ** 2)) / jnp.sqrt(jnp.mean(full ** 2)))
    assert 0 < rel < tolerance, rel
    with_lora = {**quantized, "peft": models.init_peft(cfg, jax.random.PRNGKey(1), quantized)}
    np.testing.assert_allclose(models.forward(cfg, with_lora, _batch()), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,bits", [("int8", 8), ("nf4", 4)])
def test_frozen_layout_holds_quantized_kernels_in_fewer_bytes(mode, bits):
    """state_layout's frozen base (what `flan-jax compile` counts per chip) carries the storage types: every
    quantized 2-D kernel in `bits`, the embeddings and logits_dense as before, and the whole base in fewer bytes."""
    lora_cfg = _config("unused", base="x", peft_gin=os.path.join(REPO, "gin_configs", "peft", "lora.gin"))
    qlora_cfg = _config("unused", _mode(mode), base="x")
    optimizer = optim.make_adafactor(qlora_cfg.adafactor, optim.make_schedule(qlora_cfg.schedule))
    mesh = partitioning.make_mesh(qlora_cfg.mesh)
    lora = state_lib.state_layout(lora_cfg.model, optimizer, lora_cfg.mesh, mesh)
    qlora = state_lib.state_layout(qlora_cfg.model, optimizer, qlora_cfg.mesh, mesh)
    kernel = qlora.frozen["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert jax.dtypes.itemsize_bits(kernel["qvalue"].dtype) == bits and kernel["scale"].dtype == jnp.float32
    assert qlora.frozen["decoder"]["logits_dense"]["kernel"].dtype == jnp.float32
    assert qlora.frozen["token_embedder"]["embedding"].dtype == jnp.float32
    full, small = compile_lib.per_chip_bytes(lora.frozen), compile_lib.per_chip_bytes(qlora.frozen)
    flat_full, flat_q = tree_paths.flatten(lora.frozen), tree_paths.flatten(qlora.frozen)
    paths = quant.targets(flat_full)
    assert len(paths) == 4 * 2 * 2 + 4 * 2 + 3 * 2 * 2   # tiny T5: 2+2 layers; q/k/v/o (+ cross), wi_0/wi_1/wo
    saved = 0
    for path in paths:
        q = {k: flat_q[f"{path}/{k}"] for k in ("qvalue", "scale")}
        assert quant.nbytes(q) <= quant.nbytes(flat_full[path]) * (bits / 32 + 1 / 16)   # codes + scales
        saved += quant.nbytes(flat_full[path]) - quant.nbytes(q)
    assert full - small == saved > 0
    assert qlora.abstract["params"] == lora.abstract["params"]   # the trainable LoRA factors are unchanged


def test_config_errors_name_their_key():
    with pytest.raises(ValueError, match=r"PeftConfig\.base_quantization='int3'"):
        models.PeftConfig(method="lora", base_quantization="int3")
    with pytest.raises(ValueError, match=r"PeftConfig\.base_quantization='nf4' needs method='lora'"):
        models.PeftConfig(method="prompt", base_quantization="nf4")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base run directory: a (random) tiny T5 train state saved as checkpoint_3."""
    d = str(tmp_path_factory.mktemp("base"))
    cfg = _config(d, peft_gin=None)
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    state = step_lib.init_state(cfg.model, optimizer, jax.random.PRNGKey(3))
    ckpt = checkpointing.Checkpointer(d, async_save=False)
    ckpt.save(3, state, {"step": 3, "seed": 0, "batches_consumed": 3})
    ckpt.close()
    return d, jax.device_get(state["params"])


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_qlora_steps_lower_the_loss_and_leave_the_quantized_base_unchanged(base_dir, tmp_path, mode):
    """The loop's PEFT step on a base loaded from INIT_CHECKPOINT and quantized there: 6 steps on one batch lower
    the loss, the frozen base stays bitwise the quantized checkpoint, and only the LoRA factors train."""
    cfg = _config(str(tmp_path / "run"), _mode(mode), "--gin.LEARNING_RATE=1e-2", base=base_dir[0])
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    mesh = partitioning.make_mesh(cfg.mesh)
    layout = state_lib.state_layout(cfg.model, optimizer, cfg.mesh, mesh)
    state, start, base = peft_state.init_or_restore(cfg, layout, optimizer, checkpointing.Checkpointer(cfg.model_dir))
    expected = quant.quantize_tree(base_dir[1], mode)
    assert jax.tree.structure(base.params) == jax.tree.structure(expected)
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(expected)))
    step = state_lib.jit_step(step_lib.make_train_step(cfg.model, optimizer, cfg.loss), layout,
                              partitioning.batch_sharding(mesh))
    losses = []
    for _ in range(6):
        state, metrics = step(state, _batch(), base.params)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    assert set(state["params"]) == {"peft"}
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(expected)))


def test_qlora_run_restores_on_the_quantized_base_and_merges_dequantized(base_dir, tmp_path):
    """A QLoRA run through the loop checkpoints the LoRA factors only; eval restores them on the base quantized
    again from the recorded reference, and --merge-peft folds them into the dequantized kernels, so the merged
    full-precision model computes what the QLoRA model computes."""
    model_dir = str(tmp_path / "qlora")
    flags = [f"--gin_file={TINY}", f"--gin_file={QLORA}", f"--gin.MODEL_DIR='{model_dir}'", *QUICK,
             f"--gin.INIT_CHECKPOINT='{base_dir[0]}'"]
    train_main.train_main(flags)
    cfg = _config(model_dir, base=base_dir[0])
    params, step = restore.restore_params(cfg, model_dir)
    assert step == 2 and quant.is_quantized(params["encoder"]["layers_0"]["attention"]["query"]["kernel"])
    base_cfg, merged, _ = restore.merged_params(cfg, model_dir)
    kernel = merged["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert base_cfg.peft is None and kernel.dtype == np.float32 and kernel.ndim == 2
    np.testing.assert_allclose(models.forward(base_cfg, merged, _batch()),
                               models.forward(cfg.model, jax.device_get(params), _batch()), rtol=2e-4, atol=2e-4)
