"""The native (Python) input pipeline: the same examples as the seqio Tasks, mixing rates, packing, trainer use."""
import collections
import os

import numpy as np
import pytest
import seqio

import flan_jax.tasks  # noqa: F401
from flan_jax.pipeline import native as native_pipeline
from flan_jax import packing
from flan_jax.data import registry

LENGTHS = {"inputs": 256, "targets": 64}


@pytest.mark.parametrize("task_name", ["topic_zs_opt", "addition_zs_noopt", "parity_fs_opt", "uppercase_inv"])
def test_task_stream_equals_the_seqio_task(task_name):
    ds = seqio.get_mixture_or_task(task_name).get_dataset(LENGTHS, split="validation", shuffle=False, num_epochs=1,
                                                           trim_output_features=False)
    expected = [(ex["inputs"], ex["targets"]) for ex in ds.as_numpy_iterator()]
    ours = list(native_pipeline.task_token_stream(task_name, "validation", shuffle=False, repeat=False))
    assert len(ours) == len(expected) == 200
    for (a_in, a_tg), (b_in, b_tg) in zip(ours, expected):
        np.testing.assert_array_equal(a_in, b_in)
        np.testing.assert_array_equal(a_tg, b_tg)


def test_shuffle_keeps_every_example_and_is_deterministic():
    plain = list(native_pipeline.task_token_stream("parity_zs_opt", "validation", shuffle=False, repeat=False))
    a = list(native_pipeline.task_token_stream("parity_zs_opt", "validation", seed=1, shuffle_buffer=50, repeat=False))
    b = list(native_pipeline.task_token_stream("parity_zs_opt", "validation", seed=1, shuffle_buffer=50, repeat=False))
    key = lambda pair: (tuple(pair[0]), tuple(pair[1]))
    assert [key(p) for p in a] == [key(p) for p in b]
    assert sorted(map(key, a)) == sorted(map(key, plain)) and [key(p) for p in a] != [key(p) for p in plain]


def test_mixture_follows_the_rates():
    rates = native_pipeline.registry_components("flan_default_train")
    assert rates == pytest.approx({t.name: r for t, r in zip(
        seqio.get_mixture_or_task("flan_default_train").tasks,
        [seqio.get_mixture_or_task("flan_default_train").get_rate(t) / sum(
            seqio.get_mixture_or_task("flan_default_train").get_rate(u)
            for u in seqio.get_mixture_or_task("flan_default_train").tasks)
         for t in seqio.get_mixture_or_task("flan_default_train").tasks])})
    # Identify each drawn example's task by its prompt: rendered inputs are task-specific.
    lookup = {}
    for name in rates:
        for pair in native_pipeline.task_token_stream(name, "train", seed=0, shuffle=False, repeat=False):
            lookup[tuple(pair[0])] = name
            if len(lookup) % 400 == 0:
                break
    counts = collections.Counter()
    stream = native_pipeline.mixture_token_stream("flan_default_train", "train", seed=0, shuffle=False)
    for _, (inputs, _) in zip(range(6000), stream):
        counts[lookup.get(tuple(inputs), "?")] += 1
    seen = sum(v for k, v in counts.items() if k != "?")
    assert seen > 3000
    for name, rate in rates.items():
        assert abs(counts[name] / seen - rate) < 0.03, (name, counts[name] / seen, rate)


def test_packed_batches_have_the_converter_layout_and_count():
    converter = packing.PackedEncDecFeatureConverter()
    stream = native_pipeline.packed_batches("flan_default_train", LENGTHS, 4, converter)
    batch = next(stream)
    reference = converter(seqio.get_mixture_or_task("flan_default_train").get_dataset(
        LENGTHS, split="train", shuffle=False, seed=0, num_epochs=1, trim_output_features=False).take(200),
        LENGTHS)
    expected = next(reference.batch(4).as_numpy_iterator())
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (v.shape, v.dtype) for k, v in expected.items()}
    assert converter.stats.examples_in > 0 and converter.stats.rows_out >= 4
    seg = np.concatenate([next(stream)["encoder_segment_ids"] for _ in range(4)])  # past the first rows
    assert (seg > 0).mean() > 0.95 and seg.max(axis=1).mean() >= 4  # packed, several examples per row


