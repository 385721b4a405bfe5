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
INPUTS = np.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]], np.int32)
TARGETS = np.array([[11, 12, 1], [13, 1, 0]], np.int32)
OPTIONS = np.array([[[11, 12, 1], [14, 1, 0]], [[13, 1, 0], [15, 16, 1]]], np.int32)


def _with(config, **peft):
    return dataclasses.replace(config, peft=models.PeftConfig(**peft))


def _batch(config, inputs=INPUTS, targets=TARGETS):
    """An unpacked batch in the family's feature names (option_logits' layout for the decoder family)."""
    if models.is_encoder_decoder(config):
        return {'encoder_input_tokens': jnp.asarray(inputs), 'decoder_target_tokens': jnp.asarray(targets),
                'decoder_input_tokens': models.shift_right(jnp.asarray(targets))}
    from flan_jax.models import lm_inputs
    return lm_inputs.prompt_and_targets(jnp.asarray(inputs), jnp.asarray(targets))


def _randomize(tree, key, name):
    """Leaves whose path ends in `name` set to random values (e.g. LoRA's zero-initialized B)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(key, len(flat))
    leaves = [0.1 * jax.random.normal(k, v.shape) if jax.tree_util.keystr(p).endswith(f"['{name}']") else v
              for (p, v), k in zip(flat, keys)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _peft_paths(params):
    return sorted('/'.join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params['peft'])[0])


def _base_and_peft(config, **peft):
    tuned = _with(config, **peft)
    base = models.init_params(config, jax.random.PRNGKey(0))
    params = models.init_params(tuned, jax.random.PRNGKey(0))
    return tuned, base, params


# ---------------------------------------------------------------------------------------------- LoRA

@pytest.mark.parametrize('name', FAMILIES)
def test_lora_with_zero_b_gives_the_base_logits(name):
    config = FAMILIES[name]
    tuned, base, params = _base_and_peft(config, method='lora', rank=4, targets=r'.*(query|value|wi_0)/kernel')
    assert {k: v for k, v in params.items() if k != 'peft'}.keys() == base.keys()
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in params.items() if k != 'peft'}, base)
    np.testing.assert_array_equal(models.forward(tuned, params, _batch(config)),
                                  models.forward(config, base, _batch(config)))
    np.testing.assert_array_equal(models.option_logits(tuned, params, INPUTS, OPTIONS),
                                  models.option_logits(config, base, INPUTS, OPTIONS))


@pytest.mark.parametrize('name', FAMILIES)
def test_merged_lora_equals_unmerged(name):
    config = FAMILIES[name]
    tuned, base, params = _base_and_peft(config, method='lora', rank=4, alpha=8.0,
                                         targets=r'.*(attention/(query|key|value|out)|mlp/w\w+)/kernel')
    params = {**params, 'peft': _randomize(params['peft'], jax.random.PRNGKey(3), 'lora_b')}
    merged_config, merged = models.merge_peft(tuned, params)
    assert merged_config == config and 'peft' not in merged
    unmerged_logits = models.forward(tuned, params, _batch(config))
    assert float(jnp.max(jnp.abs(unmerged_logits - models.forward(config, base, _batch(config))))) > 1e-3
    np.testing.assert_allclose(unmerged_logits, models.forward(config, merged, _batch(config)), atol=1e-5)
    np.testing.assert_allclose(models.option_logits(tuned, params, INPUTS, OPTIONS),
                               models.option_logits(config, merged, INPUTS, OPTIONS), atol=1e-5)
    greedy = lambda c, p: decoding.greedy_decode(c, p, jnp.asarray(INPUTS), 4)
    np.testing.assert_array_equal(greedy(tuned, params), greedy(config, merged))


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


def test_lora_dropout_changes_training_logits_only():
    tuned, _, params = _base_and_peft(DEC, method='lora', rank=4, dropout=0.5)
    params = {**params, 'peft': _randomize(params['peft'], jax.random.PRNGKey(3), 'lora_b')}
    batch = _batch(DEC)
    eval_logits = models.forward(tuned, params, batch)
    train_logits = models.forward(tuned, params, batch, dropout_rng=jax.random.PRNGKey(5))
    assert float(jnp.max(jnp.abs(eval_logits - train_logits))) > 1e-4
    np.testing.assert_array_equal(eval_logits, models.forward(tuned, params, batch))


def test_merge_refuses_methods_that_add_parameters():
    tuned, _, params = _base_and_peft(T5, method='adapter', adapter_dim=4)
    with pytest.raises(ValueError, match="'adapter'.*only 'lora' merges"):
        models.merge_peft(tuned, params)
