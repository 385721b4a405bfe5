"""`flan-jax data cache` / build_cache: the Beam job that writes the ArrayRecord cache of flan_jax.pipeline.cache."""
import json
import os
import uuid

import grain
import numpy as np
import pytest

from flan_jax.cli import data as data_cli
from flan_jax.data import registry
from flan_jax.pipeline import native
from flan_jax.pipeline.cache import build
from flan_jax.pipeline.cache import format as fmt

MODULE = '''
from flan_jax.data import mixing, registry
from flan_jax.data.sources import FunctionSource
from flan_jax.data.templates import Template


def _records(n, tag):
    def fn(split):
        m = n if split == "train" else n // 4
        # every 17th record has an empty answer: skipped and counted as malformed
        return [{{"word": f"{{tag}}{{split[0]}}{{i}} " + "x" * (i % 40), "answer": "" if i % 17 == 5 else str(i % 7)}}
                for i in range(m)]
    fn.__name__ = tag
    return fn


def _broken(split):
    raise RuntimeError("source exploded\\nsecond line of the message")
    yield


def _task(name, fn, n, template="Repeat: {{word}}"):
    return registry.register_task(name, FunctionSource(fn, num_examples={{"train": n, "validation": n // 4}},
                                                       name=fn.__name__),
                                  [Template(template, "{{answer}}")], fields=["word", "answer"],
                                  cluster="toy", collection="cache_test", variants=["zs_noopt"])


TASKS = _task("{prefix}_alpha", _records(120, "a"), 120, {template!r}) + _task("{prefix}_beta", _records(50, "b"), 50)
if {broken}:
    TASKS += _task("{prefix}_broken", _broken, 10)
mixing.register_mixture("{prefix}_mix", {{t: 1.0 for t in TASKS}})
'''


@pytest.fixture
def tasks(tmp_path, monkeypatch):
    """write(template=..., broken=False) -> (module path, mixture name, task names): a registration module (a
    fresh file each call, so the same tasks re-register when the template changes)."""
    prefix = "cb" + uuid.uuid4().hex[:6]
    monkeypatch.chdir(tmp_path)
    written = []

    def write(template="Repeat: {word}", broken=False):
        path = tmp_path / f"cache_mod_{prefix}_{len(written)}.py"
        path.write_text(MODULE.format(prefix=prefix, template=template, broken=broken))
        written.append(path)
        names = [f"{prefix}_alpha_zs_noopt", f"{prefix}_beta_zs_noopt"] + ([f"{prefix}_broken_zs_noopt"] * broken)
        return str(path), f"{prefix}_mix", names

    yield write
    for base in ("alpha", "beta", "broken"):
        registry.unregister_task(f"{prefix}_{base}")
    import seqio
    if f"{prefix}_mix" in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(f"{prefix}_mix")


def _build(module, name, output, **kwargs):
    kwargs.setdefault("running_mode", "in_memory")
    kwargs.setdefault("num_workers", 1)
    return build.build_cache(name, str(output), modules=[module], **kwargs)


def _read_split(root, task, split):

    stats = fmt.read_split_stats(str(root), task, split)
    paths = [os.path.join(fmt.split_dir(str(root), task, split), f) for f in stats["shards"]]
    source = grain.sources.ArrayRecordDataSource(paths)
    records = [fmt.decode_example(source[i]) for i in range(len(source))]
    return sorted(records, key=lambda r: r[0]), stats


def _files(root):
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def test_cache_holds_the_task_streams_tokens_in_record_order(tasks, tmp_path):
    module, mixture, names = tasks()
    report = _build(module, mixture, tmp_path / "c", num_shards=3)
    assert report["totals"]["failed"] == 0 and report["totals"]["built"] == 4
    for task in names:
        for split in ("train", "validation"):
            records, stats = _read_split(tmp_path / "c", task, split)
            assert len(stats["shards"]) == 3
            expected = list(native.TaskStream(task, split, shuffle=False, repeat=False))
            assert len(records) == len(expected) == stats["examples"] > 0
            indices = [r[0] for r in records]
            assert indices == sorted(set(indices))
            for (_, inputs, targets), (want_in, want_tg) in zip(records, expected):
                np.testing.assert_array_equal(inputs, want_in)
                np.testing.assert_array_equal(targets, want_tg)
    # shard k holds the records whose index is k modulo the shard count, in index order
    for k in range(3):
        path = fmt.shard_path(str(tmp_path / "c"), names[0], "train", k, 3)
        source = grain.sources.ArrayRecordDataSource([path])
        got = [fmt.decode_example(source[i])[0] for i in range(len(source))]
        assert got == sorted(got) and all(i % 3 == k for i in got)
    manifest = fmt.read_manifest(str(tmp_path / "c"))
    fmt.check_manifest(manifest, fmt.expected_manifest(names), str(tmp_path / "c"))
    assert set(manifest["tasks"]) == set(names)
    assert manifest["tasks"][names[0]]["train"]["examples"] == report["tasks"][names[0]]["train"]["examples"]
    assert not os.path.exists(tmp_path / "c" / build._REPORTS)


