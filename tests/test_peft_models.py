"""PEFT on both model families (models/peft.py): LoRA, adapters, prompt and prefix tuning.

Tiny configs; each method is checked against the base model it starts from or is equivalent to.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import models
from flan_jax.models import decoding

T5 = models.T5Config(vocab_size=61, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48, num_encoder_layers=2,
                     num_decoder_layers=2)
DEC = models.DecoderConfig(vocab_size=61, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           mlp_dim=48)
FAMILIES = {'t5': T5, 'decoder': DEC}
EXAMPLES = [(np.array([5, 6, 7, 1]), np.array([11, 12, 1])), (np.array([8, 9, 10, 14, 15, 1]), np.array([13, 1])),
            (np.array([16, 1]), np.array([17, 18, 19, 1])), (np.array([20, 21, 22, 1]), np.array([23, 1]))]


def _padded(arrays, length):
    out = np.zeros((len(arrays), length), np.int32)
    for n, a in enumerate(arrays):
        out[n, :len(a)] = a
    return out


# Every unpacked check runs through option_logits on these shapes, so each config compiles it once.
INPUTS, TARGETS = _padded([i for i, _ in EXAMPLES], 8), _padded([t for _, t in EXAMPLES], 5)
LORA = dict(method='lora', rank=4, alpha=8.0, targets=r'.*(attention/(query|key|value|out)|mlp/w\w+)/kernel')


_forward = jax.jit(models.forward, static_argnums=0)
_option_logits = jax.jit(models.option_logits, static_argnums=0)


def _with(config, **peft):
    return dataclasses.replace(config, peft=models.PeftConfig(**peft))


def _scores(config, params, targets=TARGETS):
    """Logits [N, 5, vocab] of TARGETS (or `targets`) after INPUTS, each example alone (raw, slot-free inputs)."""
    return _option_logits(config, params, INPUTS, jnp.asarray(targets)[:, None])


def _randomize(tree, key, name):
    """Leaves whose path ends in `name` set to random values (e.g. LoRA's zero-initialized B)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(key, len(flat))
    leaves = [0.1 * jax.random.normal(k, v.shape) if jax.tree_util.keystr(p).endswith(f"['{name}']") else v
              for (p, v), k in zip(flat, keys)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _forward_unpacked(config, params):
    """Logits [N, 5, vocab] of TARGETS from models.forward on an unpacked batch in the family's layout."""
    if models.is_encoder_decoder(config):
        batch = {'encoder_input_tokens': jnp.asarray(INPUTS), 'decoder_target_tokens': jnp.asarray(TARGETS),
                 'decoder_input_tokens': models.shift_right(jnp.asarray(TARGETS))}
        return _forward(config, params, batch)
    from flan_jax.models import lm_inputs
    features = lm_inputs.prompt_and_targets(jnp.asarray(INPUTS), jnp.asarray(TARGETS))
    return lm_inputs.target_part(_forward(config, params, features), features, TARGETS.shape[1])


def _assert_decoding_agrees_with_forward(config, params):
    """KV-cache greedy decoding picks, at every step, the argmax of a full forward over its own output."""
    got = decoding.greedy_decode(config, params, jnp.asarray(INPUTS), TARGETS.shape[1], eos_id=-1)
    np.testing.assert_array_equal(np.argmax(_scores(config, params, got), axis=-1), got)


def _peft_paths(params):
    return sorted('/'.join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params['peft'])[0])


def _base_and_peft(config, **peft):
    tuned = _with(config, **peft)
    base = models.init_params(config, jax.random.PRNGKey(0))
    params = models.init_params(tuned, jax.random.PRNGKey(0))
    return tuned, base, params


# ---------------------------------------------------------------------------------------------- LoRA

@pytest.mark.parametrize('name', FAMILIES)
def test_lora_with_zero_b_gives_the_base_logits_and_merged_equals_unmerged(name):
    config = FAMILIES[name]
    tuned, base, params = _base_and_peft(config, **LORA)
    assert {k: v for k, v in params.items() if k != 'peft'}.keys() == base.keys()
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in params.items() if k != 'peft'}, base)
    np.testing.assert_array_equal(_scores(tuned, params), _scores(config, base))   # B = 0
    params = {**params, 'peft': _randomize(params['peft'], jax.random.PRNGKey(3), 'lora_b')}
    merged_config, merged = models.merge_peft(tuned, params)
    assert merged_config == config and 'peft' not in merged
    unmerged = _scores(tuned, params)
    assert float(jnp.max(jnp.abs(unmerged - _scores(config, base)))) > 1e-3
    np.testing.assert_allclose(unmerged, _scores(config, merged), atol=1e-5)


