"""GRPO: group advantages and the clipped + k3-KL loss against hand-computed numbers, the Dr. GRPO variant, kl_coef 0,
packed scoring equal to unpacked, a GRPO step on tiny models, rewards, config errors and the gin config."""
import dataclasses
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import models
from flan_jax.cli import grpo as grpo_main  # imported before any test locks gin
from flan_jax.train.rl import grpo, grpo_math as gm, ppo, rollout as rollout_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two responses: lengths 2 and 1 (L = 3), advantages +1 and -1.
LOG_PROBS = jnp.array([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
OLD = jnp.array([[-1.0, -2.5, 0.0], [-0.2, 0.0, 0.0]])       # ratios 1, e^0.5 = 1.6487, e^-0.3 = 0.7408
REFERENCE = jnp.array([[-1.5, -2.0, 0.0], [-0.5, 0.0, 0.0]])
MASK = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
ADVANTAGES = jnp.array([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])


def _loss(loss_type, kl_coef, reference=REFERENCE, log_probs=LOG_PROBS):
    weights = gm.token_weights(MASK, loss_type, max_len=3)
    return gm.objective(log_probs, OLD, reference, ADVANTAGES, weights, clip_eps=0.2, kl_coef=kl_coef)[0]


def test_group_advantages_match_hand_computation():
    scores = jnp.array([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])   # two groups of 3
    # group 1: mean 0.5, deviations (0.5, -0.5, 0), population std sqrt(1/6) = 0.408248; 0.5 / (0.408248 + 1e-4)
    # group 2: all equal -> 0 (no signal, no division by zero)
    np.testing.assert_allclose(gm.group_advantages(scores, 3), [1.224445, -1.224445, 0, 0, 0, 0], rtol=1e-5, atol=1e-7)
    # Dr. GRPO: the mean is subtracted, nothing is divided
    np.testing.assert_allclose(gm.group_advantages(scores, 3, scale_by_std=False), [0.5, -0.5, 0, 0, 0, 0], atol=1e-7)


def test_grpo_loss_matches_hand_computation():
    # per token min(r A, clip(r, 0.8, 1.2) A):  (0,0) r=1 -> 1;  (0,1) r=1.6487 -> 1.2 (clipped);  (1,0) r=0.7408,
    # A=-1 -> min(-0.7408, -0.8) = -0.8.  k3 at (0,0): d = -1.5 + 1 = -0.5, e^-0.5 + 0.5 - 1 = 0.1065307; 0 elsewhere.
    # beta 0.1: token (0,0) 1 - 0.01065307 = 0.9893469.  GRPO weights 1/(2 * |o_i|): 0.25, 0.25 | 0.5
    # loss = -(0.25 * (0.9893469 + 1.2) + 0.5 * (-0.8)) = -0.1473367
    np.testing.assert_allclose(_loss("grpo", 0.1), -0.1473367, rtol=1e-6)
    np.testing.assert_allclose(gm.k3_kl(LOG_PROBS, REFERENCE)[0, 0], 0.1065307, rtol=1e-6)
    _, metrics = gm.objective(LOG_PROBS, OLD, REFERENCE, ADVANTAGES, gm.token_weights(MASK, "grpo", 3), 0.2, 0.1)
    np.testing.assert_allclose(metrics["clip_fraction"], 2 / 3, rtol=1e-6)   # tokens (0,1) and (1,0)


def test_dr_grpo_weights_every_token_alike_and_changes_the_loss_as_the_formula_says():
    np.testing.assert_allclose(gm.token_weights(MASK, "grpo", 3), [[0.25, 0.25, 0], [0.5, 0, 0]])
    np.testing.assert_allclose(gm.token_weights(MASK, "dr_grpo", 3), [[1 / 6, 1 / 6, 0], [1 / 6, 0, 0]])
    # the same per-token terms, each weighted 1 / (2 * max_len): -(0.9893469 + 1.2 - 0.8) / 6
    np.testing.assert_allclose(_loss("dr_grpo", 0.1), -0.2315578, rtol=1e-6)
    # GRPO: a token of the short response weighs twice one of the long response; Dr. GRPO: the same
    grad = lambda kind: jax.grad(lambda lp: _loss(kind, 0.0, log_probs=lp))(OLD)   # at ratio 1: -w * A
    np.testing.assert_allclose(grad("grpo"), [[-0.25, -0.25, 0], [0.5, 0, 0]], atol=1e-7)
    np.testing.assert_allclose(grad("dr_grpo"), [[-1 / 6, -1 / 6, 0], [1 / 6, 0, 0]], atol=1e-7)
    with pytest.raises(ValueError, match="grpo.loss_type"):
        gm.token_weights(MASK, "dapo", 3)


def test_kl_coefficient_zero_removes_the_kl_term():
    # -(0.25 * (1 + 1.2) + 0.5 * (-0.8)) = -0.15, and the reference is never read (NaN stays out)
    np.testing.assert_allclose(_loss("grpo", 0.0), -0.15, rtol=1e-6)
    np.testing.assert_allclose(_loss("grpo", 0.0, reference=jnp.full((2, 3), jnp.nan)), -0.15, rtol=1e-6)
    # with beta > 0 the KL gradient pulls log pi towards the reference: at (0,0) log pi > log ref, so d loss > 0
    kl_grad = jax.grad(lambda lp: _loss("grpo", 1.0, log_probs=lp) - _loss("grpo", 0.0, log_probs=lp))(LOG_PROBS)
    assert float(kl_grad[0, 0]) > 0 and float(kl_grad[0, 1]) == 0.0


def test_k3_is_nonnegative_and_unbiased_for_the_true_kl():
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.4, 0.4, 0.2])
    samples = np.random.default_rng(0).choice(3, size=200_000, p=p)
    k3 = gm.k3_kl(jnp.log(p[samples]), jnp.log(q[samples]))
    assert float(k3.min()) >= 0
    np.testing.assert_allclose(float(k3.mean()), np.sum(p * np.log(p / q)), atol=5e-3)


