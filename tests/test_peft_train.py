"""Training side of PEFT (flan_jax/train/peft.py) on tiny_test.gin: only params['peft'] trains, has optimizer state
and is checkpointed; the base is reloaded from the recorded reference on resume, eval and --merge-peft."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import models
from flan_jax.checkpoints import run_dir as trained
from flan_jax.cli import convert as convert_cli
from flan_jax.train import (checkpointing, loop, optim, partitioning, peft_state as peft, state as state_lib,
                            step as step_lib)
from flan_jax.pipeline import batches as data_lib
from flan_jax.cli import train as train_main
from flan_jax.train.metrics_log import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin_configs", "runs", "tiny_test.gin")
LORA = os.path.join(REPO, "gin_configs", "peft", "lora.gin")
BASE_STEP = 7
# No eval, no matmul probe: what these tests measure is the parameters, not the metrics.
QUICK = ("--gin.EVAL_MIXTURE_OR_TASK_NAME=None", "--gin.BEST_METRIC=None", "--gin.train.peak_tflops=1.0",
         "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2", "--gin.LOG_PERIOD=1")


def _flags(model_dir, *extra, peft_gin=LORA, base=None):
    files = [f"--gin_file={TINY}"] + ([f"--gin_file={peft_gin}"] if peft_gin else [])
    base_flag = [f"--gin.INIT_CHECKPOINT={base}"] if base else []
    return [*files, f"--gin.MODEL_DIR={model_dir}", *QUICK, *base_flag, *extra]


def _config(model_dir, *extra, **kw):
    return train_main._configured(_flags(model_dir, *extra, **kw))[1]


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base run directory of ours: a (random, non-zero) tiny T5 train state saved as checkpoint_7."""
    d = str(tmp_path_factory.mktemp("base"))
    cfg = _config(d, peft_gin=None)
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    state = step_lib.init_state(cfg.model, optimizer, jax.random.PRNGKey(3))
    ckpt = checkpointing.Checkpointer(d, async_save=False)
    ckpt.save(BASE_STEP, state, {"step": BASE_STEP, "seed": 0, "batches_consumed": BASE_STEP})
    ckpt.close()
    return d, jax.device_get(state["params"])


@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("lora"))
    train_main.train_main(_flags(d, base=base_dir[0]))
    return d


def _restored(model_dir, base):
    cfg = _config(model_dir, base=base)
    from flan_jax.train.restore import restore_params
    return cfg, restore_params(cfg, model_dir)


@pytest.mark.slow
def test_train_steps_leave_the_frozen_base_bitwise_unchanged(base_dir, tmp_path):
    """The loop's PEFT step (state.jit_step, the base its third argument) run three times: the base it was given is
    bitwise the checkpoint's, and only params['peft'] (with its optimizer state) comes back."""
    cfg = _config(str(tmp_path / "steps"), base=base_dir[0])
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    mesh = partitioning.make_mesh(cfg.mesh)
    layout = state_lib.state_layout(cfg.model, optimizer, cfg.mesh, mesh)
    state, start, base = peft.init_or_restore(cfg, layout, optimizer, checkpointing.Checkpointer(cfg.model_dir))
    assert start == 0 and set(state["params"]) == {"peft"}
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 100, (2, 8))
    batch = {"encoder_input_tokens": rng.integers(2, 100, (2, 16)), "decoder_target_tokens": targets,
             "decoder_input_tokens": np.asarray(models.shift_right(jnp.asarray(targets))),
             "decoder_loss_weights": np.ones((2, 8), np.float32)}
    step_fn = step_lib.make_train_step(cfg.model, optimizer, cfg.loss)
    train_step = state_lib.jit_step(step_fn, layout, partitioning.batch_sharding(mesh))
    for _ in range(3):
        state, metrics = train_step(state, batch, base.params)
    assert float(metrics["grad_norm"]) > 0 and int(state["step"]) == 3
    assert _leaves_equal(base.params, base_dir[1])


def test_frozen_base_bitwise_unchanged_after_training(lora_run, base_dir):
    base_path, base_params = base_dir
    cfg, (params, step) = _restored(lora_run, base_path)
    assert step == 4
    trainable, frozen = peft.split_params(jax.device_get(params))
    assert _leaves_equal(frozen, base_params)
    # LoRA B starts at zero (the model starts as the base) and moved: the PEFT parameters trained.
    b_leaves = [v for k, v in jax.tree_util.tree_flatten_with_path(trainable)[0] if "lora_b" in jax.tree_util.keystr(k)]
    assert b_leaves and all(np.abs(x).max() > 0 for x in b_leaves)


