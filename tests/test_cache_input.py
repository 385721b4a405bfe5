"""The cache input path (train.input_pipeline='cache'): Grain over a preprocessed cache, mixed, packed and batched in
the native layout; resumable bitwise from plain data; sharded by process; refusing caches it cannot use."""
import collections
import json
import os
import shutil

import numpy as np
import pytest

import flan_jax.tasks.default  # noqa: F401
from flan_jax import packing
from flan_jax.data import mixing
from flan_jax.pipeline import native
from flan_jax.pipeline.cache import format as cache_format
from flan_jax.pipeline.cache import grain_input
from flan_jax.train import checkpointing
from tests import cache_testing

TASKS = ["addition_zs_noopt", "keyword_sentiment_zs_opt", "acronym_zs_noopt"]
RATES = {TASKS[0]: 1.0, TASKS[1]: 2.0, TASKS[2]: 1.0}
MIXTURE = "cache_input_test_mix"
LENGTHS = {"inputs": 128, "targets": 32}
SPLIT = "validation"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mixing.register_mixture(MIXTURE, RATES)
    root = str(tmp_path_factory.mktemp("cache"))
    written = cache_testing.build_cache(root, TASKS, splits=(SPLIT,), num_shards=3)
    return root, written


def _batches(root, **options):
    options.setdefault("split", SPLIT)
    return grain_input.cache_batches(root, MIXTURE, LENGTHS, 4, packing.PackedEncDecFeatureConverter(), **options)


def _key(inputs, targets):
    return np.asarray(inputs, np.int32).tobytes(), np.asarray(targets, np.int32).tobytes()


def test_batches_have_the_native_layout_and_epochs_hold_the_tasks_examples(cache):
    root, written = cache
    ours = next(_batches(root))
    theirs = next(native.PackedBatches(MIXTURE, LENGTHS, 4, packing.PackedEncDecFeatureConverter(), split=SPLIT))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    assert np.any(ours["encoder_input_tokens"]) and np.max(ours["decoder_segment_ids"]) >= 1

    mixed, names, _ = grain_input.example_dataset(root, MIXTURE, LENGTHS, split=SPLIT, seed=3)
    per_task = collections.defaultdict(list)
    for i in range(2000):  # enough for a full epoch of each task (200 records, the smallest rate a quarter)
        task_id, index, inputs, targets = mixed[i]
        per_task[names[task_id]].append((index, *_key(inputs, targets)))
    for task in TASKS:
        epoch = per_task[task][:200]
        assert sorted(epoch) == sorted((i, *_key(a, b)) for i, a, b in written[task, SPLIT])
        assert [e[0] for e in epoch] != sorted(e[0] for e in epoch)  # shuffled
        assert per_task[task][200:400] != epoch  # each epoch in another order


def test_unshuffled_tasks_read_in_record_order(cache):
    root, written = cache
    mixed, names, _ = grain_input.example_dataset(root, TASKS[0], LENGTHS, split=SPLIT, shuffle=False)
    got = [mixed[i] for i in range(200)]
    assert [g[1] for g in got] == [i for i, _, _ in written[TASKS[0], SPLIT]]
    for (_, _, a, b), (_, x, y) in zip(got, written[TASKS[0], SPLIT]):
        np.testing.assert_array_equal(a, x)
        np.testing.assert_array_equal(b, y)


def test_mixing_follows_the_rates(cache):
    root, _ = cache
    mixed, names, _ = grain_input.example_dataset(root, MIXTURE, LENGTHS, split=SPLIT)
    counts = collections.Counter(names[mixed[i][0]] for i in range(4000))
    total = sum(RATES.values())
    for task, rate in RATES.items():
        assert abs(counts[task] / 4000 - rate / total) < 0.02, counts


