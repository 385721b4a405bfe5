"""T5 model fidelity: packing equivalence, masking, relative positions, params, dtypes, FLOPs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax.models import layers, t5

CONFIG = t5.T5Config(vocab_size=61, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48, num_encoder_layers=2,
                     num_decoder_layers=2)


@pytest.fixture(scope='module')
def params():
    return t5.init_params(CONFIG, jax.random.PRNGKey(0))


_JIT_FORWARD = jax.jit(t5.forward, static_argnums=0)   # one compile per (config, shapes) across tests


def _forward(config):
    return lambda p, b: _JIT_FORWARD(config, p, b)


def _cross_entropy(logits, targets, weights):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(picked * weights)


def _example(rng, in_len, tgt_len):
    """Random example: tokens in [3, vocab), ending with EOS (1)."""
    inputs = np.append(rng.integers(3, CONFIG.vocab_size, in_len - 1), 1)
    targets = np.append(rng.integers(3, CONFIG.vocab_size, tgt_len - 1), 1)
    return inputs, targets


def _unpacked(inputs, targets, in_len, tgt_len):
    enc = np.zeros((1, in_len), np.int32); enc[0, :len(inputs)] = inputs
    tgt = np.zeros((1, tgt_len), np.int32); tgt[0, :len(targets)] = targets
    dec_in = np.zeros_like(tgt); dec_in[0, 1:] = tgt[0, :-1]
    return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec_in, 'decoder_target_tokens': tgt,
            'decoder_loss_weights': (tgt != 0).astype(np.float32)}


def _pack(examples, in_len, tgt_len):
    """One packed row, following seqio EncDecFeatureConverter: per-segment shift right, 0 at each start."""
    row = {k: np.zeros((1, n), np.int32) for k, n in [
        ('encoder_input_tokens', in_len), ('encoder_segment_ids', in_len), ('encoder_positions', in_len),
        ('decoder_target_tokens', tgt_len), ('decoder_input_tokens', tgt_len), ('decoder_segment_ids', tgt_len),
        ('decoder_positions', tgt_len)]}
    i = j = 0
    for seg, (inputs, targets) in enumerate(examples, start=1):
        row['encoder_input_tokens'][0, i:i + len(inputs)] = inputs
        row['encoder_segment_ids'][0, i:i + len(inputs)] = seg
        row['encoder_positions'][0, i:i + len(inputs)] = np.arange(len(inputs))
        row['decoder_target_tokens'][0, j:j + len(targets)] = targets
        row['decoder_input_tokens'][0, j + 1:j + len(targets)] = targets[:-1]
        row['decoder_segment_ids'][0, j:j + len(targets)] = seg
        row['decoder_positions'][0, j:j + len(targets)] = np.arange(len(targets))
        i, j = i + len(inputs), j + len(targets)
    row['decoder_loss_weights'] = (row['decoder_target_tokens'] != 0).astype(np.float32)
    return row


LENGTHS = [(5, 4), (9, 6), (3, 7)]   # (inputs, targets) per packed example


@pytest.mark.parametrize('from_features', [False, True])
def test_packed_loss_equals_sum_of_unpacked_losses(params, from_features):
    config = dataclasses.replace(CONFIG, relative_positions_from_features=from_features)
    rng = np.random.default_rng(1)
    examples = [_example(rng, a, b) for a, b in LENGTHS]
    fwd = _forward(config)
    packed = _pack(examples, 20, 20)   # trailing padding in both rows
    packed_loss = _cross_entropy(fwd(params, packed), packed['decoder_target_tokens'],
                                 packed['decoder_loss_weights'])
    unpacked_loss = 0.0
    for inputs, targets in examples:
        b = _unpacked(inputs, targets, 12, 8)
        unpacked_loss += _cross_entropy(fwd(params, b), b['decoder_target_tokens'], b['decoder_loss_weights'])
    assert float(packed_loss) > 1.0
    np.testing.assert_allclose(float(packed_loss), float(unpacked_loss), rtol=1e-5)


def _loss_and_grads(config, params, batch):
    def loss(p):
        return _cross_entropy(t5.forward(config, p, batch), batch['decoder_target_tokens'],
                              batch['decoder_loss_weights'])
    return jax.jit(jax.value_and_grad(loss))(params)


def test_packed_gradient_equals_sum_of_unpacked_gradients(params):
    rng = np.random.default_rng(4)
    examples = [_example(rng, a, b) for a, b in LENGTHS]
    _, packed = _loss_and_grads(CONFIG, params, _pack(examples, 20, 20))
    unpacked = [_loss_and_grads(CONFIG, params, _unpacked(i, t, 12, 8))[1] for i, t in examples]
    total = jax.tree.map(lambda *g: sum(g), *unpacked)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(packed), jax.tree.leaves(total)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _stack(rows):
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize('weight_padding', [False, True])
def test_hand_written_attention_logits_gradient_matches_autodiff(params, monkeypatch, weight_padding):
    """The masked, shared-bias logits sum the bias over rows with a dot; same gradient as autodiff's select.

    Three packed rows with trailing padding (fully masked query rows in both stacks); with weight_padding the loss
    also weights the padding positions, so those rows get a non-zero cotangent that must not reach the bias.
    """
    rng = np.random.default_rng(5)
    lengths = [LENGTHS, [(4, 3)], [(7, 5), (2, 2)]]
    batch = _stack([_pack([_example(rng, a, b) for a, b in row], 20, 20) for row in lengths])
    if weight_padding:
        batch['decoder_loss_weights'] = np.ones_like(batch['decoder_loss_weights'])
    loss, grads = _loss_and_grads(CONFIG, params, batch)
    monkeypatch.setattr(t5, '_masked_shared_bias_logits',
                        lambda logits, bias, mask: jnp.where(mask, logits + bias, layers.MASK_VALUE))
    ref_loss, ref_grads = _loss_and_grads(CONFIG, params, batch)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    assert np.abs(np.asarray(grads['encoder']['relpos_bias']['rel_embedding'])).max() > 1e-3


def test_changing_one_packed_example_leaves_neighbours_unchanged(params):
    rng = np.random.default_rng(2)
    examples = [_example(rng, a, b) for a, b in LENGTHS]
    changed = list(examples)
    changed[1] = _example(np.random.default_rng(99), *LENGTHS[1])
    fwd = _forward(CONFIG)
    a, b = _pack(examples, 20, 20), _pack(changed, 20, 20)
    la, lb = np.asarray(fwd(params, a)), np.asarray(fwd(params, b))
    seg = a['decoder_segment_ids'][0]
    neighbours = (seg == 1) | (seg == 3)
    np.testing.assert_allclose(la[0, neighbours], lb[0, neighbours], atol=1e-6, rtol=0)
    assert np.abs(la[0, seg == 2] - lb[0, seg == 2]).max() > 1e-2   # the changed example itself did change


def test_padding_does_not_affect_real_positions(params):
    rng = np.random.default_rng(3)
    inputs, targets = _example(rng, 6, 5)
    fwd = _forward(CONFIG)
    short, long = _unpacked(inputs, targets, 6, 5), _unpacked(inputs, targets, 17, 11)
    # Garbage in the padded decoder-input slots must not leak into real positions either (causality).
    long['decoder_input_tokens'][0, 6:] = 7
    ls, ll = np.asarray(fwd(params, short)), np.asarray(fwd(params, long))
    np.testing.assert_allclose(ls[0], ll[0, :5], atol=1e-5, rtol=1e-5)


def test_relative_position_buckets_match_hand_computed_values():
    bidi = t5.relative_position_bucket(np.array([0, -1, -7, -8, -10, -20, -127, -500, 1, 7, 9, 500]), True, 32, 128)
    # key before query: n = q - k; n < 8 exact; else 8 + floor(log(n/8)/log(16) * 8), capped at 15.
    # key after query: same plus 16.
    np.testing.assert_array_equal(bidi, [0, 1, 7, 8, 8, 10, 15, 15, 17, 23, 24, 31])
    uni = t5.relative_position_bucket(np.array([0, -5, -15, -16, -20, -64, -128, -200, 3, 200]), False, 32, 128)
    # n < 16 exact; else 16 + floor(log(n/16)/log(8) * 16) capped at 31; future keys -> 0.
    np.testing.assert_array_equal(uni, [0, 5, 15, 16, 17, 26, 31, 31, 0, 0])
    jax_version = t5.relative_position_bucket(jnp.array([-20, 9]), True, 32, 128)
    np.testing.assert_array_equal(jax_version, [10, 24])


def test_gelu_tanh_is_the_tanh_approximation_accurate_in_both_tails():
    x = np.concatenate([np.linspace(-12, 12, 20001), np.random.default_rng(0).standard_normal(20000) * 3])
    x32 = x.astype(np.float32)
    x64 = x32.astype(np.float64)
    u = np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)
    exact = x64 / (1 + np.exp(-2 * u))   # 0.5 x (1 + tanh(u)), without its cancellation even in float64
    ours = np.asarray(jax.jit(layers.gelu_tanh)(x32), np.float64)
    np.testing.assert_allclose(ours, exact, atol=1e-6, rtol=0)
    # Relative accuracy where 1 + tanh(u) cancels (x << 0): the sigmoid form keeps it; the tanh form loses it all
    # by x = -6 (there it returns 0 or noise of the size of x * 6e-8).
    tail = (x64 < -2) & (np.abs(exact) > 1e-30)   # float32 normals
    rel = np.abs(ours[tail] - exact[tail]) / np.abs(exact[tail])
    assert rel.max() < 5e-5, rel.max()
    assert np.asarray(jax.jit(layers.gelu_tanh)(jnp.asarray(x32, jnp.bfloat16))).dtype == jnp.bfloat16


def test_relative_position_bias_uses_shared_table(params):
    table = params['decoder']['relpos_bias']['rel_embedding']
    pos = np.arange(6)
    bias = t5.relative_position_bias(table, pos, pos, False, CONFIG)
    assert bias.shape == (CONFIG.num_heads, 6, 6)
    np.testing.assert_allclose(bias[:, 4, 1], table[:, 3])   # key 3 steps back -> bucket 3
    np.testing.assert_allclose(bias[:, 1, 4], table[:, 0])   # future key -> bucket 0


def test_param_tree_names_shapes_and_logical_axes(params):
    axes = t5.param_logical_axes(CONFIG)
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    a_leaves, a_def = jax.tree_util.tree_flatten(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert p_def == a_def
    assert all(len(a) == p.ndim for a, p in zip(a_leaves, p_leaves))
    d, hk, f = CONFIG.emb_dim, CONFIG.joined_kv, CONFIG.mlp_dim
    assert params['token_embedder']['embedding'].shape == (CONFIG.vocab_size, d)
    assert params['encoder']['layers_1']['attention']['query']['kernel'].shape == (d, hk)
    assert params['encoder']['layers_0']['attention']['out']['kernel'].shape == (hk, d)
    assert params['decoder']['layers_1']['encoder_decoder_attention']['key']['kernel'].shape == (d, hk)
    assert params['decoder']['layers_0']['mlp']['wo']['kernel'].shape == (f, d)
    assert params['decoder']['logits_dense']['kernel'].shape == (d, CONFIG.vocab_size)
    assert axes['decoder']['logits_dense']['kernel'] == ('embed', 'vocab')
    assert axes['encoder']['relpos_bias']['rel_embedding'] == ('heads', 'relpos_buckets')
    assert set(params['decoder']['layers_0']) == {
        'pre_self_attention_layer_norm', 'self_attention', 'pre_cross_attention_layer_norm',
        'encoder_decoder_attention', 'pre_mlp_layer_norm', 'mlp'}
    assert sum(x.size for x in p_leaves) == t5.count_params(CONFIG)


def test_init_scales_follow_t5x():
    config = t5.T5Config(vocab_size=512, emb_dim=256, num_heads=4, head_dim=64, mlp_dim=512, num_encoder_layers=1,
                         num_decoder_layers=1)
    p = t5.init_params(config, jax.random.PRNGKey(1))
    np.testing.assert_allclose(np.std(p['token_embedder']['embedding']), 1.0, rtol=0.02)
    attn = p['encoder']['layers_0']['attention']
    np.testing.assert_allclose(np.std(attn['key']['kernel']), 256 ** -0.5, rtol=0.03)
    np.testing.assert_allclose(np.std(attn['query']['kernel']), 256 ** -0.5 / 8, rtol=0.03)
    np.testing.assert_allclose(np.std(p['encoder']['layers_0']['mlp']['wo']['kernel']), 512 ** -0.5, rtol=0.03)
    np.testing.assert_array_equal(p['encoder']['encoder_norm']['scale'], 1.0)
    bf16 = t5.init_params(dataclasses.replace(config, param_dtype='bfloat16'), jax.random.PRNGKey(1))
    assert bf16['decoder']['logits_dense']['kernel'].dtype == jnp.bfloat16


def test_bfloat16_compute_is_close_to_float32(params):
    rng = np.random.default_rng(4)
    batch = _unpacked(*_example(rng, 10, 8), 12, 8)
    ref = np.asarray(_forward(CONFIG)(params, batch))
    low = _forward(dataclasses.replace(CONFIG, dtype='bfloat16'))(params, batch)
    assert low.dtype == jnp.float32   # logits stay float32
    rel = np.abs(np.asarray(low) - ref).mean() / np.abs(ref).mean()
    assert rel < 3e-2, rel


def test_dropout_and_remat(params):
    rng = np.random.default_rng(5)
    batch = _unpacked(*_example(rng, 10, 8), 12, 8)
    base = np.asarray(_forward(CONFIG)(params, batch))
    dropped = dataclasses.replace(CONFIG, dropout_rate=0.3)
    fwd = jax.jit(lambda p, b, r: t5.forward(dropped, p, b, dropout_rng=r))
    a, b = fwd(params, batch, jax.random.PRNGKey(1)), fwd(params, batch, jax.random.PRNGKey(1))
    c = fwd(params, batch, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    np.testing.assert_allclose(_forward(dropped)(params, batch), base, rtol=1e-6, atol=1e-6)   # no rng: no dropout

    def loss(config):
        return jax.jit(jax.grad(lambda p: _cross_entropy(t5.forward(config, p, batch), batch['decoder_target_tokens'],
                                                         batch['decoder_loss_weights'])))
    one_layer = dataclasses.replace(CONFIG, num_encoder_layers=1, num_decoder_layers=1)   # cheaper compiles
    g_plain = loss(one_layer)(params)
    g_remat = loss(dataclasses.replace(one_layer, remat='full'))(params)
    assert np.abs(g_plain['encoder']['layers_0']['mlp']['wo']['kernel']).max() > 0
    for x, y in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise_clear_errors(params):
    with pytest.raises(ValueError, match='Unknown T5 preset'):
        t5.T5Config.preset('huge')
    with pytest.raises(ValueError, match='remat'):
        t5.T5Config(remat='sometimes')
    with pytest.raises(KeyError, match='decoder_input_tokens'):
        t5.forward(CONFIG, params, {'encoder_input_tokens': np.ones((1, 4), np.int32)})


def test_presets_and_flops_anchor():
    small = t5.T5Config.preset('small')
    assert abs(t5.count_params(small) / 1e6 - 77.0) < 0.5
    assert abs(t5.count_params(t5.T5Config.preset('xl')) / 1e9 - 2.85) < 0.01
    assert t5.T5Config.preset('tiny').vocab_size == 384
    # Hand count: forward = 2 FLOPs per weight per token (Kaplan et al. 2020, arXiv:2001.08361) for the dense layers
    # (~240 GFLOP for batch 8 at 512/128) plus the attention score and mixing matmuls (~42 GFLOP); a train step is
    # 3x the forward, ~0.85-0.88 TFLOP.
    step = 3 * 8 * t5.count_flops_per_example(small, 512, 128)
    assert abs(step / 0.88e12 - 1) < 0.01


@pytest.mark.parametrize('length', [1, 2, 7, 64, 300])
@pytest.mark.parametrize('bidirectional', [True, False])
def test_toeplitz_relative_bias_equals_the_gathered_bias_and_its_gradient(length, bidirectional):
    """Training builds the [heads, L, L] bias from its 2L-1 offsets (no L x L gather); it must equal the gather."""
    config = t5.T5Config.preset('tiny')
    table = jax.random.normal(jax.random.PRNGKey(0), (4, 32))
    pos = np.arange(length)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), (4, length, length))

    def total(t, positions):
        return (t5.relative_position_bias(t, positions, positions, bidirectional, config) * cotangent).sum()

    fast = t5.relative_position_bias(table, pos, pos, bidirectional, config)
    gathered = t5.relative_position_bias(table, jnp.asarray(pos), jnp.asarray(pos), bidirectional, config)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(gathered))
    np.testing.assert_allclose(jax.grad(total)(table, pos), jax.grad(total)(table, jnp.asarray(pos)),
                               rtol=1e-4, atol=1e-4)  # float32 sums over up to 45k terms, in another order