def _bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def test_optimizer_state_holds_peft_parameters_only(base_dir):
    cfg = _config("unused", base=base_dir[0])
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    mesh = partitioning.make_mesh(cfg.mesh)
    layout = state_lib.state_layout(cfg.model, optimizer, cfg.mesh, mesh)
    abstract, frozen = layout.abstract, layout.frozen
    full = state_lib.state_layout(peft.base_config(cfg.model), optimizer, cfg.mesh, mesh).abstract
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract["opt_state"])[0]]
    per_param = [p for p in paths if "'" in p]  # counts have no dict key
    assert per_param and all("['peft']" in p for p in per_param), per_param[:5]
    peft_bytes, full_bytes = _bytes(abstract["opt_state"]), _bytes(full["opt_state"])
    # Adafactor state of exactly the PEFT parameters. tiny_test's kernels (dims < 128) are not factored, so full
    # finetuning keeps a second moment per weight and PEFT a small fraction of that.
    assert peft_bytes == _bytes(jax.eval_shape(optimizer.init, abstract["params"]))
    assert peft_bytes < full_bytes / 5, (peft_bytes, full_bytes)
    assert set(abstract["params"]) == {"peft"} and _bytes(frozen) == _bytes(full["params"])


def test_factored_adafactor_state_of_lora_is_larger_than_full_finetuning():
    """docs/peft.md: on the default model (emb 128) Adafactor factors every base kernel (v_row + v_col), while a
    rank-8 LoRA factor has a dim below min_dim_size_to_factor (128) and keeps one second moment per weight: the
    PEFT optimizer state is then the larger one; the saving is in gradients (PEFT params only)."""
    default = os.path.join(REPO, "gin_configs", "runs", "default_cpu.gin")
    cfg = train_main._configured([f"--gin_file={default}", f"--gin_file={LORA}", "--gin.INIT_CHECKPOINT='x'"])[1]
    optimizer = optim.make_adafactor(cfg.adafactor, optim.make_schedule(cfg.schedule))
    mesh = partitioning.make_mesh(cfg.mesh)
    layout = state_lib.state_layout(cfg.model, optimizer, cfg.mesh, mesh)
    abstract, frozen = layout.abstract, layout.frozen
    full = state_lib.state_layout(peft.base_config(cfg.model), optimizer, cfg.mesh, mesh).abstract
    peft_bytes, full_bytes = _bytes(abstract["opt_state"]), _bytes(full["opt_state"])
    assert peft_bytes >= 4 * models.count_peft_params(cfg.model)  # a float32 second moment per LoRA weight
    assert full_bytes < peft_bytes < _bytes(frozen) / 5, (peft_bytes, full_bytes, _bytes(frozen))


def test_checkpoint_holds_peft_params_and_base_reference(lora_run, base_dir):
    base_path, _ = base_dir
    import orbax.checkpoint as ocp
    ckpt_dir = os.path.join(lora_run, "checkpoint_4")
    tree = ocp.PyTreeCheckpointer().metadata(os.path.join(ckpt_dir, "state")).item_metadata.tree
    assert set(tree["params"]) == {"peft"}
    param_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree["opt_state"])[0]]
    assert not any("encoder" in p and "peft" not in p for p in param_paths)
    meta = json.load(open(os.path.join(ckpt_dir, "meta", "metadata")))
    want = {"path": os.path.abspath(base_path), "step": BASE_STEP, "format": "flan_jax"}
    assert meta["peft_base"] == want
    assert json.load(open(os.path.join(lora_run, "peft_base.json"))) == want
    size = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
    assert size(ckpt_dir) < size(os.path.join(base_path, f"checkpoint_{BASE_STEP}")) / 2


def test_metrics_carry_parameter_counts(lora_run):
    rows = [r for r in read_metrics(lora_run) if r["split"] == "train" and r["task"] == "all"]
    trainable = {r["value"] for r in rows if r["metric"] == "trainable_parameters"}
    total = {r["value"] for r in rows if r["metric"] == "total_parameters"}
    cfg = _config(lora_run)
    assert trainable == {float(models.count_peft_params(cfg.model))}
    assert total == {float(models.count_params(cfg.model))} and max(trainable) < max(total) / 5


