"""T5X checkpoints: legacy msgpack + TensorStore layout and orbax layout, read back exactly."""
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import serialization

from flan_jax.checkpoints import t5x
from flan_jax.models import t5

CONFIG = t5.T5Config.preset('tiny', num_encoder_layers=2, num_decoder_layers=1)
STEP = 1_100_000


@pytest.fixture(scope='module')
def params():
    return jax.tree_util.tree_map(np.asarray, t5.init_params(CONFIG, jax.random.PRNGKey(0)))


@pytest.fixture(scope='module')
def slots(params):
    """Random non-zero Adafactor slots shaped like T5X's; one parameter also has momentum."""
    rng = np.random.RandomState(0)
    out = {}
    for path, value in t5x.flatten(params).items():
        shaped = {k: v for k, v in t5x.default_adafactor_slots(value.shape).items() if v.shape != (1,)}
        out[path] = {k: rng.rand(*v.shape).astype(np.float32) for k, v in shaped.items()}
    out['encoder/encoder_norm/scale']['m'] = rng.randn(CONFIG.emb_dim).astype(np.float32)
    return out


@pytest.fixture(scope='module')
def legacy_dir(tmp_path_factory, params, slots):
    root = str(tmp_path_factory.mktemp('legacy'))
    return t5x.save_t5x_legacy(params, root, STEP, param_states=slots)


def _assert_same_arrays(a, b):
    fa, fb = t5x.flatten(a), t5x.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _logits(p):
    batch = {'encoder_input_tokens': np.array([[5, 6, 7, 1, 0]], np.int32),
             'decoder_input_tokens': np.array([[0, 9, 10]], np.int32)}
    return np.asarray(t5.forward(CONFIG, p, batch))


def test_legacy_round_trip_params_slots_step_and_logits(legacy_dir, params, slots):
    assert os.path.basename(legacy_dir) == f'checkpoint_{STEP}'
    loaded, opt = t5x.load_t5x(legacy_dir, with_optimizer_state=True)
    _assert_same_arrays(loaded, params)
    assert opt['step'] == STEP
    assert sorted(opt['slots']) == sorted(slots)
    _assert_same_arrays(opt['slots'], slots)
    np.testing.assert_array_equal(_logits(loaded), _logits(params))
    # Plain call returns params only; the msgpack file path and the parent dir work as well.
    _assert_same_arrays(t5x.load_t5x(os.path.join(legacy_dir, 'checkpoint')), params)
    _assert_same_arrays(t5x.load_t5x(os.path.dirname(legacy_dir)), params)


def test_legacy_layout_is_t5x(legacy_dir):
    """msgpack {version, optimizer: {target, state: {step, param_states}}}; big leaves are zarr+gzip
    TensorStore specs with relative, dotted paths; factored slots and step are inline."""
    with open(os.path.join(legacy_dir, 'checkpoint'), 'rb') as f:
        contents = serialization.msgpack_restore(f.read())
    assert contents['version'] == 3 and set(contents['optimizer']) == {'target', 'state'}
    spec = contents['optimizer']['target']['encoder']['layers_0']['attention']['query']['kernel']
    assert spec['driver'] == 'zarr' and spec['dtype'] == 'float32'
    assert spec['kvstore']['driver'] == 'file'
    assert spec['kvstore']['path'].rstrip('/') == 'target.encoder.layers_0.attention.query.kernel'
    assert spec['metadata']['compressor']['id'] == 'gzip'
    assert list(spec['metadata']['shape']) == [CONFIG.emb_dim, CONFIG.num_heads * CONFIG.head_dim]
    with open(os.path.join(legacy_dir, 'target.encoder.layers_0.attention.query.kernel', '.zarray')) as f:
        zarray = json.load(f)
    assert zarray['compressor']['id'] == 'gzip' and zarray['dtype'] == '<f4'
    state = contents['optimizer']['state']
    assert np.asarray(state['step']).dtype == np.int32 and int(state['step']) == STEP
    query_slots = state['param_states']['encoder']['layers_0']['attention']['query']['kernel']
    assert set(query_slots) == {'v_row', 'v_col', 'v', 'm'}
    assert isinstance(query_slots['v_row'], np.ndarray) and query_slots['v_row'].shape == (128,)
    assert query_slots['v'].shape == (1,) and query_slots['m'].shape == (1,)  # T5X placeholders
    norm_v = state['param_states']['encoder']['encoder_norm']['scale']['v']
    assert isinstance(norm_v, dict) and norm_v['kvstore']['path'].startswith('state.param_states.')