def test_lora_targets_pick_the_matching_kernels_and_unknown_targets_fail_clearly():
    tuned = _with(T5, method='lora', rank=2)   # default: every attention query/key/value/out
    paths = _peft_paths(models.init_params(tuned, jax.random.PRNGKey(0)))
    blocks = {p.rsplit('/', 1)[0] for p in paths}
    assert len(blocks) == 4 * (2 + 2 * 2)      # encoder self + decoder self and cross, 2 layers each
    assert 'decoder/layers_1/encoder_decoder_attention/value' in blocks
    assert all(p.rsplit('/', 1)[1] in ('lora_a', 'lora_b') for p in paths)
    tuned = _with(DEC, method='lora', rank=2, targets=r'layers_1/mlp/wo/kernel')
    params = models.init_params(tuned, jax.random.PRNGKey(0))
    assert _peft_paths(params) == ['layers_1/mlp/wo/lora_a', 'layers_1/mlp/wo/lora_b']
    assert params['peft']['layers_1']['mlp']['wo']['lora_a'].shape == (DEC.mlp_dim, 2)
    assert models.param_logical_axes(tuned)['peft']['layers_1']['mlp']['wo']['lora_b'] == ('lora_rank', 'embed')
    assert models.count_params(tuned) == models.count_params(DEC) + 2 * (DEC.mlp_dim + DEC.emb_dim)
    with pytest.raises(ValueError, match='matches no 2-D kernel.*not kernels'):
        models.init_params(_with(DEC, method='lora', targets='token_embedder/embedding'), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"targets='.\*/qkv/kernel' matches no"):
        models.param_shapes(_with(T5, method='lora', targets='.*/qkv/kernel'))


def test_lora_dropout_applies_to_the_lora_input_only_when_training():
    from flan_jax.models import peft
    tuned, _, params = _base_and_peft(DEC, method='lora', rank=4, dropout=0.5)
    assert 'lora_rng' not in peft.view(tuned, params)['layers_0']['attention']['query']
    block = peft.view(tuned, params, jax.random.PRNGKey(5))['layers_0']['attention']['query']
    block = {**block, 'lora_a': jnp.eye(DEC.emb_dim, 4), 'lora_b': jnp.eye(4, 7)}
    x = jnp.ones((3, DEC.emb_dim))
    y = peft.lora(block, x, jnp.zeros((3, 7)), jnp.float32)   # dropout(x)[:, :4] in the first 4 columns
    assert set(np.unique(np.asarray(y[:, :4]))) <= {0.0, 2.0} and {0.0, 2.0} <= set(np.asarray(y[:, :4]).ravel().tolist())
    np.testing.assert_array_equal(y[:, 4:], 0.0)


def test_merge_refuses_methods_that_add_parameters():
    tuned, _, params = _base_and_peft(T5, method='adapter', adapter_dim=4)
    with pytest.raises(ValueError, match="'adapter'.*only 'lora' merges"):
        models.merge_peft(tuned, params)


# ---------------------------------------------------------------------------------------------- adapters

@pytest.mark.parametrize('name', FAMILIES)
def test_adapters_start_as_identity_and_decoding_honours_them(name):
    config = FAMILIES[name]
    tuned, base, params = _base_and_peft(config, method='adapter', adapter_dim=4)
    layers = 2 if name == 'decoder' else 4
    assert len(_peft_paths(params)) == layers * 2 * 4      # (attention, mlp) x (down, up) x (kernel, bias)
    np.testing.assert_array_equal(_scores(tuned, params), _scores(config, base))
    params = {**params, 'peft': _randomize(params['peft'], jax.random.PRNGKey(3), 'kernel')}
    assert float(jnp.max(jnp.abs(_scores(tuned, params) - _scores(config, base)))) > 1e-3
    _assert_decoding_agrees_with_forward(tuned, params)


# ---------------------------------------------------------------------------------------------- prompt tuning

def _token_losses(logits, targets):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None].astype(jnp.int32), -1)[..., 0]