@pytest.mark.slow
def test_resume_is_bitwise_identical(lora_run, base_dir, tmp_path):
    d = str(tmp_path / "resumed")
    cfg = _config(d, base=base_dir[0])
    loop.run(cfg, feature_converter=train_main.make_feature_converter(), stop_after_steps=2)
    # Resume needs no INIT_CHECKPOINT: the checkpoint names its base.
    train_main.train_main(_flags(d))
    losses = lambda m: {r["step"]: r["value"] for r in read_metrics(m) if r["metric"] == "loss"}
    assert losses(d) == losses(lora_run) and sorted(losses(d)) == [1, 2, 3, 4]
    (_, (a, _)), (_, (b, _)) = _restored(d, None), _restored(lora_run, None)
    assert _leaves_equal(a, b)


def test_resume_on_another_base_is_an_error(lora_run, tmp_path):
    other = tmp_path / "other_base"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not the base this PEFT run was trained on"):
        loop.run(_config(lora_run, base=str(other)))


def test_peft_without_base_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="INIT_CHECKPOINT"):
        loop.run(_config(str(tmp_path / "nobase")))


@pytest.mark.slow
def test_eval_loads_base_plus_peft(lora_run, base_dir):
    task = "parity_zs_opt"
    results = train_main.eval_main(_flags(lora_run, f"--gin.EVAL_MIXTURE_OR_TASK_NAME='{task}'",
                                          "--gin.EVAL_EXAMPLES_PER_TASK=4") + [f"--checkpoint={lora_run}"])
    assert 0.0 <= results[task]["accuracy"] <= 1.0
    # What eval scores is base + PEFT: the LoRA run's logits differ from the base's.
    cfg, (params, _) = _restored(lora_run, None)
    tokens = jnp.asarray(np.arange(2, 18).reshape(1, 16))
    batch = {"encoder_input_tokens": tokens, "decoder_input_tokens": tokens[:, :8]}
    with_lora = models.forward(cfg.model, params, batch)
    base_only = models.forward(peft.base_config(cfg.model), base_dir[1], batch)
    assert float(jnp.abs(with_lora - base_only).max()) > 0


def test_merge_peft_checkpoint_gives_the_unmerged_logits(lora_run, tmp_path):
    from flan_jax.train.restore import restore_params
    out = str(tmp_path / "merged")
    assert convert_cli.merge_main(["--merge-peft", *_flags(lora_run), out]) == 0
    cfg, (params, step) = _restored(lora_run, None)
    base_cfg = _config(out, peft_gin=None)
    merged, merged_step = restore_params(base_cfg, out)
    assert merged_step == step and "peft" not in merged
    tokens = jnp.asarray(np.arange(2, 34).reshape(2, 16))
    batch = {"encoder_input_tokens": tokens, "decoder_input_tokens": tokens[:, :8]}
    np.testing.assert_allclose(models.forward(base_cfg.model, merged, batch), models.forward(cfg.model, params, batch),
                               atol=1e-5, rtol=1e-5)
    # A merged checkpoint is a full model of ours: it can be the base of another run.
    assert trained.find_trained_checkpoint(out) == (os.path.join(os.path.abspath(out), f"checkpoint_{step}"), step)


def test_prompt_tuning_defaults_follow_lester_et_al():
    cfg = _config("unused", peft_gin=os.path.join(REPO, "gin_configs", "peft", "prompt.gin"), base="x")
    assert cfg.model.peft.method == "prompt" and cfg.model.peft.prompt_length == 100
    assert cfg.schedule == optim.ScheduleConfig("constant", 0.3, 0)
    assert cfg.adafactor.multiply_by_parameter_scale is False and cfg.adafactor.weight_decay_rate == 1e-5
    assert cfg.adafactor.decay_rate == 0.8 and cfg.adafactor.step_offset == 0
    # The gin-selected packer reserves the prompt's slots in every segment; a packer that does not is refused.
    converter = train_main.make_feature_converter()
    assert converter.packing_options["prompt_slots"] == 100
    peft.check_converter(cfg.model, converter)
    import seqio
    with pytest.raises(ValueError, match="prompt_slots"):
        peft.check_converter(cfg.model, seqio.EncDecFeatureConverter(pack=True))


