"""Vocabularies and chat templates of HF checkpoints, on tokenizers trained here (no download)."""
import json
import pickle

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

tokenizers = pytest.importorskip("tokenizers")

from flan_jax.data.vocabularies import hf as hv  # noqa: E402

from flan_jax import models
from flan_jax.checkpoints import vocab_rows

CORPUS = ["Is the review positive or negative? A great film!", 'She said "yes" and left.', "2 + 3 = 5, so odd.",
          "Translate to French: the cat sleeps.", "Answer: positive", "Answer: negative"] * 20
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# A Llama-3-style template (shortened; the published one also handles tools and dates).
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                  "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _byte_level_bpe(folder, specials=LLAMA_SPECIALS, config=None):
    """A byte-level BPE tokenizer.json (as Llama 3's and Qwen2's): ids 0 and 1 are the bytes '!' and '"'."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=
                                                        pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"},
              "chat_template": LLAMA_TEMPLATE} if config is None else config
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def test_tokenizer_json_ids_keep_pad_0_and_eos_1(tmp_path):
    tok = _byte_level_bpe(tmp_path)
    assert tok.id_to_token(0) == "!" and tok.id_to_token(1) == '"'   # ordinary tokens in the checkpoint's ids
    vocab = hv.HFTokenizerVocabulary(str(tmp_path))
    order = vocab.hf_order
    assert order[0] == tok.token_to_id("<|begin_of_text|>") and order[1] == tok.token_to_id("<|eot_id|>")
    np.testing.assert_array_equal(order[order], np.arange(len(order)))   # a swap: its own inverse
    assert vocab.vocab_size == tok.get_vocab_size() and (vocab.eos_id, vocab.pad_id) == (1, 0)
    for text in CORPUS[:6]:
        ids = vocab.encode(text)
        assert 0 not in ids and 1 not in ids
        assert [order[i] for i in ids] == tok.encode(text).ids   # every other id is the checkpoint's own
        assert vocab.decode(ids + [1, 5, 6]) == text             # decoding stops at EOS
    assert vocab.decode(vocab.encode('say "!"')) == 'say "!"'
    copy = pickle.loads(pickle.dumps(vocab))
    assert copy == vocab and copy.encode("odd!") == vocab.encode("odd!")


def test_seqio_tokenizes_with_it_inside_tf_data(tmp_path):
    _byte_level_bpe(tmp_path)
    vocab = hv.HFTokenizerVocabulary(str(tmp_path / "tokenizer.json"))
    features = {"inputs": seqio.Feature(vocab, add_eos=False), "targets": seqio.Feature(vocab, add_eos=True)}
    ds = tf.data.Dataset.from_tensor_slices({"inputs": CORPUS[:3], "targets": CORPUS[3:6]})
    ds = seqio.preprocessors.tokenize(ds, features)
    ds = seqio.preprocessors.append_eos(ds, features)
    for i, ex in enumerate(ds.as_numpy_iterator()):
        assert list(ex["inputs"]) == vocab.encode(CORPUS[i])
        assert list(ex["targets"]) == vocab.encode(CORPUS[3 + i]) + [1]
        assert ex["targets_pretokenized"].decode() == CORPUS[3 + i]
    batch = tf.constant([vocab.encode("Answer: positive") + [1, 0], vocab.encode("2 + 3") + [1, 0, 0, 0]][:1])
    assert [t.decode() for t in vocab.decode_tf(batch).numpy()] == ["Answer: positive"]


def test_sentencepiece_model_with_gemma_ids(tmp_path):
    """Gemma's tokenizer.model already has pad 0, eos 1 (bos 2): the order is the identity."""
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    with pytest.raises(ValueError, match="start_token '<bos>' is not in the vocabulary"):
        hv.HFTokenizerVocabulary(str(tmp_path))  # this model's pieces are <s> / </s>
    vocab = hv.HFTokenizerVocabulary(str(tmp_path), start_token="<pad>", eos_token="</s>")
    np.testing.assert_array_equal(vocab.hf_order, np.arange(vocab.vocab_size))
    text = "A great film! Is 905 odd?"
    assert vocab.decode(vocab.encode(text)) == text and vocab.unk_id == 3


