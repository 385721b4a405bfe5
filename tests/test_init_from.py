"""Finetuning starts from a T5X checkpoint: params by default; Adafactor slots and step when asked."""
import jax
import numpy as np
import pytest

from flan_jax import checkpoints
from flan_jax.models import t5
from flan_jax.train import init_from, optim

CFG = t5.T5Config(vocab_size=256, emb_dim=128, num_heads=2, head_dim=64, mlp_dim=256,
                  num_encoder_layers=1, num_decoder_layers=1)


def _slots(params, rng):
    """T5X-shaped slots: factored (v_row drops the largest dim, v_col the second largest) or full v."""
    out = {}
    for path, p in init_from._flat(params):
        shape = p.shape
        if len(shape) == 2 and min(shape) >= 128:
            big = int(np.argmax(shape)) if shape[0] != shape[1] else 1
            small = 1 - big
            out[path] = {"v_row": rng.rand(*[shape[small]]).astype(np.float32),
                         "v_col": rng.rand(*[shape[big]]).astype(np.float32)}
        else:
            out[path] = {"v": rng.rand(*shape).astype(np.float32)}
    return out


def test_restores_params_slots_and_step(tmp_path):
    params = jax.device_get(t5.init_params(CFG, jax.random.PRNGKey(1)))
    rng = np.random.RandomState(0)
    slots = _slots(params, rng)
    nested = {}
    for path, s in slots.items():
        node = nested
        *head, last = path.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = s
    ckpt = checkpoints.save_t5x_legacy(params, str(tmp_path), step=1_100_000, param_states=nested)
    opt = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig()))
    template = jax.device_get(opt.init(params))

    p0, state0, step0 = init_from.initial_params_and_opt_state(ckpt, CFG, template, False)
    assert state0 is None and step0 == 0
    np.testing.assert_array_equal(p0["decoder"]["logits_dense"]["kernel"], params["decoder"]["logits_dense"]["kernel"])

    p1, state1, step1 = init_from.initial_params_and_opt_state(ckpt, CFG, template, True)
    assert step1 == 1_100_000
    factored = [s for s in jax.tree.leaves(state1, is_leaf=lambda x: hasattr(x, "v_row")) if hasattr(s, "v_row")][0]
    assert int(factored.count) == 1_100_000
    emb_slots = slots["token_embedder/embedding"]  # [256, 128]: factored
    np.testing.assert_array_equal(factored.v_row["token_embedder"]["embedding"], emb_slots["v_row"])
    np.testing.assert_array_equal(factored.v_col["token_embedder"]["embedding"], emb_slots["v_col"])
    scale = slots["encoder/encoder_norm/scale"]["v"]
    np.testing.assert_array_equal(factored.v["encoder"]["encoder_norm"]["scale"], scale)


def test_mismatched_model_config_names_the_parameter(tmp_path):
    params = jax.device_get(t5.init_params(CFG, jax.random.PRNGKey(1)))
    ckpt = checkpoints.save_t5x_legacy(params, str(tmp_path), step=1)
    other = t5.T5Config(vocab_size=256, emb_dim=128, num_heads=2, head_dim=64, mlp_dim=512,
                        num_encoder_layers=1, num_decoder_layers=1)
    with pytest.raises(ValueError, match=r"mlp/wi_0/kernel"):
        init_from.load_checkpoint_params(ckpt, other)


def _updates_after(opt, params, grads, state):
    return jax.device_get(opt.update(grads, state, params)[0])


def test_rsqrt_schedule_and_momentum_continue_from_the_t5x_step():
    """T5X at step 1000 with momentum: restoring its slots and step gives the update T5X's run would make next (the
    schedule counts from 1000, not 0); `m` lands in the momentum EMA; without momentum in our optimizer `m` is an
    error naming the slot."""
    shape = (128, 256)  # factored
    params = {"w": np.ones(shape, np.float32), "b": np.ones((8,), np.float32)}
    grad = lambda t: jax.tree.map(lambda p: np.full(p.shape, 0.1 + 0.01 * (t % 7), np.float32), params)
    schedule = optim.make_schedule(optim.ScheduleConfig("rsqrt", 1e-2, warmup_steps=10))
    opt = optim.make_adafactor(optim.AdafactorConfig(beta1=0.9), schedule)
    state, p = opt.init(params), params
    step = jax.jit(lambda g, s, p: opt.update(g, s, p))
    for t in range(1000):  # "T5X's" run: 1000 updates, then the 1001st is the reference
        _, state = step(grad(t), state, p)
    state = jax.device_get(state)
    expected = _updates_after(opt, p, grad(1000), state)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "v_row") or hasattr(x, "ema"))
    fac = next(x for x in leaves if hasattr(x, "v_row"))
    ema = next(x for x in leaves if hasattr(x, "ema"))
    slots = {"w": {"v_row": fac.v_row["w"], "v_col": fac.v_col["w"], "m": ema.ema["w"]},
             "b": {"v": fac.v["b"], "m": ema.ema["b"]}}
    restored = init_from.adafactor_state_from_slots(jax.device_get(opt.init(params)), slots, 1000)
    got = _updates_after(opt, p, grad(1000), restored)
    for k in params:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, err_msg=k)
    fresh = _updates_after(opt, p, grad(1000), init_from.adafactor_state_from_slots(
        jax.device_get(opt.init(params)), slots, 0))
    assert not np.allclose(fresh["b"], expected["b"])  # the step (schedule and decay) matters
    no_momentum = optim.make_adafactor(optim.AdafactorConfig(), schedule)
    with pytest.raises(ValueError, match=r"slot b/m has no place.*beta1"):
        init_from.adafactor_state_from_slots(jax.device_get(no_momentum.init(params)), slots, 1000)


def test_logged_learning_rate_follows_the_restored_t5x_step():
    """After restoring T5X's slots and step 1000, the first finetuning update (loop step 1) uses, and logs, the
    rsqrt rate of step 1000, not of step 0; without a restore both counters agree."""
    params = {"w": np.ones((128, 256), np.float32), "b": np.ones((8,), np.float32)}
    schedule = optim.make_schedule(optim.ScheduleConfig("rsqrt", 1e-2, warmup_steps=10))
    opt = optim.make_adafactor(optim.AdafactorConfig(), schedule)
    leaves = jax.tree.leaves(jax.device_get(opt.init(params)), is_leaf=lambda x: hasattr(x, "v_row"))
    fac = next(x for x in leaves if hasattr(x, "v_row"))
    slots = {"w": {"v_row": fac.v_row["w"], "v_col": fac.v_col["w"]}, "b": {"v": fac.v["b"]}}
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.1, np.float32), params)
    for t5x_step, loop_step in ((1000, 1), (0, 1)):
        state = init_from.adafactor_state_from_slots(jax.device_get(opt.init(params)), slots, t5x_step)
        _, state = opt.update(grads, state, params)
        logged = optim.applied_learning_rate(schedule, state, loop_step)
        np.testing.assert_allclose(logged, float(schedule(t5x_step)), rtol=1e-6)
    assert float(schedule(1000)) < float(schedule(0)) / 5  # the two differ: the test can tell them apart
    assert optim.applied_learning_rate(schedule, {}, 7) == float(schedule(6))  # no counter: the loop's step