def test_prompt_init_from_the_mixtures_class_labels_or_a_file(base_dir, tmp_path):
    prompt_gin = os.path.join(REPO, "gin_configs", "peft", "prompt.gin")
    cfg = _config("unused", "--gin.PeftConfig.prompt_init='labels'", "--gin.PROMPT_LENGTH=8", peft_gin=prompt_gin,
                  base=base_dir[0])
    labels = peft.mixture_class_labels(cfg.input.mixture_or_task_name)
    assert labels and len(set(labels)) == len(labels)
    inputs = peft.prompt_init_inputs(cfg)
    vocabulary = data_lib.targets_vocabulary(cfg.input)
    assert [vocabulary.decode(ids) for ids in inputs["label_token_ids"]] == labels
    _, base_params = base_dir
    prompt = peft.init_trainable(cfg.model, jax.random.PRNGKey(0), base_params, **inputs)["peft"]["prompt"]
    table = np.asarray(base_params["token_embedder"]["embedding"], np.float32)
    first = np.asarray(inputs["label_token_ids"][0])
    np.testing.assert_allclose(prompt[0], table[first[first != 0]].mean(axis=0), rtol=1e-6, atol=1e-7)
    # A saved prompt is used as it is.
    saved = np.random.default_rng(0).normal(size=(8, cfg.model.emb_dim)).astype(np.float32)
    np.save(tmp_path / "prompt.npy", saved)
    cfg = _config("unused", f"--gin.PeftConfig.prompt_init='{tmp_path / 'prompt.npy'}'", "--gin.PROMPT_LENGTH=8",
                  peft_gin=prompt_gin, base=base_dir[0])
    loaded = peft.init_trainable(cfg.model, jax.random.PRNGKey(0), base_params, **peft.prompt_init_inputs(cfg))
    np.testing.assert_array_equal(loaded["peft"]["prompt"], saved)
    with pytest.raises(ValueError, match="prompt_init"):
        models.PeftConfig("prompt", prompt_init="labelz")


# --- decoder-only family -------------------------------------------------------------------------------------------
DEC = models.DecoderConfig(vocab_size=61, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           mlp_dim=48)
DEC_PEFT = {"lora": (models.PeftConfig("lora", rank=4, alpha=8.0), 3e-3),
            "prompt": (models.PeftConfig("prompt", prompt_length=3), 0.3)}   # the gin_configs/peft/ LRs


def _decoder_packed_batch(prompt_slots: int) -> dict:
    """Prefix-LM rows from the real packer (which reserves the prompt's slots in every segment), 2+ segments a row."""
    from flan_jax import packing
    rng = np.random.default_rng(0)
    examples = [(rng.integers(3, 61, n_in), rng.integers(3, 61, n_tg)) for n_in, n_tg in [(6, 3), (4, 2), (7, 4), (5, 3)]]
    packer = packing.ExamplePacker((24, 12), concatenate=True, prompt_slots=prompt_slots, buffer_size=8)
    rows = [r for ex in examples for r in packer.add(*ex)] + packer.flush()
    assert max(len(r) for r in rows) >= 2, "the test needs segments that share a row"
    return packing.prefix_lm_feature_batch(rows, 36)


@pytest.mark.parametrize("method", sorted(DEC_PEFT))
def test_decoder_peft_steps_train_the_peft_params_and_leave_the_base_bitwise_unchanged(method):
    """train/peft.py on a tiny DecoderConfig: the loop's PEFT step (state.jit_step) lowers the loss, moves every
    PEFT parameter, keeps optimizer state for them only, and never changes the frozen base it is given."""
    peft_cfg, lr = DEC_PEFT[method]
    config = dataclasses.replace(DEC, peft=peft_cfg)
    optimizer = optim.make_adafactor(optim.AdafactorConfig(multiply_by_parameter_scale=False),
                                     optim.make_schedule(optim.ScheduleConfig("constant", lr, 0)))
    mesh_cfg = partitioning.MeshConfig()
    mesh = partitioning.make_mesh(mesh_cfg, jax.devices()[:1])
    layout = state_lib.state_layout(config, optimizer, mesh_cfg, mesh)
    base_params = jax.device_put(models.init_params(DEC, jax.random.PRNGKey(0)), layout.frozen_shardings)
    base_before = jax.device_get(base_params)
    trainable = peft.init_trainable(config, jax.random.PRNGKey(1), base_params)
    before = jax.device_get(trainable)
    state = jax.device_put(state_lib.new_state(trainable, optimizer), layout.shardings)
    step_fn = step_lib.make_train_step(config, optimizer, step_lib.LossConfig())
    train_step = state_lib.jit_step(step_fn, layout, partitioning.batch_sharding(mesh))
    batch = _decoder_packed_batch(peft_cfg.prompt_length if method == "prompt" else 0)
    losses = []
    for _ in range(4):
        state, metrics = train_step(state, batch, base_params)
        losses.append(float(metrics["loss"]))
    assert int(state["step"]) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    assert _leaves_equal(base_params, base_before)
    after = jax.device_get(state["params"])
    assert set(after) == {"peft"}
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
    assert moved and all(moved), moved
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
    assert all("['peft']" in p for p in opt_paths if "'" in p)
