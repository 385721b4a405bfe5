"""Preference learning: closed-form losses, ranked-list pair expansion, bad records, the reward head, and DPO steps
that move the policy the right way, for both model families (tiny configs)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import models

from flan_jax.data import preference as preference_data, registry
from flan_jax.data.sources import FunctionSource, MalformedRecordError
from flan_jax.data.templates import Template
from flan_jax.train import optim, state as state_lib
from flan_jax.train.preference import losses, pairs, reward, scoring, steps
from flan_jax.cli import preference as pref_main  # imported before any test locks gin

T5_CFG = models.T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24, num_encoder_layers=1,
                         num_decoder_layers=1)
DEC_CFG = models.DecoderConfig(vocab_size=64, emb_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                               mlp_dim=24)
LENGTHS = {"inputs": 12, "targets": 6}


class CharVocab:
    """Character ids 2..63 (0 pad, 1 EOS): enough to tokenize the test prompts without a SentencePiece model."""
    pad_id, eos_id = 0, 1

    def encode(self, text):
        return [2 + (ord(c) % 62) for c in text]


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# --- losses --------------------------------------------------------------------------------------------------------

PC, PR = np.array([-3.0, -5.0, -2.0]), np.array([-4.0, -3.0, -9.0])
RC, RR = np.array([-3.5, -5.0, -1.0]), np.array([-3.5, -4.0, -2.0])
W = np.array([1.0, 0.5, 0.0])   # the third pair is padding


def test_dpo_loss_is_the_closed_form():
    beta = 0.3
    h = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    want = sum(w * -math.log(_sigmoid(beta * x)) for w, x in zip(W, h)) / W.sum()
    got = losses.dpo_loss(PC, PR, RC, RR, W, beta=beta)
    assert abs(float(got) - want) < 1e-6
    assert h == pytest.approx([1.0, -1.0, 6.0])   # by hand: one pair right, one wrong, one padding


def test_ipo_loss_is_the_closed_form():
    tau = 0.25
    h = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    want = sum(w * (x - 1 / (2 * tau)) ** 2 for w, x in zip(W, h)) / W.sum()
    assert abs(float(losses.dpo_loss(PC, PR, RC, RR, W, beta=tau, loss_type="ipo")) - want) < 1e-6
    # IPO's minimum sits at h = 1/(2 tau), not at h -> infinity as DPO's does
    at_target = losses.dpo_loss(jnp.array([2.0]), jnp.array([0.0]), jnp.array([0.0]), jnp.array([0.0]),
                                jnp.array([1.0]), beta=tau, loss_type="ipo")
    assert float(at_target) == 0.0
    with pytest.raises(ValueError, match="loss_type='hinge'"):
        losses.dpo_loss(PC, PR, RC, RR, W, beta=tau, loss_type="hinge")


def test_reward_loss_is_the_closed_form():
    want = sum(w * -math.log(_sigmoid(c - r)) for w, c, r in zip(W, PC, PR)) / W.sum()
    assert abs(float(losses.reward_loss(PC, PR, W)) - want) < 1e-6


def test_sequence_logprobs_skip_padding():
    logits = np.random.default_rng(0).normal(size=(2, 4, 10)).astype(np.float32)
    targets = np.array([[3, 4, 1, 0], [5, 1, 0, 0]])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [logp[0, 0, 3] + logp[0, 1, 4] + logp[0, 2, 1], logp[1, 0, 5] + logp[1, 1, 1]]
    np.testing.assert_allclose(losses.sequence_logprobs(logits, targets), want, rtol=1e-6)


# --- data: ranked lists, pairs, bad records --------------------------------------------------------------------------

def test_ranked_pairs_are_all_k_choose_2_better_before_worse():
    assert preference_data.ranked_pairs(2) == [(0, 1)]
    got = preference_data.ranked_pairs(4)
    assert len(got) == 6 and set(got) == {(i, j) for i in range(4) for j in range(4) if i < j}


def _register_jsonl(tmp_path, lines, policy="skip_and_count", name="toy_prefs"):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    source = preference_data.PreferenceJsonlSource({"train": str(path)})
    return preference_data.register_preference_task(
        name, source, [Template("Q: {question}", "-"), Template("{question}?", "-")], prompt_fields=["question"],
        vocabulary=CharVocab(), record_policy=policy), path


def test_ranked_lists_expand_into_whole_prompt_batches(tmp_path):
    task, _ = _register_jsonl(tmp_path, [
        json.dumps({"question": "abc", "responses": ["x", "yy", "zzz", "w"]}),
        json.dumps({"question": "de", "chosen": "good", "rejected": "bad"}),
        json.dumps({"question": "fgh", "responses": ["p", "q", "r"]})])
    groups = list(preference_data.iter_groups(task, "train"))
    assert [len(g.pairs) for g in groups] == [6, 1, 3]
    assert groups[0].inputs in ("Q: abc", "abc?") and groups[1].responses == ("good", "bad")
    pool = pairs.build_pool([task], "train", 10, LENGTHS)
    assert len(pool) == 10 and pool.counters["prompts"] == 3
    np.testing.assert_allclose(pool.weight[:6], 1 / 6)
    np.testing.assert_allclose(pool.weight[7:], 1 / 3)
    # chosen is the better of each pair: "x" (first) is chosen in all 3 of its pairs, "w" (last) never
    first_tokens = pool.responses[:6, :, 0]
    assert (first_tokens[:, 0] == CharVocab().encode("x")[0]).sum() == 3
    assert (first_tokens[:, 0] == CharVocab().encode("w")[0]).sum() == 0
    for epoch in range(3):
        for index in pairs.epoch_batches(pool, 8, seed=0, epoch=epoch):
            real = index[index >= 0]
            for g in np.unique(pool.group[real]):
                assert np.sum(pool.group[real] == g) == np.sum(pool.group == g)  # a prompt's pairs never split
    with pytest.raises(ValueError, match="PAIRS_PER_BATCH=4 is smaller than the 6 pairs"):
        pairs.epoch_batches(pool, 4, seed=0, epoch=0)


def test_bad_records_are_counted_or_named(tmp_path):
    lines = ["{not json", json.dumps({"question": "a", "chosen": "x"}),
             json.dumps({"question": "b", "responses": ["only"]}),
             json.dumps({"question": "c", "chosen": "same", "rejected": "same"}),
             json.dumps({"question": "d", "chosen": "y", "rejected": "z"})]
    preference_data.reset_data_error_counts()
    task, path = _register_jsonl(tmp_path, lines)
    assert [g.responses for g in preference_data.iter_groups(task, "train")] == [("y", "z")]
    assert preference_data.data_error_counts()[task] == {
        "invalid_json": 1, "missing_field:rejected": 1, "too_few_responses:responses": 1,
        "duplicate_response:rejected": 1}
    task, path = _register_jsonl(tmp_path, lines[1:], policy="fail_fast", name="toy_strict")
    with pytest.raises(MalformedRecordError, match=rf"toy_strict.*file {path} line 1: missing_field:rejected"):
        list(preference_data.iter_groups(task, "train"))


def test_truncation_is_counted(tmp_path):
    task, _ = _register_jsonl(tmp_path, [json.dumps({"question": "q" * 40, "chosen": "a" * 20, "rejected": "b"})],
                              name="toy_long")
    pool = pairs.build_pool([task], "train", 5, LENGTHS)
    assert pool.counters["truncated_inputs"] == 1 and pool.counters["truncated_responses"] == 1
    assert pool.inputs.shape == (1, LENGTHS["inputs"]) and pool.inputs[0, -1] == pairs.EOS_ID


def test_embedded_preferences_follow_the_rule_and_validation_prompts_are_unseen():
    import flan_jax.tasks  # noqa: F401
    from flan_jax.tasks import default_preference as dp
    for name, (generate, _) in dp.WRONG_ANSWERS.items():
        spec = preference_data.preference_spec(name + "_pref")
        base = registry.task_spec(name).source
        for split in ("train", "validation"):
            for _, record in zip(range(40), (r for _, r in spec.source.records(split))):
                assert record["chosen"] == record["answer"] != record["rejected"]
                # the instruction task (SFT) puts the same prompt in the same split: validation is unseen by both
                assert base.split_of({k: v for k, v in record.items() if k not in ("chosen", "rejected")}) == split


# --- models: reward head, DPO steps --------------------------------------------------------------------------------

def _toy_batch(pairs_count=4):
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, 60, (pairs_count, 8)).astype(np.int32)
    inputs[:, 6:] = 0
    inputs[:, 5] = 1
    chosen = np.array([[7, 8, 1, 0, 0], [9, 1, 0, 0, 0], [7, 7, 7, 1, 0], [10, 11, 1, 0, 0]][:pairs_count], np.int32)
    rejected = np.array([[12, 1, 0, 0, 0], [13, 14, 1, 0, 0], [15, 1, 0, 0, 0], [16, 17, 18, 1, 0]][:pairs_count],
                        np.int32)
    return {"inputs": inputs, "responses": np.stack([chosen, rejected], 1),
            "weight": np.ones(pairs_count, np.float32)}


@pytest.mark.parametrize("config", [T5_CFG, DEC_CFG], ids=["t5", "decoder"])
def test_reward_is_the_head_on_the_hidden_state_at_eos(config):
    rewards = jax.jit(lambda p, x, y: reward.rewards(config, p, x, y))
    params = reward.reward_params(config, models.init_params(config, jax.random.PRNGKey(0)))
    batch = _toy_batch()
    assert np.all(np.asarray(rewards(params, batch["inputs"], batch["responses"])) == 0.0)
    params["head"] = {"kernel": jax.random.normal(jax.random.PRNGKey(1), (config.emb_dim,)), "bias": jnp.float32(0.5)}
    r = np.asarray(rewards(params, batch["inputs"], batch["responses"]))
    hidden = np.asarray(jax.jit(lambda p, x, y: scoring.response_hidden_states(config, p, x, y))(
        params["backbone"], batch["inputs"], batch["responses"]))
    flat = batch["responses"].reshape(-1, batch["responses"].shape[-1])
    eos = [int(np.flatnonzero(row == 1)[0]) for row in flat]
    want = np.array([hidden[i, e] @ np.asarray(params["head"]["kernel"]) + 0.5 for i, e in enumerate(eos)])
    np.testing.assert_allclose(r.reshape(-1), want, rtol=1e-5, atol=1e-5)
    # more padding after the EOS changes nothing
    padded = np.pad(batch["responses"], ((0, 0), (0, 0), (0, 3)))
    np.testing.assert_allclose(rewards(params, batch["inputs"], padded), r, rtol=1e-5, atol=1e-5)


def _train(loss_fn, params, batch, steps_count, lr):
    optimizer = optim.make_adafactor(optim.AdafactorConfig(multiply_by_parameter_scale=False),
                                     optim.make_schedule(optim.ScheduleConfig(learning_rate=lr)))
    state = state_lib.new_state(params, optimizer)
    step = jax.jit(steps.make_train_step(loss_fn, optimizer, seed=0))
    history = []
    for _ in range(steps_count):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


@pytest.mark.parametrize("config,loss_type", [(T5_CFG, "sigmoid"), (T5_CFG, "ipo"), (DEC_CFG, "sigmoid")],
                         ids=["t5-dpo", "t5-ipo", "decoder-dpo"])
def test_dpo_steps_raise_the_margin_over_the_reference(config, loss_type):
    params = models.init_params(config, jax.random.PRNGKey(0))
    batch = _toy_batch()
    policy = jax.jit(lambda p, b: steps.policy_scores(config, p, b))
    reference = np.asarray(policy(params, batch))
    batch = {**batch, "reference_logprobs": reference}
    beta = 0.5   # IPO's target margin 1 / (2 tau) = 1
    state, history = _train(steps.make_dpo_loss(config, beta=beta, loss_type=loss_type), params, batch, 6, 3e-3)
    assert history[0]["log_ratio_margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    assert history[-1]["loss"] < history[0]["loss"]
    logp = np.asarray(policy(state["params"], batch))
    h = (logp[:, 0] - reference[:, 0]) - (logp[:, 1] - reference[:, 1])
    assert np.all(h > 0), h
    if loss_type == "ipo":
        assert np.mean(np.abs(h - 1 / (2 * beta))) < 1.0   # moved from |0 - 1| towards the target


def test_reward_steps_learn_to_rank():
    params = reward.reward_params(T5_CFG, models.init_params(T5_CFG, jax.random.PRNGKey(0)))
    batch = _toy_batch()
    state, history = _train(steps.make_reward_loss(T5_CFG), params, batch, 8, 1e-2)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)   # zero head: every reward 0
    r = np.asarray(jax.jit(lambda p, b: steps.reward_scores(T5_CFG, p, b))(state["params"], batch))
    assert np.all(r[:, 0] > r[:, 1]) and history[-1]["loss"] < 0.5 * history[0]["loss"]


def test_preference_gin_configs_parse(tmp_path):
    import os
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for kind in ("reward", "dpo"):
        cfg = pref_main.configure([f"--gin_file={repo}/gin_configs/runs/{kind}_default_cpu.gin",
                                    f"--gin.MODEL_DIR={tmp_path}"])
        assert cfg.kind == kind and cfg.init_checkpoint == "runs/default" and cfg.train_steps > 0
        assert pairs.task_names(cfg.mixture_or_task_name) == sorted(
            f"{t}_pref" for t in ("addition", "subtraction", "list_sort", "list_max"))
