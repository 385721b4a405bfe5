"""`flan-jax convert --to hf` writes a directory that serves: AutoTokenizer encodes prompts into our vocabulary's ids
and AutoModelFor... `.generate` reproduces our greedy decoding (`flan-jax eval`'s predictions) token for token, for
SentencePiece, byte and HF tokenizer vocabularies, T5 and decoder families; `--verify` runs that check."""
import io
import json
import logging
import os
import sys

import jax
import numpy as np
import pytest
import seqio
import sentencepiece as spm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flan_jax import checkpoints, models  # noqa: E402
from flan_jax.checkpoints import hf_tokenizer, hf_verify, run_dir as trained  # noqa: E402
from flan_jax.checkpoints.convert import Converted  # noqa: E402
from flan_jax.cli import convert as convert_cli  # noqa: E402
from flan_jax.cli import train as train_main  # noqa: E402
from flan_jax.data import vocabularies  # noqa: E402
from flan_jax.data.vocabularies import hf as hv  # noqa: E402
from flan_jax.tasks import default  # noqa: E402
from flan_jax.train import checkpointing, optim, step as step_lib  # noqa: E402
from tests.test_hf_vocabularies import _byte_level_bpe  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Text our vocabularies keep exactly: newlines, repeated and edge spaces, digits, accents, CJK, emoji.
TEXTS = ["Is this review positive or negative?\nA lovely film, take 3.", "  two  spaces\n\nand lines ",
         "Translate: café 12345 漢字 🙂", "x", "Answer:", "tab\there", "", "UPPER lower MiXeD 3.14"]
CORPUS = [t * 3 for t in TEXTS] + ["The quick brown fox jumps over the lazy dog.", "positive negative neutral"] * 20


def _tiny(vocab_size, encoder_decoder, **decoder):
    if encoder_decoder:
        return models.T5Config(vocab_size=vocab_size, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                               num_encoder_layers=1, num_decoder_layers=1)
    return models.DecoderConfig(vocab_size=vocab_size, emb_dim=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=8, mlp_dim=32, **{"prefix_lm": False, **decoder})


def _sentencepiece(tmp_path, model_type):
    """BPE as trained for the default collection (identity normalization, byte fallback, '\\n' user-defined); Unigram
    as T5's (NFKC, extra whitespace removed) with seqio's extra ids."""
    if model_type == "bpe":
        model = vocabularies.train_sentencepiece(CORPUS, 400)
        extra_ids = 0
    else:
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=400,
                                       model_type="unigram", byte_fallback=True, pad_id=0, eos_id=1, unk_id=2,
                                       bos_id=-1, hard_vocab_limit=False, minloglevel=2)
        model, extra_ids = out.getvalue(), 5
    path = tmp_path / f"{model_type}.model"
    path.write_bytes(model)
    return seqio.SentencePieceVocabulary(str(path), extra_ids=extra_ids)


def _export(tmp_path, vocab, encoder_decoder, name="hf", **decoder):
    config = _tiny(vocab.vocab_size, encoder_decoder, **decoder)
    params = jax.device_get(models.init_params(config, jax.random.PRNGKey(3)))
    out = str(tmp_path / name)
    checkpoints.export_hf(config, params, out, vocabulary=vocab)
    return Converted(out, config, params, vocab)


def _assert_tokenizer_matches(out, vocab, encoder_decoder, texts=TEXTS):
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in texts:
        ours = hf_verify.model_input_ids(vocab, text, encoder_decoder)
        assert tokenizer(text)["input_ids"] == ours, text
        ids = list(vocab.encode(text))
        assert tokenizer.decode(ids, skip_special_tokens=True) == vocab.decode(ids), text
    return tokenizer


@pytest.mark.parametrize("model_type,encoder_decoder", [("bpe", True), ("unigram", True), ("bpe", False)],
                         ids=["bpe-t5", "unigram-t5", "bpe-decoder"])
def test_sentencepiece_vocabulary_exports_a_tokenizer_with_our_ids(tmp_path, model_type, encoder_decoder):
    vocab = _sentencepiece(tmp_path, model_type)
    done = _export(tmp_path, vocab, encoder_decoder)
    tokenizer = _assert_tokenizer_matches(done.path, vocab, encoder_decoder)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    if model_type == "unigram":   # seqio's extra ids: <extra_id_0> is the last id
        assert tokenizer.convert_tokens_to_ids("▁<extra_id_0>") == vocab.vocab_size - 1
    generation = json.load(open(os.path.join(done.path, "generation_config.json")))
    start = "decoder_start_token_id" if encoder_decoder else "bos_token_id"
    assert generation == {start: 0, "eos_token_id": 1, "pad_token_id": 0}


def test_default_collection_vocabulary_encodes_its_prompts_as_ours(tmp_path):
    """The vocabulary `flan-jax train` copies into MODEL_DIR, on the default collection's own rendered prompts."""
    vocab = default.vocabulary()
    done = _export(tmp_path, vocab, True)
    prompts = [e["inputs"] for _, i, e in default.vocabulary_corpus_examples() if i < 3]
    assert len(prompts) >= 8
    _assert_tokenizer_matches(done.path, vocab, True, prompts)


