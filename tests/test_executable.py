"""A saved compiled step (train/executable.py): loaded only for the very program and devices it was compiled for, it
computes what the jitted step computes; a run given one trains to the same losses; anything else is refused in one
line and the step is compiled as usual. On CPU here; `flan-jax compile --save_executable` writes the TPU one
(tests/test_tpu_compile.py)."""
import json
import os

import jax
import numpy as np
import pytest

from flan_jax.cli import compile as cli_compile, train as train_cli
from flan_jax.train import executable, partitioning, program
from flan_jax.train.metrics_log import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin_configs", "runs", "tiny_test.gin")
SHORT = ["--gin.TRAIN_STEPS=3", "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=0",
         "--gin.train.eval_mixture_or_task_name=None"]


def _program(*flags):
    cfg = cli_compile.load_config([f"--gin_file={TINY}", *flags])
    mesh = partitioning.make_mesh(cfg.mesh)
    return cfg, program.build(cfg, mesh)


def _save(prog, directory, effort=0.0):
    lowered = prog.jitted.lower(*prog.abstract_args())
    executable.save(lowered.compile(), lowered, list(prog.mesh.devices.flat), directory, effort, topology="cpu")


def _load(prog, directory, effort=0.0):
    lines = []
    loaded = executable.load(prog.jitted, prog.abstract_args(), list(prog.mesh.devices.flat), directory, effort,
                             log=lines.append)
    return loaded, lines


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("step"))
    _, prog = _program()
    _save(prog, directory)
    return directory


def test_loaded_step_computes_what_the_jitted_step_computes(saved):
    _, prog = _program()
    loaded, lines = _load(prog, saved)
    assert loaded is not None and lines == [f"train.compiled_step_dir={saved!r}: loaded the saved compiled step"]
    manifest = json.load(open(os.path.join(saved, executable.MANIFEST)))
    assert manifest["versions"]["jax"] == jax.__version__ and manifest["num_devices"] == prog.mesh.devices.size

    def concrete(x):
        return jax.device_put(np.ones(x.shape, x.dtype), x.sharding)
    state = jax.tree.map(concrete, prog.layout.abstract)
    batch = jax.tree.map(concrete, prog.batch)
    want = prog.jitted(jax.tree.map(lambda a: a.copy(), state), batch)
    got = loaded(state, batch)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("flags, effort, needle", [
    (["--gin.BATCH_SIZE=16"], 0.0, "fingerprint: saved"),          # another program
    ([], -1.0, "compile_effort: saved 0.0, this run -1.0"),         # another compile effort
])
def test_a_step_saved_for_another_program_is_refused_in_one_line(saved, flags, effort, needle):
    _, prog = _program(*flags)
    loaded, lines = _load(prog, saved, effort)
    assert loaded is None and len(lines) == 1 and needle in lines[0] and lines[0].endswith("compiling the step")


def test_missing_or_corrupt_files_are_named_not_raised(saved, tmp_path):
    _, prog = _program()
    loaded, lines = _load(prog, str(tmp_path / "nothing"))
    assert loaded is None and "FileNotFoundError" in lines[0]
    (tmp_path / executable.MANIFEST).write_text("{ torn")
    (tmp_path / executable.BINARY).write_bytes(b"")
    loaded, lines = _load(prog, str(tmp_path))
    assert loaded is None and "JSONDecodeError" in lines[0]


def test_a_run_given_the_saved_step_trains_to_the_same_losses(saved, tmp_path, caplog):
    def losses(model_dir, *extra):
        train_cli.train_main([f"--gin_file={TINY}", f"--gin.MODEL_DIR={model_dir}", *SHORT, *extra])
        return [r["value"] for r in read_metrics(model_dir) if r["split"] == "train" and r["metric"] == "loss"]
    # The saved step was compiled for the default TRAIN_STEPS; the step program does not depend on the run length.
    plain = losses(str(tmp_path / "plain"))
    with caplog.at_level("WARNING"):
        loaded = losses(str(tmp_path / "loaded"), f"--gin.train.compiled_step_dir='{saved}'")
    assert "loaded the saved compiled step" in caplog.text
    assert len(plain) == 3 and loaded == plain
