"""SPMD: meshes (8,1), (4,2), (2,4) and FSDP give the one-device losses (activation sharding constraints active),
with really sharded params and optimizer state; two processes on 127.0.0.1 (jax.distributed, gloo) give the
one-process losses of tiny_test.gin, and resume bitwise from their own saved input positions."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin_configs", "runs", "tiny_test.gin")

MESH_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from tests.test_train_core import _packed_batch
    from flan_jax.models import t5
    from flan_jax.train import optim, partitioning, state as state_lib, step as step_lib

    cfg = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                      num_encoder_layers=1, num_decoder_layers=1)
    opt = optim.make_adafactor(optim.AdafactorConfig(min_dim_size_to_factor=16),
                               optim.make_schedule(optim.ScheduleConfig(learning_rate=1e-2)))
    batches = [_packed_batch(i, rows=8) for i in range(10)]
    out = {}
    for name, shape, fsdp in [("1x1", (1, 1), False), ("8x1", (8, 1), False), ("4x2", (4, 2), False),
                              ("2x4", (2, 4), False), ("4x2_fsdp", (4, 2), True)]:
        mcfg = partitioning.MeshConfig(mesh_shape=shape, fsdp=fsdp)
        mesh = partitioning.make_mesh(mcfg, jax.devices()[:shape[0] * shape[1]])
        shardings = state_lib.state_layout(cfg, opt, mcfg, mesh).shardings
        init = jax.jit(lambda r: step_lib.init_state(cfg, opt, r), out_shardings=shardings)
        state = init(jax.random.PRNGKey(0))
        # Traced under the mesh, as program.build does: the models' activation constraints apply.
        step = jax.jit(partitioning.under_mesh(mesh, step_lib.make_train_step(cfg, opt, step_lib.LossConfig())),
                       in_shardings=(shardings, partitioning.batch_sharding(mesh)), out_shardings=(shardings, None))
        losses = []
        for b in batches:
            state, m = step(state, jax.device_put(b, partitioning.batch_sharding(mesh)))
            losses.append(float(m["loss"]))
        wi = state["params"]["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
        emb = state["params"]["token_embedder"]["embedding"]
        opt_leaves = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "ndim", 0) >= 1]
        out[name] = {"losses": losses,
                     "wi0_shard": list(wi.addressable_shards[0].data.shape),
                     "emb_shard": list(emb.addressable_shards[0].data.shape),
                     "opt_sharded": sum(int(x.addressable_shards[0].data.size < x.size) for x in opt_leaves)}
    print("RESULT" + json.dumps(out))
''')


def _run(cmd, env=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_meshes_match_one_device_and_really_shard():
    proc = _run([sys.executable, "-c", MESH_SCRIPT, REPO],
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    ref = np.array(out["1x1"]["losses"])
    assert ref[-1] < ref[0]
    for name in ("8x1", "4x2", "2x4", "4x2_fsdp"):
        np.testing.assert_allclose(out[name]["losses"], ref, rtol=1e-5, err_msg=name)
    # wi_0 [embed=32, mlp=64]: mlp is sharded over 'model'; with FSDP, embed also over 'data'.
    assert out["1x1"]["wi0_shard"] == [32, 64] and out["8x1"]["wi0_shard"] == [32, 64]
    assert out["4x2"]["wi0_shard"] == [32, 32] and out["2x4"]["wi0_shard"] == [32, 16]
    assert out["4x2_fsdp"]["wi0_shard"] == [8, 32]
    assert out["2x4"]["emb_shard"] == [16, 32] and out["4x2_fsdp"]["emb_shard"] == [32, 8]
    assert out["1x1"]["opt_sharded"] == 0 and out["2x4"]["opt_sharded"] > 0
    assert out["4x2_fsdp"]["opt_sharded"] > out["4x2"]["opt_sharded"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses_by_step(model_dir):
    rows = [json.loads(l) for l in open(os.path.join(model_dir, "metrics.jsonl"))]
    return {r["step"]: r["value"] for r in rows if r["split"] == "train" and r["metric"] == "loss" and r["task"] == "all"}


def _losses(model_dir):
    return [v for _, v in sorted(_losses_by_step(model_dir).items())]


def test_data_shards_follow_the_mesh():
    """T5X's layout: a process's shard is the block of data-parallel rows its devices hold."""
    from flan_jax.train.partitioning import DataShard, data_shard_of
    # 2 hosts x 2 devices, NUM_PARTITIONS=4: the model axis spans both hosts -> one shard, fed by both.
    assert [data_shard_of([[0, 0, 1, 1]], p) for p in (0, 1)] == [DataShard(0, 1)] * 2
    # NUM_PARTITIONS=2: one data row per host.
    assert [data_shard_of([[0, 0], [1, 1]], p) for p in (0, 1)] == [DataShard(0, 2), DataShard(1, 2)]
    # 4 hosts x 2 devices, NUM_PARTITIONS=4: pairs of hosts share a shard.
    grid = [[0, 0, 1, 1], [2, 2, 3, 3]]
    assert [data_shard_of(grid, p).index for p in range(4)] == [0, 0, 1, 1]
    # 2 hosts x 4 devices, NUM_PARTITIONS=1: each host holds 4 rows.
    assert data_shard_of([[0], [0], [0], [0], [1], [1], [1], [1]], 1) == DataShard(1, 2)
    # 3 hosts x 2 devices, NUM_PARTITIONS=3: host 1 holds parts of both rows -> no per-host split exists.
    with pytest.raises(ValueError, match="NUM_PARTITIONS: process"):
        data_shard_of([[0, 0, 1], [1, 2, 2]], 0)


def test_an_epoch_is_split_over_shards_without_duplicates_or_gaps():
    """Per-process shards: every example of a pass is read by exactly one of the data shards."""
    import flan_jax.tasks  # noqa: F401  (registers the mixtures)
    from flan_jax.pipeline import native as native_pipeline
    name = "parity_zs_opt"
    whole = lambda i, n: [tuple(a.tolist()) + (-1,) + tuple(b.tolist()) for a, b in native_pipeline.task_token_stream(
        name, shuffle=False, repeat=False, shard_index=i, num_shards=n)]
    full = whole(0, 1)
    parts = [whole(i, 3) for i in range(3)]
    assert sorted(full) == sorted(sum(parts, [])) and all(parts)


def _eval_values(model_dir):
    rows = [json.loads(l) for l in open(os.path.join(model_dir, "metrics.jsonl"))]
    return {(r["step"], r["task"], r["metric"]): r["value"] for r in rows if r["split"] == "eval"}


def _launch(args, model_dir, env, processes):
    """Runs the trainer as `processes` jax.distributed processes on 127.0.0.1 (or one plain process)."""
    cmd = args + [f"--gin.MODEL_DIR={model_dir}"]
    if processes == 1:
        procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    else:
        port = _free_port()
        procs = [subprocess.Popen(
            cmd + [f"--gin.distributed.coordinator_address='127.0.0.1:{port}'",
                   f"--gin.distributed.num_processes={processes}", f"--gin.distributed.process_id={i}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]
    return procs


# The multi-process runs, launched once per module and shared by the tests (interpreter, JAX and input start-up
# dominate their cost): for each (NUM_PARTITIONS, input sharding) case, 2 processes x 2 devices and, where the data
# allow it, 1 process x 4 devices. A single small task and short features keep each run cheap; what the tests
# compare does not depend on the mixture.
CASES = {"model_axis_across_hosts": (4, "per_process_shard"),  # one data shard: both processes feed the same rows
         "data_axis_across_hosts": (2, "global_stream"),       # data axis across processes, model axis inside each
         "own_shard_per_host": (2, "per_process_shard")}       # each process reads its own shard (2-process only)
TRAIN_STEPS = 3


def _args(partitions, sharding, evaluate=True):
    # Eval where outputs are compared across process counts; bitwise-equal params need no eval to compare.
    eval_task = "'parity_zs_opt'" if evaluate else "None"
    return [sys.executable, "-m", "flan_jax.train", f"--gin_file={TINY}", f"--gin.TRAIN_STEPS={TRAIN_STEPS}",
            "--gin.MIXTURE_OR_TASK_NAME='parity_zs_opt'", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}",
            "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=0", "--gin.EVAL_EXAMPLES_PER_TASK=4",
            f"--gin.EVAL_MIXTURE_OR_TASK_NAME={eval_task}", "--gin.CHECKPOINT_PERIOD=2", "--gin.BEST_METRIC=None",
            f"--gin.NUM_PARTITIONS={partitions}", f"--gin.train.input_sharding='{sharding}'",
            "--gin.train.peak_tflops=1.0", "--gin.train.async_checkpointing=False"]


def _env(devices):
    return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _wait(procs):
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosts")
    dirs = {}
    for case, (partitions, sharding) in CASES.items():  # one case at a time: at most 3 processes in memory
        dirs[case] = {"multi": str(root / case / "multi")}
        own_shards = case == "own_shard_per_host"  # different shards than one process reads: no 1-process twin
        procs = _launch(_args(partitions, sharding, evaluate=not own_shards), dirs[case]["multi"], _env(2), 2)
        if not own_shards:
            dirs[case]["single"] = str(root / case / "single")
            procs += _launch(_args(partitions, sharding), dirs[case]["single"], _env(4), 1)
        _wait(procs)
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("case", ["model_axis_across_hosts", "data_axis_across_hosts"])
def test_two_hosts_of_two_devices_match_one_host_of_four(runs, case):
    """(4, per-process input): the model axis spans both processes, one data shard, both feed the same rows.
    (2, global_stream): the data axis spans the processes, the model axis stays inside each. Eval on."""
    single, multi = runs[case]["single"], runs[case]["multi"]
    assert len(_losses(single)) == TRAIN_STEPS
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)
    one, two = _eval_values(single), _eval_values(multi)
    assert one and set(one) == set(two)
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=str(key))


def _train_state(model_dir, step):
    import jax
    import orbax.checkpoint as ocp
    path = os.path.join(model_dir, f"checkpoint_{step}", "state")
    ckptr = ocp.PyTreeCheckpointer()
    tree = dict(ckptr.metadata(path).item_metadata.tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                        is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
    return ckptr.restore(path, restore_args=args)


@pytest.mark.slow
def test_two_hosts_resume_bitwise_from_their_own_input_positions(runs, tmp_path):
    """Each process reads its own shard and saves its own input position; the two processes restarted from
    checkpoint 2 end at step 3 with the uninterrupted run's params and optimizer state, bit for bit."""
    import shutil
    reference = runs["own_shard_per_host"]["multi"]
    positions = [os.path.join(reference, "input_state", "checkpoint_2", f"process_{i}.json") for i in (0, 1)]
    assert open(positions[0], "rb").read() != open(positions[1], "rb").read()  # two shards, two positions
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(reference, "checkpoint_2"), os.path.join(resumed, "checkpoint_2"))
    shutil.copytree(os.path.join(reference, "input_state", "checkpoint_2"),
                    os.path.join(resumed, "input_state", "checkpoint_2"))
    _wait(_launch(_args(*CASES["own_shard_per_host"], evaluate=False), resumed, _env(2), 2))
    assert sorted(_losses_by_step(resumed)) == [3]  # it resumed at 2 rather than starting over
    assert _losses_by_step(resumed)[3] == _losses_by_step(reference)[3]
    want, got = _train_state(reference, 3), _train_state(resumed, 3)
    assert int(got["step"]) == 3
    flat_want, flat_got = jax_leaves_with_paths(want), jax_leaves_with_paths(got)
    assert [k for k, _ in flat_got] == [k for k, _ in flat_want]
    for (key, a), (_, b) in zip(flat_want, flat_got):
        np.testing.assert_array_equal(b, a, err_msg=key)


def jax_leaves_with_paths(tree):
    import jax
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]