@pytest.mark.parametrize("encoder_decoder", [True, False], ids=["t5-byt5", "decoder"])
def test_byte_vocabulary_exports_a_tokenizer_with_our_ids(tmp_path, encoder_decoder):
    vocab = seqio.ByteVocabulary()
    done = _export(tmp_path, vocab, encoder_decoder)
    tokenizer = _assert_tokenizer_matches(done.path, vocab, encoder_decoder)
    if encoder_decoder:
        assert type(tokenizer).__name__ == "ByT5Tokenizer"
    report = hf_verify.verify(done.path, vocab, TEXTS[:3], convert_cli.our_greedy(done, 8),
                              encoder_decoder=encoder_decoder, max_new_tokens=8)
    assert report.ok, report.verdict()


def test_hf_vocabulary_export_copies_the_tokenizer_and_uses_its_ids(tmp_path):
    """Llama-3-style tokenizer (0 and 1 are ordinary tokens): its files are copied, config and generation ids are the
    tokenizer's own, and generation from the exported rows (back in the tokenizer's order) matches ours."""
    tok = _byte_level_bpe(tmp_path, config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    vocab = hv.HFTokenizerVocabulary(str(tmp_path))
    config = _tiny(vocab.vocab_size, False)
    ours = jax.device_get(models.init_params(config, jax.random.PRNGKey(3)))
    params = hf_tokenizer.rows_in_tokenizer_ids(config, ours, vocab)
    out = str(tmp_path / "hf")
    checkpoints.export_hf(config, params, out, vocabulary=vocab)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    bos, eot = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>")
    hf_config = json.load(open(os.path.join(out, "config.json")))
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (bos, eot, eot)
    report = hf_verify.verify(out, vocab, ["Is the review positive?", "2 + 3 = 5"],
                              convert_cli.our_greedy(Converted(out, config, params, vocab), 8),
                              encoder_decoder=False, max_new_tokens=8)
    assert report.ok, report.verdict()


def _training_run(model_dir, config, vocab):
    """A training checkpoint as the loop writes it, with the vocabulary the trainer copies into MODEL_DIR."""
    optimizer = optim.make_adafactor(optim.AdafactorConfig(), optim.make_schedule(optim.ScheduleConfig()))
    state = step_lib.init_state(config, optimizer, jax.random.PRNGKey(7))
    ckpt = checkpointing.Checkpointer(str(model_dir), async_save=False)
    ckpt.save(2, state, {"step": 2, "model": trained.model_record(config, vocab)})
    ckpt.close()
    (model_dir / "vocabulary.model").write_bytes(vocab.sp_model)


def test_convert_verify_on_a_run_directory(tmp_path, capsys):
    vocab = _sentencepiece(tmp_path, "bpe")
    _training_run(tmp_path / "run", _tiny(vocab.vocab_size, True), vocab)
    assert convert_cli.main(["--from", "t5x", "--to", "hf", "--verify", str(tmp_path / "run"),
                             str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    assert "verify OK: transformers tokenizer matches our ids on 8/8 prompts" in printed
    assert {"tokenizer.json", "spiece.model", "generation_config.json"} <= set(os.listdir(tmp_path / "hf"))


def test_verify_without_transformers_says_how_to_install(tmp_path, capsys, monkeypatch):
    vocab = _sentencepiece(tmp_path, "bpe")
    _training_run(tmp_path / "run", _tiny(vocab.vocab_size, False), vocab)
    monkeypatch.setitem(sys.modules, "transformers", None)   # `import transformers` raises ImportError
    assert convert_cli.main(["--from", "t5x", "--to", "hf", "--verify", str(tmp_path / "run"),
                             str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "--verify loads the export with transformers and torch" in err and "flan_jax[hf]" in err
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.json")   # the export itself was written


def test_prefix_lm_decoder_export_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _export(tmp_path, seqio.ByteVocabulary(), False, prefix_lm=True)
    assert "prefix LM" in caplog.text and "attends causally" in caplog.text


def _hf_generate(model, tokenizer, text, encoder_decoder, max_new_tokens):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)[0].tolist()
    new = out[1:] if encoder_decoder else out[ids["input_ids"].shape[1]:]
    return new[:new.index(1)] if 1 in new else new


def _assert_same_text(ours: str, theirs: str):
    """Equal text, except where the model emitted bytes that are not UTF-8 (decoded to U+FFFD by both, in runs
    HF's byte fallback replaces whole): token equality is asserted separately."""
    if "\ufffd" not in ours:
        assert theirs == ours


SHORT_RUN = ["--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2", "--gin.EVAL_MIXTURE_OR_TASK_NAME=None",
             "--gin.BATCH_SIZE=4", "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 16}",
             "--gin.train.async_checkpointing=False", "--gin.BEST_METRIC=None"]
EVAL_TASK = "uppercase_zs_noopt"   # generative: its predictions are greedy decodes
EVAL = [f"--gin.EVAL_MIXTURE_OR_TASK_NAME='{EVAL_TASK}'", "--gin.EVAL_EXAMPLES_PER_TASK=8",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 16}"]   # 16: the eval's decode length too


@pytest.mark.slow  # ~60 s on an idle 2-core CPU: a 2-step run, `flan-jax eval`, convert + verify, transformers
def test_trained_t5_served_by_transformers_reproduces_flan_jax_eval(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    run, preds, out = str(tmp_path / "run"), str(tmp_path / "preds"), str(tmp_path / "hf")
    flags = ["--gin_file=runs/tiny_test.gin", f"--gin.MODEL_DIR={run!r}"]
    train_main.train_main([*flags, *SHORT_RUN])
    train_main.eval_main([*flags, *SHORT_RUN, *EVAL, f"--checkpoint={run}", f"--predictions_dir={preds}"])
    predictions = [json.loads(line) for line in open(os.path.join(preds, f"{EVAL_TASK}.jsonl"))]
    assert len(predictions) == 8

    assert convert_cli.main(["--from", "t5x", "--to", "hf", "--verify", run, out]) == 0
    done = _served(run, out)
    ours = convert_cli.our_greedy(done, 16)([p["input"] for p in predictions])
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)   # T5 1.1's head stays untied
    for p, mine in zip(predictions, ours):
        assert tokenizer(p["input"])["input_ids"] == list(done.vocabulary.encode(p["input"])) + [1]
        theirs = _hf_generate(model, tokenizer, p["input"], True, 16)
        assert theirs == mine, p["input"]
        assert done.vocabulary.decode(mine) == p["prediction"]
        _assert_same_text(p["prediction"], tokenizer.decode(theirs, skip_special_tokens=True))


def _served(run, out):
    """What the export was written from: the run's params, config and vocabulary."""
    config, params, _ = trained.load_trained(run)
    return Converted(out, config, params, trained.trained_vocabulary(run))


@pytest.mark.slow  # ~50 s on an idle 2-core CPU: a 2-step decoder run, convert, transformers
def test_trained_decoder_served_by_transformers_reproduces_our_greedy(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    run, out = str(tmp_path / "run"), str(tmp_path / "hf")
    train_main.train_main(["--gin_file=runs/default_cpu_decoder.gin", f"--gin.MODEL_DIR={run!r}", *SHORT_RUN,
                           "--gin.DecoderConfig.emb_dim=64", "--gin.DecoderConfig.num_layers=2",
                           "--gin.DecoderConfig.num_heads=4", "--gin.DecoderConfig.num_kv_heads=2",
                           "--gin.DecoderConfig.head_dim=16", "--gin.DecoderConfig.mlp_dim=128",
                           "--gin.DecoderConfig.prefix_lm=False"])   # HF causal LMs: no prefix-LM attention
    assert convert_cli.main(["--from", "t5x", "--to", "hf", run, out]) == 0
    done = _served(run, out)
    prompts = [e["inputs"] for e in default.registry.iter_examples(default.registry.task_spec("uppercase"),
                                                                   "zs_noopt", "validation")][:8]
    ours = convert_cli.our_greedy(done, 16)(prompts)
    with caplog.at_level(logging.WARNING, logger="transformers"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert "tie" not in caplog.text
    for prompt, mine in zip(prompts, ours):
        assert tokenizer(prompt)["input_ids"] == [0] + list(done.vocabulary.encode(prompt)) + [1]
        theirs = _hf_generate(model, tokenizer, prompt, False, 16)
        assert theirs == mine, prompt
        _assert_same_text(done.vocabulary.decode(mine), tokenizer.decode(theirs, skip_special_tokens=True))


def _lora_flags(model_dir, base=None, peft_gin="peft/lora.gin"):
    """A quick run of the tiny T5 (a LoRA run on `base` with peft_gin, else a full one): no eval, 4 steps."""
    files = ["--gin_file=runs/tiny_test.gin"] + ([f"--gin_file={peft_gin}"] if peft_gin else [])
    return [*files, f"--gin.MODEL_DIR={model_dir!r}", "--gin.EVAL_MIXTURE_OR_TASK_NAME=None", "--gin.BEST_METRIC=None",
            "--gin.train.peak_tflops=1.0", "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2",
            "--gin.train.async_checkpointing=False"] + ([f"--gin.INIT_CHECKPOINT={base!r}"] if base else [])


@pytest.mark.slow  # ~40 s on an idle 2-core CPU: a 4-step LoRA run on a random base, merge, export, verify
def test_merged_peft_run_exports_and_verifies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    base = str(tmp_path / "base")
    _training_run(tmp_path / "base", train_main.load_config(_lora_flags(base, peft_gin=None))[1].model,
                  default.vocabulary())
    lora = str(tmp_path / "lora")
    train_main.train_main(_lora_flags(lora, base=base))
    out = str(tmp_path / "hf")
    assert convert_cli.merge_main(["--merge-peft", "--to", "hf", "--verify", *_lora_flags(lora), out]) == 0
    assert "verify OK" in capsys.readouterr().out
    assert {"tokenizer.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(out))
