"""The lm-evaluation-harness adapter (flan_jax/evaluation/harness.py, flan_jax/cli/eval_harness.py): its
loglikelihoods are rank classification's, rolling and generation follow their definitions, and lm-eval runs the
offline tasks of tests/fixtures/harness end to end, on a tiny trained T5 checkpoint and a decoder-only model."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from flan_jax import models  # noqa: E402
from flan_jax.cli import eval_harness  # noqa: E402
from flan_jax.evaluation import harness, inference, scoring  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "harness")
TINY = os.path.join(REPO, "gin_configs", "runs", "tiny_test.gin")
SHORT_RUN = ["--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2", "--gin.EVAL_MIXTURE_OR_TASK_NAME=None",
             "--gin.BATCH_SIZE=4", "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 16}",
             "--gin.train.async_checkpointing=False", "--gin.BEST_METRIC=None"]
OPTIONS = harness.HarnessOptions(batch_size=4, max_input_len=128, max_target_len=16, max_gen_toks=8)
PAIRS = [("Question: Is the sky blue?\nAnswer:", " yes"), ("Question: Is the sky blue?\nAnswer:", " no"),
         ("", "An empty context scores the text after EOS alone."),
         ("Translate to German: good morning", "Guten Morgen"),
         ("x " * 200, " a prompt longer than max_input_len keeps its end")]


@pytest.fixture(scope="module", autouse=True)
def offline_in_repo(tmp_path_factory):
    """The fixture tasks read their JSONL by paths relative to the repository root; nothing may reach the hub."""
    patch = pytest.MonkeyPatch()
    patch.chdir(REPO)
    patch.setenv("HF_DATASETS_OFFLINE", "1")
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    from flan_jax.cli import train as train_main
    run = str(tmp_path_factory.mktemp("harness") / "run")
    train_main.train_main([f"--gin_file={TINY}", f"--gin.MODEL_DIR={run}", *SHORT_RUN])
    return run


@pytest.fixture(scope="module")
def t5(t5_run):
    return eval_harness.load_scorer([f"--gin_file={t5_run}/config.gin", f"--checkpoint={t5_run}/checkpoint_2"],
                                    OPTIONS)


@pytest.fixture(scope="module")
def decoder():
    """A random prefix-LM decoder over bytes (no training: the definitions hold for any parameters)."""
    import seqio
    vocab = seqio.ByteVocabulary()
    cfg = models.DecoderConfig(vocab_size=vocab.vocab_size, emb_dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
                               head_dim=16, mlp_dim=64, dtype="float32")
    model = inference.InferenceModel(cfg, models.init_params(cfg, jax.random.PRNGKey(0)), vocab)
    return harness.HarnessScorer(model, OPTIONS)


def _reference_scores(scorer, pairs, eos: bool):
    """Each pair scored alone by flan_jax's rank classification scorer (scoring.rank_classification_scores)."""
    m = scorer.model
    out = []
    for context, continuation in pairs:
        prompt, _ = inference.encode_prompts(m.vocabulary, [context], OPTIONS.max_input_len)
        target = list(m.vocabulary.encode(continuation.lstrip())) + ([m.ids.eos] if eos else [])
        tokens = inference.pad_rows(prompt, OPTIONS.max_input_len)   # one shape for every pair: one compilation
        options = inference.pad_options([[target]], 1, 64)
        out.append(float(scoring.rank_classification_scores(m.config, m.params, tokens, options)[0, 0]))
    return out


def _check_loglikelihood(scorer):
    # 1e-5 nats, or 1e-6 of the sum: a sum of hundreds of nats in float32 (resolution ~3e-5 at 300) moves by a few
    # units in the last place with the padded width and batch it was computed in.
    for eos in (False, True):
        fresh = harness.HarnessScorer(scorer.model, dataclasses.replace(OPTIONS, eos=eos))
        got = fresh.loglikelihood(PAIRS)
        assert fresh.truncated == 1   # the long prompt, counted for the command's report
        np.testing.assert_allclose([s for s, _ in got], _reference_scores(scorer, PAIRS, eos), rtol=1e-6, atol=1e-5)
        assert all(isinstance(g, bool) for _, g in got)
    # is_greedy: the model's own greedy continuation is greedy; one changed token is not
    prompt, _ = inference.encode_prompts(scorer.vocab, [PAIRS[3][0]], OPTIONS.max_input_len)
    ids, _ = inference.cut_at_eos(np.asarray(scorer.model.greedy(inference.pad_rows(prompt, 64), 6))[0],
                                  scorer.model.ids.eos)
    assert ids, "the greedy continuation is empty"
    changed = [ids[0] % 100 + 2 if ids[0] % 100 + 2 != ids[0] else 3] + ids[1:]
    _, greedy = scorer.score_ids([prompt[0], prompt[0]], [ids, changed])
    assert greedy.tolist() == [True, False]


def test_decoder_loglikelihood_is_rank_classification_and_greedy_is_the_decoded_text(decoder):
    _check_loglikelihood(decoder)


@pytest.mark.slow
def test_t5_loglikelihood_is_rank_classification_and_greedy_is_the_decoded_text(t5):
    _check_loglikelihood(t5)


