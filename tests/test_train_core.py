"""Loss normalizers, the T5X Adafactor rule, gradient accumulation and schedules (no data pipeline needed)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax.models import t5
from flan_jax.train import loss as loss_lib, optim, step as step_lib


def _packed_batch(rng, rows=4, lin=16, lt=8, vocab=64):
    """Two segments per row (lengths vary), seqio pack semantics."""
    r = np.random.RandomState(rng)
    b = {k: np.zeros((rows, n), np.int32) for k, n in (
        ("encoder_input_tokens", lin), ("encoder_segment_ids", lin), ("encoder_positions", lin),
        ("decoder_target_tokens", lt), ("decoder_input_tokens", lt), ("decoder_segment_ids", lt),
        ("decoder_positions", lt))}
    b["decoder_loss_weights"] = np.zeros((rows, lt), np.float32)
    for i in range(rows):
        ei = di = 0
        for seg in (1, 2):
            n_in, n_t = r.randint(2, lin // 2), r.randint(2, lt // 2)
            b["encoder_input_tokens"][i, ei:ei + n_in] = r.randint(2, vocab, n_in)
            b["encoder_segment_ids"][i, ei:ei + n_in] = seg
            b["encoder_positions"][i, ei:ei + n_in] = np.arange(n_in)
            tgt = r.randint(2, vocab, n_t)
            b["decoder_target_tokens"][i, di:di + n_t] = tgt
            b["decoder_input_tokens"][i, di:di + n_t] = np.concatenate([[0], tgt[:-1]])
            b["decoder_segment_ids"][i, di:di + n_t] = seg
            b["decoder_positions"][i, di:di + n_t] = np.arange(n_t)
            b["decoder_loss_weights"][i, di:di + n_t] = 1.0
            ei, di = ei + n_in, di + n_t
    return {k: jnp.asarray(v) for k, v in b.items()}


def test_cross_entropy_matches_log_softmax_and_z_loss():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 11)) * 3
    targets = jnp.array([[1, 2, 3], [4, 5, 0]])
    tok, z = loss_lib.token_cross_entropy(logits, targets, z_loss=1e-2)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    lse = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(tok, ce + 1e-2 * lse ** 2, rtol=1e-6)
    np.testing.assert_allclose(z, 1e-2 * lse ** 2, rtol=1e-6)


def test_cross_entropy_hand_written_gradient_matches_autodiff():
    logits = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 13)) * 4
    targets = jax.random.randint(jax.random.PRNGKey(2), (2, 5), 0, 13)
    weights = jax.random.uniform(jax.random.PRNGKey(3), (2, 5))

    def reference(lg):
        lse = jax.nn.logsumexp(lg, -1)
        ce = lse - jnp.take_along_axis(lg, targets[..., None], -1)[..., 0]
        return jnp.sum((ce + 1e-2 * lse ** 2) * weights) + jnp.sum(jnp.sin(lse))

    def ours(lg):
        tok, z = loss_lib.token_cross_entropy(lg, targets, z_loss=1e-2)
        lse = jnp.sqrt(z / 1e-2) * jnp.sign(jax.nn.logsumexp(lg, -1))  # the z-loss output carries a gradient too
        return jnp.sum(tok * weights) + jnp.sum(jnp.sin(lse))

    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), rtol=1e-4, atol=1e-5)


def test_predicted_correctly_agrees_with_argmax_without_ties():
    logits = jax.random.normal(jax.random.PRNGKey(4), (3, 7, 50))
    targets = jnp.argmax(logits, -1).at[:, ::2].set(5)
    np.testing.assert_array_equal(loss_lib.predicted_correctly(logits, targets),
                                  jnp.argmax(logits, -1) == targets)


def test_label_smoothing_perfect_prediction_has_near_zero_loss():
    vocab, ls = 7, 0.1
    soft = np.full(vocab, ls / (vocab - 1))
    soft[3] = 1 - ls
    logits = jnp.log(jnp.asarray(soft))[None, None]  # the prediction equals the smoothed target
    tok, _ = loss_lib.token_cross_entropy(logits, jnp.array([[3]]), label_smoothing=ls)
    assert abs(float(tok[0, 0])) < 1e-5
    tok_bad, _ = loss_lib.token_cross_entropy(-logits, jnp.array([[3]]), label_smoothing=ls)
    assert float(tok_bad[0, 0]) > 1.0


def test_normalizers():
    batch = _packed_batch(0)
    w = np.asarray(batch["decoder_loss_weights"])
    _, d = loss_lib.loss_weights_and_denominator(batch, "num_real_target_tokens")
    assert float(d) == w.sum()
    _, d = loss_lib.loss_weights_and_denominator(batch, None)
    assert float(d) == 1.0
    _, d = loss_lib.loss_weights_and_denominator(batch, "NUM_REAL_TARGET_TOKENS")  # T5X's enum spelling
    assert float(d) == w.sum()
    _, d = loss_lib.loss_weights_and_denominator(batch, "num_total_target_tokens")
    assert float(d) == w.size and w.sum() < w.size
    _, d = loss_lib.loss_weights_and_denominator(batch, 233472.0)
    assert float(d) == 233472.0
    ws, d = loss_lib.loss_weights_and_denominator(batch, "average_per_sequence")
    # every (row, segment) sequence gets total weight 1, so the denominator counts sequences: 4 rows x 2 segments
    assert float(d) == pytest.approx(8.0)
    seg = np.asarray(batch["decoder_segment_ids"])
    for i in range(4):
        for s in (1, 2):
            assert float(np.asarray(ws)[i][seg[i] == s].sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="loss_normalizing_factor"):
        loss_lib.loss_weights_and_denominator(batch, "per_token_typo")


def _t5x_adafactor_reference(param, grads, lr):
    """Hand-written T5X rule (factored when both dims >= 128), applied for len(grads) steps."""
    p = np.asarray(param, np.float64)
    factored = p.ndim == 2 and min(p.shape) >= 128
    vr = vc = v = None
    for t, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        beta2 = 1.0 - (t + 1.0) ** -0.8
        g2 = g * g + 1e-30
        if factored:
            r, c = g2.mean(axis=1), g2.mean(axis=0)
            vr = r if vr is None else beta2 * vr + (1 - beta2) * r
            vc = c if vc is None else beta2 * vc + (1 - beta2) * c
            vhat = np.outer(vr, vc) / vr.mean()
        else:
            v = g2 if v is None else beta2 * v + (1 - beta2) * g2
            vhat = v
        u = g / np.sqrt(vhat)
        u = u / max(1.0, np.sqrt(np.mean(u * u)) / 1.0)  # update clipping at RMS 1
        scale = max(np.sqrt(np.mean(p * p)), 1e-3)      # multiply_by_parameter_scale
        p = p - lr * scale * u
    return p


@pytest.mark.parametrize("shape", [(130, 129), (5, 3), (7,)])
def test_adafactor_matches_hand_computed_t5x_rule(shape):
    rng = np.random.RandomState(1)
    param = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) * s for s in (1.0, 0.3, 2.0)]
    opt = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig(learning_rate=1e-2)))
    p = jnp.asarray(param)
    state = opt.init(p)
    for g in grads:
        upd, state = opt.update(jnp.asarray(g), state, p)
        p = p + upd
    np.testing.assert_allclose(np.asarray(p), _t5x_adafactor_reference(param, grads, 1e-2), rtol=2e-5, atol=2e-6)


def test_adafactor_state_is_float32_for_bfloat16_params():
    """T5X keeps Adafactor's (factored and unfactored) second moments in float32 whatever the parameter dtype."""
    cfg = t5.T5Config(vocab_size=160, emb_dim=128, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1,
                      num_decoder_layers=1, param_dtype="bfloat16", dtype="bfloat16")
    opt = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig(learning_rate=1e-2)))
    state = step_lib.init_state(cfg, opt, jax.random.PRNGKey(0))
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.bfloat16)}
    new, metrics = jax.jit(step_lib.make_train_step(cfg, opt, step_lib.LossConfig()))(state, _packed_batch(6))
    for s in (state, new):
        moments = [x for x in jax.tree.leaves(s["opt_state"]) if x.dtype != jnp.int32]  # int32: step counts
        assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
        assert any(x.ndim == 1 and x.shape[0] == 128 for x in moments)  # a factored row/column moment is among them
    assert {x.dtype for x in jax.tree.leaves(new["params"])} == {jnp.dtype(jnp.bfloat16)}
    assert float(metrics["finite"]) == 1.0
    moved = [bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(state["params"]))]
    assert sum(moved) > len(moved) // 2