def test_non_registry_task_is_refused_with_its_name():
    name = "native_test_plain_seqio_task"
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(lambda split, shuffle_files: None,
                                                                     splits=["train"]),
                               preprocessors=[], output_features={})
    with pytest.raises(ValueError, match=name):
        native_pipeline.registry_components(name)


def test_saved_position_resumes_the_stream_bitwise():
    """state() after 5 batches (through pickle, as the trainer saves it) continues with the uninterrupted batches 6-12,
    shuffle buffers, mixing RNG, packer buffer and counters included."""
    import pickle
    reference_converter = packing.PackedEncDecFeatureConverter()
    reference = native_pipeline.packed_batches("flan_default_train", LENGTHS, 4, reference_converter, seed=1)
    expected = [next(reference) for _ in range(12)]
    first = native_pipeline.packed_batches("flan_default_train", LENGTHS, 4, packing.PackedEncDecFeatureConverter(),
                                           seed=1)
    for _ in range(5):
        next(first)
    state = pickle.loads(pickle.dumps(first.state()))
    converter = packing.PackedEncDecFeatureConverter()
    resumed = native_pipeline.packed_batches("flan_default_train", LENGTHS, 4, converter, seed=1, state=state)
    for want in expected[5:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert converter.stats.as_dict() == reference_converter.stats.as_dict()


def test_trainer_on_the_native_pipeline_resumes_bitwise(tmp_path, monkeypatch):
    """Train 8 steps; separately train 4, stop, and resume to 8: the losses of steps 5-8 must be identical, and the
    resumed run continues from the saved input position instead of replaying the stream."""
    from flan_jax.pipeline import batches as data_lib
    from flan_jax.train import loop
    from flan_jax.cli import train as train_main_lib
    from flan_jax.train.metrics_log import read_metrics
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs", "runs",
                        "tiny_test.gin")
    flags = ["--gin.train.input_pipeline='native'", "--gin.TRAIN_STEPS=8", "--gin.EVAL_PERIOD=0",
             "--gin.LOG_PERIOD=1", "--gin.CHECKPOINT_PERIOD=4"]

    def losses(d):
        rows = read_metrics(d)
        assert any(r["metric"] == "packing_examples_in" and r["value"] > 0 for r in rows)
        return {r["step"]: r["value"] for r in rows if r["metric"] == "loss" and r["split"] == "train"}

    full = str(tmp_path / "full")
    train_main_lib.train_main([f"--gin_file={tiny}", f"--gin.MODEL_DIR={full}", *flags])
    resumed = str(tmp_path / "resumed")
    cfg = train_main_lib._configured([f"--gin_file={tiny}", f"--gin.MODEL_DIR={resumed}", *flags])[1]
    loop.run(cfg, feature_converter=train_main_lib.make_feature_converter(), stop_after_steps=4)
    assert os.path.exists(os.path.join(resumed, "input_state", "checkpoint_4", "process_0.json"))
    positions = []
    original = data_lib.train_batches
    monkeypatch.setattr(data_lib, "train_batches",
                        lambda *a, **k: positions.append(k.get("input_state")) or original(*a, **k))
    train_main_lib.train_main([f"--gin_file={tiny}", f"--gin.MODEL_DIR={resumed}", *flags])
    assert len(positions) == 1 and positions[0] is not None
    a, b = losses(full), losses(resumed)
    assert sorted(a) == list(range(1, 9)) and all(np.isfinite(list(a.values())))
    for step in range(5, 9):
        assert a[step] == b[step], (step, a[step], b[step])
    assert a[1] != a[8]
    with pytest.raises(train_main_lib.ConfigError, match="input_pipeline"):
        train_main_lib.train_main([f"--gin_file={tiny}", f"--gin.MODEL_DIR={full}x",
                                   "--gin.train.input_pipeline='tfx'"])
