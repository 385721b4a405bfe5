"""The documented journeys, run from the docs' own code blocks, so the pages cannot rot.

Convention (readable on GitHub, which renders a block by the first word of its info string and ignores the rest):

    ```bash journey=<name>            shell commands of journey <name>
    ```python journey=<name>          a Python snippet of the journey, run with `python -`
    ```python journey=<name> file=P   (or text, gin, ...) a file the reader writes: its content goes to P verbatim

All blocks of a journey on one page run in page order as ONE bash script (`set -e -o pipefail -x`: shell variables
carry over from block to block, the first failing command fails the journey) in a fresh temporary directory that
stands in for the repository root: `gin_configs` and `scripts` are symlinks to the repository's, so
`--gin_file=gin_configs/runs/...` and `python scripts/...` work as documented. Blocks without `journey=` are not run.

Tiny settings are injected without the docs showing them: the test puts a `flan-jax` wrapper first on PATH that
rewrites every `flan-jax train` and `flan-jax eval` command line (`tiny_argv`): the step counts the page gives
(TRAIN_STEPS, CHECKPOINT_PERIOD, EVAL_PERIOD, LOG_PERIOD) are divided by STEP_SCALE, and small batches, feature
lengths and eval sizes are appended unless the page sets them. Other subcommands run as written. Then the test
checks a few things each page promises (files that appear, lines that are printed), in scaled step numbers.
"""
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_SCALE = 25                      # TRAIN_STEPS=200 in a page -> 8 steps here
STEP_MACROS = ("TRAIN_STEPS", "CHECKPOINT_PERIOD", "EVAL_PERIOD", "LOG_PERIOD")
TINY = {                             # appended to train and eval unless the command sets the macro itself
    "BATCH_SIZE": "4",
    "TASK_FEATURE_LENGTHS": "{'inputs': 64, 'targets': 16}",
    "EVAL_EXAMPLES_PER_TASK": "4",
    "EVAL_PERIOD": "0",               # evaluate at the last step only
    "LOG_PERIOD": "2",
}
TINY_TRAIN = {"TRAIN_STEPS": "4"}     # a page's train command without TRAIN_STEPS: 4 steps, saved at the end
LINKED = ("gin_configs", "scripts")  # what the temporary "repository root" links to


def scaled(steps: int) -> int:
    return max(1, -(-steps // STEP_SCALE)) if steps > 0 else steps


def tiny_argv(argv):
    """A documented `flan-jax ...` argv -> the argv this test runs (train and eval only are rewritten)."""
    if not argv or argv[0] not in ("train", "eval"):
        return list(argv)
    out, given = [], set()
    for arg in argv:
        m = re.fullmatch(r"--gin\.([A-Za-z_]+)=(.*)", arg, re.S)
        if m:
            given.add(m.group(1))
            if m.group(1) in STEP_MACROS and re.fullmatch(r"\d+", m.group(2)):
                arg = f"--gin.{m.group(1)}={scaled(int(m.group(2)))}"
        out.append(arg)
    extra = dict(TINY, **(TINY_TRAIN if argv[0] == "train" else {}))
    return out + [f"--gin.{k}={v}" for k, v in extra.items() if k not in given]


def wrapper_main():
    """The `flan-jax` first on PATH during a journey."""
    argv = tiny_argv(sys.argv[1:])
    if argv != sys.argv[1:]:
        print("+ as run: flan-jax " + shlex.join(argv), file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "flan_jax.cli", *argv])


# --- the pages ------------------------------------------------------------------------------------------------------
FENCE = re.compile(r"^```(\S+)([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def journeys(page):
    """{name: [(kind, attrs, body)]} of a Markdown page, blocks in page order."""
    found = {}
    with open(os.path.join(REPO, page)) as f:
        text = f.read()
    for m in FENCE.finditer(text):
        attrs = dict(a.split("=", 1) for a in m.group(2).split() if "=" in a)
        if "journey" in attrs:
            found.setdefault(attrs["journey"], []).append((m.group(1), attrs, m.group(3)))
    return found


def script(blocks):
    lines = ["set -e -o pipefail -x"]
    for i, (kind, attrs, body) in enumerate(blocks):
        end = f"JOURNEY_BLOCK_{i}_END"
        assert end not in body
        if "file" in attrs:
            path = attrs["file"]
            lines += [f"mkdir -p {shlex.quote(os.path.dirname(path) or '.')}",
                      f"cat > {shlex.quote(path)} <<'{end}'", body.rstrip("\n"), end]
        elif kind in ("bash", "sh", "shell"):
            lines.append(body)
        elif kind == "python":
            lines += [f"python - <<'{end}'", body.rstrip("\n"), end]
        else:
            raise AssertionError(f"a journey block of kind {kind!r} needs file=PATH")
    return "\n".join(lines) + "\n"


def run_journey(page, name, workdir):
    blocks = journeys(page).get(name)
    assert blocks, f"{page} has no block with journey={name}"
    bin_dir = workdir / ".journey_bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "flan-jax"
    wrapper.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {REPO!r})\n"
                       "from tests.test_docs_journeys import wrapper_main\nwrapper_main()\n")
    wrapper.chmod(0o755)
    for name_ in LINKED:
        os.symlink(os.path.join(REPO, name_), workdir / name_)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    start = time.monotonic()
    done = subprocess.run(["bash", "-c", script(blocks)], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=900)
    seconds = time.monotonic() - start
    log = f"--- {page} journey={name} ({seconds:.0f} s), stdout:\n{done.stdout[-6000:]}\n--- stderr:\n" \
          f"{done.stderr[-6000:]}"
    assert done.returncode == 0, log
    return done.stdout, log