def _packed_losses(config, params, prompt_slots, lengths=(24, 12)):
    """{targets: summed loss} for EXAMPLES packed by the real packer (which reserves the prompt slots)."""
    from flan_jax import packing
    concatenate = not models.is_encoder_decoder(config)
    packer = packing.ExamplePacker(lengths, concatenate=concatenate, prompt_slots=prompt_slots, buffer_size=8)
    rows = [row for ex in EXAMPLES for row in packer.add(*ex)] + packer.flush()
    assert max(len(row) for row in rows) >= 2, 'the test needs segments that share a row'
    assert all(np.all(i[:prompt_slots] == packing.PROMPT_SLOT_ID) for row in rows for i, _ in row)
    features = (packing.prefix_lm_feature_batch(rows, sum(lengths)) if concatenate
                else packing.encdec_feature_batch(rows, lengths))
    batch = {k: jnp.asarray(v) for k, v in features.items()}
    losses = _token_losses(_forward(config, params, batch), batch['decoder_target_tokens'])
    weights, segments = features['decoder_loss_weights'], features['decoder_segment_ids']
    out = {}
    for r, row in enumerate(rows):
        for s, (_, targets) in enumerate(row):
            out[tuple(targets.tolist())] = float(jnp.sum(losses[r] * (weights[r] * (segments[r] == s + 1))))
    return out


def _unpacked_losses(config, params):
    """{targets: summed loss} of each example alone, through option_logits on raw (slot-free) inputs."""
    losses = _token_losses(_scores(config, params), jnp.asarray(TARGETS))
    sums = jnp.sum(losses * (TARGETS != 0), axis=1)
    return {tuple(t.tolist()): float(s) for (_, t), s in zip(EXAMPLES, sums)}