def test_resume_is_bitwise_from_plain_data_and_does_not_replay(cache):
    root, _ = cache
    converter = packing.PackedEncDecFeatureConverter()
    batches = grain_input.cache_batches(root, MIXTURE, LENGTHS, 4, converter, split=SPLIT, seed=1)
    for _ in range(5):
        next(batches)
    state = json.loads(json.dumps(checkpointing.to_plain(batches.state())))
    expected = [next(batches) for _ in range(5)]
    stats = converter.stats.as_dict()
    for _ in range(40):
        next(batches)
    late_state = checkpointing.to_plain(batches.state())

    resumed_converter = packing.PackedEncDecFeatureConverter()
    resumed = grain_input.cache_batches(root, MIXTURE, LENGTHS, 4, resumed_converter, split=SPLIT, seed=1,
                                        state=checkpointing.from_plain(state))
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert resumed_converter.stats.as_dict() == stats

    early_reads = resumed.reads()  # restored after 5 batches and read 5 more
    late = _batches(root, seed=1, state=checkpointing.from_plain(late_state))
    next(late)
    # Restoring after 50 batches reads no more than restoring after 5 (no replay): only the read-ahead and the rows.
    assert late.reads() <= early_reads + grain_input.READ_AHEAD, (late.reads(), early_reads)
    assert late.reads() < 2 * grain_input.READ_AHEAD + 100


def test_process_shards_read_disjoint_parts_of_the_stream(cache):
    root, _ = cache
    full, _, _ = grain_input.example_dataset(root, MIXTURE, LENGTHS, split=SPLIT)
    parts = [grain_input.example_dataset(root, MIXTURE, LENGTHS, split=SPLIT, shard_index=k, num_shards=2)[0]
             for k in range(2)]
    for i in range(100):  # shard k reads positions k, k + 2, ... of the one mixed stream
        for k in range(2):
            want, got = full[2 * i + k], parts[k][i]
            assert (want[0], want[1]) == (got[0], got[1])
            np.testing.assert_array_equal(want[2], got[2])
    a, b = next(_batches(root, shard_index=0, num_shards=2)), next(_batches(root, shard_index=1, num_shards=2))
    assert not np.array_equal(a["encoder_input_tokens"], b["encoder_input_tokens"])


