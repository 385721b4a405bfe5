"""`flan-jax compile` (train/compile.py): small configs compiled by the real TPU compiler for v5e:2x2 and v5p:2x2x2 on
this CPU host (skipped without libtpu: pip install '.[tpu]'), and what a TPU program relies on that runs on CPU:
the attention kernel chosen for the target platform, layers under one scan computing what the unrolled ones do."""
import dataclasses
import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import models
from flan_jax.cli import compile as cli_compile
from flan_jax.train import compile as compile_lib, executable, partitioning, program

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install '.[tpu]')")

T5 = "gin_configs/runs/default_cpu.gin"
DECODER = "gin_configs/runs/default_cpu_decoder.gin"
LORA = "gin_configs/peft/lora.gin"
# What the small configs compile to, against the analytic estimate (train/compile.py estimate_*): the compiler pads
# small arrays to TPU tiles, fuses some of what the estimate counts and keeps buffers it does not model, so only the
# order of magnitude is held. Batches of 256 rows: activations far beyond the chip's on-chip memory (tens of MiB),
# where a tiny program's temporaries live without counting against HBM.
ESTIMATE_FACTOR = 3.0

CASES = {
    "t5_v5e": ([T5, "--gin.BATCH_SIZE=256"], "v5e:2x2"),
    "t5_fsdp_v5p": ([T5, "--gin.BATCH_SIZE=256", "--gin.train.fsdp=True"], "v5p:2x2x2"),
    "decoder_model_axis_v5e": ([DECODER, "--gin.BATCH_SIZE=256", "--gin.NUM_PARTITIONS=2"], "v5e:2x2"),
    "decoder_lora_fsdp_v5p": ([DECODER, LORA, "--gin.BATCH_SIZE=256", "--gin.train.fsdp=True"], "v5p:2x2x2"),
}


def _argv(files_and_flags):
    return [a if a.startswith("--") else f"--gin_file={a}" for a in files_and_flags]


def _config(name):
    return cli_compile.load_config(_argv(CASES[name][0]))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    pytest.importorskip("libtpu")
    """Every case compiled once; the first through the command line and its --json file."""
    out = {}
    folder = tmp_path_factory.mktemp("compile")
    path, saved = folder / "t5.json", folder / "step"
    argv = _argv(CASES["t5_v5e"][0]) + ["--topology=v5e:2x2", f"--json={path}", f"--save_executable={saved}"]
    assert cli_compile.main(argv) == 0
    out["t5_v5e"] = json.loads(path.read_text())
    out["saved_step"] = saved
    for name, (_, topology) in CASES.items():
        if name not in out:
            out[name] = compile_lib.compile_train_step(_config(name), topology).to_dict()
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_compiles_fits_and_counts_flops(reports, name):
    r = reports[name]
    assert r["fits"] and r["error"] is None and 0 < r["total_gib"] < r["usable_gib"]
    assert r["num_chips"] == (4 if r["topology"] == "v5e:2x2" else 8)
    assert r["settings"]["attention_kernel"] == "dense"   # the TPU's kernel, chosen for the target, not this host
    low = 0.5 if r["settings"]["peft"] else 0.8   # PEFT computes no base-weight gradients (~2/3 of a full step)
    assert low < r["flops_ratio"] < 1.5
    # Gradients (or the model axis's partial sums) are combined across chips.
    assert set(r["collectives"]) & {"all-reduce", "reduce-scatter"}


@needs_libtpu
def test_the_saved_executable_is_the_tpu_program_with_its_manifest(reports):
    """--save_executable wrote the TPU executable and the manifest a launch checks (tests/test_executable.py: the
    loading side, on CPU)."""
    manifest = json.loads((reports["saved_step"] / executable.MANIFEST).read_text())
    assert manifest["device_kind"] == "TPU v5 lite" and manifest["num_devices"] == 4
    assert manifest["topology"] == "v5e:2x2" and manifest["versions"]["libtpu"] == "0.0.42.1"
    assert (reports["saved_step"] / executable.BINARY).stat().st_size > 10_000


@pytest.mark.parametrize("name", list(CASES))
def test_memory_within_a_factor_of_the_analytic_estimate(reports, name):
    r = reports[name]
    compiled = r["total_gib"] - r["per_chip_gib"]["generated_code"]
    assert 1 / ESTIMATE_FACTOR < compiled / r["estimate_gib"] < ESTIMATE_FACTOR, (compiled, r["estimate_gib"])


def _expected_shards(leaf) -> int:
    spec = leaf.sharding.spec
    mesh = leaf.sharding.mesh
    return math.prod(mesh.shape[a] for a in spec if a is not None)