def test_decoder_rolling_is_loglikelihood_from_an_empty_context_window_by_window(decoder):
    short = "Foxes run."
    assert len(decoder.vocab.encode(short)) <= OPTIONS.max_target_len
    [rolled] = decoder.loglikelihood_rolling([short])
    [(empty_context, _)] = decoder.loglikelihood([("", short)])
    assert rolled == pytest.approx(empty_context, abs=1e-5)
    # A long text: the sum over its windows, each scored given the ids before it. 20 texts put more than
    # OPTIONS_PER_ROW first windows (prompt: EOS alone) on one prompt, so that prompt takes two rows.
    texts = [f"Document {n}: " + "tuning on tasks " * (1 + n % 3) for n in range(20)]
    eos, expected = decoder.model.ids.eos, []
    for text in texts:
        windows = harness.rolling_windows(list(decoder.vocab.encode(text)), OPTIONS.max_target_len,
                                          OPTIONS.max_input_len - 1)
        assert len(windows) >= (2 if len(decoder.vocab.encode(text)) > 16 else 1)
        prompts, targets = [w[0] + [eos] for w in windows], [w[1] for w in windows]
        expected.append(sum(float(decoder.score_ids([p], [t])[0][0]) for p, t in zip(prompts, targets)))
    np.testing.assert_allclose(decoder.loglikelihood_rolling(texts), expected, rtol=1e-6, atol=1e-5)
    assert harness.rolling_windows(list(range(1, 8)), 3, 2) == [([], [1, 2, 3]), ([2, 3], [4, 5, 6]), ([5, 6], [7])]


def test_generate_until_stops_before_the_first_stop_string(decoder):
    context = "Write a sentence about the sea."
    [full] = decoder.generate_until([(context, {"until": [], "max_gen_toks": 8})])
    assert full and len(decoder.vocab.encode(full)) <= 8
    stop = full[len(full) // 2:len(full) // 2 + 1]
    got = decoder.generate_until([(context, {"until": [stop, "never there"], "max_gen_toks": 8}),
                                  (context, {"until": "never there", "max_gen_toks": 8}),
                                  (context, {"until": [], "max_gen_toks": 2, "do_sample": False})])
    assert got[0] == full[:full.index(stop)] and got[1] == full
    assert len(decoder.vocab.encode(got[2])) <= 2
    assert harness.cut_at_stops("a. b\nc", ["\n", "."]) == "a" and harness.cut_at_stops("abc", ["", "x"]) == "abc"


@pytest.mark.slow
def test_multiple_choice_task_through_lm_eval_matches_rank_classification(t5_run, t5):
    from lm_eval.tasks import TaskManager
    eval_harness.register()
    manager = TaskManager(include_path=FIXTURES, include_defaults=False)
    out = lm_eval.simple_evaluate(   # the registered name and model_args, as lm-eval's command line passes them
        model="flan_jax", model_args=f"gin_file={t5_run}/config.gin,checkpoint={t5_run}/checkpoint_2,eos=True,"
                                     "max_input_len=128", batch_size=4, tasks=["flan_jax_harness_mc"],
        task_manager=manager, log_samples=True)
    samples = out["samples"]["flan_jax_harness_mc"]
    assert len(samples) == 8
    # the same (context, option) texts ranked by flan_jax's rank classification: EOS-terminated options, batched
    vocab, pad = t5.vocab, t5.model.ids.pad
    rows, _ = inference.encode_prompts(vocab, [s["arguments"][0][0] for s in samples], 128)
    options = [[a[1].lstrip() for a in s["arguments"]] for s in samples]   # lm-eval's " even" is our target "even"
    encoded = [inference.encode_options(vocab, opts) for opts in options]
    scores = inference.option_scores(t5.model.rank, inference.ladder_batches(rows, 128, lambda w: 4, pad), encoded,
                                     32, pad)
    for s, row in zip(samples, scores):
        np.testing.assert_allclose([r[0][0] for r in s["resps"]], row[:len(s["resps"])], rtol=0, atol=1e-5)
    hits = [int(np.argmax(row[:len(s["arguments"])])) == int(s["target"]) for s, row in zip(samples, scores)]
    assert out["results"]["flan_jax_harness_mc"]["acc,none"] == pytest.approx(np.mean(hits))


@pytest.mark.slow
def test_cli_prints_a_table_and_errors_are_one_line(t5_run, tmp_path, capsys):
    model = [f"--gin_file={t5_run}/config.gin", f"--checkpoint={t5_run}/checkpoint_2"]
    local = ["--include_path", FIXTURES, "--skip_builtin_tasks", "--batch_size", "4", "--max_input_len", "128"]
    tasks = "flan_jax_harness_mc,flan_jax_harness_gen,flan_jax_harness_rolling"
    assert eval_harness.main([*model, *local, "--tasks", tasks, "--output", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    for word in ("|flan_jax_harness_mc", "acc", "exact_match", "word_perplexity", "14 examples in"):
        assert word in out
    assert set(json.load(open(tmp_path / "r.json"))["results"]) == set(tasks.split(","))
    for argv, message in (([*model, *local, "--tasks", "flan_jax_harness_mc,no_such_task"], "'no_such_task'"),
                          ([*model, *local, "--tasks", "flan_jax_harness_broken"], "task error: "),
                          ([f"--gin_file={tmp_path}/none.gin", *local, "--tasks", "flan_jax_harness_mc"],
                           "config error: ")):
        assert eval_harness.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_model_args_become_harness_options():
    assert eval_harness.harness_options("auto", eos=True) == harness.HarnessOptions(eos=True)
    assert eval_harness.harness_options("8").batch_size == 8 == eval_harness.harness_options(8).batch_size
    with pytest.raises(ValueError, match="unknown model_args.*'pretrained'"):
        eval_harness.harness_options(pretrained="t5-small")
    with pytest.raises(ValueError, match="max_gen_toks=0"):
        harness.HarnessOptions(max_gen_toks=0)