# --- tiny models ----------------------------------------------------------------------------------------------------
T5_TINY = models.T5Config(vocab_size=16, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1,
                          num_decoder_layers=1)
DEC_TINY = models.DecoderConfig(vocab_size=16, emb_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                                mlp_dim=32)
PROMPTS = np.array([[3, 4, 5, 1, 0], [6, 7, 1, 0, 0], [8, 9, 10, 11, 1], [12, 1, 0, 0, 0]], np.int32)
RESPONSES = np.array([[5, 6, 1, 0], [7, 1, 0, 0], [2, 0, 2, 2], [1, 0, 0, 0]], np.int32)   # row 2: id 0, no EOS


@pytest.mark.parametrize("config", [T5_TINY, DEC_TINY,
                                    dataclasses.replace(T5_TINY, peft=models.PeftConfig("prompt", prompt_length=2)),
                                    dataclasses.replace(DEC_TINY, peft=models.PeftConfig("prompt", prompt_length=2))],
                         ids=["t5", "decoder", "t5_prompt_tuning", "decoder_prompt_tuning"])
def test_packed_and_one_per_row_log_probs_equal_the_unpacked_rollout_scores(config):
    params = models.init_params(config, jax.random.PRNGKey(0))
    mask = np.asarray(rollout_lib.ppo_math.response_mask(RESPONSES))
    want = np.asarray(rollout_lib.reference_log_probs(config, params, PROMPTS, RESPONSES)) * mask
    for pack in (False, True):
        packed = grpo.pack_pairs(config, PROMPTS, RESPONSES, mask, pack, pack_factor=4, row_multiple=8)
        got = np.asarray(grpo.packed_log_probs(config, params, packed.features))
        assert np.all(np.isfinite(got))
        rows = 8 if pack else 4            # packed: 4 pairs in 1 row, padded to 8 rows
        assert packed.features["decoder_target_tokens"].shape[0] == rows
        back = np.zeros_like(want)
        for i in range(4):
            n = int(mask[i].sum())
            back[i, :n] = got[packed.rows[i], packed.starts[i]:packed.starts[i] + n]
        np.testing.assert_allclose(back, want, rtol=1e-4, atol=1e-5)
        scattered = packed.scatter(mask * np.arange(1, 5)[:, None])
        assert scattered.sum() == pytest.approx(float((mask * np.arange(1, 5)[:, None]).sum()))


