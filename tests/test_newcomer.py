"""A new user's first run on their own data: defaults that follow the data, an explicit vocabulary, a config.gin that
reproduces the run, a readable console and "did you mean" for mistyped names (issue 34)."""
import json
import os
import subprocess
import sys
import textwrap
import time

import gin
import pytest

from flan_jax.cli import console, train as cli_train

MODULE = "newcomer_reverse_tasks"   # unique: the module stays imported for the rest of the test session
PROBE = "newcomer_probe_module"     # registers nothing; shows whether config.gin imports it
TASK = "newcomer_reverse_zs_noopt"  # generative only: its eval reports exact_match and loss, no accuracy
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    with open(tmp_path / "reverse.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"word": f"word{i}", "answer": f"{i}drow"}) + "\n")
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(f'''
        import os
        from flan_jax.data import registry
        from flan_jax.data.sources.files import JsonlSource
        from flan_jax.data.templates import Template

        HERE = os.path.dirname(os.path.abspath(__file__))
        registry.register_task(
            "newcomer_reverse",
            JsonlSource({{s: os.path.join(HERE, "reverse.jsonl") for s in ("train", "validation")}}),
            templates=[Template("Reverse: {{word}}", "{{answer}}")],
            fields=["word", "answer"], cluster="reverse", collection="newcomer")
        '''))
    (tmp_path / f"{PROBE}.py").write_text("LOADED = True\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _flags(*extra):
    return ["--module", MODULE, "--gin_file=runs/tiny_test.gin", "--gin.MODEL_DIR=run",
            f"--gin.MIXTURE_OR_TASK_NAME={TASK}", f"--gin.EVAL_MIXTURE_OR_TASK_NAME={TASK}", *extra]


# --- 1. BEST_METRIC follows the eval tasks ------------------------------------------------------------------------
def test_best_metric_defaults_to_first_reported_metric(user_dir):
    _, cfg = cli_train._configured(_flags())
    assert cfg.best_metric == "mean_seen/exact_match"
    assert gin.query_parameter("BEST_METRIC/gin.macro.value") == "mean_seen/exact_match"  # config.gin records it
    assert "BEST_METRIC = 'mean_seen/exact_match'" in gin.operative_config_str()      # the end-of-run config.gin


def test_best_metric_set_by_the_user_is_checked_with_suggestions(user_dir):
    with pytest.raises(cli_train.ConfigError) as e:
        cli_train._configured(_flags("--gin.BEST_METRIC=mean_seen/exact_mach"))
    assert "the eval tasks report ['loss', 'exact_match']" in str(e.value)
    assert "did you mean 'mean_seen/exact_match'?" in str(e.value)


# --- 2. the vocabulary is explicit --------------------------------------------------------------------------------
def test_vocabulary_is_saved_and_checked_against_the_embedding(user_dir, caplog):
    from flan_jax.train import validation
    validation._WARNED.clear()
    with caplog.at_level("WARNING"):
        _, cfg = cli_train._configured(_flags())
        cli_train._configured(_flags())
    warning = f"T5Config.vocab_size=2048 embedding rows for the 259-id ByteVocabulary of '{TASK}'"
    assert caplog.text.count(warning) == 1
    path = cli_train.save_vocabulary(cfg)
    assert path.endswith("vocabulary.json")
    assert json.loads(open(path).read())["type"] == "ByteVocabulary"
    assert json.loads(open(path).read())["vocab_size"] == 259
    with pytest.raises(cli_train.ConfigError, match=r"T5Config.vocab_size=200 is smaller than the 'inputs' "
                                                    r"vocabulary .*\(ByteVocabulary, 259 ids\)"):
        cli_train._configured(_flags("--gin.T5Config.vocab_size=200"))


# --- 3. config.gin records the --module names ---------------------------------------------------------------------
def test_config_gin_imports_the_modules_of_the_run(user_dir):
    cli_train._configured(_flags("--module", PROBE))
    (user_dir / "config.gin").write_text(gin.config_str())
    assert f"import {MODULE}" in gin.config_str() and f"import {PROBE}" in gin.config_str()
    sys.modules.pop(PROBE)
    _, cfg = cli_train._configured(["--gin_file=config.gin"])   # no --module: config.gin imports them
    assert PROBE in sys.modules and cfg.input.mixture_or_task_name == TASK
    assert cfg.best_metric == "mean_seen/exact_match"


# --- 4. console -----------------------------------------------------------------------------------------------------
def test_start_banner_and_end_summary(user_dir):
    _, cfg = cli_train._configured(_flags())
    banner = console.start_banner(cfg)
    for part in ("model        T5, ", "M parameters", "vocabulary   ByteVocabulary, 259 ids (embedding: 2048 rows)",
                 f"mixture      {TASK}", "mesh data=", "MODEL_DIR    run", "start        fresh, to step 12"):
        assert part in banner
    (user_dir / "run" / "checkpoint_6").mkdir(parents=True)
    assert "resuming from checkpoint_6" in console.start_banner(cfg)
    (user_dir / "run" / "best.json").write_text(json.dumps(
        {"metric": "mean_seen/exact_match", "value": 0.5, "step": 6, "path": "run/best/checkpoint_6"}))
    summary = console.end_summary(cfg, {"mean_seen": {"exact_match": 0.5, "loss": 1.0}, TASK: {"loss": 1.0}})
    assert "final eval   mean_seen: exact_match=0.5000, loss=1.0000" in summary
    assert "best         run/best/checkpoint_6 (mean_seen/exact_match=0.5000 at step 6)" in summary
    assert "flan-jax eval --gin_file=run/config.gin --checkpoint=run/best/checkpoint_6" in summary
    assert "python scripts/plot_metrics.py run" in summary and "flan-jax convert --from t5x --to hf" in summary
    # what the data cost, from the latest counters the loop logged (a resumed run logs restored counts)
    rows = [(4, "all", "packing_examples_in", 90), (8, "all", "packing_examples_in", 180),
            (8, "all", "packing_truncated", 3), (8, "all", "packing_dropped_overlength", 0),
            (4, f"{TASK}_zs_noopt", "data_errors/invalid_json", 1), (8, f"{TASK}_zs_noopt", "data_errors/invalid_json", 2),
            (8, f"{TASK}_zs_noopt", "data_errors/invalid_utf8", 1)]
    with open(user_dir / "run" / "metrics.jsonl", "w") as f:
        for step, task, metric, value in rows:
            f.write(json.dumps({"step": step, "split": "train", "task": task, "metric": metric, "value": value}) + "\n")
    summary = console.end_summary(cfg, {})
    assert "data         180 examples packed; 3 truncated" in summary and "dropped" not in summary
    assert f"skipped      {TASK}_zs_noopt: 3 records (invalid_json 2, invalid_utf8 1)" in summary


def _flan_jax(*args):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flan_jax.cli", *args], capture_output=True, text=True, cwd=REPO)
    return done, time.monotonic() - start


def test_help_is_fast_and_lists_macros():
    done, seconds = _flan_jax("train", "--gin_file=runs/tiny_test.gin", "--help")
    assert done.returncode == 0 and seconds < 2, seconds
    assert done.stdout.startswith("usage: flan-jax train ")
    assert "TRAIN_STEPS = 12" in done.stdout and "BEST_METRIC = 'mean_seen/accuracy'" in done.stdout


def test_library_noise_is_hidden_unless_verbose():
    done, _ = _flan_jax("train", "--gin_file=runs/tiny_test.gin", "--gin.BEST_METRC=1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "flan-jax train: config error: --gin.BEST_METRC: no macro BEST_METRC is defined in ['runs/tiny_test.gin'] "
        "(did you mean BEST_METRIC?)"]


# --- 5. did you mean ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, hint", [("--gin.BATCH_SIZ=4", "did you mean BATCH_SIZE?"),
                                        ("--gin.T5Config.num_head=2", "did you mean T5Config.num_heads?"),
                                        ("--gin.T5Confg.num_heads=2", "did you mean T5Config?")])
def test_unknown_gin_names_get_did_you_mean(flag, hint, tmp_path):
    with pytest.raises(cli_train.ConfigError, match=hint.replace("?", r"\?")):
        cli_train._configured(["--gin_file=runs/tiny_test.gin", f"--gin.MODEL_DIR={tmp_path}", flag])