def test_two_builds_are_byte_identical(tasks, tmp_path):
    module, mixture, _ = tasks()
    _build(module, mixture, tmp_path / "a", num_shards=2)
    _build(module, mixture, tmp_path / "b", num_shards=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 2 * 2 * 3 + 1
    assert a == b


def test_a_second_build_skips_and_a_changed_task_is_rebuilt_alone(tasks, tmp_path):
    module, mixture, names = tasks()
    out = tmp_path / "c"
    _build(module, mixture, out)
    stats_before = fmt.read_split_stats(str(out), names[1], "train")
    again = _build(module, mixture, out)
    assert again["totals"] == {"built": 0, "skipped": 4, "failed": 0, "examples": 0, "tokens": 0}
    assert again["tasks"][names[0]]["train"]["reason"] == "cached"
    # alpha's template changes (the module registers both tasks; beta's declaration is unchanged)
    module2, _, _ = tasks(template="Say it back: {word}")
    alpha_before = _read_split(out, names[0], "train")[0]
    third = _build(module2, mixture, out)
    assert {s: r["status"] for s, r in third["tasks"][names[0]].items()} == {"train": "built", "validation": "built"}
    assert {s: r["status"] for s, r in third["tasks"][names[1]].items()} == {"train": "skipped",
                                                                             "validation": "skipped"}
    alpha_after = _read_split(out, names[0], "train")[0]
    assert len(alpha_after) == len(alpha_before)
    assert alpha_after[0][1].size > alpha_before[0][1].size  # the longer template
    assert fmt.read_split_stats(str(out), names[1], "train") == stats_before
    manifest = fmt.read_manifest(str(out))
    assert manifest["tasks"][names[0]]["train"]["fingerprint"] == fmt.task_fingerprint(names[0], "train")
    # a missing shard file un-caches its split
    os.remove(os.path.join(fmt.split_dir(str(out), names[1], "validation"), stats_before["shards"][0].replace(
        "train", "validation")))
    fourth = _build(module2, mixture, out)
    assert fourth["totals"]["built"] == 1 and fourth["tasks"][names[1]]["validation"]["status"] == "built"


def test_a_failing_task_is_reported_and_the_others_committed(tasks, tmp_path, capsys):
    module, mixture, names = tasks(broken=True)
    out = tmp_path / "c"
    code = data_cli.main(["cache", mixture, "--output", str(out), "--module", module, "--num_shards", "2",
                          "--direct_running_mode", "in_memory", "--direct_num_workers", "1"])
    captured = capsys.readouterr()
    assert code == 1
    broken = names[2]
    assert f"{broken} [train] failed: shard 0/2: RuntimeError: source exploded" in captured.err
    assert "second line" not in captured.err and "Traceback" not in captured.err
    assert fmt.read_split_stats(str(out), broken, "train") is None
    broken_dir = fmt.split_dir(str(out), broken, "train")
    assert not os.path.isdir(broken_dir) or os.listdir(broken_dir) == []  # its partial shards are deleted
    for task in names[:2]:
        assert fmt.read_split_stats(str(out), task, "train")["examples"] > 0
        assert any(line.startswith(task + "\ttrain=built validation=built") for line in captured.out.splitlines())
    assert any(line.startswith(broken + "\ttrain=failed") for line in captured.out.splitlines())
    assert "splits built 4, cached (skipped) 0, failed 2" in captured.out.splitlines()[-1]
    manifest = fmt.read_manifest(str(out))
    assert set(manifest["tasks"]) == set(names[:2])


@pytest.mark.parametrize("argv, message", [
    (["NO_SUCH_MIXTURE_x"], "no task or mixture named 'NO_SUCH_MIXTURE_x'"),
    (["MIX", "--feature_lengths", "inputs=12,bogus"], "--feature_lengths: expected inputs=N,targets=M, got 'bogus'"),
    (["MIX", "--feature_lengths", "inputs=0"], "--feature_lengths"),
    (["MIX", "--splits", "test"], "--splits test: no task of"),
    (["MIX", "--num_shards", "0"], "--num_shards 0: must be at least 1"),
    (["MIX", "--output", "/proc/no_such_dir/cache"], "--output /proc/no_such_dir/cache: cannot create it"),
    (["MIX", "--output", "gs://bucket/cache"], "--output gs://bucket/cache: the cache is written with local file"),
])
def test_bad_arguments_are_one_line_errors(tasks, tmp_path, capsys, argv, message):
    module, mixture, _ = tasks()
    argv = [mixture if a == "MIX" else a for a in argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "c")]
    code = data_cli.main(["cache", *argv, "--module", module, "--direct_running_mode", "in_memory"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("flan-jax data cache: ") and message in err, err


def test_a_manifest_for_other_feature_lengths_is_refused(tasks, tmp_path, capsys):
    module, mixture, names = tasks()
    out = tmp_path / "c"
    _build(module, mixture, out, splits=["validation"], feature_lengths={"inputs": 8, "targets": 4})
    with pytest.raises(fmt.CacheError, match="feature_lengths is .*'inputs': 8"):
        _build(module, mixture, out, splits=["validation"])


def test_stats_count_examples_truncation_skips_and_lengths(tasks, tmp_path):
    module, mixture, names = tasks()
    out = tmp_path / "c"
    report = _build(module, mixture, out, splits=["train"], num_shards=2, feature_lengths={"inputs": 20, "targets": 2})
    assert set(report["tasks"][names[0]]) == {"train"}
    task = names[0]
    records, stats = _read_split(out, task, "train")
    full = list(native.TaskStream(task, "train", shuffle=False, repeat=False))
    assert stats["examples"] == len(records) == len(full) == 120 - 7  # indices 5, 22, ..., 107 have no answer
    assert stats["skipped"] == {"empty_field:answer": 7}
    assert stats["truncated"] == {"inputs": sum(a.size > 20 for a, _ in full), "targets": 0}
    assert stats["truncated"]["inputs"] > 0
    assert all(r[1].size <= 20 and r[2].size <= 2 for r in records)
    assert stats["tokens"] == {"inputs": sum(r[1].size for r in records), "targets": sum(r[2].size for r in records)}
    # the histogram counts the untruncated lengths by power-of-two bucket
    assert sum(stats["histogram"]["inputs"].values()) == stats["examples"]
    assert stats["histogram"]["targets"] == {"2": len(full)}  # one digit + EOS
    assert max(int(b) for b in stats["histogram"]["inputs"]) >= max(a.size for a, _ in full)
    assert stats["fingerprint"] == fmt.task_fingerprint(task, "train", {"inputs": 20, "targets": 2})
    assert stats["shards"] == [os.path.basename(fmt.shard_path(str(out), task, "train", k, 2)) for k in range(2)]
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["feature_lengths"] == {"inputs": 20, "targets": 2}
    assert build.length_bucket(0) == "0" and build.length_bucket(1) == "1" and build.length_bucket(5) == "8"
    assert build.length_bucket(8) == "8" and build.length_bucket(9) == "16"


@pytest.mark.slow
def test_multi_processing_workers_import_the_modules_and_match_in_memory(tasks, tmp_path):
    module, mixture, _ = tasks()
    _build(module, mixture, tmp_path / "a", num_shards=2)
    report = _build(module, mixture, tmp_path / "b", num_shards=2, running_mode="multi_processing", num_workers=2)
    assert report["totals"]["failed"] == 0, report
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_beam_options_after_a_double_dash_pass_through(tasks, tmp_path, monkeypatch):
    assert data_cli.data_cache.split_pipeline_args(["cache", "m", "--output", "o", "--", "--project=P", "--x"]) == (
        ["cache", "m", "--output", "o"], ["--project=P", "--x"])
    assert data_cli.data_cache.split_pipeline_args(["show", "m", "--", "x"]) == (["show", "m", "--", "x"], [])
    seen = {}
    monkeypatch.setattr(build, "build_cache", lambda *a, **kw: seen.update(kw) or {
        "tasks": {}, "totals": {"built": 0, "skipped": 0, "failed": 0, "examples": 0, "tokens": 0}})
    module, mixture, _ = tasks()
    assert data_cli.main(["cache", mixture, "--output", str(tmp_path), "--module", module, "--runner",
                          "DataflowRunner", "--", "--project=P", "--region=R"]) == 0
    assert seen["runner"] == "DataflowRunner" and list(seen["pipeline_args"]) == ["--project=P", "--region=R"]
    assert "flan_jax.tasks" in seen["modules"] and module in seen["modules"]


def test_a_seqio_task_outside_the_registry_is_refused_by_name(tmp_path, capsys):
    import seqio
    features = {k: seqio.Feature(seqio.PassThroughVocabulary(100)) for k in ("inputs", "targets")}
    seqio.TaskRegistry.add("plain_seqio_for_cache", source=seqio.FunctionDataSource(lambda split, shuffle_files: None,
                                                                                     splits=["train"]),
                           output_features=features)
    try:
        assert data_cli.main(["cache", "plain_seqio_for_cache", "--output", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err.strip()
        assert "task 'plain_seqio_for_cache' was not registered with flan_jax.data.registry" in err, err
        assert len(err.splitlines()) == 1
    finally:
        seqio.TaskRegistry.remove("plain_seqio_for_cache")
