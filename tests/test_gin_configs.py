"""Every shipped run config parses, binds every macro and passes the pre-training checks."""
import glob
import os

import pytest

from flan_jax.models import t5
from flan_jax.cli import train as train_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Preference runs (reward/dpo/ppo, their shared preference_defaults.gin) bind `preference.*`, not `train.*`: their
# own tests parse them (tests/test_preference.py).
PREFERENCE_PREFIXES = ("reward_", "dpo_", "ppo_", "preference_")
RUNS = sorted(p for p in glob.glob(os.path.join(REPO, "gin_configs", "runs", "*.gin"))
              if not os.path.basename(p).startswith(PREFERENCE_PREFIXES))
PUBLISHED = {"small": (512, 6, 8, 1024), "base": (768, 12, 12, 2048), "large": (1024, 16, 24, 2816),
             "xl": (2048, 32, 24, 5120), "xxl": (4096, 64, 24, 10240)}


@pytest.mark.parametrize("path", [p for p in RUNS if not p.endswith("finetune.gin")], ids=os.path.basename)
def test_run_config_is_valid(path, tmp_path):
    _, cfg = train_main._configured([f"--gin_file={path}", f"--gin.MODEL_DIR={tmp_path}", "--gin.NUM_PARTITIONS=1"])
    assert cfg.train_steps > 0 and cfg.input.global_batch_size > 0
    assert cfg.eval_mixture_or_task_name
    assert cfg.loss.normalizer == "num_real_target_tokens"  # a token mean, set explicitly (None is T5X's sum)


def test_loss_normalizing_factor_none_stays_none(tmp_path):
    path = os.path.join(REPO, "gin_configs", "runs", "tiny_test.gin")
    _, cfg = train_main._configured([f"--gin_file={path}", f"--gin.MODEL_DIR={tmp_path}",
                                     "--gin.train.loss_normalizing_factor=None"])
    assert cfg.loss.normalizer is None


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_model_configs_have_published_sizes(size, tmp_path, monkeypatch):
    from flan_jax.train import validation
    monkeypatch.setattr(validation, "checkpoint_bytes", lambda model: 0)  # an xxl checkpoint may not fit this disk
    path = os.path.join(REPO, "gin_configs", "runs", f"flan_t5_{size}_finetune.gin")
    _, cfg = train_main._configured([f"--gin_file={path}", f"--gin.MODEL_DIR={tmp_path}", "--gin.NUM_PARTITIONS=1"])
    m = cfg.model
    assert (m.emb_dim, m.num_heads, m.num_encoder_layers, m.mlp_dim) == PUBLISHED[size]
    assert m.num_decoder_layers == m.num_encoder_layers and m.vocab_size == 32128 and m.head_dim == 64
    assert m.dtype == "bfloat16"
    assert cfg.model == t5.T5Config.preset(size, dtype="bfloat16", dropout_rate=m.dropout_rate, remat=m.remat)


def test_too_little_disk_for_a_checkpoint_names_model_dir(tmp_path, monkeypatch):
    import collections
    from flan_jax.train import validation
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(validation.shutil, "disk_usage", lambda path: usage(10, 10, 1000))
    with pytest.raises(train_main.ConfigError, match="MODEL_DIR=.*GiB free, a checkpoint needs"):
        train_main._configured([f"--gin_file={RUNS[0]}", f"--gin.MODEL_DIR={tmp_path}"])
    small = t5.T5Config.preset("small")
    # T5 1.1 small: ~77M float32 params (308 MB) plus factored slots (a few MB)
    assert 300e6 < validation.checkpoint_bytes(small) < 330e6


def test_configs_parse_with_a_runs_folder_in_the_working_directory(tmp_path, monkeypatch):
    """Regression: after the main job wrote runs/default, gin took the folder `runs` for a Python package and crashed
    on `include 'runs/finetune.gin'`."""
    (tmp_path / "runs" / "default").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _, cfg = train_main._configured([f"--gin_file={os.path.join(REPO, 'gin_configs', 'runs', 'default_cpu.gin')}",
                                     f"--gin.MODEL_DIR={tmp_path / 'runs' / 'default'}"])
    assert cfg.model_dir.endswith("runs/default")