@pytest.mark.parametrize("name", ["t5_fsdp_v5p", "decoder_model_axis_v5e", "decoder_lora_fsdp_v5p"])
def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say(reports, name):
    cfg = _config(name)
    devices = compile_lib.topology_devices(CASES[name][1])
    prog = program.build(cfg, partitioning.make_mesh(cfg.mesh, devices=devices), platform="tpu")
    trees = {"params": prog.layout.abstract["params"], "opt_state": prog.layout.abstract["opt_state"]}
    if prog.layout.frozen is not None:
        trees["frozen"] = prog.layout.frozen
    for kind, tree in trees.items():
        leaves = [x for x in jax.tree.leaves(tree) if x.ndim]
        total = sum(x.size * x.dtype.itemsize for x in leaves)
        per_chip = compile_lib.per_chip_bytes(leaves)
        assert per_chip == sum(x.size * x.dtype.itemsize // _expected_shards(x) for x in leaves), kind
        assert per_chip < total, kind
        if kind != "opt_state":   # Adafactor's factored statistics are vectors, some on unsharded axes
            # Every matrix with an 'embed' (FSDP) or 'mlp'/'heads' (model axis) dimension that divides is sharded, so
            # the largest leaves hold 1/shards of their bytes per chip.
            big = max(leaves, key=lambda x: x.size)
            shards = len(devices) if cfg.mesh.fsdp else cfg.mesh.num_partitions
            assert compile_lib.per_chip_bytes([big]) * shards == big.size * big.dtype.itemsize, (kind, big.sharding)
    # What the compiler holds as arguments is the layout's per-chip bytes plus TPU tile padding.
    r = reports[name]
    declared = sum(r["per_chip_gib"][k] for k in ("parameters", "optimizer_state", "batch"))
    assert declared <= r["per_chip_gib"]["arguments"] * 1.001 < 2 * declared + 0.01


def test_fsdp_shards_the_state_over_all_chips(reports):
    """Same tiny T5: with FSDP over 8 chips each chip holds far less of the parameters than replicated over 4."""
    replicated, fsdp = reports["t5_v5e"]["per_chip_gib"], reports["t5_fsdp_v5p"]["per_chip_gib"]
    assert fsdp["parameters"] < replicated["parameters"] / 4
    assert fsdp["optimizer_state"] < replicated["optimizer_state"]


@needs_libtpu
def test_a_program_that_does_not_fit_reports_the_compilers_reason():
    cfg = cli_compile.load_config(_argv([T5, "--gin.BATCH_SIZE=2048", "--gin.TASK_FEATURE_LENGTHS={'inputs': 1024, "
                                         "'targets': 256}"]))
    r = compile_lib.compile_train_step(cfg, "v5e:2x2")
    assert not r.fits and "RESOURCE_EXHAUSTED" in r.error and "HBM" in r.error
    assert r.per_chip_gib["temporaries"] > r.usable_gib and r.headroom < 0
    assert "does not fit" in compile_lib.summary(r)


@needs_libtpu
def test_two_slices_compile_on_a_hybrid_mesh_data_parallel_across_slices(reports):
    """--num_slices 2: eight chips of two v5e:2x2 slices, slice 0's chips the first half of the data axis (the DCN
    link carries only the gradient all-reduce); per-chip state as on one slice, the batch split over twice the chips."""
    cfg = compile_lib.with_settings(_config("t5_v5e"), compile_effort=-1.0)
    devices = compile_lib.topology_devices("v5e:2x2", num_slices=2)
    mesh = partitioning.make_mesh(cfg.mesh, devices=devices)
    assert [d.slice_index for d in mesh.devices.flat] == [0] * 4 + [1] * 4
    r = compile_lib.compile_train_step(cfg, "v5e:2x2", num_slices=2)
    one = reports["t5_v5e"]
    assert r.fits and r.num_chips == 8 and r.mesh == {"data": 8, "model": 1}
    assert r.per_chip_gib["parameters"] == pytest.approx(one["per_chip_gib"]["parameters"])
    assert r.per_chip_gib["batch"] == pytest.approx(one["per_chip_gib"]["batch"] / 2)
    assert "all-reduce" in r.collectives


@needs_libtpu
def test_cli_help_and_a_bad_topology(capsys):
    with pytest.raises(SystemExit) as e:
        cli_compile.main(["--help"])
    assert e.value.code == 0 and "--topology" in capsys.readouterr().out
    assert cli_compile.main([f"--gin_file={T5}", "--topology=v5e:3x3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "v5e:3x3" in err[0]
    assert cli_compile.main([f"--gin_file={T5}", "--topology=tpu-big"]) == 2
    assert "tpu-big" in capsys.readouterr().err


def test_resource_exhausted_message_parsing():
    message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used "
               "30.21G of 15.75G hbm. Exceeded hbm capacity by 14.46G.\nRan out of memory on HBM, the total memory "
               "required for HLO temporaries (512.5M) exceeds available HBM (15.75G).\n\n  1. Size: 1.50G\n"
               "     Shape: f32[32,12,1024,1024]{3,2,1,0}\n")
    reason, gib, buffers = compile_lib.parse_resource_exhausted(message)
    assert reason.startswith("RESOURCE_EXHAUSTED") and np.isclose(gib, 512.5 / 1024)
    assert buffers[0].startswith("1. Size: 1.50G") and buffers[1].startswith("Shape: f32[32,12,1024,1024]")


def test_suggest_candidates_go_from_the_largest_batch_and_least_recomputation():
    cfg = _config("t5_v5e")
    tried = list(compile_lib.candidates(cfg, 4))
    assert tried[0] == {"batch": 256, "remat": "none", "fsdp": False, "num_partitions": 1}
    assert [c["batch"] for c in tried] == sorted((c["batch"] for c in tried), reverse=True)
    assert {c["remat"] for c in tried} == {"none", "dots", "full"}
    assert all(c["batch"] % (4 // c["num_partitions"]) == 0 for c in tried)   # whole rows per data shard
    smaller = compile_lib.with_settings(cfg, batch=4, remat="full", fsdp=True, num_partitions=2)
    assert (smaller.input.global_batch_size, smaller.model.remat, smaller.mesh.fsdp,
            smaller.mesh.num_partitions) == (4, "full", True, 2)


def test_the_attention_kernel_is_chosen_for_the_target_platform():
    config = models.T5Config.preset('tiny')
    assert config.attention_kernel == 'auto'
    assert models.for_platform(config, 'tpu').attention_kernel == 'dense'
    assert models.for_platform(config, 'gpu').attention_kernel == 'dense'
    assert models.for_platform(config, 'cpu').attention_kernel == 'span'
    forced = dataclasses.replace(config, attention_kernel='dense')
    assert models.for_platform(forced, 'cpu') is forced
    with pytest.raises(ValueError, match="attention_kernel='flash'"):
        dataclasses.replace(config, attention_kernel='flash')


def _t5_batch(rows=2, lin=16, lt=8):
    rng = np.random.default_rng(0)
    seg = lambda n: np.repeat([[1] * (n // 2) + [2] * (n // 2 - 2) + [0, 0]], rows, axis=0).astype(np.int32)
    tokens = lambda n: rng.integers(2, 60, size=(rows, n)).astype(np.int32) * (seg(n) > 0)
    pos = lambda n: np.concatenate([np.arange(n // 2), np.arange(n // 2)])[None].repeat(rows, 0).astype(np.int32)
    return {'encoder_input_tokens': tokens(lin), 'encoder_segment_ids': seg(lin), 'encoder_positions': pos(lin),
            'decoder_input_tokens': tokens(lt), 'decoder_target_tokens': tokens(lt), 'decoder_segment_ids': seg(lt),
            'decoder_positions': pos(lt), 'decoder_loss_weights': (seg(lt) > 0).astype(np.float32)}


def _decoder_batch(rows=2, length=16):
    batch = _t5_batch(rows, length, length)
    return {k.replace('encoder_', 'x_'): v for k, v in batch.items() if k.startswith('decoder_')}


@pytest.mark.parametrize("family", ["t5", "decoder"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_layers_under_one_scan_equal_the_unrolled_layers(family, remat):
    if family == "t5":
        config, batch = models.T5Config(vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                                        num_encoder_layers=3, num_decoder_layers=2, dropout_rate=0.1,
                                        remat=remat), _t5_batch()
    else:
        config, batch = models.DecoderConfig(vocab_size=64, emb_dim=32, num_layers=3, num_heads=4, num_kv_heads=2,
                                             head_dim=8, mlp_dim=64, dropout_rate=0.1, remat=remat), _decoder_batch()
    params = models.init_params(config, jax.random.PRNGKey(0))

    def loss(params, config):
        logits = models.forward(config, params, batch, dropout_rng=jax.random.PRNGKey(1))
        return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * batch['decoder_loss_weights'])

    unrolled = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, config)
    scanned = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, dataclasses.replace(config, scan_layers=True))
    np.testing.assert_allclose(scanned[0], unrolled[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(scanned[1]), jax.tree.leaves(unrolled[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)   # float summation order
