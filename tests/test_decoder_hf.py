"""Decoder-only Transformer vs HF transformers (PyTorch) with random weights: Llama 3, Qwen2, Gemma."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from flan_jax import checkpoints, models  # noqa: E402
from flan_jax.models import decoding  # noqa: E402
from tests.float32_peer import assert_float32_error_like_peer  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              bos_token_id=0, eos_token_id=1, pad_token_id=0, max_position_embeddings=256)
CASES = {
    # GQA (2 KV heads), untied head, Llama-3 RoPE frequency scaling.
    'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
                   rope_parameters={'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0,
                                    'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                    'original_max_position_embeddings': 16})),
    # q/k/v biases, tied embeddings, GQA.
    'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)),
    # multi-query, head_dim != hidden/heads, sqrt(d) embedding scale, (1 + w) norm, GeGLU, tied.
    'gemma': (transformers.GemmaConfig, transformers.GemmaForCausalLM,
              dict(num_key_value_heads=1, head_dim=24, tie_word_embeddings=True, rms_norm_eps=1e-6)),
}


def _hf_model(kind, tmp_path):
    config_cls, model_cls, extra = CASES[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    with torch.no_grad():   # norm weights are ones/zeros at init; randomize so the scale convention is tested
        for name, p in model.named_parameters():
            if 'norm' in name or name.endswith('bias'):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / kind)
    return model


def _tokens():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, VOCAB, (3, 12)).astype(np.int64)
    lengths = np.array([12, 7, 3])
    mask = np.arange(12)[None] < lengths[:, None]
    return np.where(mask, tokens, 0), mask


@pytest.mark.parametrize('kind', sorted(CASES))
def test_logits_match_hf_within_float32_error(kind, tmp_path):
    model = _hf_model(kind, tmp_path)
    config, params = checkpoints.load_hf(str(tmp_path / kind))
    assert isinstance(config, models.DecoderConfig)
    tokens, mask = _tokens()
    with torch.no_grad():
        ids, attn = torch.tensor(tokens), torch.tensor(mask.astype(np.int64))
        hf32 = model.float()(input_ids=ids, attention_mask=attn).logits.numpy()
        hf64 = model.double()(input_ids=ids, attention_mask=attn).logits.numpy()
    ours = np.asarray(jax.jit(models.forward, static_argnums=0)(
        config, params, {'decoder_input_tokens': jnp.asarray(tokens, jnp.int32)}))
    real = mask[..., None]   # padded positions are free in both; compare real ones
    mine, peer = assert_float32_error_like_peer(ours, hf32, hf64, real)
    print(kind, "float32 error vs HF float64: ours", mine, "HF float32", peer)


@pytest.mark.parametrize('kind', ['llama', 'gemma'])
def test_export_round_trip_loads_in_transformers(kind, tmp_path):
    model = _hf_model(kind, tmp_path)
    config, params = checkpoints.load_hf(str(tmp_path / kind))
    checkpoints.export_hf(config, params, str(tmp_path / 'out'))
    again = CASES[kind][1].from_pretrained(tmp_path / 'out').eval()
    want, got = model.state_dict(), again.state_dict()
    assert sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_array_equal(want[name].numpy(), got[name].numpy(), err_msg=name)
    config2, params2 = checkpoints.load_hf(str(tmp_path / 'out'))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)


@pytest.mark.parametrize('kind', ['llama', 'qwen2'])
def test_greedy_kv_cache_decoding_matches_hf_generate(kind, tmp_path):
    model = _hf_model(kind, tmp_path)
    config, params = checkpoints.load_hf(str(tmp_path / kind), prefix_lm=False)
    prompts, mask = _tokens()
    steps = 8
    ours = np.asarray(decoding.greedy_decode(config, params, jnp.asarray(prompts, jnp.int32), steps, eos_id=1))
    # HF: BOS ++ prompt, left-padded (generate derives positions from the attention mask, as we do).
    rows, attn = [], []
    for row, m in zip(prompts, mask):
        seq = [0] + list(row[m])
        rows.append([0] * (13 - len(seq)) + seq)
        attn.append([0] * (13 - len(seq)) + [1] * len(seq))
    with torch.no_grad():
        out = model.float().generate(input_ids=torch.tensor(rows), attention_mask=torch.tensor(attn),
                                     max_new_tokens=steps, do_sample=False, eos_token_id=1, pad_token_id=0)
    want = out[:, 13:].numpy()
    want = np.pad(want, ((0, 0), (0, steps - want.shape[1])))
    after_eos = np.cumsum(np.cumsum(want == 1, axis=1), axis=1) > 1
    np.testing.assert_array_equal(ours, np.where(after_eos, 0, want))


def test_convert_cli_both_ways(tmp_path):
    """HF -> orbax -> HF with `flan-jax convert`; the orbax side needs --hf_config for a decoder."""
    from flan_jax.checkpoints import convert
    from flan_jax.cli import convert as convert_cli
    _hf_model('qwen2', tmp_path)
    src = str(tmp_path / 'qwen2')
    assert convert_cli.main(['--from', 'hf', '--to', 'orbax', src, str(tmp_path / 'orbax')]) == 0
    assert convert_cli.main(['--from', 't5x', '--to', 'hf', '--hf_config', src, str(tmp_path / 'orbax'),
                         str(tmp_path / 'back')]) == 0
    config, params = checkpoints.load_hf(src)
    config2, params2 = checkpoints.load_hf(str(tmp_path / 'back'))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)
