"""Our own training checkpoints as a source: INIT_CHECKPOINT, `flan-jax convert` and `flan-jax eval` read their params
(never the optax state, whose structure only the training config can rebuild) and the model config they record."""
import jax
import numpy as np
import pytest

from flan_jax import checkpoints, models
from flan_jax.checkpoints import convert, run_dir as trained
from flan_jax.cli import convert as convert_cli
from flan_jax.train import checkpointing, init_from, loop, optim, restore, step as step_lib
from flan_jax.pipeline import batches as data_lib

T5 = models.T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1,
                     num_decoder_layers=1)
DECODER = models.DecoderConfig(vocab_size=64, emb_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                               mlp_dim=32, rope_scaling=(8.0, 1.0, 4.0, 64.0))


def _save_training_checkpoint(model_dir, config, step=3, *, record=True, best=True):
    """A checkpoint exactly as the loop writes it: the train state (params + Adafactor state) and its meta."""
    optimizer = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig()))
    state = step_lib.init_state(config, optimizer, jax.random.PRNGKey(7))
    meta = {"step": step, "seed": 0, "batches_consumed": step}
    if record:
        meta["model"] = trained.model_record(config)
    ckpt = checkpointing.Checkpointer(str(model_dir), async_save=False, best_metric="m" if best else None)
    ckpt.save(step, state, meta)
    if best:
        ckpt.maybe_save_best(step, state, meta, {"m": 1.0})
    ckpt.close()
    return jax.device_get(state["params"])


def _assert_same_params(a, b):
    flat_a, flat_b = checkpoints.t5x.flatten(a), checkpoints.t5x.flatten(b)
    assert sorted(flat_a) == sorted(flat_b)
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)


@pytest.mark.parametrize("config", [T5, DECODER], ids=["t5", "decoder"])
def test_init_checkpoint_and_convert_read_params_of_every_layout(tmp_path, config):
    model_dir = tmp_path / "run"
    params = _save_training_checkpoint(model_dir, config)
    for path in (model_dir, model_dir / "checkpoint_3", model_dir / "best", model_dir / "best" / "checkpoint_3"):
        assert trained.find_trained_checkpoint(str(path))[1] == 3, path
        loaded, _, step = init_from.load_checkpoint_params(str(path), config)
        assert step is None
        _assert_same_params(loaded, params)
    # The loop's init path: params in, a fresh optimizer state, step 0.
    template = jax.device_get(optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(
        optim.ScheduleConfig())).init(params))
    loaded, opt_state, step = init_from.initial_params_and_opt_state(str(model_dir), config, template, False)
    assert opt_state is None and step == 0
    with pytest.raises(ValueError, match="restore_optimizer_state"):
        init_from.load_checkpoint_params(str(model_dir), config, with_optimizer_state=True)

    # flan-jax convert: the recorded config is used (a decoder's RoPE scaling cannot be read off shapes).
    assert convert_cli.main(["--from", "t5x", "--to", "hf", str(model_dir / "checkpoint_3"), str(tmp_path / "hf")]) == 0
    hf_config, hf_params = checkpoints.load_hf(str(tmp_path / "hf"))
    assert hf_config == config
    _assert_same_params(hf_params, params)
    assert convert_cli.main(["--from", "t5x", "--to", "orbax", str(model_dir / "best"), str(tmp_path / "orbax")]) == 0
    if config is T5:
        _assert_same_params(checkpoints.load_t5x(str(tmp_path / "orbax")), params)


def test_eval_restores_params_only_on_the_training_mesh(tmp_path):
    params = _save_training_checkpoint(tmp_path / "run", DECODER, best=False)
    # Another optimizer setting than the one trained with: eval never reads the optimizer state.
    cfg = loop.TrainConfig(model_dir=str(tmp_path / "run"), model=DECODER, train_steps=1,
                           input=data_lib.InputConfig("unused", {"inputs": 8, "targets": 8}, 1),
                           adafactor=optim.AdafactorConfig(beta1=0.9))
    restored, step = restore.restore_params(cfg, str(tmp_path / "run"))
    assert step == 3 and all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    _assert_same_params(jax.device_get(restored), params)
    with pytest.raises(FileNotFoundError, match="no checkpoint_<step> found"):
        restore.restore_params(cfg, str(tmp_path / "nothing_here"))


def test_checkpoint_without_a_recorded_config(tmp_path):
    """Runs from before configs were recorded: a T5's config comes from its shapes; a decoder needs --hf_config."""
    params = _save_training_checkpoint(tmp_path / "t5", T5, record=False, best=False)
    config, loaded, step = trained.load_trained(str(tmp_path / "t5"))
    assert (config.emb_dim, config.num_heads, config.mlp_dim, step) == (16, 2, 32, 3)
    _assert_same_params(loaded, params)
    _save_training_checkpoint(tmp_path / "dec", DECODER, record=False, best=False)
    with pytest.raises(ValueError, match="--hf_config"):
        trained.load_trained(str(tmp_path / "dec"))
    config, _, _ = trained.load_trained(str(tmp_path / "dec"), DECODER)
    assert config == DECODER
    assert trained.find_trained_checkpoint(str(tmp_path)) is None  # a folder of runs is not itself a run
