"""PPO arithmetic (GAE, clipping, masked KL, KL controller, entropy) and a tiny end-to-end PPO update."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax.train.rl import ppo_math as pm


def test_gae_matches_hand_computation_and_ignores_padding():
    rewards = jnp.array([[1.0, 0.0, 2.0, 5.0]])       # the 5.0 sits on padding
    values = jnp.array([[0.5, 0.2, 0.1, 9.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    # deltas: d2 = 2 - 0.1 = 1.9 (episode ends), d1 = 0 + 0.9*0.1 - 0.2 = -0.11, d0 = 1 + 0.9*0.2 - 0.5 = 0.68
    # A2 = 1.9, A1 = -0.11 + 0.72*1.9 = 1.258, A0 = 0.68 + 0.72*1.258 = 1.58576
    adv, ret = pm.gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv[0], [1.58576, 1.258, 1.9, 0.0], rtol=1e-5)
    np.testing.assert_allclose(ret[0], [2.08576, 1.458, 2.0, 0.0], rtol=1e-5)


def test_gae_limits_lambda_one_is_discounted_return_lambda_zero_is_td():
    rng = np.random.default_rng(0)
    rewards, values = jnp.asarray(rng.normal(size=(2, 5))), jnp.asarray(rng.normal(size=(2, 5)))
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], jnp.float32)
    _, ret = pm.gae(rewards, values, mask, 0.95, 1.0)
    for row in range(2):
        n = int(mask[row].sum())
        mc = [sum(0.95 ** (k - t) * float(rewards[row, k]) for k in range(t, n)) for t in range(n)]
        np.testing.assert_allclose(ret[row, :n], mc, rtol=1e-5)
    adv, _ = pm.gae(rewards, values, mask, 0.95, 0.0)
    np.testing.assert_allclose(adv[0, 0], rewards[0, 0] + 0.95 * values[0, 1] - values[0, 0], rtol=1e-5)
    np.testing.assert_allclose(adv[1, 1], rewards[1, 1] - values[1, 1], rtol=1e-5)   # last real token: no bootstrap


def test_policy_clipping_gives_no_gradient_past_the_clip_in_the_advantage_direction():
    eps = 0.2
    old = jnp.zeros(4)
    # ratios 1.5 (A>0, past 1+eps), 0.5 (A<0, past 1-eps): clipped, no gradient.
    # ratios 1.5 with A<0 and 0.5 with A>0: the pessimistic min keeps the unclipped term, gradient flows.
    ratios = jnp.array([1.5, 0.5, 1.5, 0.5])
    adv = jnp.array([1.0, -1.0, -1.0, 1.0])
    mask = jnp.ones(4)
    grad = jax.grad(lambda lp: pm.policy_loss(lp, old, adv, mask, eps)[0])(jnp.log(ratios))
    np.testing.assert_allclose(grad[:2], 0.0)
    # d/dlogp of -ratio*A/4 = -ratio*A/4
    np.testing.assert_allclose(grad[2:], -ratios[2:] * adv[2:] / 4, rtol=1e-6)
    _, clip_fraction = pm.policy_loss(jnp.log(ratios), old, adv, mask, eps)
    assert float(clip_fraction) == 1.0
    inside = jax.grad(lambda lp: pm.policy_loss(lp, old, adv, mask, eps)[0])(jnp.log(jnp.array([1.1, 0.9, 1.0, 1.0])))
    assert np.all(np.abs(inside) > 0)


def test_value_loss_clips_towards_old_values():
    old, returns, mask = jnp.array([0.0, 0.0]), jnp.array([1.0, -1.0]), jnp.ones(2)
    values = jnp.array([0.5, 0.5])   # row 0 moved +0.5 towards its return (past clip 0.2), row 1 moved away
    loss, frac = pm.value_loss(values, old, returns, mask, 0.2)
    # row 0: max((0.5-1)^2, (0.2-1)^2) = 0.64; row 1: max((0.5+1)^2, (0.2+1)^2) = 2.25
    np.testing.assert_allclose(loss, 0.5 * (0.64 + 2.25) / 2, rtol=1e-6)
    assert float(frac) == 1.0
    grad = jax.grad(lambda v: pm.value_loss(v, old, returns, mask, 0.2)[0])(values)
    assert float(grad[0]) == 0.0 and float(grad[1]) > 0


def test_per_token_kl_masks_padding():
    policy = jnp.array([[-1.0, -2.0, -0.5, -7.0]])
    reference = jnp.array([[-1.5, -1.0, -0.5, -1.0]])
    mask = pm.response_mask(jnp.array([[5, 6, 1, 0]]))
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0]])
    kl = pm.per_token_kl(policy, reference, mask)
    np.testing.assert_allclose(kl, [[0.5, -1.0, 0.0, 0.0]])
    np.testing.assert_allclose(pm.sequence_kl(policy, reference, mask), [-0.5])
    # a sampled id 0 before EOS is a real token; a row without EOS is all real
    np.testing.assert_array_equal(pm.response_mask(jnp.array([[0, 4, 1, 0], [3, 3, 3, 3]])),
                                  [[1, 1, 1, 0], [1, 1, 1, 1]])


def test_kl_estimate_is_unbiased_for_the_true_kl():
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.4, 0.4, 0.2])
    samples = np.random.default_rng(0).choice(3, size=200_000, p=p)
    estimate = pm.per_token_kl(jnp.log(p[samples]), jnp.log(q[samples]), jnp.ones(len(samples))).mean()
    np.testing.assert_allclose(float(estimate), np.sum(p * np.log(p / q)), atol=5e-3)


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    kl = jnp.array([[0.1, 0.2, 0.3, 0.0], [0.4, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], jnp.float32)
    r = pm.shaped_rewards(jnp.array([2.0, -1.0]), kl, mask, beta=0.5)
    np.testing.assert_allclose(r, [[-0.05, -0.1, 2.0 - 0.15, 0.0], [-1.0 - 0.2, 0.0, 0.0, 0.0]], rtol=1e-6)


def test_fixed_and_adaptive_kl_controller():
    fixed = pm.KLController(beta=0.1)
    assert fixed.update(100.0, 64).beta == 0.1
    ctl = pm.KLController(beta=0.1, target=6.0, horizon=100)
    up = ctl.update(12.0, 10)        # error clipped to +0.2: beta * (1 + 0.1 * 0.2 * 10 / 100)
    np.testing.assert_allclose(up.beta, 0.1 * (1 + 0.002))
    down = ctl.update(4.5, 10)       # error -0.25 clipped to -0.2
    np.testing.assert_allclose(down.beta, 0.1 * (1 - 0.002))
    np.testing.assert_allclose(ctl.update(6.6, 10).beta, 0.1 * (1 + 0.1 * 0.1 * 0.1))
    with pytest.raises(ValueError, match="target"):
        pm.KLController(beta=0.1, target=0.0)


def test_entropy_and_token_log_probs():
    logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0]]])
    ent = pm.token_entropy(logits)
    np.testing.assert_allclose(ent[0, 0], np.log(4), rtol=1e-6)
    assert float(ent[0, 1]) < 1e-6
    np.testing.assert_allclose(pm.token_log_probs(logits, jnp.array([[2, 0]])), [[-np.log(4), 0.0]], atol=1e-6)


def test_masked_whiten_ignores_padding():
    x, mask = jnp.array([1.0, 3.0, 100.0]), jnp.array([1.0, 1.0, 0.0])
    np.testing.assert_allclose(pm.masked_whiten(x, mask), [-1.0, 1.0, 0.0], atol=1e-4)


# --- rollouts and updates on tiny models ---------------------------------------------------------------------------
from flan_jax import models  # noqa: E402
from flan_jax.train.rl import ppo, rollout as rollout_lib  # noqa: E402
from flan_jax.cli import ppo as ppo_main  # noqa: E402  (imported before any test locks gin)

T5_TINY = models.T5Config(vocab_size=16, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1,
                          num_decoder_layers=1)
DEC_TINY = models.DecoderConfig(vocab_size=16, emb_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                                mlp_dim=32)
PROMPTS = np.array([[3, 4, 5, 1, 0], [6, 7, 1, 0, 0], [8, 9, 10, 11, 1], [12, 1, 0, 0, 0]] * 4, np.int32)


@pytest.mark.parametrize('config', [T5_TINY, DEC_TINY], ids=['t5', 'decoder'])
def test_response_logits_are_the_models_option_logits(config):
    params = models.init_params(config, jax.random.PRNGKey(0))
    responses = np.array([[5, 6, 1, 0], [7, 1, 0, 0], [2, 2, 2, 2], [1, 0, 0, 0]], np.int32)
    got = jax.jit(rollout_lib.response_logits, static_argnums=0)(config, params, PROMPTS[:4], responses)
    want = jax.jit(models.option_logits, static_argnums=0)(config, params, PROMPTS[:4], responses[:, None, :])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    hidden = jax.jit(rollout_lib.response_hidden, static_argnums=0)(config, params, PROMPTS[:4], responses)
    assert hidden.shape == (4, 4, config.emb_dim)


def _first_token_reward(target):
    return lambda prompts, responses, refs: (responses[:, 0] == target).astype(np.float32)


@pytest.mark.slow
def test_ppo_raises_a_toy_reward_and_reports_its_metrics():
    params = models.init_params(T5_TINY, jax.random.PRNGKey(0))
    cfg = ppo.PPOConfig(iterations=6, rollout_batch_size=16, ppo_epochs=2, num_minibatches=2, learning_rate=3e-2,
                        init_kl_coef=0.01, kl_target=1.0, kl_horizon=100,
                        sampling=rollout_lib.SamplingConfig(max_decode_len=3))
    prompts = ppo.PromptSet(PROMPTS, ('',) * len(PROMPTS))
    logged = []
    _, history = ppo.train(T5_TINY, cfg, params, prompts, _first_token_reward(7), eval_prompts=prompts,
                           log=lambda i, split, m: logged.append((i, split, m)))
    assert [m for i, split, m in logged if i == 0 and split == 'train'][0].keys() == {'sft_reward_mean', 'sft_reward_std'}
    train_rows = [m for i, split, m in logged if split == 'train' and i > 0]
    assert len(train_rows) == 6
    for key in ('reward_mean', 'kl', 'entropy', 'clip_fraction', 'value_loss', 'beta'):
        assert all(np.isfinite(m[key]) for m in train_rows), key
    assert history[6]['greedy_reward_mean'] > history[0]['greedy_reward_mean']
    assert history[6]['reward_mean'] > history[0]['reward_mean'] + 0.2
    assert history[0]['kl'] == pytest.approx(0.0, abs=1e-5) and history[6]['kl'] > 0
    assert train_rows[-1]['beta'] != cfg.init_kl_coef   # the adaptive controller moved


def test_ptx_term_is_the_sft_loss_and_enters_the_update():
    params = models.init_params(T5_TINY, jax.random.PRNGKey(0))
    targets = np.array([[5, 6, 1, 0]] * 4, np.int32)
    batch = {'encoder_input_tokens': PROMPTS[:4], 'decoder_input_tokens': np.asarray(models.shift_right(targets)),
             'decoder_target_tokens': targets}
    logits = models.forward(T5_TINY, params, batch)
    token_nll = -pm.token_log_probs(logits, targets)
    want = float(jnp.sum(token_nll * (targets > 0)) / 12)
    assert float(ppo.ptx_loss(T5_TINY, params, batch)) == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_learned_reward_reads_a_reward_model_checkpoint_and_scores_at_the_last_real_token(tmp_path):
    from flan_jax.train import checkpointing
    from flan_jax.train.preference import reward, reward_adapter
    backbone = models.init_params(T5_TINY, jax.random.PRNGKey(0))
    head = {'kernel': jax.random.normal(jax.random.PRNGKey(1), (T5_TINY.emb_dim,)), 'bias': jnp.float32(0.3)}
    state = {'step': jnp.int32(7), 'params': {'backbone': backbone, 'head': head}, 'opt_state': {'v': jnp.ones(3)}}
    ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(7, state, {'step': 7})
    ckpt.close()
    params = reward_adapter.load_reward_params(str(tmp_path), T5_TINY)
    responses = np.array([[5, 6, 1, 0], [7, 1, 0, 0], [2, 2, 2, 2], [1, 0, 0, 0]], np.int32)
    want = jax.jit(reward.rewards, static_argnums=0)(T5_TINY, {'backbone': backbone, 'head': head}, PROMPTS[:4],
                                                     responses[:, None, :])[:, 0]
    got = reward_adapter.learned_reward(str(tmp_path), T5_TINY)(PROMPTS[:4], responses, [''] * 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a sampled id 0 before EOS: the score is still read at the EOS, not at the last non-zero id
    odd = np.array([[5, 0, 6, 1]], np.int32)
    hidden = jax.jit(rollout_lib.response_hidden, static_argnums=0)(T5_TINY, backbone, PROMPTS[:1], odd)
    at_eos = float(hidden[0, 3] @ head['kernel'] + head['bias'])
    np.testing.assert_allclose(reward_adapter.score_responses(T5_TINY, params, PROMPTS[:1], odd), [at_eos],
                               rtol=1e-5)
    with pytest.raises(FileNotFoundError):
        reward_adapter.load_reward_params(str(tmp_path / 'missing'), T5_TINY)
    # a reward model of another config: the first mismatched parameter is named with both shapes
    with pytest.raises(ValueError, match=r'mlp/wi_0/kernel: got \(16, 32\), expected \(16, 64\)'):
        reward_adapter.load_reward_params(str(tmp_path), dataclasses.replace(T5_TINY, mlp_dim=64))


def test_ppo_gin_config_parses_into_ppo_and_run_configs():
    import os
    import gin
    from flan_jax.cli import train as train_main
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = train_main.parse_flags([f'--gin_file={repo}/gin_configs/runs/ppo_default_cpu.gin', '--gin.REWARD=rule',
                                   '--gin.ppo.iterations=3'])
    try:
        train_main.configure_gin(args)
        cfg, run = ppo_main.ppo_config(), ppo_main.run_config()
    finally:
        gin.clear_config()
    assert cfg.iterations == 3 and cfg.kl_target is not None and cfg.ptx_coef > 0
    assert run.reward == 'rule' and run.prompt_task == 'flan_default_preference'
    with pytest.raises(ValueError, match='reward_model_dir'):
        ppo_main.RunConfig('d', 'sft', 'task', reward='learned', reward_model_dir=None)
    with pytest.raises(ValueError, match='num_minibatches'):
        ppo.PPOConfig(rollout_batch_size=10, num_minibatches=4)


def test_reward_normalization_uses_the_sft_policys_score_statistics():
    params = models.init_params(T5_TINY, jax.random.PRNGKey(0))
    cfg = ppo.PPOConfig(rollout_batch_size=16, num_minibatches=2, sampling=rollout_lib.SamplingConfig(max_decode_len=3))
    score = lambda prompts, responses, refs: responses[:, 0].astype(np.float32)   # a spread of values
    mean, std = ppo.reward_statistics(T5_TINY, params, ppo.PromptSet(PROMPTS, ('',) * 16), score, cfg,
                                      jax.random.PRNGKey(0))
    assert std > 0
    norm = ppo.normalized(score, mean, std)
    responses = np.array([[3, 1, 0]] * 2, np.int32)
    np.testing.assert_allclose(norm(PROMPTS[:2], responses, ['', '']), (3.0 - mean) / std)


def _ptx_stream():
    """Distinct SFT batches in a fixed order, so a resumed run that replayed the wrong ones would differ."""
    for i in range(10**6):
        targets = np.array([[2 + (i + r) % 13, 1, 0, 0] for r in range(4)], np.int32)
        yield {'encoder_input_tokens': PROMPTS[:4], 'decoder_input_tokens': np.asarray(models.shift_right(targets)),
               'decoder_target_tokens': targets}


@pytest.mark.slow
def test_ppo_resume_equals_an_uninterrupted_run(tmp_path):
    from flan_jax.train.rl import ppo_resume
    params = models.init_params(T5_TINY, jax.random.PRNGKey(0))
    prompts = ppo.PromptSet(PROMPTS, ('',) * len(PROMPTS))
    base = ppo.PPOConfig(iterations=4, rollout_batch_size=8, ppo_epochs=1, num_minibatches=2, learning_rate=3e-2,
                         ptx_coef=0.5, init_kl_coef=0.05, kl_target=1.0, kl_horizon=50,
                         sampling=rollout_lib.SamplingConfig(max_decode_len=3))

    def run(cfg, directory):
        logged = []
        out, history = ppo.train(T5_TINY, cfg, params, prompts, _first_token_reward(7), eval_prompts=prompts,
                                 ptx_batches=_ptx_stream(), eval_period=0, log=lambda *row: logged.append(row),
                                 checkpoint=ppo_resume.CheckpointConfig(str(directory), period=2))
        return out, history, logged

    import dataclasses
    whole, whole_history, whole_log = run(base, tmp_path / 'whole')
    run(dataclasses.replace(base, iterations=2), tmp_path / 'split')       # interrupted after iteration 2
    resumed, resumed_history, resumed_log = run(base, tmp_path / 'split')  # restarts from checkpoint_2
    assert ('resumed_from' in resumed_log[0][2]) and resumed_log[0][0] == 2
    assert not any(split == 'eval' and i == 0 for i, split, _ in resumed_log)   # no second SFT eval
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the interrupted run also evaluated at its own last iteration (2); every eval of the whole run is repeated
    assert {i: resumed_history[i] for i in whole_history} == whole_history
    whole_train = [m for i, split, m in whole_log if split == 'train' and i > 2]
    resumed_train = [m for i, split, m in resumed_log if split == 'train' and i > 2]
    assert [m['beta'] for m in whole_train] == [m['beta'] for m in resumed_train]
    assert [m['ptx_loss'] for m in whole_train] == [m['ptx_loss'] for m in resumed_train]
    assert not np.array_equal(np.asarray(jax.tree.leaves(whole)[0]), np.asarray(jax.tree.leaves(params)[0]))


def test_rule_gin_restricts_prompts_to_the_list_tasks_and_comma_lists_load_each_task():
    import os
    import gin
    from flan_jax.cli import train as train_main
    from flan_jax.train.rl import prompts as prompts_lib
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = train_main.parse_flags([f'--gin_file={repo}/gin_configs/runs/ppo_rule_cpu.gin'])
    try:
        train_main.configure_gin(args)
        cfg, run = ppo_main.ppo_config(), ppo_main.run_config()
    finally:
        gin.clear_config()
    assert run.reward == 'rule' and run.reward_model_dir is None and run.checkpoint_period > 0
    assert run.prompt_task == 'list_sort_pref,list_max_pref' and cfg.kl_target is not None
    prompts, counts = prompts_lib.load_prompts(run.prompt_task, 'validation', 6, 64)
    assert sorted(counts) == ['list_max_pref', 'list_sort_pref'] and len(prompts.tokens) == 6
    assert all(c['kept'] == 3 for c in counts.values())
    with pytest.raises(ValueError, match='checkpoint_period'):
        ppo_main.checkpoint_config(ppo_main.RunConfig('d', 'sft', 'task', reward='rule', checkpoint_period=-1))


def test_rollouts_stop_at_the_vocabulary_eos():
    from flan_jax.cli import ppo as ppo_cli

    class Vocab:   # a vocabulary whose EOS is not T5's 1
        eos_id, pad_id = 5, 0
    cfg = ppo_cli.with_vocabulary_eos(ppo_cli.ppo_config(), Vocab())
    assert cfg.sampling.eos_id == 5