def test_schedules():
    const = optim.make_schedule(optim.ScheduleConfig("constant", 1e-3))
    assert float(const(0)) == float(const(10_000)) == pytest.approx(1e-3)
    warm = optim.make_schedule(optim.ScheduleConfig("warmup_constant", 1e-3, warmup_steps=10))
    assert float(warm(0)) == pytest.approx(1e-4) and float(warm(50)) == pytest.approx(1e-3)
    rsqrt = optim.make_schedule(optim.ScheduleConfig("rsqrt", 1e-2, warmup_steps=100))
    assert float(rsqrt(10)) == pytest.approx(1e-2) and float(rsqrt(399)) == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="schedule kind"):
        optim.make_schedule(optim.ScheduleConfig("cosine_typo"))


TINY = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                   num_encoder_layers=1, num_decoder_layers=1)


@pytest.mark.parametrize("normalizer", ["num_real_target_tokens", None, "average_per_sequence"])
def test_microbatch_accumulation_equals_full_batch(normalizer):
    opt = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig()))
    state = step_lib.init_state(TINY, opt, jax.random.PRNGKey(0))
    batch = _packed_batch(3)
    cfg = step_lib.LossConfig(normalizer=normalizer)
    one = jax.jit(step_lib.make_train_step(TINY, opt, cfg, num_microbatches=1))
    two = jax.jit(step_lib.make_train_step(TINY, opt, cfg, num_microbatches=2))
    s1, m1 = one(state, batch)
    s2, m2 = two(state, batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_none_normalizer_is_the_unnormalized_sum_as_in_t5x():
    """T5X (t5x/losses.py compute_weighted_cross_entropy): loss_normalizing_factor=None returns the weighted sum."""
    opt = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig()))
    state = step_lib.init_state(TINY, opt, jax.random.PRNGKey(0))
    batch = _packed_batch(5)
    tokens = float(jnp.sum(batch["decoder_loss_weights"]))
    logits = t5.forward(TINY, state["params"], batch)
    token_loss, _ = loss_lib.token_cross_entropy(logits, batch["decoder_target_tokens"], z_loss=1e-4)
    weighted_sum = float(jnp.sum(token_loss * batch["decoder_loss_weights"]))
    step = lambda norm: jax.jit(step_lib.make_train_step(TINY, opt, step_lib.LossConfig(normalizer=norm)))(
        state, batch)[1]
    summed, mean = step(None), step(step_lib.LossConfig().normalizer)
    assert step_lib.LossConfig().normalizer == loss_lib.NUM_REAL_TARGET_TOKENS
    assert float(summed["loss"]) == pytest.approx(weighted_sum, rel=1e-5)
    assert float(mean["loss"]) == pytest.approx(weighted_sum / tokens, rel=1e-5)
    assert float(summed["grad_norm"]) == pytest.approx(float(mean["grad_norm"]) * tokens, rel=1e-4)


def test_nonfinite_step_is_recorded_and_update_skipped_when_configured():
    opt = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig()))
    state = step_lib.init_state(TINY, opt, jax.random.PRNGKey(0))
    state["params"]["decoder"]["logits_dense"]["kernel"] = state["params"]["decoder"]["logits_dense"]["kernel"].at[
        0, 0].set(jnp.nan)
    batch = _packed_batch(4)
    skip = jax.jit(step_lib.make_train_step(TINY, opt, step_lib.LossConfig(), skip_nonfinite_updates=True))
    new, metrics = skip(state, batch)
    assert int(new["nonfinite_step"]) == 1 and float(metrics["finite"]) == 0.0
    # the skipped update leaves every other parameter exactly as it was
    np.testing.assert_array_equal(np.asarray(new["params"]["token_embedder"]["embedding"]),
                                  np.asarray(state["params"]["token_embedder"]["embedding"]))
