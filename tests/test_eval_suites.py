"""Benchmark suites: BBH on the real published files (skipped where absent), MMLU / TyDiQA / MGSM on fixtures in their
published formats, the scorers' rules, contextual calibration, and a short model run through the suite runner."""
import json
import os

import jax
import numpy as np
import pytest
import seqio

from flan_jax.cli import eval_suite as suites_cli
from flan_jax.evaluation import calibration
from flan_jax.evaluation.suites import bbh, mgsm, mmlu, tydiqa
from flan_jax.evaluation.suites.runner import RunOptions, SuiteRunner
from flan_jax.models import t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "suites")
BBH_DIR = os.environ.get("FLAN_JAX_BBH_DIR") or os.path.join(REPO, "..", "shared", "data", "bbh")
needs_bbh = pytest.mark.skipif(not os.path.isdir(os.path.join(BBH_DIR, "bbh")),
                               reason=f"BBH data not found at {BBH_DIR} (set FLAN_JAX_BBH_DIR or put it in "
                                      "../shared/data/bbh beside the checkout)")


# --- BBH --------------------------------------------------------------------------------------------------------------
def test_bbh_extraction_is_the_authors_rule():
    assert bbh.extract_answer("A: Let's think. So the answer is (A). Wait, so the answer is no. So the answer is (C).") \
        == "(C)"                                                        # the last occurrence wins
    assert bbh.extract_answer(" So the answer is True.") == "True"      # trailing period stripped
    assert bbh.extract_answer("So the answer is 3.5.") == "3.5"         # only one period
    assert bbh.extract_answer("(B)") == "(B)"                           # direct output compared whole
    # nothing else is normalized: case, parentheses and inner punctuation must match exactly
    assert bbh.score(["(B)", "True", "] ]"], ["(b)", "true", "]]"])["accuracy"] == 0.0
    assert bbh.score(["(B)", "valid"], [bbh.extract_answer("So the answer is (B)."), "valid"])["accuracy"] == 100.0


@needs_bbh
def test_bbh_real_data_counts_and_prompts():
    tasks = bbh.load_tasks(BBH_DIR, mode="cot")
    assert len(tasks) == 27
    assert sum(len(t.examples) for t in tasks) == 6511
    date = next(t for t in tasks if t.name == "bbh/date_understanding")
    prompt = date.examples[0].prompt
    assert prompt.startswith("Infer the date from context.\n\nQ: ")
    assert prompt.count("So the answer is ") == 3 and prompt.endswith("\nA: Let's think step by step.")
    assert "canary" not in prompt and "-----" not in prompt
    direct = bbh.load_tasks(BBH_DIR, mode="direct", tasks=["date_understanding"])[0]
    d_prompt = direct.examples[0].prompt
    assert "So the answer is" not in d_prompt and "\nA: (D)\n\nQ: " in d_prompt and d_prompt.endswith("\nA:")
    assert direct.examples[0].target == "(B)"
    # every published exemplar's answer is what direct prompting shows: the CoT answer after "So the answer is"
    assert len(bbh.load_tasks(BBH_DIR, mode="direct", shots=1, tasks=["navigate"])[0].examples[0].prompt.split(
        "\n\nQ: ")) == 3   # description+1 exemplar, then the test question


