"""SPMD: meshes (8,1), (4,2), (2,4) and FSDP give the one-device losses, with really sharded params and optimizer
state; two processes on 127.0.0.1 (jax.distributed, gloo) give the one-process losses of tiny_test.gin."""
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
    from flan_jax.train import loop, optim, partitioning, step as step_lib

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
        abstract, shardings = loop.abstract_train_state(cfg, opt, mcfg, mesh)
        init = jax.jit(lambda r: step_lib.init_state(cfg, opt, r), out_shardings=shardings)
        state = init(jax.random.PRNGKey(0))
        step = jax.jit(step_lib.make_train_step(cfg, opt, step_lib.LossConfig()),
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


def _losses(model_dir):
    rows = [json.loads(l) for l in open(os.path.join(model_dir, "metrics.jsonl"))]
    return [r["value"] for r in sorted((r for r in rows if r["split"] == "train" and r["metric"] == "loss"),
                                       key=lambda r: r["step"])]


def test_two_processes_match_one_process(tmp_path):
    common = [sys.executable, "-m", "flan_jax.train", f"--gin_file={TINY}", "--gin.TRAIN_STEPS=5",
              "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=0", "--gin.EVAL_MIXTURE_OR_TASK_NAME=None",
              "--gin.CHECKPOINT_PERIOD=0", "--gin.train.input_sharding='global_stream'"]
    env = {"JAX_PLATFORMS": "cpu"}
    single = str(tmp_path / "single")
    one = _run(common + [f"--gin.MODEL_DIR={single}"], env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    multi = str(tmp_path / "multi")
    port = _free_port()
    procs = [subprocess.Popen(
        common + [f"--gin.MODEL_DIR={multi}", f"--gin.distributed.coordinator_address='127.0.0.1:{port}'",
                  "--gin.distributed.num_processes=2", f"--gin.distributed.process_id={i}"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)
    assert len(_losses(single)) == 5
