"""Peer equivalence with Hugging Face PyTorch T5: load_hf / export_hf, logits and greedy decoding."""
import json
import os

import numpy as np
import pytest

try:
    import torch
    import transformers
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f'!!! HF PEER TESTS SKIPPED: torch/transformers not importable ({e}); '
                f'install the [test] extra (torch==2.13.0 transformers) !!!', allow_module_level=True)

import jax

from flan_jax.checkpoints import hf as hf_ckpt
from flan_jax.checkpoints.t5x import flatten
from flan_jax.models import decoding, t5

SHAPES = {
    'tiny': dict(vocab_size=384, d_model=64, num_heads=2, d_kv=32, d_ff=128, num_layers=2, num_decoder_layers=2),
    'small_like': dict(vocab_size=32128, d_model=512, num_heads=6, d_kv=64, d_ff=1024, num_layers=2,
                       num_decoder_layers=2),
}
LOGIT_TOLERANCE = 1e-4


def _randomize(model, seed: int):
    """Weights of realistic scale (unit-variance activations, O(1) logits), distinct lm_head."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
        for name, p in model.named_parameters():
            if 'layer_norm' in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif 'relative_attention_bias' in name or name == 'shared.weight':
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # Linear [out, in]
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
    return model.eval()


def _hf_model(shape: str, seed: int = 0):
    config = transformers.T5Config(**SHAPES[shape], feed_forward_proj='gated-gelu', tie_word_embeddings=False,
                                   dropout_rate=0.0, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    return _randomize(transformers.T5ForConditionalGeneration(config), seed)


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
    """{shape: (torch model, save_pretrained dir)}, plus a pytorch_model.bin variant of 'tiny'."""
    out = {}
    for shape in SHAPES:
        model = _hf_model(shape)
        path = str(tmp_path_factory.mktemp(shape))
        model.save_pretrained(path)
        out[shape] = (model, path)
    model, _ = out['tiny']
    bin_dir = str(tmp_path_factory.mktemp('tiny_bin'))
    model.config.save_pretrained(bin_dir)
    torch.save(model.state_dict(), os.path.join(bin_dir, 'pytorch_model.bin'))
    out['tiny_bin'] = (model, bin_dir)
    return out


def _batch(vocab: int, seed: int = 1):
    """Two rows; the second has encoder padding (token 0) at the end."""
    rng = np.random.RandomState(seed)
    inputs = rng.randint(3, vocab, size=(2, 12)).astype(np.int32)
    inputs[1, 7:] = 0
    targets = rng.randint(3, vocab, size=(2, 6)).astype(np.int32)
    decoder_inputs = np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], axis=1)
    return inputs, decoder_inputs


def _hf_logits(model, inputs, decoder_inputs):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(inputs).long(),
                    attention_mask=torch.from_numpy(inputs != 0).long(),
                    decoder_input_ids=torch.from_numpy(decoder_inputs).long())
    return out.logits.float().numpy()


_forward = jax.jit(t5.forward, static_argnums=0)  # one compile per config across tests


def _our_logits(config, params, inputs, decoder_inputs):
    batch = {'encoder_input_tokens': inputs, 'decoder_input_tokens': decoder_inputs}
    return np.asarray(_forward(config, params, batch))


@pytest.mark.parametrize('variant', ['tiny', 'small_like', 'tiny_bin'])
def test_load_hf_logits_match_torch(hf_dirs, variant):
    model, path = hf_dirs[variant]
    config, params = hf_ckpt.load_hf(path)
    assert (config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim, config.vocab_size) == (
        model.config.d_model, model.config.num_heads, model.config.d_kv, model.config.d_ff, model.config.vocab_size)
    inputs, decoder_inputs = _batch(config.vocab_size)
    ours, theirs = _our_logits(config, params, inputs, decoder_inputs), _hf_logits(model, inputs, decoder_inputs)
    assert ours.shape == theirs.shape
    assert np.abs(theirs).max() > 0.5  # the comparison is not between near-zero tensors
    diff = np.abs(ours - theirs).max()
    assert diff <= LOGIT_TOLERANCE, f'{variant}: max |logit diff| {diff:.2e}'


def test_padding_does_not_leak(hf_dirs):
    """The padded row's logits equal those of the same row without padding (both in ours and HF)."""
    model, path = hf_dirs['tiny']
    config, params = hf_ckpt.load_hf(path)
    inputs, decoder_inputs = _batch(config.vocab_size)
    ours = _our_logits(config, params, inputs, decoder_inputs)
    trimmed = _our_logits(config, params, inputs[1:, :7], decoder_inputs[1:])
    np.testing.assert_allclose(ours[1:], trimmed, atol=1e-5)


@pytest.mark.parametrize('shape', ['tiny', 'small_like'])
def test_greedy_decoding_matches_hf_generate(hf_dirs, shape):
    model, path = hf_dirs[shape]
    config, params = hf_ckpt.load_hf(path)
    inputs, _ = _batch(config.vocab_size, seed=3)
    steps = 8
    ours = np.asarray(decoding.greedy_decode(config, params, inputs, steps))
    with torch.no_grad():
        generated = model.generate(input_ids=torch.from_numpy(inputs).long(),
                                   attention_mask=torch.from_numpy(inputs != 0).long(),
                                   do_sample=False, num_beams=1, max_new_tokens=steps, min_new_tokens=0)
    theirs = generated.numpy()[:, 1:]  # drop decoder_start_token_id
    theirs = np.pad(theirs, ((0, 0), (0, steps - theirs.shape[1])))
    np.testing.assert_array_equal(ours, theirs)