@needs_bbh
def test_bbh_score_command_on_real_targets(tmp_path, capsys):
    rows = bbh.load_examples(BBH_DIR, "sports_understanding")[:20]
    path = tmp_path / "p.jsonl"
    with open(path, "w") as f:   # 15 right (in the CoT form), 5 wrong (different case)
        for i, r in enumerate(rows):
            pred = f"Reasoning. So the answer is {r['target']}." if i < 15 else r["target"].upper()
            f.write(json.dumps({"prediction": pred, "target": r["target"], "extra": i}) + "\n")
    assert suites_cli.main(["score", "--suite", "bbh", "--task", "sports_understanding", "--predictions",
                            str(path)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["accuracy"] == 75.0 and last["num_examples"] == 20


def test_bbh_score_reads_the_authors_published_json_form(tmp_path, capsys):
    rows = [{"input": "Q: x\nA:", "prediction": p, "target": t} for p, t in
            [("Steps. So the answer is (A).", "(A)"), ("(B)", "(B)"), ("So the answer is (C)", "(D)"), ("no", "(A)")]]
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps({"canary": "c", "outputs": rows}))
    assert suites_cli.main(["score", "--suite", "bbh", "--task", "t", "--predictions", str(path)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["accuracy"] == 50.0 and last["num_examples"] == 4


BBH_OUTPUTS = os.environ.get("FLAN_JAX_BBH_OUTPUTS_DIR") or os.path.join(BBH_DIR, "code-davinci-002-outputs")


@pytest.mark.skipif(not os.path.isdir(BBH_OUTPUTS), reason=(
    f"the BBH authors' published model outputs are not at {BBH_OUTPUTS} (the code-davinci-002-outputs folder of "
    "github.com/suzgunmirac/BIG-Bench-Hard; set FLAN_JAX_BBH_OUTPUTS_DIR)"))
def test_bbh_score_reproduces_the_authors_reported_accuracy(capsys):
    checked = 0
    for mode in ("direct", "cot"):
        folder = os.path.join(BBH_OUTPUTS, f"code-davinci-002-{mode}")
        for name in sorted(f for f in os.listdir(folder) if f.endswith("_eval_metrics.jsonl")):
            reported = json.loads(open(os.path.join(folder, name)).readline())["accuracy"]
            predictions = os.path.join(folder, name.replace("_eval_metrics.jsonl", ".json"))
            task = name.split("_few_shot")[0]
            assert suites_cli.main(["score", "--suite", "bbh", "--task", task, "--mode", mode, "--predictions",
                                    predictions]) == 0
            ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]
            assert ours == pytest.approx(reported, abs=1e-9), (mode, task)
            checked += 1
    assert checked == 54    # 27 tasks, direct and CoT


# --- MMLU -------------------------------------------------------------------------------------------------------------
def test_mmlu_prompt_and_content_free_inputs():
    tasks = mmlu.load_tasks(os.path.join(FIXTURES, "mmlu"))
    assert [t.name for t in tasks] == ["mmlu/high_school_physics", "mmlu/world_religions"]
    ex = tasks[0].examples[1]
    assert ex.prompt.startswith("The following are multiple choice questions (with answers) about high school "
                                "physics.\n\nWhat is the SI unit of force?\nA. joule\nB. newton\nC. watt\nD. pascal"
                                "\nAnswer: B\n\n")
    assert ex.prompt.endswith("\n\nSound cannot travel through\nA. air\nB. water\nC. steel\nD. a vacuum\nAnswer:")
    assert ex.prompt.count("Answer:") == 6 and ex.target == "D" and ex.options == ("A", "B", "C", "D")
    context = ex.prompt[:ex.prompt.rindex("Sound cannot")]
    assert ex.content_free == (context + "N/A\nAnswer:", context + "\nAnswer:", context + "[MASK]\nAnswer:")
    assert tasks[0].kind == "rank" and mmlu.load_tasks(os.path.join(FIXTURES, "mmlu"), mode="cot")[0].kind == "generate"


def test_mmlu_bad_row_names_file_and_line(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"x_test.csv:1"):
        mmlu.read_rows(str(tmp_path / "test" / "x_test.csv"))


# --- TyDiQA / MGSM ----------------------------------------------------------------------------------------------------
def test_tydiqa_squad_metrics_per_language():
    tasks = tydiqa.load_tasks(os.path.join(FIXTURES, "tydiqa"))
    assert [(t.name, len(t.examples)) for t in tasks] == [("tydiqa/english", 2), ("tydiqa/finnish", 1)]
    assert tasks[0].examples[1].target == ("a river", "river")
    m = tydiqa.score([("The Nile",), ("a river", "river"), ("about 6,650 km",)],
                     ["nile", "River!", "6650 km long"])
    # EM after lowercasing/punctuation/article removal: 2 of 3; F1: 1, 1, and for the third "about 6650 km" vs
    # "6650 km long" (',' removed) 2 common tokens of 3 each -> P = R = F1 = 2/3
    assert m["exact_match"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3) / 3)


def test_mgsm_numeric_extraction_and_shots():
    assert mgsm.extract_number("She has 3 + 4 = 7 apples. The answer is 7.") == "7"
    assert mgsm.extract_number("1,000 seats minus 200 leaves 800") == "800"
    assert mgsm.extract_number("no number") == ""
    assert mgsm.score(["1000", "7", "5"], ["1,000", "7.0", "6"])["accuracy"] == pytest.approx(200 / 3)
    tasks = mgsm.load_tasks(os.path.join(FIXTURES, "mgsm"), shots=2)
    assert [(t.name, len(t.examples)) for t in tasks] == [("mgsm/de", 1), ("mgsm/en", 2)]
    prompt = tasks[1].examples[0].prompt
    assert prompt.count("Question: ") == 3 and prompt.endswith("Answer: Let's think step by step.")


# --- calibration ------------------------------------------------------------------------------------------------------
def test_calibration_flips_a_biased_argmax_as_the_formula_says():
    # The model prefers option 0 whatever the input: content-free prompts give it 0.7 / 0.2 / 0.1.
    cf = np.log(np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.8, 0.1, 0.1]]))
    p_cf = calibration.content_free_prior(cf)
    np.testing.assert_allclose(p_cf, [0.7, 0.2, 0.1])
    p = calibration.option_probs(np.log(np.array([0.5, 0.3, 0.2])))
    q = calibration.calibrate(p, p_cf)
    expected = np.array([0.5 / 0.7, 0.3 / 0.2, 0.2 / 0.1])
    np.testing.assert_allclose(q, expected / expected.sum())
    assert np.argmax(p) == 0 and np.argmax(q) == 2
    # an unbiased prior changes nothing
    np.testing.assert_allclose(calibration.calibrate(p, np.full(3, 1 / 3)), p)