def _assert_packed_equals_unpacked(config, params, prompt_slots=0):
    packed, unpacked = _packed_losses(config, params, prompt_slots), _unpacked_losses(config, params)
    assert packed.keys() == unpacked.keys()
    for key in packed:
        np.testing.assert_allclose(packed[key], unpacked[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', FAMILIES)
def test_prompt_tuning_packed_equals_unpacked_per_example_loss(name):
    config = FAMILIES[name]
    tuned, base, params = _base_and_peft(config, method='prompt', prompt_length=3)
    assert params['peft']['prompt'].shape == (3, config.emb_dim)
    _assert_packed_equals_unpacked(tuned, params, prompt_slots=3)
    # forward on an unpacked batch inserts the slots itself, like option_logits
    np.testing.assert_allclose(_forward_unpacked(tuned, params), _scores(tuned, params), atol=1e-5)
    assert _unpacked_losses(tuned, params) != _unpacked_losses(config, base)   # the prompt is live
    _assert_decoding_agrees_with_forward(tuned, params)


def test_prompt_slots_lead_every_segment_and_truncation_is_counted():
    from flan_jax import packing
    converter = models.feature_converter(_with(T5, method='prompt', prompt_length=3))
    assert converter.packing_options['prompt_slots'] == 3
    packer = packing.ExamplePacker((6, 4), prompt_slots=3)
    rows = packer.add(np.arange(10, 15), np.array([7, 1])) + packer.add(np.array([20]), np.array([8, 1]))
    rows += packer.flush()
    inputs = sorted((i.tolist() for row in rows for i, _ in row), key=len)
    assert inputs == [[1, 1, 1, 20], [1, 1, 1, 10, 11, 12]]
    assert packer.stats.truncated == 1
    with pytest.raises(ValueError, match='prompt_slots=6.*inputs length 6'):
        packing.ExamplePacker((6, 4), prompt_slots=6)


def test_prompt_init_from_vocabulary_labels_and_file(tmp_path):
    tuned = _with(DEC, method='prompt', prompt_length=4)
    base = models.init_params(DEC, jax.random.PRNGKey(0))
    table = np.asarray(base['token_embedder']['embedding'])
    sampled = np.asarray(models.init_peft(tuned, jax.random.PRNGKey(1), base)['prompt'])
    assert all(any(np.array_equal(row, t) for t in table) for row in sampled)
    assert len({row.tobytes() for row in sampled}) == 4                   # drawn without replacement
    labelled = np.asarray(models.init_peft(tuned, jax.random.PRNGKey(1), base, label_token_ids=[[7, 8], [9]])['prompt'])
    np.testing.assert_allclose(labelled[0], (table[7] + table[8]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(labelled[1], table[9])
    np.save(tmp_path / 'prompt.npy', labelled)
    np.testing.assert_array_equal(models.load_prompt(str(tmp_path / 'prompt.npy'), tuned), labelled)
    with pytest.raises(ValueError, match=r'shape \(4, 32\).*wants \(5, 32\)'):
        models.load_prompt(str(tmp_path / 'prompt.npy'), _with(DEC, method='prompt', prompt_length=5))


# ---------------------------------------------------------------------------------------------- prefix tuning

@pytest.mark.parametrize('name', FAMILIES)
def test_prefix_tuning_packed_equals_unpacked_and_decoding_honours_it(name):
    config = FAMILIES[name]
    tuned, base, params = _base_and_peft(config, method='prefix', prefix_length=3)
    blocks = {p.rsplit('/', 2)[0] for p in _peft_paths(params)}
    assert blocks == ({'layers_0/attention', 'layers_1/attention'} if name == 'decoder' else
                      {'encoder/layers_0/attention', 'encoder/layers_1/attention',
                       'decoder/layers_0/self_attention', 'decoder/layers_1/self_attention'})
    params = {**params, 'peft': jax.tree.map(lambda x: 30 * x, params['peft'])}   # prefixes that matter
    _assert_packed_equals_unpacked(tuned, params)
    assert _unpacked_losses(tuned, params) != _unpacked_losses(config, base)
    _assert_decoding_agrees_with_forward(tuned, params)


@pytest.mark.parametrize('name', FAMILIES)
def test_folded_prefix_mlp_equals_unfolded(name):
    config = FAMILIES[name]
    tuned, _, params = _base_and_peft(config, method='prefix', prefix_length=3, prefix_mlp_dim=16)
    assert sorted(params['peft']) == ['prefix_mlp']
    params = {**params, 'peft': _randomize(params['peft'], jax.random.PRNGKey(3), 'kernel')}
    folded_config, folded = models.fold_peft(tuned, params)
    assert folded_config.peft.prefix_mlp_dim == 0 and 'prefix_mlp' not in folded['peft']
    assert jax.tree.map(jnp.shape, folded) == jax.tree.map(lambda s: s.shape, models.param_shapes(folded_config))
    np.testing.assert_allclose(_scores(tuned, params), _scores(folded_config, folded), atol=1e-5)
    with pytest.raises(ValueError, match="'prefix'.*only 'lora' merges"):
        models.merge_peft(folded_config, folded)


# ---------------------------------------------------------------------------------------------- interface

@pytest.mark.parametrize('peft', [LORA, dict(method='adapter', adapter_dim=4), dict(method='prompt', prompt_length=3),
                                  dict(method='prefix', prefix_length=3), dict(method='prefix', prefix_length=3,
                                                                               prefix_mlp_dim=8)],
                         ids=['lora', 'adapter', 'prompt', 'prefix', 'prefix_mlp'])
def test_peft_subtree_has_shapes_axes_and_counts(peft):
    for config in FAMILIES.values():
        tuned = _with(config, **peft)
        params = models.init_params(tuned, jax.random.PRNGKey(0))
        shapes = models.param_shapes(tuned)
        assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
        axes = models.param_logical_axes(tuned)['peft']
        jax.tree.map(lambda a, s: len(a) == len(s.shape) or pytest.fail(f'{a} vs {s.shape}'), axes,
                     shapes['peft'], is_leaf=lambda x: isinstance(x, tuple))
        trainable = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params['peft']))
        assert models.count_peft_params(tuned) == trainable > 0
        assert models.count_params(tuned) == models.count_params(config) + trainable
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params['peft']))


def test_bad_peft_configs_fail_clearly():
    with pytest.raises(ValueError, match="PeftConfig.method='ia3'"):
        models.PeftConfig(method='ia3')
    with pytest.raises(ValueError, match='PeftConfig.rank=0'):
        models.PeftConfig(method='lora', rank=0)
    with pytest.raises(ValueError, match='not a regular expression'):
        models.PeftConfig(method='lora', targets='(')
    with pytest.raises(ValueError, match='peft=None'):
        models.forward(T5, {**models.init_params(T5, jax.random.PRNGKey(0)), 'peft': {}}, {})
