"""The first thing a user does with their own data (docs/own-data.md): a JSONL file, a task registered in
the user's own module, `flan-jax data show`, then `flan-jax train` and `flan-jax eval` with `--module`."""
import json
import os
import textwrap

import pytest

from flan_jax import cli

from flan_jax.cli import data as data_cli

MODULE = "journey_user_tasks"   # unique: the module stays imported for the rest of the test session
LABELS = ("positive", "negative")


def _write_user_files(folder):
    words = {"positive": ["great", "lovely", "superb", "fun"], "negative": ["awful", "dull", "bad", "boring"]}
    for split, count in (("train", 48), ("validation", 8)):
        with open(os.path.join(folder, f"reviews_{split}.jsonl"), "w") as f:
            for i in range(count):
                label = LABELS[i % 2]
                f.write(json.dumps({"text": f"a {words[label][i % 4]} film, take {i}", "label": label}) + "\n")
            f.write("{not json\n")                                   # a malformed line in each split
    with open(os.path.join(folder, f"{MODULE}.py"), "w") as f:
        f.write(textwrap.dedent(f'''
            import os
            from flan_jax.data import registry
            from flan_jax.data.sources.files import JsonlSource
            from flan_jax.data.templates import Template

            HERE = os.path.dirname(os.path.abspath(__file__))
            registry.register_task(
                "my_reviews",
                JsonlSource({{split: os.path.join(HERE, f"reviews_{{split}}.jsonl")
                             for split in ("train", "validation")}}),
                templates=[Template("{{text}}\\nIs this review positive or negative?", "{{label}}"),
                           Template("Review: {{text}}\\nSentiment:", "{{label}}")],
                fields=["text", "label"], fixed_options={list(LABELS)!r}, cluster="sentiment", collection="mine")
            '''))


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    _write_user_files(tmp_path)
    monkeypatch.chdir(tmp_path)            # the module is found in the working directory, as `python -m` does
    return tmp_path


def test_own_jsonl_task_data_show(user_dir, capsys):
    assert data_cli.main(["show", "my_reviews_zs_opt", "--module", MODULE, "-n", "2"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("=== my_reviews_zs_opt [train #") == 2
    assert f"skipped 1 record(s) of those read: 1 invalid_json (first at {user_dir}/reviews_train.jsonl:49)" in shown


@pytest.mark.slow  # ~35 s of CPU (two compiles of the tiny model), more on a loaded machine
def test_own_jsonl_task_train_then_eval(user_dir, capsys):
    tmp_path = user_dir
    flags = ["--module", MODULE, "--gin_file=runs/tiny_test.gin", "--gin.MODEL_DIR=run",
             "--gin.MIXTURE_OR_TASK_NAME=my_reviews_zs_opt", "--gin.EVAL_MIXTURE_OR_TASK_NAME=my_reviews_zs_opt",
             "--gin.TRAIN_STEPS=2", "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=2", "--gin.BATCH_SIZE=4",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}"]
    assert cli.main(["train", *flags]) == 0
    assert os.path.isdir(tmp_path / "run" / "checkpoint_2")
    out = capsys.readouterr().out
    # the first eval and the end summary say what the data cost: the malformed line of the train file, per task
    after_eval = out[out.index("eval step 2:"):]
    assert "  skipped my_reviews_zs_opt: " in after_eval and "record_is_none" in after_eval, after_eval[:600]
    assert "skipped      my_reviews_zs_opt: " in out and "examples packed" in out

    assert cli.main(["eval", *flags, "--checkpoint=run", "--predictions_dir=preds"]) == 0
    printed = capsys.readouterr().out
    (line,) = [l for l in printed.splitlines() if l.startswith("my_reviews_zs_opt\t")]
    accuracy = float(line.split("accuracy=")[1].split("\t")[0])
    predictions = [json.loads(l) for l in open(tmp_path / "preds" / "my_reviews_zs_opt.jsonl")]
    assert len(predictions) == 8 and {p["target"] for p in predictions} == set(LABELS)  # the malformed line is out
    assert accuracy == pytest.approx(sum(p["prediction"] == p["target"] for p in predictions) / 8)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = {(r["task"], r["metric"]): r["value"] for r in rows if r["split"] == "eval"}
    assert evals[("my_reviews_zs_opt", "accuracy")] == pytest.approx(accuracy)
    assert ("mean_seen", "accuracy") in evals     # the task is in the training mixture: a seen task


def test_unknown_module_is_a_config_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--module", "no_such_user_module", "--gin_file=runs/tiny_test.gin"]) == 2
    assert "--module no_such_user_module: no module named 'no_such_user_module'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no module named 'no_such_user_module'"):
        data_cli.main(["list", "--module", "no_such_user_module"])


def test_gin_file_imports_the_user_module_as_in_t5x(user_dir):
    """No --module: `import <module>` in the user's gin file registers the task before its name is validated."""
    gin_module = "journey_gin_tasks"
    (user_dir / f"{gin_module}.py").write_text((user_dir / f"{MODULE}.py").read_text().replace('"my_reviews"',
                                                                                                  '"my_gin_reviews"'))
    (user_dir / "my_run.gin").write_text(textwrap.dedent(f"""\
        include 'runs/tiny_test.gin'
        import {gin_module}
        MODEL_DIR = 'run_gin'
        MIXTURE_OR_TASK_NAME = 'my_gin_reviews_zs_opt'
        EVAL_MIXTURE_OR_TASK_NAME = 'my_gin_reviews_zs_opt'
        """))
    # Config, gin import and task validation pass; only the checkpoint is missing (nothing was trained here).
    with pytest.raises(FileNotFoundError, match="no checkpoint_<step> found"):
        cli.main(["eval", "--gin_file=my_run.gin", "--checkpoint=run_gin"])
    from flan_jax.data import registry
    assert registry.task_info("my_gin_reviews_zs_opt").collection == "mine"
