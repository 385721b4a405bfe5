"""Nothing outside flan_jax/models imports a model family module; lower stages never import higher ones."""
import ast
import pathlib

import jax
import numpy as np

from flan_jax import models

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAMILY_NAMES = {'t5', 'decoder', 't5_cache', 't5_positions'}
FAMILY_MODULES = {f'flan_jax.models.{name}' for name in FAMILY_NAMES}


def _imports(path: pathlib.Path):
    """(module, imported name or None) for every import statement in the file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                yield node.module, alias.name


def _sources():
    for folder in ('flan_jax', 'scripts'):
        for path in sorted((ROOT / folder).rglob('*.py')):
            yield path


def test_only_models_imports_family_modules():
    offenders = []
    for path in _sources():
        if path.is_relative_to(ROOT / 'flan_jax' / 'models'):
            continue
        for module, name in _imports(path):
            if module in FAMILY_MODULES or (module == 'flan_jax.models' and name in FAMILY_NAMES):
                offenders.append(f'{path.relative_to(ROOT)}: {module} {name or ""}')
    assert not offenders, 'import the model interface (flan_jax.models) instead:\n' + '\n'.join(offenders)


def test_no_upward_imports():
    # models/ is the bottom stage; evaluation/ and checkpoints/ sit beside train/, never above it.
    forbidden = {'models': ('flan_jax.train', 'flan_jax.evaluation', 'flan_jax.checkpoints'),
                 'evaluation': ('flan_jax.train',), 'checkpoints': ('flan_jax.train', 'flan_jax.evaluation')}
    offenders = []
    for stage, banned in forbidden.items():
        for path in sorted((ROOT / 'flan_jax' / stage).rglob('*.py')):
            for module, name in _imports(path):
                full = f'{module}.{name}' if name else module
                if any(full == b or full.startswith(b + '.') for b in banned):
                    offenders.append(f'{path.relative_to(ROOT)}: {full}')
    assert not offenders, '\n'.join(offenders)


def test_interface_dispatches_on_config_type():
    t5_cfg = models.T5Config(vocab_size=40, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24, num_encoder_layers=1,
                             num_decoder_layers=1)
    dec_cfg = models.DecoderConfig(vocab_size=40, emb_dim=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                   head_dim=8, mlp_dim=24)
    inputs = np.array([[5, 6, 7, 1], [8, 1, 0, 0]], np.int32)
    options = np.array([[[9, 1, 0], [10, 11, 1]], [[12, 1, 0], [0, 0, 0]]], np.int32)
    for cfg, name in ((t5_cfg, 't5'), (dec_cfg, 'decoder')):
        assert models.family(cfg).name == name
        params = models.init_params(cfg, jax.random.PRNGKey(0))
        shapes = jax.tree.map(lambda s: s.shape, models.param_shapes(cfg))
        assert jax.tree.map(lambda a: a.shape, params) == shapes
        assert models.count_params(cfg) == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
        logits = models.option_logits(cfg, params, inputs, options)
        assert logits.shape == (4, 3, 40)
        assert models.flops_per_example(cfg, 4, 3) > 0
    try:
        models.family(object())
    except TypeError as e:
        assert 'T5Config' in str(e) and 'DecoderConfig' in str(e)
    else:
        raise AssertionError('unknown config type accepted')


# Parameter counts of the published checkpoints (from their safetensors sizes), to 1%.
PUBLISHED_PARAMS = {'llama3_2_1b': 1.236e9, 'llama3_1_8b': 8.030e9, 'qwen2_5_0_5b': 0.494e9, 'qwen2_5_7b': 7.616e9,
                    'gemma_2b': 2.506e9}


def test_published_decoder_shapes():
    import gin
    from flan_jax.cli import train as main  # noqa: F401  (registers DecoderConfig with gin)
    for name, want in PUBLISHED_PARAMS.items():
        gin.clear_config()
        gin.parse_config_file(str(ROOT / 'gin_configs' / 'models' / f'{name}.gin'), skip_unknown=['train'])
        config = gin.get_configurable('DecoderConfig')()
        assert abs(models.count_params(config) / want - 1) < 0.01, (name, models.count_params(config))
    gin.clear_config()
