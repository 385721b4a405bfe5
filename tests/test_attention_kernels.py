"""The fused attention kernels (models/fused_attention.py) equal dense masked attention on this CPU host: 'splash'
through the Pallas interpreter, 'cudnn' through the same jax.nn.dot_product_attention call with XLA's implementation;
and 'splash' compiles for a TPU (skipped without libtpu)."""
import dataclasses
import functools
import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import models, packing
from flan_jax.cli import compile as cli_compile
from flan_jax.models import fused_attention as fa
from flan_jax.models import span_attention as sa
from flan_jax.train import compile as compile_lib, partitioning, program
from flan_jax.train import loss as loss_lib

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install '.[tpu]')")
KERNELS = {'splash': fa.splash_attention, 'cudnn': fa.cudnn_attention}


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(fa, 'INTERPRET', True)


def _mask(kind, rows=3, lq=256, extra_keys=0):
    """[rows, lq, extra_keys + lq] bool of packed rows (segments of 20..90 tokens, a padded tail, row 2 all padding):
    causal, or prefix-LM (each segment's first third bidirectional); `extra_keys` leading keys every real query sees
    (prefix tuning)."""
    rng = np.random.default_rng(0)
    seg, pos = np.zeros((rows, lq), np.int32), np.zeros((rows, lq), np.int32)
    for r in range(rows - 1):
        start, s = 0, 1
        while (n := int(rng.integers(20, 91))) + start <= lq - 10:
            seg[r, start:start + n], pos[r, start:start + n], start, s = s, np.arange(n), start + n, s + 1
    allowed = np.tril(np.ones((lq, lq), bool))[None]
    if kind == 'prefix_lm':
        length = np.array([[np.sum(seg[r] == s) for s in seg[r]] for r in range(rows)])
        prefix = pos < length // 3
        allowed = allowed | (prefix[:, :, None] & prefix[:, None, :])
    mask = allowed & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    real = np.broadcast_to((seg > 0)[:, :, None], (rows, lq, extra_keys))
    return jnp.asarray(np.concatenate([real, mask], axis=-1))


def _inputs(mask, kv=2, groups=2, hd=16):
    rng = np.random.default_rng(1)
    rows, lq, lk = mask.shape
    q = jnp.asarray(rng.normal(size=(rows, kv, lq, groups, hd)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(rows, kv, lk, hd)), jnp.float32) for _ in range(2))
    return q, k, v, jnp.asarray(rng.normal(size=q.shape), jnp.float32)


# (mask kind, query length, leading keys): two 128-tiles; a length splash pads to two; prefix-tuning keys (Lk != Lq).
CASES = [('prefix_lm', 256, 0), ('causal', 200, 0), ('causal', 100, 8)]


@pytest.mark.parametrize('kind, lq, extra_keys', CASES)
@pytest.mark.parametrize('kernel', list(KERNELS))
def test_fused_kernels_equal_dense_values_and_gradients(interpret, kernel, kind, lq, extra_keys):
    mask = _mask(kind, lq=lq, extra_keys=extra_keys)
    assert not np.asarray(mask[2]).any() and np.asarray(mask[:2]).any(-1).sum() < 2 * lq   # padding rows and tails
    q, k, v, w = _inputs(mask)
    dense = lambda q, k, v: sa.dense_attention(q, k, v, mask, 0.3)
    fused = lambda q, k, v: KERNELS[kernel](q, k, v, mask, 0.3, 128)

    def values_and_grads(fn):   # one compile for both (the interpreter's compiles take seconds)
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(w)
    got, grads = jax.jit(values_and_grads, static_argnums=0)(fused)
    want, grads_dense = values_and_grads(dense)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(np.asarray(got)[2] == 0)   # queries that may attend nothing
    for name, a, b in zip('qkv', grads_dense, grads):
        np.testing.assert_allclose(b, a, atol=2e-5, err_msg=f'd{name}')


