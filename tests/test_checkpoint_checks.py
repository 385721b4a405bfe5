"""Every checkpoint import checks each tensor against the model config and names the first mismatch in one line:
HF decoder (Llama/Qwen2/Gemma) and HF T5 directories, T5X checkpoints and our own training checkpoints."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from flan_jax import models
from flan_jax.checkpoints import hf, hf_decoder, param_check, run_dir, t5x

DECODER = models.DecoderConfig(vocab_size=64, emb_dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                               mlp_dim=32)
T5 = models.T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=2,
                     num_decoder_layers=1)


def _params(config, seed=0):
    """Random parameters of the config's shapes and dtype (no model code runs)."""
    rng = np.random.default_rng(seed)
    return t5x.unflatten({p: rng.standard_normal(shape).astype(dtype)
                          for p, (shape, dtype) in param_check.expected_specs(config).items()})


def _edit_config_json(path, **changes):
    file = os.path.join(path, 'config.json')
    with open(file) as f:
        config = json.load(f)
    with open(file, 'w') as f:
        json.dump({**config, **changes}, f)


def _one_line(err) -> str:
    message = str(err.value)
    assert '\n' not in message, message
    return message


@pytest.fixture()
def decoder_dir(tmp_path):
    return hf_decoder.export(DECODER, _params(DECODER), str(tmp_path / 'decoder'))


@pytest.fixture()
def t5_dir(tmp_path):
    return hf.export_hf(T5, _params(T5), str(tmp_path / 't5'))


def test_hf_decoder_round_trip_passes_the_check(decoder_dir):
    config, params = hf.load_hf(decoder_dir)
    assert config.mlp_dim == DECODER.mlp_dim and config.num_layers == DECODER.num_layers


def test_hf_decoder_wrong_mlp_dim_names_parameter_shapes_and_key(decoder_dir):
    _edit_config_json(decoder_dir, intermediate_size=48)
    with pytest.raises(ValueError) as err:
        hf.load_hf(decoder_dir)
    message = _one_line(err)
    assert 'layers_0/mlp/wi_0/kernel: got (16, 32), expected (16, 48)' in message
    assert 'set intermediate_size=32' in message


def test_hf_decoder_wrong_num_layers_names_missing_weight_and_key(decoder_dir):
    _edit_config_json(decoder_dir, num_hidden_layers=3)
    with pytest.raises(ValueError) as err:
        hf.load_hf(decoder_dir)
    message = _one_line(err)
    assert 'model.layers.2.' in message and 'missing' in message
    assert 'set num_hidden_layers=2' in message


def test_hf_t5_wrong_d_ff_names_parameter_shapes_and_key(t5_dir):
    _edit_config_json(t5_dir, d_ff=48)
    with pytest.raises(ValueError) as err:
        hf.load_hf(t5_dir)
    message = _one_line(err)
    assert 'decoder/layers_0/mlp/wi_0/kernel: got (16, 32), expected (16, 48)' in message
    assert 'set d_ff=32' in message


def test_hf_t5_wrong_num_layers_names_unexpected_weight(t5_dir):
    _edit_config_json(t5_dir, num_layers=1, num_decoder_layers=1)
    with pytest.raises(ValueError) as err:
        hf.load_hf(t5_dir)
    message = _one_line(err)
    assert 'encoder.block.1.' in message and 'unexpected' in message
    assert 'set num_layers=2' in message


def test_t5x_checks_shape_dtype_and_missing(tmp_path):
    ckpt = t5x.save_t5x_legacy(_params(T5), str(tmp_path / 'shape'), 1)
    with pytest.raises(ValueError) as err:
        t5x.load_t5x(ckpt, config=dataclasses.replace(T5, mlp_dim=64))
    assert 'mlp/wi_0/kernel: got (16, 32), expected (16, 64) (set mlp_dim=32' in _one_line(err)

    with pytest.raises(ValueError) as err:
        t5x.load_t5x(ckpt, config=dataclasses.replace(T5, param_dtype='bfloat16'))
    assert 'got dtype float32, expected bfloat16 (set param_dtype=float32' in _one_line(err)

    flat = t5x.flatten(_params(T5))
    del flat['decoder/layers_0/mlp/wo/kernel']
    ckpt = t5x.save_t5x_legacy(t5x.unflatten(flat), str(tmp_path / 'missing'), 1)
    with pytest.raises(ValueError) as err:
        t5x.load_t5x(ckpt, config=T5)
    assert 'decoder/layers_0/mlp/wo/kernel: missing (expected (32, 16))' in _one_line(err)


def test_t5x_inferred_config_keeps_the_stored_dtype(tmp_path):
    ckpt = t5x.save_t5x_legacy(_params(dataclasses.replace(T5, param_dtype='bfloat16')), str(tmp_path), 1)
    assert np.dtype(t5x.load_t5x(ckpt)['token_embedder']['embedding'].dtype).name == 'bfloat16'


def _training_checkpoint(model_dir, config):
    from flan_jax.train import checkpointing, optim, step as step_lib   # the loop's own writer
    optimizer = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig()))
    state = step_lib.init_state(config, optimizer, jax.random.PRNGKey(0))
    ckpt = checkpointing.Checkpointer(str(model_dir), async_save=False)
    ckpt.save(1, state, {'step': 1, 'seed': 0, 'batches_consumed': 1, 'model': run_dir.model_record(config)})
    ckpt.close()
    return os.path.join(str(model_dir), 'checkpoint_1')


def _abstract(config):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), models.param_shapes(config))


def test_run_dir_restore_names_missing_and_mis_shaped_params(tmp_path):
    checkpoint_dir = _training_checkpoint(tmp_path / 'run', DECODER)
    restored = run_dir.restore_params(checkpoint_dir, _abstract(DECODER))
    assert restored['layers_1']['mlp']['wo']['kernel'].shape == (32, 16)

    with pytest.raises(ValueError) as err:
        run_dir.restore_params(checkpoint_dir, _abstract(dataclasses.replace(DECODER, mlp_dim=48)))
    assert 'layers_0/mlp/wi_0/kernel: got (16, 32), expected (16, 48)' in _one_line(err)

    with pytest.raises(ValueError) as err:
        run_dir.restore_params(checkpoint_dir, _abstract(dataclasses.replace(DECODER, num_layers=3)))
    assert 'layers_2/attention/key/kernel: missing' in _one_line(err)

    with pytest.raises(ValueError) as err:   # the numpy path is checked against the recorded config
        run_dir.load_trained(checkpoint_dir, dataclasses.replace(DECODER, num_layers=1))
    assert 'layers_1/' in _one_line(err) and 'set num_layers=2' in str(err.value)