def _two_response_group():
    prompts = np.repeat(PROMPTS[:1], 2, axis=0)
    responses = np.array([[5, 6, 1, 0], [7, 1, 0, 0]], np.int32)
    mask = np.asarray(rollout_lib.ppo_math.response_mask(responses))
    scores = np.array([1.0, 0.0], np.float32)
    return grpo.Groups(prompts, responses, mask, scores, np.asarray(gm.group_advantages(scores, 2)))


@pytest.mark.parametrize("config", [T5_TINY, DEC_TINY,
                                    dataclasses.replace(T5_TINY, peft=models.PeftConfig("lora", rank=2))],
                         ids=["t5", "decoder", "t5_lora"])
def test_a_grpo_step_raises_the_log_prob_of_the_higher_reward_response(config):
    params = models.init_params(config, jax.random.PRNGKey(0))
    cfg = grpo.GRPOConfig(prompts_per_iteration=1, group_size=2, learning_rate=1e-2, kl_coef=0.04,
                          sampling=rollout_lib.SamplingConfig(max_decode_len=4))
    groups = _two_response_group()
    trainable, frozen = grpo.split_params(config, params)
    optimizer = grpo.make_optimizer(cfg)
    step = grpo.make_update_step(config, cfg, optimizer)
    batch = grpo.minibatch(config, cfg, groups, np.arange(2), params, params)
    state, metrics = step({"params": trainable, "opt_state": optimizer.init(trainable)}, frozen, batch)
    seq_log_prob = lambda p: np.sum(np.asarray(rollout_lib.reference_log_probs(config, p, groups.prompts,
                                                                               groups.responses)) * groups.mask, 1)
    before, after = seq_log_prob(params), seq_log_prob(grpo.join_params(state["params"], frozen))
    assert after[0] > before[0] and after[1] < before[1]
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6) and metrics["clip_fraction"] == 0.0   # ratio 1, policy = ref
    if config.peft is not None:   # only the adapter moved
        assert set(state["params"]) == {"peft"}
        for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(grpo.split_params(config, params)[1])):
            np.testing.assert_array_equal(a, b)


def _first_token_reward(target):
    return lambda prompts, responses, refs: (responses[:, 0] == target).astype(np.float32)


@pytest.mark.slow
def test_grpo_train_logs_its_figures_and_resumes_from_its_checkpoint(tmp_path):
    from flan_jax.train.rl import ppo_resume
    params = models.init_params(T5_TINY, jax.random.PRNGKey(0))
    prompts = ppo.PromptSet(np.concatenate([PROMPTS] * 2), ("",) * 8)
    cfg = grpo.GRPOConfig(iterations=2, prompts_per_iteration=4, group_size=4, epochs=2, num_minibatches=2,
                          learning_rate=3e-2, sampling=rollout_lib.SamplingConfig(max_decode_len=3))

    def run(cfg, directory):
        logged = []
        out, history = grpo.train(T5_TINY, cfg, params, prompts, _first_token_reward(7), eval_prompts=prompts,
                                  log=lambda *row: logged.append(row),
                                  checkpoint=ppo_resume.CheckpointConfig(str(directory), period=1))
        return out, history, logged

    whole, history, logged = run(cfg, tmp_path / "whole")
    train_rows = [m for _, split, m in logged if split == "train"]
    for key in ("reward_mean", "kl", "kl_k3", "clip_fraction", "groups_with_signal", "rollout_tokens_per_sec"):
        assert all(np.isfinite(m[key]) for m in train_rows), key
    assert sorted(history) == [0, 2] and history[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    run(dataclasses.replace(cfg, iterations=1), tmp_path / "split")
    resumed, _, resumed_log = run(cfg, tmp_path / "split")
    assert resumed_log[0][2] == {"resumed_from": 1}
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- rewards, config errors, the gin config ---------------------------------------------------------------------------
class _Vocab:
    eos_id, pad_id = 1, 0
    words = {2: "3", 3: "7", 4: " ", 5: ",", 6: "x"}

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)