# --- convention, no subprocess ----------------------------------------------------------------------------------------
def test_tiny_argv_scales_steps_and_appends_small_settings():
    argv = tiny_argv(["train", "--gin_file=x.gin", "--gin.TRAIN_STEPS=200", "--gin.BATCH_SIZE=2"])
    assert argv[:4] == ["train", "--gin_file=x.gin", "--gin.TRAIN_STEPS=8", "--gin.BATCH_SIZE=2"]
    assert "--gin.EVAL_PERIOD=0" in argv and not any(a.startswith("--gin.BATCH_SIZE=4") for a in argv)
    assert "--gin.TRAIN_STEPS=4" in tiny_argv(["train", "--gin_file=x.gin"])
    assert not any("TRAIN_STEPS" in a for a in tiny_argv(["eval", "--gin_file=x.gin"]))
    assert tiny_argv(["convert", "--from", "t5x", "a", "b"]) == ["convert", "--from", "t5x", "a", "b"]


PAGES = {"README.md": ["own-data"], "docs/evaluation.md": ["evaluate"], "docs/export.md": ["export"],
         "docs/configuration.md": ["resume"], "docs/cache.md": ["cache"]}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_pages_mark_their_journeys(page):
    assert sorted(journeys(page)) == sorted(PAGES[page])
    for name in PAGES[page]:
        script(journeys(page)[name])          # every block is of a kind the runner knows


# --- the journeys -------------------------------------------------------------------------------------------------
@pytest.mark.slow  # ~40 s on an idle 2-core CPU: data show, train, eval
def test_readme_own_data(tmp_path):
    out, log = run_journey("README.md", "own-data", tmp_path)
    assert out.count("=== my_reviews_zs_opt [train #") == 2, log
    assert os.path.isdir(tmp_path / "runs/mine" / f"checkpoint_{scaled(200)}"), log
    assert re.search(r"^my_reviews_zs_opt\t.*accuracy=", out, re.M), log
    assert os.path.getsize(tmp_path / "runs/mine/preds/my_reviews_zs_opt.jsonl") > 0, log


@pytest.mark.slow  # ~40 s: train, eval, plot
def test_evaluation_page(tmp_path):
    out, log = run_journey("docs/evaluation.md", "evaluate", tmp_path)
    preds = tmp_path / "runs/preds"
    assert any(name.endswith(".jsonl") for name in os.listdir(preds)), log
    assert os.path.isfile(tmp_path / "runs/default/plots/train_loss.png"), log


@pytest.mark.slow  # ~45 s: train, convert --verify, transformers generate
def test_export_page(tmp_path):
    out, log = run_journey("docs/export.md", "export", tmp_path)
    assert os.path.isdir(tmp_path / "runs/default" / f"checkpoint_{scaled(50)}"), log
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        assert os.path.isfile(tmp_path / "runs/default_hf" / name), (name, log)
    assert "verify OK" in out, log


@pytest.mark.slow  # ~50 s: train, an already finished rerun, train on from the checkpoint
def test_resume_page(tmp_path):
    out, log = run_journey("docs/configuration.md", "resume", tmp_path)
    # the lines the page shows, in this test's step numbers
    assert f"already trained to step {scaled(100)} (TRAIN_STEPS={scaled(100)}) in runs/resume; nothing to do" \
        in out.splitlines(), log
    assert f"start        resuming from checkpoint_{scaled(100)}, to step {scaled(200)}" in out.splitlines(), log
    assert os.path.isdir(tmp_path / "runs/resume" / f"checkpoint_{scaled(200)}"), log


@pytest.mark.slow  # ~60 s: a Beam cache job over one task, train from it
def test_cache_page(tmp_path):
    out, log = run_journey("docs/cache.md", "cache", tmp_path)
    assert re.search(r"^parity_zs_opt\ttrain=built\texamples=20000\t", out, re.M), log
    with open(tmp_path / "runs/parity_cache/manifest.json") as f:
        assert "parity_zs_opt" in f.read(), log
    assert os.path.isdir(tmp_path / "runs/parity" / "checkpoint_4"), log