def _copy(cache, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(cache[0], root)
    return root


def _edit_manifest(root, edit):
    path = os.path.join(root, cache_format.MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    cache_format.write_json_atomic(path, manifest)


@pytest.mark.parametrize("field,value", [("vocabulary", ["spm:0000"]), ("feature_lengths", {"inputs": 64, "targets": 16}),
                                         ("render_version", -1), ("format_version", 99)])
def test_a_cache_for_another_configuration_is_refused_naming_the_field(cache, tmp_path, field, value):
    root = _copy(cache, tmp_path)
    _edit_manifest(root, lambda m: m.update({field: value}))
    with pytest.raises(cache_format.CacheError, match=field):
        _batches(root)


def test_missing_and_stale_tasks_are_refused(cache, tmp_path):
    root = _copy(cache, tmp_path)
    _edit_manifest(root, lambda m: m["tasks"].pop(TASKS[1]))
    with pytest.raises(cache_format.CacheError, match=f"no 'validation' split of task '{TASKS[1]}'"):
        _batches(root)
    with pytest.raises(cache_format.CacheError, match="no 'train' split"):
        _batches(cache[0], split="train")
    root = _copy(cache, tmp_path / "stale")
    _edit_manifest(root, lambda m: m["tasks"][TASKS[2]][SPLIT].update(fingerprint="0" * 20))
    with pytest.raises(cache_format.CacheError, match=f"task '{TASKS[2]}'.*stale.*flan-jax data cache"):
        _batches(root)


def test_missing_and_corrupt_shards_are_named(cache, tmp_path):
    root = _copy(cache, tmp_path)
    missing = cache_format.shard_path(root, TASKS[0], SPLIT, 1, 3)
    os.remove(missing)
    with pytest.raises(cache_format.CacheError, match=f"{missing}.*{TASKS[0]}.*missing"):
        _batches(root)
    root = _copy(cache, tmp_path / "corrupt")
    corrupt = cache_format.shard_path(root, TASKS[1], SPLIT, 2, 3)
    with open(corrupt, "wb") as f:
        f.write(os.urandom(4096))
    with pytest.raises(cache_format.CacheError, match=f"{corrupt}.*{TASKS[1]}"):
        batches = _batches(root)
        for _ in range(20):
            next(batches)


def test_an_undecodable_record_is_named(cache, tmp_path):
    root = _copy(cache, tmp_path)
    path = cache_format.shard_path(root, TASKS[2], SPLIT, 0, 3)
    cache_format.write_shard(path, [b"not an example"] * 67)  # same count, bad records
    with pytest.raises(cache_format.CacheError, match=f"{path}.*{TASKS[2]}.*corrupt"):
        mixed, _, _ = grain_input.example_dataset(root, TASKS[2], LENGTHS, split=SPLIT, shuffle=False)
        mixed[0]


def test_an_untruncated_cache_serves_any_lengths_and_a_truncated_one_its_own(cache, tmp_path):
    root, _ = cache
    next(grain_input.cache_batches(root, MIXTURE, {"inputs": 64, "targets": 16}, 2, split=SPLIT))
    truncated = str(tmp_path / "truncated")
    examples = {t: cache_testing.task_examples(t, SPLIT, 50) for t in TASKS}
    entries = {t: {SPLIT: cache_testing.write_task(truncated, t, SPLIT, examples[t], 2, LENGTHS)} for t in TASKS}
    cache_testing.write_manifest(truncated, TASKS, entries, LENGTHS)
    next(_batches(truncated))
    with pytest.raises(cache_format.CacheError, match="feature_lengths"):
        grain_input.cache_batches(truncated, MIXTURE, {"inputs": 64, "targets": 16}, 2, split=SPLIT)


@pytest.mark.slow
def test_the_trainer_runs_on_a_cache(tmp_path):
    from flan_jax.cli import train as train_main_lib
    from flan_jax.train.metrics_log import read_metrics
    mixing.register_mixture(MIXTURE, RATES)
    root = str(tmp_path / "cache")
    cache_testing.build_cache(root, TASKS, splits=("train",), limit=400)
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs", "runs",
                        "tiny_test.gin")
    flags = [f"--gin_file={tiny}", f"--gin.MIXTURE_OR_TASK_NAME='{MIXTURE}'", "--gin.train.input_pipeline='cache'",
             "--gin.TRAIN_STEPS=4", "--gin.EVAL_PERIOD=0", "--gin.LOG_PERIOD=1", "--gin.CHECKPOINT_PERIOD=2"]
    model_dir = str(tmp_path / "run")
    with pytest.raises(train_main_lib.ConfigError, match="train.input_cache_dir"):
        train_main_lib.train_main([*flags, f"--gin.MODEL_DIR='{model_dir}x'"])
    train_main_lib.train_main([*flags, f"--gin.MODEL_DIR='{model_dir}'", f"--gin.train.input_cache_dir='{root}'"])
    rows = read_metrics(model_dir)
    losses = {r["step"]: r["value"] for r in rows if r["metric"] == "loss" and r["split"] == "train"}
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    assert any(r["metric"] == "packing_examples_in" and r["value"] > 0 for r in rows)
    assert os.path.exists(os.path.join(model_dir, "input_state", "checkpoint_4", "process_0.json"))
    with pytest.raises(train_main_lib.ConfigError, match="train.input_workers=2"):
        train_main_lib.train_main([*flags[:2], f"--gin.MODEL_DIR='{model_dir}y'", "--gin.train.input_workers=2"])

    # Resumed at step 4 from the saved input position, steps 5-6 see the batches of an uninterrupted run.
    six = ["--gin.TRAIN_STEPS=6", f"--gin.train.input_cache_dir='{root}'"]
    train_main_lib.train_main([*flags, f"--gin.MODEL_DIR='{model_dir}'", *six])
    train_main_lib.train_main([*flags, f"--gin.MODEL_DIR='{model_dir}_straight'", *six])
    resumed, straight = ({r["step"]: r["value"] for r in read_metrics(d) if r["metric"] == "loss"
                          and r["split"] == "train"} for d in (model_dir, model_dir + "_straight"))
    assert [resumed[s] for s in (5, 6)] == [straight[s] for s in (5, 6)]


def test_mixing_schedule_is_exact_in_each_period_and_random_access():
    """Each period gives every task its share of slots; a task's examples come in order 0, 1, 2, ... without gaps;
    any position read alone (a resumed stream) equals the sequential walk; another seed gives another order."""
    schedule = grain_input.MixingSchedule([1.0, 2.0, 0.5, 1e-9], seed=3, period=700)
    assert schedule.period == 701 and list(schedule.counts) == [200, 400, 100, 1]  # a tiny rate keeps one slot
    walk = [schedule[i] for i in range(3 * schedule.period)]
    for task, count in enumerate(schedule.counts):
        offsets = [k for t, k in walk if t == task]
        assert offsets == list(range(3 * count))
    fresh = grain_input.MixingSchedule([1.0, 2.0, 0.5, 1e-9], seed=3, period=700)
    assert [fresh[i] for i in (2000, 5, 1401, 700)] == [walk[i] for i in (2000, 5, 1401, 700)]
    other = grain_input.MixingSchedule([1.0, 2.0, 0.5, 1e-9], seed=4, period=700)
    assert [other[i] for i in range(50)] != walk[:50]


@pytest.mark.slow  # starts Grain worker processes (~10 s each on a loaded 2-core host)
def test_worker_processes_pack_the_same_examples_resume_bitwise_and_count(cache):
    """With 2 workers each packs its own slice of the mixed stream: the rows hold exactly the stream's first examples
    (none lost or repeated), the counters arrive from the workers, and a saved position resumes bitwise."""
    root, _ = cache
    converter = packing.PackedEncDecFeatureConverter()
    batches = grain_input.cache_batches(root, MIXTURE, LENGTHS, 4, converter, split=SPLIT, seed=2, worker_count=2)
    first = [next(batches) for _ in range(3)]
    state = json.loads(json.dumps(checkpointing.to_plain(batches.state())))
    expected = [next(batches) for _ in range(3)]
    stats = converter.stats.as_dict()
    assert stats["rows_out"] >= 24 and stats["examples_in"] >= stats["segments"] > 0

    packed = collections.Counter()
    for batch in first + expected:
        for row, seg in zip(batch["encoder_input_tokens"], batch["encoder_segment_ids"]):
            for s in range(1, int(seg.max()) + 1):
                packed[row[seg == s].tobytes()] += 1
    mixed, _, _ = grain_input.example_dataset(root, MIXTURE, LENGTHS, split=SPLIT, seed=2)
    stream = collections.Counter(np.asarray(mixed[i][2][:LENGTHS["inputs"]], np.int32).tobytes()
                                 for i in range(stats["examples_in"]))
    assert sum(packed.values()) == stats["segments"] and not packed - stream  # every packed example is in the stream

    resumed_converter = packing.PackedEncDecFeatureConverter()
    resumed = grain_input.cache_batches(root, MIXTURE, LENGTHS, 4, resumed_converter, split=SPLIT, seed=2,
                                        worker_count=2, state=checkpointing.from_plain(state))
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with pytest.raises(ValueError, match="2 input workers, this run has 0"):
        grain_input.cache_batches(root, MIXTURE, LENGTHS, 4, split=SPLIT, seed=2, state=checkpointing.from_plain(state))


def test_a_missing_cache_package_names_the_extra(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grain" else real(name, *a))
    with pytest.raises(cache_format.CacheError, match=r"needs grain: pip install 'flan_jax\[cache\]'"):
        grain_input.check_cache("/nonexistent", TASKS, SPLIT, LENGTHS)