def test_missing_start_token_names_the_argument(tmp_path):
    """Qwen2 has no BOS and pads with its EOS: the start token must be chosen."""
    _byte_level_bpe(tmp_path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    with pytest.raises(ValueError, match="no start_token given"):
        hv.HFTokenizerVocabulary(str(tmp_path))
    with pytest.raises(ValueError, match="both '<|endoftext|>'"):
        hv.HFTokenizerVocabulary(str(tmp_path), start_token="<|endoftext|>")
    assert hv.HFTokenizerVocabulary(str(tmp_path), start_token="<|im_start|>").encode("odd") != []


def test_reordered_rows_give_the_checkpoints_logits_in_seqio_ids(tmp_path):
    _byte_level_bpe(tmp_path)
    vocab = hv.HFTokenizerVocabulary(str(tmp_path))
    # untied: both the embedding rows and the output columns move
    config = models.DecoderConfig(vocab_size=vocab.vocab_size + 3, emb_dim=16, num_layers=1, num_heads=2,
                                  num_kv_heads=1, head_dim=8, mlp_dim=32, tie_embeddings=False)
    hf_params = jax.device_get(models.init_params(config, jax.random.PRNGKey(0)))
    ours = vocab_rows.reorder_vocabulary_rows(config, hf_params, vocab.hf_order)
    ids = np.asarray([[0] + vocab.encode("A great film!")], np.int32)
    batch = lambda tokens: {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
                            "decoder_causal_attention": np.zeros_like(tokens)}
    order = np.concatenate([vocab.hf_order, np.arange(vocab.vocab_size, config.vocab_size)])
    forward = jax.jit(lambda p, b: models.forward(config, p, b))
    hf_logits = forward(hf_params, batch(order[ids].astype(np.int32)))
    our_logits = forward(ours, batch(ids))
    np.testing.assert_allclose(np.asarray(our_logits), np.asarray(hf_logits)[..., order], rtol=1e-6, atol=1e-6)
    back = vocab_rows.reorder_vocabulary_rows(config, ours, vocab_rows.inverse(vocab.hf_order))
    np.testing.assert_array_equal(back["token_embedder"]["embedding"], hf_params["token_embedder"]["embedding"])


def test_chat_template_splits_the_exchange_into_inputs_and_targets(tmp_path):
    _byte_level_bpe(tmp_path)
    chat = hv.ChatFormat.from_checkpoint(str(tmp_path), system="Be brief.")
    inputs, targets = chat.apply("Is 7 odd?", "yes")
    assert inputs == ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\nIs 7 odd?<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert targets == "yes<|eot_id|>"
    vocab = hv.HFTokenizerVocabulary(str(tmp_path))
    assert vocab.encode(targets)[-1] == 1           # the end-of-turn marker is this vocabulary's EOS
    ds = hv.chat_format_preprocessor(tf.data.Dataset.from_tensor_slices({"inputs": ["Is 7 odd?"],
                                                                         "targets": ["yes"]}), chat)
    ex = next(ds.as_numpy_iterator())
    assert (ex["inputs"].decode(), ex["targets"].decode()) == (inputs, targets)


def test_chat_template_is_sandboxed(tmp_path):
    import jinja2.exceptions
    chat = hv.ChatFormat("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        chat.apply("hi", "there")
    with pytest.raises(ValueError, match="chat template: only user turns"):
        hv.ChatFormat("{{ raise_exception('only user turns') }}").apply("hi", "there")


def test_init_checkpoint_reorders_rows_and_convert_puts_them_back(tmp_path):
    """HF dir -> INIT_CHECKPOINT with this vocabulary (rows into seqio ids) -> a training checkpoint recording the
    swaps -> `flan-jax convert` to HF: the tokenizer's own row order again."""
    from flan_jax import checkpoints
    from flan_jax.checkpoints import convert, run_dir as trained
    from flan_jax.cli import convert as convert_cli
    from flan_jax.train import checkpointing, init_from, optim, step as step_lib
    _byte_level_bpe(tmp_path)
    vocab = hv.HFTokenizerVocabulary(str(tmp_path))
    config = models.DecoderConfig(vocab_size=vocab.vocab_size, emb_dim=16, num_layers=1, num_heads=2,
                                  num_kv_heads=1, head_dim=8, mlp_dim=32, tie_embeddings=False)
    hf_params = jax.device_get(models.init_params(config, jax.random.PRNGKey(1)))
    checkpoints.export_hf(config, hf_params, str(tmp_path / "hf"))
    params, _, _ = init_from.load_checkpoint_params(str(tmp_path / "hf"), config, vocabulary=vocab)
    emb, hf_emb = params["token_embedder"]["embedding"], hf_params["token_embedder"]["embedding"]
    np.testing.assert_array_equal(emb[0], hf_emb[vocab.hf_order[0]])          # seqio 0 = the start token's row
    np.testing.assert_array_equal(params["logits_dense"]["kernel"][:, 1],
                                  hf_params["logits_dense"]["kernel"][:, vocab.hf_order[1]])
    np.testing.assert_array_equal(emb[5], hf_emb[5])

    optimizer = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig()))
    state = dict(step_lib.init_state(config, optimizer, jax.random.PRNGKey(0)), params=params)
    ckpt = checkpointing.Checkpointer(str(tmp_path / "run"), async_save=False)
    ckpt.save(1, state, {"step": 1, "model": trained.model_record(config, vocab)})
    ckpt.close()
    assert convert_cli.main(["--from", "t5x", "--to", "hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    _, back = checkpoints.load_hf(str(tmp_path / "out"))
    jax.tree.map(np.testing.assert_array_equal, back, hf_params)