def test_legacy_checkpoint_is_relocatable_and_reads_gcs_specs(legacy_dir, params, tmp_path):
    """Specs hold relative paths; a checkpoint written to GCS (dummy bucket) reads from a local copy."""
    moved = str(tmp_path / 'copy' / os.path.basename(legacy_dir))
    shutil.copytree(legacy_dir, moved)
    msgpack_file = os.path.join(moved, 'checkpoint')
    with open(msgpack_file, 'rb') as f:
        contents = serialization.msgpack_restore(f.read())

    def to_gcs(tree):
        if isinstance(tree, dict) and 'kvstore' in tree:
            return {**tree, 'kvstore': {'driver': 'gcs', 'bucket': 't5x-dummy-bucket',
                                        'path': tree['kvstore']['path']}}
        return {k: to_gcs(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    with open(msgpack_file, 'wb') as f:
        f.write(serialization.msgpack_serialize(to_gcs(contents)))
    _assert_same_arrays(t5x.load_t5x(moved), params)

    def to_old_spec(tree):  # tensorstore < 0.1.14 kept the path at the top level of the spec
        if isinstance(tree, dict) and 'kvstore' in tree:
            return {**tree, 'path': tree['kvstore']['path'], 'kvstore': {'driver': 'file'}}
        return {k: to_old_spec(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    with open(msgpack_file, 'wb') as f:
        f.write(serialization.msgpack_serialize(to_old_spec(contents)))
    _assert_same_arrays(t5x.load_t5x(moved), params)


def test_default_slots_follow_t5x_adafactor(params, tmp_path):
    """Without param_states the writer emits zero slots shaped like a fresh T5X Adafactor."""
    ckpt = t5x.save_t5x_legacy(params, str(tmp_path), 3)
    _, opt = t5x.load_t5x(ckpt, with_optimizer_state=True)
    assert opt['step'] == 3
    # T5X: v_row drops the largest dim, v_col the second largest (embedding [384, 128]).
    assert {k: v.shape for k, v in opt['slots']['token_embedder/embedding'].items()} == {
        'v_row': (CONFIG.emb_dim,), 'v_col': (CONFIG.vocab_size,)}
    assert {k: v.shape for k, v in opt['slots']['encoder/encoder_norm/scale'].items()} == {'v': (CONFIG.emb_dim,)}
    with pytest.raises(FileExistsError):
        t5x.save_t5x_legacy(params, str(tmp_path), 3)


def test_bfloat16_params_round_trip(params, tmp_path):
    bf16 = jax.tree_util.tree_map(lambda a: a.astype(ml_dtypes.bfloat16), params)
    loaded = t5x.load_t5x(t5x.save_t5x_legacy(bf16, str(tmp_path), 1))
    _assert_same_arrays(loaded, bf16)


def test_orbax_round_trip(params, slots, tmp_path):
    ckpt_dir = str(tmp_path / f'checkpoint_{STEP}')
    state_dir = t5x.save_orbax_params(params, ckpt_dir, step=STEP, slots=slots)
    assert state_dir == os.path.join(ckpt_dir, 'state')
    loaded, opt = t5x.load_t5x(ckpt_dir, with_optimizer_state=True)
    _assert_same_arrays(loaded, params)
    assert opt['step'] == STEP
    _assert_same_arrays(opt['slots'], slots)
    np.testing.assert_array_equal(_logits(loaded), _logits(params))
    _assert_same_arrays(t5x.load_t5x(str(tmp_path)), params)  # picks checkpoint_<step> under a parent dir
    params_only = t5x.save_orbax_params(params, str(tmp_path / 'bare'))
    loaded, opt = t5x.load_t5x(params_only, with_optimizer_state=True)
    _assert_same_arrays(loaded, params)
    assert opt == {'step': 0, 'slots': {}}


def test_missing_and_extra_parameters_are_named(params, tmp_path):
    flat = dict(t5x.flatten(params))
    del flat['encoder/layers_1/mlp/wo/kernel']
    flat['encoder/layers_0/attention/bias'] = np.zeros((4,), np.float32)
    ckpt = t5x.save_t5x_legacy(t5x.unflatten(flat), str(tmp_path), 7)
    with pytest.raises(ValueError) as err:
        t5x.load_t5x(ckpt)
    assert 'encoder/layers_1/mlp/wo/kernel' in str(err.value)
    assert 'encoder/layers_0/attention/bias' in str(err.value)


def test_explicit_config_mismatch_names_shapes(legacy_dir):
    wrong = t5.T5Config.preset('tiny', num_encoder_layers=2, num_decoder_layers=1, mlp_dim=512)
    with pytest.raises(ValueError, match=r'encoder/layers_0/mlp/wi_0/kernel: got \(128, 256\), expected \(128, 512\)'):
        t5x.load_t5x(legacy_dir, config=wrong)


def test_infer_config_recovers_shapes(params):
    assert t5x.infer_config(params) == CONFIG


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match='not a T5X checkpoint'):
        t5x.load_t5x(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        t5x.load_t5x(str(tmp_path / 'absent'))


@pytest.mark.parametrize('shape,itemsize', [((32128, 4096), 4), ((4096, 10240), 2), ((7,), 4), ((64, 3), 4)])
def test_chunk_shape_divides_and_fits(shape, itemsize):
    chunks = t5x._chunk_shape(shape, itemsize)
    assert all(n % c == 0 for n, c in zip(shape, chunks))
    assert np.prod(chunks) * itemsize <= 64 * 1024 * 1024
    if np.prod(shape) * itemsize <= 64 * 1024 * 1024:
        assert list(chunks) == list(shape)


def test_convert_cli_t5x_to_hf_and_orbax(legacy_dir, params, slots, tmp_path, capsys):
    from flan_jax.checkpoints import convert, hf
    from flan_jax.cli import convert as convert_cli
    hf_dir = str(tmp_path / 'hf')
    assert convert_cli.main(['--from', 't5x', '--to', 'hf', legacy_dir, hf_dir]) == 0
    config, loaded = hf.load_hf(hf_dir)
    assert config == CONFIG
    _assert_same_arrays(loaded, params)

    orbax_dir = str(tmp_path / 'orbax')
    assert convert_cli.main(['--from', 't5x', '--to', 'orbax', legacy_dir, orbax_dir]) == 0
    loaded, opt = t5x.load_t5x(orbax_dir, with_optimizer_state=True)
    _assert_same_arrays(loaded, params)
    assert opt['step'] == STEP
    _assert_same_arrays(opt['slots'], slots)

    back = str(tmp_path / 'from_hf')
    assert convert_cli.main(['--from', 'hf', '--to', 'orbax', hf_dir, back]) == 0
    _assert_same_arrays(t5x.load_t5x(back), params)

    assert convert_cli.main(['--from', 't5x', '--to', 'hf', str(tmp_path / 'nothing_here'), hf_dir]) == 1
    assert 'not found' in capsys.readouterr().err


def test_orbax_with_optimizer_state_has_t5x_placeholders_and_relative_paths(params, slots, tmp_path, monkeypatch):
    """convert --to orbax keeps T5X's four slots per parameter ((1,) placeholders included): the same tree as the
    legacy checkpoint T5X writes; load_t5x reads it through relative and absolute paths."""
    monkeypatch.chdir(tmp_path)
    legacy = t5x.save_t5x_legacy(params, 'legacy', STEP, param_states=slots)
    from flan_jax.checkpoints import convert
    from flan_jax.cli import convert as convert_cli
    assert convert_cli.main(['--from', 't5x', '--to', 'orbax', os.path.relpath(legacy), 'out/checkpoint_7']) == 0
    import orbax.checkpoint as ocp
    written = ocp.PyTreeCheckpointer().restore(os.path.abspath('out/checkpoint_7/state'))
    with open(os.path.join(legacy, 'checkpoint'), 'rb') as f:
        raw = serialization.msgpack_restore(f.read())['optimizer']['state']['param_states']

    def shapes(tree, prefix=''):  # a TensorStore spec stands for an array of its metadata's shape
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict) and 'driver' in v:
                out[prefix + k] = tuple(v['metadata']['shape'])
            elif isinstance(v, dict):
                out.update(shapes(v, f'{prefix}{k}/'))
            else:
                out[prefix + k] = np.shape(v)
        return out
    orbax_shapes = {k: np.shape(v) for k, v in t5x.flatten(written['state']['param_states']).items()}
    assert orbax_shapes == shapes(raw)
    assert orbax_shapes['decoder/decoder_norm/scale/m'] == (1,)
    for path in ('out/checkpoint_7', os.path.abspath('out/checkpoint_7'), 'out'):
        loaded, opt = t5x.load_t5x(path, with_optimizer_state=True)
        _assert_same_arrays(loaded, params)
        _assert_same_arrays(opt['slots'], slots)
        assert opt['step'] == STEP
