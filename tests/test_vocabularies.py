"""The on-the-fly SentencePiece vocabulary: lazy, cached, deterministic, lossless; and the default collection's."""
import seqio

from flan_jax.data import vocabularies
from flan_jax.data.sources import generated as gen

CORPUS = [f"Is {n} even or odd?\n\nOPTIONS:\n- even\n- odd" for n in range(300)] + \
         [f"The {w} was here. {w.upper()}" for w in gen.WORDS] * 5
CALLS = []


def corpus():
    CALLS.append(1)
    return CORPUS


def test_trained_on_first_use_then_cached_and_deterministic(tmp_path):
    CALLS.clear()
    vocab = vocabularies.CorpusSentencePieceVocabulary("t", corpus, 400, "k1", directory=str(tmp_path / "a"))
    assert not vocab.is_built and not CALLS
    ids = vocab.encode("Is 17 even or odd?")
    assert vocab.is_built and len(CALLS) == 1
    again = vocabularies.CorpusSentencePieceVocabulary("t", corpus, 400, "k1", directory=str(tmp_path / "a"))
    assert again.encode("Is 17 even or odd?") == ids and len(CALLS) == 1  # read from the cache, not retrained
    elsewhere = vocabularies.CorpusSentencePieceVocabulary("t", corpus, 400, "k1", directory=str(tmp_path / "b"))
    assert elsewhere.sp_model == vocab.sp_model and len(CALLS) == 2       # same corpus -> same bytes
    assert seqio.SentencePieceVocabulary(vocab.sentencepiece_model_file).encode("Is 17 even or odd?") == ids


def test_special_ids_digits_and_lossless_round_trip(tmp_path):
    vocab = vocabularies.CorpusSentencePieceVocabulary("t", corpus, 400, "k2", directory=str(tmp_path))
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert vocab.tokenizer.encode("905", out_type=str)[-3:] == ["9", "0", "5"]  # digits split
    for text in ("Ünïcode ✓ 漢字 and {braces} {{x}}", "two  spaces\n\nand\ttabs ", "even"):
        ids = vocab.encode(text)
        assert vocab.unk_id not in ids and vocab.decode(ids) == text, text  # byte fallback: never UNK


def test_default_collection_vocabulary_has_word_pieces():
    import flan_jax.tasks  # noqa: F401
    from flan_jax.data import registry
    vocab = registry.task_spec("topic").vocabulary
    assert isinstance(vocab, vocabularies.CorpusSentencePieceVocabulary) and vocab.vocab_size <= 2048
    for words in (*gen.TOPIC_WORDS.values(), *gen.SENTIMENT_WORDS.values(), tuple(gen.TOPIC_WORDS)):
        for word in words:
            assert len(vocab.encode(word)) == 1, word
    # Rendered default prompts are far shorter than in bytes (what lets a tiny model learn them in minutes).
    spec = registry.task_spec("topic")
    texts = [ex["inputs"] for _, ex in zip(range(200), registry.iter_examples(spec, "zs_opt", "validation"))]
    num_bytes = sum(len(t.encode()) for t in texts)
    num_tokens = sum(len(vocab.encode(t)) for t in texts)
    assert num_bytes / num_tokens > 2.5


def test_unwritable_cache_falls_back_to_the_temp_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(vocabularies.tempfile, "tempdir", str(tmp_path / "tmp"))
    vocab = vocabularies.CorpusSentencePieceVocabulary("t", corpus, 400, "k3", directory=str(blocker / "cache"))
    assert vocab.decode(vocab.encode("Is 3 even?")) == "Is 3 even?"
    assert vocab.sentencepiece_model_file.startswith(str(tmp_path / "tmp"))