MESH_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path[:0] = sys.argv[1:3]
    import test_attention_kernels as t
    from flan_jax.models import fused_attention as fa, span_attention as sa

    fa.INTERPRET = True
    mask = t._mask('prefix_lm', rows=4, lq=128)
    q, k, v, w = t._inputs(mask)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ('data', 'model'))

    def run(fn, *args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask, 0.3, 128), *args)
            return out, vjp(w)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    args = [put(x, 'data', 'model') for x in (q, k, v)]
    compiled = jax.jit(run, static_argnums=0).lower(fa.splash_attention, *args).compile()
    assert 'all-gather' not in compiled.as_text()
    got = compiled(*args)
    want = run(lambda q, k, v, m, s, b: sa.dense_attention(q, k, v, m, s), q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    print('OK')
""")


@pytest.mark.slow  # a fresh process on 4 host devices and an interpreted kernel: ~40 s on a loaded 2-core machine
def test_splash_under_a_mesh_runs_each_devices_rows_and_heads():
    """Rows over 'data', KV heads over 'model' (4 host devices): the dense values and gradients, no gathering."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT, tests, os.path.dirname(tests)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


def test_splash_tiles_are_the_largest_128_multiples_dividing_the_padded_length():
    assert fa.tile(2048, 512) == (2048, 512)
    assert fa.tile(2048, 4096) == (2048, 512)    # at most MAX_TILE
    assert fa.tile(640, 512) == (640, 128)       # 512 does not divide 640
    assert fa.tile(1536, 512) == (1536, 512) and fa.tile(1536, 384) == (1536, 384)
    assert fa.tile(512, 384) == (512, 256)
    assert fa.tile(320, 128) == (384, 128)       # padded to whole 128s
    assert fa.tile(48, 0) == (128, 128)


# ---------------------------------------------------------------------------------------------- in the decoder

# Layers under one scan: one layer body to compile, and the kernels inside a scan as the TPU configs run them.
DECODER = models.DecoderConfig(vocab_size=53, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                               mlp_dim=48, scan_layers=True)


def _batch():
    rng = np.random.default_rng(3)
    sizes = [(5, 3), (7, 4), (2, 6), (6, 2), (9, 5), (3, 3)]
    examples = [(rng.integers(2, 53, i).astype(np.int32), rng.integers(2, 53, t).astype(np.int32)) for i, t in sizes]
    rows = packing.prefix_lm_feature_batch([examples[:3], examples[3:]], 48)
    return {k: jnp.asarray(v) for k, v in rows.items()}


@functools.partial(jax.jit, static_argnums=2)
def _loss_grads_logits(params, batch, config):
    def total(p):
        logits = models.forward(config, p, batch)
        return loss_lib.summed_loss(logits, batch, normalizer='none')[0], logits
    (loss, logits), grads = jax.value_and_grad(total, has_aux=True)(params)
    return (loss, grads), logits


@pytest.mark.parametrize('kernel, prefix_lm', [('splash', True), ('splash', False), ('cudnn', True)])
def test_decoder_with_a_fused_kernel_equals_dense(interpret, kernel, prefix_lm):
    config = dataclasses.replace(DECODER, prefix_lm=prefix_lm)
    batch = _batch()
    params = models.init_params(config, jax.random.PRNGKey(0))
    run = lambda name: _loss_grads_logits(params, batch, dataclasses.replace(config, attention_kernel=name))
    (loss, grads), logits = run(kernel)
    (loss_d, grads_d), logits_d = run('dense')
    real = np.asarray(batch['decoder_segment_ids']) != 0
    np.testing.assert_allclose(loss, loss_d, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(logits_d)[real], atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_d), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_fused_kernels_refuse_what_they_cannot_run():
    splash = dataclasses.replace(DECODER, attention_kernel='splash')
    assert models.for_platform(splash, 'tpu') is splash
    with pytest.raises(ValueError, match=r"DecoderConfig.attention_kernel='splash' is a TPU kernel"):
        models.for_platform(splash, 'cpu')
    with pytest.raises(ValueError, match=r"DecoderConfig.attention_kernel='cudnn' has no attention dropout"):
        dataclasses.replace(DECODER, attention_kernel='cudnn', dropout_rate=0.1)
    with pytest.raises(ValueError, match=r"T5Config.attention_kernel='splash' takes no relative-position bias"):
        models.T5Config.preset('tiny', attention_kernel='splash')
    with pytest.raises(ValueError, match="expected one of .*'splash', 'cudnn'"):
        dataclasses.replace(DECODER, attention_kernel='flash')


@needs_libtpu
def test_a_decoder_with_splash_attention_compiles_for_tpu():
    """The Mosaic kernel (not the interpreter) in a train step sharded over 4 chips, prefix-LM rows of 320 tokens."""
    assert not fa.INTERPRET
    cfg = cli_compile.load_config(["--gin_file=gin_configs/runs/default_cpu_decoder.gin", "--gin.BATCH_SIZE=8",
                                   "--gin.DecoderConfig.attention_kernel='splash'", "--gin.DecoderConfig.num_layers=1"])
    cfg = compile_lib.with_settings(cfg, compile_effort=-1.0)
    mesh = partitioning.make_mesh(cfg.mesh, devices=compile_lib.topology_devices("v5e:2x2"))
    prog = program.build(cfg, mesh, platform="tpu")
    text = prog.jitted.lower(*prog.abstract_args()).as_text()
    assert "tpu_custom_call" in text and ("manual_computation" in text or "SPMDFullToShardShape" in text)   # shard_map
    r = compile_lib.compile_train_step(cfg, "v5e:2x2").to_dict()
    assert r["error"] is None and r["fits"], r["error"]
    assert r["settings"]["attention_kernel"] == "splash"