def test_format_and_user_function_rewards():
    responses = np.array([[2, 4, 3, 1], [3, 3, 1, 0], [6, 1, 0, 0]], np.int32)   # "3 7", "77", "x"
    refs = ["1 2", "5", "9"]
    np.testing.assert_array_equal(grpo.format_reward(_Vocab())(None, responses, refs), [1, 1, 0])
    user = lambda prompts, texts, references: [len(t) for t in texts]
    np.testing.assert_array_equal(grpo.text_reward(user, _Vocab())(responses, responses, refs), [3, 2, 1])
    both = grpo.weighted_sum([(1.0, grpo.text_reward(user, _Vocab())), (0.5, grpo.format_reward(_Vocab()))])
    np.testing.assert_allclose(both(responses, responses, refs), [3.5, 2.5, 1])
    with pytest.raises(ValueError, match="returned shape"):
        grpo.text_reward(lambda *a: [1.0], _Vocab())(responses, responses, refs)


def test_a_config_error_names_its_key(capsys):
    for kwargs, key in [({"group_size": 1}, "grpo.group_size"), ({"kl_coef": -1.0}, "grpo.kl_coef"),
                        ({"loss_type": "ppo"}, "grpo.loss_type"), ({"num_minibatches": 3}, "grpo.num_minibatches")]:
        with pytest.raises(ValueError, match=key):
            grpo.GRPOConfig(**kwargs)
    with pytest.raises(ValueError, match="grpo_run.reward_function"):
        grpo_main.RunConfig("d", "sft", "task", reward="function")
    with pytest.raises(ValueError, match="grpo_run.reward_model_dir"):
        grpo_main.RunConfig("d", "sft", "task", reward="learned")
    rc = grpo_main.main([f"--gin_file={REPO}/gin_configs/runs/grpo_rule_cpu.gin", "--gin.grpo.group_size=1"])
    assert rc == 2 and "grpo.group_size=1" in capsys.readouterr().err


@gin.configurable
def grpo_test_reward(prompts, responses, references):
    return [float(len(r)) for r in responses]


def test_grpo_gin_config_parses_and_names_a_user_reward_function():
    from flan_jax.cli import train as train_main
    args = train_main.parse_flags([f"--gin_file={REPO}/gin_configs/runs/grpo_rule_cpu.gin",
                                   "--gin.grpo.loss_type='dr_grpo'", "--gin.grpo.kl_coef=0.0"])
    try:
        train_main.configure_gin(args)
        cfg, run = grpo_main.grpo_config(), grpo_main.run_config()
        assert cfg.loss_type == "dr_grpo" and cfg.kl_coef == 0.0 and cfg.pack
        assert run.reward == "rule" and run.prompt_task == "list_sort_pref,list_max_pref" and run.checkpoint_period > 0
        args = train_main.parse_flags([f"--gin_file={REPO}/gin_configs/runs/grpo_rule_cpu.gin",
                                       "--gin.grpo_run.reward='function'",
                                       "--gin.grpo_run.reward_function=@grpo_test_reward"])
        train_main.configure_gin(args)
        run = grpo_main.run_config()
    finally:
        gin.clear_config()
    responses = np.array([[2, 4, 3, 1], [6, 1, 0, 0]], np.int32)   # "3 7", "x"
    np.testing.assert_array_equal(grpo_main.make_reward_fn(run, None, _Vocab())(responses, responses, ["", ""]), [3, 1])