# --- a model through the runner ---------------------------------------------------------------------------------------
VOCAB = seqio.ByteVocabulary()
CONFIG = t5.T5Config(vocab_size=VOCAB.vocab_size, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                     num_encoder_layers=1, num_decoder_layers=1)


@pytest.fixture(scope="module")
def runner():
    params = t5.init_params(CONFIG, jax.random.PRNGKey(0))
    return SuiteRunner(CONFIG, params, VOCAB, RunOptions(batch_size=4, max_input_len=512, max_decode_len=16,
                                                         calibrate=True))


def test_mmlu_rank_run_reports_raw_and_calibrated(runner):
    task = mmlu.load_tasks(os.path.join(FIXTURES, "mmlu"), tasks=["high_school_physics"])[0]
    result = runner.run(task)
    assert set(result.metrics) == {"accuracy", "calibrated_accuracy"}
    assert len(result.records) == 3 and result.truncated == 3   # byte prompts exceed 512 tokens
    for rec, ex in zip(result.records, task.examples):
        assert rec["prediction"] == "ABCD"[int(np.argmax(rec["probs"]))]
        assert rec["calibrated_prediction"] in "ABCD" and sum(rec["probs"]) == pytest.approx(1.0)
    hits = [r["prediction"] == r["target"] for r in result.records]
    assert result.metrics["accuracy"] == pytest.approx(100 * np.mean(hits))


@needs_bbh
def test_bbh_short_run_with_a_tiny_model(runner):
    tasks = bbh.load_tasks(BBH_DIR, mode="direct", tasks=["boolean_expressions", "web_of_lies"])
    for task in tasks:
        task = type(task)(task.name, task.examples[:6], task.kind, task.extract, task.score, task.max_decode_len)
        result = runner.run(task)
        assert len(result.records) == 6 and result.generated_tokens > 0
        answers = [bbh.extract_answer(r["raw"]) for r in result.records]
        assert [r["prediction"] for r in result.records] == answers
        assert result.metrics["accuracy"] == bbh.score([r["target"] for r in result.records], answers)["accuracy"]