def test_export_hf_round_trip_loads_in_transformers(hf_dirs, tmp_path):
    model, path = hf_dirs['tiny']
    config, params = hf_ckpt.load_hf(path)
    for max_shard_bytes, name in [(0, 'single'), (20_000, 'sharded')]:
        out = hf_ckpt.export_hf(config, params, str(tmp_path / name), max_shard_bytes=max_shard_bytes)
        reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
        assert reloaded.config.feed_forward_proj == 'gated-gelu'
        assert (reloaded.config.decoder_start_token_id, reloaded.config.eos_token_id,
                reloaded.config.pad_token_id) == (0, 1, 0)
        assert not torch.equal(reloaded.lm_head.weight, reloaded.shared.weight)
        inputs, decoder_inputs = _batch(config.vocab_size, seed=5)
        diff = np.abs(_hf_logits(reloaded, inputs, decoder_inputs) - _our_logits(config, params, inputs,
                                                                                  decoder_inputs)).max()
        assert diff <= LOGIT_TOLERANCE, f'{name}: max |logit diff| {diff:.2e}'
        # Our loader reads our export back exactly.
        config2, params2 = hf_ckpt.load_hf(out)
        assert config2 == config
        a, b = flatten(params), flatten(params2)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert os.path.isfile(tmp_path / 'sharded' / 'model.safetensors.index.json')


def test_export_of_fresh_init_matches_transformers(tmp_path):
    """Params made on our side (not from HF) export to a model HF runs identically."""
    tiny = SHAPES['tiny']  # same shapes as the HF 'tiny' model, so the compiled forward is reused
    config = t5.T5Config(vocab_size=tiny['vocab_size'], emb_dim=tiny['d_model'], num_heads=tiny['num_heads'],
                         head_dim=tiny['d_kv'], mlp_dim=tiny['d_ff'], num_encoder_layers=tiny['num_layers'],
                         num_decoder_layers=tiny['num_decoder_layers'])
    rng = np.random.RandomState(7)
    params = jax.tree_util.tree_map(  # numpy draws: eager jax.random would compile one op per shape
        lambda s: (rng.randn(*s.shape) / np.sqrt(s.shape[0])).astype(np.float32), t5.param_shapes(config))
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(
        hf_ckpt.export_hf(config, params, str(tmp_path / 'out'))).eval()
    inputs, decoder_inputs = _batch(config.vocab_size, seed=9)
    diff = np.abs(_hf_logits(reloaded, inputs, decoder_inputs) - _our_logits(config, params, inputs,
                                                                              decoder_inputs)).max()
    assert diff <= LOGIT_TOLERANCE


def test_sharded_hf_checkpoint_loads(hf_dirs, tmp_path):
    model, path = hf_dirs['tiny']
    model.save_pretrained(str(tmp_path), max_shard_size='100KB')
    assert os.path.isfile(tmp_path / 'model.safetensors.index.json')
    _, params = hf_ckpt.load_hf(str(tmp_path))
    _, reference = hf_ckpt.load_hf(path)
    a, b = flatten(params), flatten(reference)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_missing_and_unexpected_weights_are_named(hf_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file
    _, path = hf_dirs['tiny']
    weights = load_file(os.path.join(path, 'model.safetensors'))
    del weights['encoder.block.1.layer.1.DenseReluDense.wi_0.weight']
    del weights['decoder.final_layer_norm.weight']
    weights['encoder.block.1.layer.1.DenseReluDense.wi.weight'] = np.zeros((128, 64), np.float32)
    save_file(weights, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(path, 'config.json')) as f:
        (tmp_path / 'config.json').write_text(f.read())
    with pytest.raises(ValueError) as err:
        hf_ckpt.load_hf(str(tmp_path))
    message = str(err.value)
    for name in ('encoder.block.1.layer.1.DenseReluDense.wi_0.weight', 'decoder.final_layer_norm.weight',
                 'encoder.block.1.layer.1.DenseReluDense.wi.weight'):
        assert name in message


def test_wrong_shape_is_named(hf_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file
    _, path = hf_dirs['tiny']
    weights = load_file(os.path.join(path, 'model.safetensors'))
    weights['encoder.block.0.layer.0.SelfAttention.q.weight'] = np.zeros((32, 64), np.float32)
    save_file(weights, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(path, 'config.json')) as f:
        (tmp_path / 'config.json').write_text(f.read())
    with pytest.raises(ValueError, match=r'encoder/layers_0/attention/query/kernel: got \(64, 32\)'):
        hf_ckpt.load_hf(str(tmp_path))


@pytest.mark.parametrize('change,message', [
    ({'feed_forward_proj': 'relu'}, 'feed_forward_proj'),
    ({'model_type': 'umt5'}, 'model_type'),
])
def test_non_t5_1_1_configs_are_rejected(hf_dirs, tmp_path, change, message):
    _, path = hf_dirs['tiny']
    with open(os.path.join(path, 'config.json')) as f:
        config = {**json.load(f), **change}
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        hf_ckpt.load_hf(str(tmp_path))