def test_width_ladder_and_token_budget_batches_cover_every_row_once():
    from flan_jax.evaluation.inference import bucket_width
    assert [bucket_width(n, 2048) for n in (1, 64, 65, 129, 1025, 1281, 1473, 1729, 5000)] == [
        64, 64, 128, 192, 1280, 1472, 1728, 2048, 2048]
    assert bucket_width(700, 512) == 512
    small = SuiteRunner(CONFIG, None, VOCAB, RunOptions(batch_size=8, max_input_len=2048, max_batch_tokens=1024))
    rng = np.random.default_rng(0)
    rows = [[5] * int(n) for n in rng.integers(1, 1500, 60)]
    seen = []
    for idx, arr in small._batches(rows):
        assert arr.shape == (small.rows_per_batch(arr.shape[1]), arr.shape[1]) and len(idx) <= len(arr)
        assert arr.shape[0] == max(1, min(8, 1024 // arr.shape[1]))
        assert all(len(rows[i]) <= arr.shape[1] for i in idx)
        assert arr.shape[1] == bucket_width(max(len(rows[i]) for i in idx), 2048)
        seen += list(idx)
    assert sorted(seen) == list(range(60))
    with pytest.raises(ValueError, match="max_batch_tokens=0"):
        RunOptions(max_batch_tokens=0)


def test_pooled_generation_across_tasks_matches_one_task_at_a_time(runner):
    """Pooling tasks, token-budget batches and padding change nothing in what each example decodes to."""
    tasks = mgsm.load_tasks(os.path.join(FIXTURES, "mgsm"), shots=1)
    assert sum(len(t.examples) for t in tasks) >= 4
    pooled = runner.run_many(tasks)
    single = SuiteRunner(CONFIG, runner.params, VOCAB, RunOptions(batch_size=1, max_input_len=512, max_decode_len=16))
    for task, result in zip(tasks, pooled):
        alone = single.run(task)
        assert result.name == alone.name == task.name and result.metrics == alone.metrics
        assert [r["raw"] for r in result.records] == [r["raw"] for r in alone.records]
        assert [r["input"] for r in result.records] == [e.prompt for e in task.examples]
        assert result.generated_tokens == alone.generated_tokens > 0 and result.seconds > 0


@pytest.mark.slow
def test_runner_serves_a_decoder_only_model_through_the_model_interface():
    from flan_jax import models
    cfg = models.DecoderConfig(vocab_size=VOCAB.vocab_size, emb_dim=16, num_layers=1, num_heads=2, num_kv_heads=1,
                               head_dim=8, mlp_dim=32, dtype="float32")
    run = SuiteRunner(cfg, models.init_params(cfg, jax.random.PRNGKey(0)), VOCAB,
                      RunOptions(batch_size=2, max_input_len=128, max_decode_len=4, calibrate=True))   # one width
    rank = run.run(mmlu.load_tasks(os.path.join(FIXTURES, "mmlu"), shots=0, tasks=["world_religions"])[0])
    assert {"accuracy", "calibrated_accuracy"} <= set(rank.metrics) and len(rank.records) == 2
    assert all(r["prediction"] in "ABCD" and sum(r["probs"]) == pytest.approx(1.0) for r in rank.records)
    gen = run.run(mgsm.load_tasks(os.path.join(FIXTURES, "mgsm"), shots=1, tasks=["en"])[0])
    assert len(gen.records) == 3 and 0 < gen.generated_tokens <= 3 * 4


@pytest.mark.slow
def test_cli_run_from_gin_and_checkpoint_writes_metrics_predictions_and_table(tmp_path, capsys):
    from flan_jax.cli import train as train_main_lib
    from flan_jax.train.metrics_log import read_metrics
    tiny = os.path.join(REPO, "gin_configs", "runs", "tiny_test.gin")
    d = str(tmp_path / "run")
    train_main_lib.train_main([f"--gin_file={tiny}", f"--gin.MODEL_DIR={d}", "--gin.TRAIN_STEPS=2",
                               "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=2"])
    argv = ["run", "--suite", "mmlu", "--data_dir", os.path.join(FIXTURES, "mmlu"), "--calibrate",
            f"--gin_file={tiny}", f"--gin.MODEL_DIR={d}", f"--checkpoint={d}/checkpoint_2"]
    assert suites_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "mmlu/world_religions" in out and "examples/s" in out
    rows = [r for r in read_metrics(d) if r["task"].startswith("mmlu/")]
    got = {(r["task"], r["metric"]) for r in rows}
    for task in ("mmlu/high_school_physics", "mmlu/world_religions", "mmlu/mean"):
        assert {(task, "accuracy"), (task, "calibrated_accuracy")} <= got and all(
            r["split"] == "eval" and r["step"] == 2 for r in rows)
    preds = os.path.join(d, "eval_suites", "mmlu_direct", "world_religions.jsonl")
    assert len(open(preds).read().splitlines()) == 2
    # a missing data folder is a clear error, not a traceback
    assert suites_cli.main(["run", "--suite", "mmlu", "--data_dir", str(tmp_path / "none"), *argv[5:]]) == 2
    # an output folder that cannot be written is refused before the checkpoint is read or any example runs
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    capsys.readouterr()
    assert suites_cli.main([*argv, f"--output_dir={blocker}/preds"]) == 2
    err = capsys.readouterr().err
    assert f"--output_dir='{blocker}/preds': cannot write there" in err and "Traceback" not in err


def test_ids_and_task_names_from_data_cannot_leave_the_predictions_folder(tmp_path):
    from flan_jax.evaluation import predictions
    for name in ("../../etc/passwd", "a/b", "..", "", "tydiqa/eng lish"):
        path = predictions.file_in(str(tmp_path), name)
        assert os.path.dirname(path) == str(tmp_path) and not os.path.basename(path).startswith("."), (name, path)
    bad = {"data": [{"paragraphs": [{"context": "c", "qas": [
        {"id": "../../x-1", "question": "q", "answers": [{"text": "a"}]}]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"dev.json: question id '../../x-1' does not start with a language name"):
        tydiqa.read_questions(str(tmp_path))
