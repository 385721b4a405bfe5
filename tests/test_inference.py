"""The one inference path (flan_jax.evaluation.inference) and its callers take EOS and padding from the vocabulary: with
a vocabulary whose EOS is not T5's 1, prompts end in its EOS, decoding stops at it and text is cut at it."""
import jax
import numpy as np
import pytest
import seqio

from flan_jax.data.vocabularies import special_ids
from flan_jax.evaluation import inference, self_consistency
from flan_jax.generation.model import TextModel
from flan_jax.models import t5
from flan_jax.train.rl import rule_reward

LETTERS = "!abcdefghijklmnopqrstuvwxyz"


class LetterVocabulary(seqio.Vocabulary):
    """Id 0 pads; ids 1..27 are "!a..z" (so T5's EOS id 1 is the letter "!"); EOS is a chosen id outside them."""

    def __init__(self, eos_id: int = 30):
        super().__init__()
        self._eos = eos_id

    @property
    def eos_id(self):
        return self._eos

    @property
    def unk_id(self):
        return None

    @property
    def _base_vocab_size(self):
        return 32

    def _encode(self, s):
        return [LETTERS.index(c) + 1 for c in s]

    def _decode(self, ids):
        return "".join(LETTERS[i - 1] for i in ids if 1 <= i <= len(LETTERS))

    def _encode_tf(self, s):
        raise NotImplementedError

    def _decode_tf(self, ids):
        raise NotImplementedError


VOCAB = LetterVocabulary()
CONFIG = t5.T5Config(vocab_size=32, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48, num_encoder_layers=1,
                     num_decoder_layers=1)


@pytest.fixture(scope="module")
def params():
    return t5.init_params(CONFIG, jax.random.PRNGKey(0))


def test_special_ids_come_from_the_vocabulary():
    assert special_ids(VOCAB) == special_ids(LetterVocabulary(30)) and special_ids(VOCAB).eos == 30
    assert (special_ids(VOCAB).pad, special_ids(seqio.ByteVocabulary()).eos) == (0, 1)
    with pytest.raises(ValueError, match="no EOS"):
        special_ids(LetterVocabulary(eos_id=None))


def test_tokens_end_in_the_vocabulary_eos_and_text_is_cut_there():
    rows, truncated = inference.encode_prompts(VOCAB, ["ab", "abcdef"], max_len=4)
    assert rows == [[2, 3, 30], [5, 6, 7, 30]] and truncated == 1       # a long prompt keeps its end
    assert inference.encode_options(VOCAB, ["a!", "abc"], max_len=3) == [[2, 1, 30], [2, 3, 30]]
    assert inference.tokens_to_text(VOCAB, [2, 1, 3, 30, 4, 0]) == "a!b"   # id 1 is a letter here, not an end
    decoded = inference.decode_rows(VOCAB, np.array([[2, 1, 30, 0], [3, 0, 4, 5]]))
    assert decoded == [inference.Decoded("a!", 2, True), inference.Decoded("bcd", 4, False)]
    assert rule_reward.response_text(VOCAB, np.array([2, 1, 30, 3])) == "a!"
    assert rule_reward.exact_match_reward(VOCAB)(None, np.array([[2, 30, 3], [2, 3, 3]]), ["a", "a"]).tolist() == [
        1.0, 0.0]


def test_batches_cover_every_row_and_fill_with_real_rows():
    got = list(inference.fixed_batches(5, 2))
    assert [(r.tolist(), p.tolist()) for r, p in got] == [([0, 1], [0, 1]), ([2, 3], [2, 3]), ([4], [4, 4])]
    rows = [[7] * n for n in (3, 70, 5, 200)]
    seen = []
    for real, padded, tokens in inference.ladder_batches(rows, 256, lambda width: 2):
        assert tokens.shape == (2, inference.bucket_width(max(len(rows[i]) for i in real), 256))
        assert padded[:len(real)].tolist() == real.tolist() and set(padded) <= set(real)
        seen += real.tolist()
    assert sorted(seen) == [0, 1, 2, 3]
    assert inference.longest(inference.pad_rows(rows[:1], 8)) == 3 and inference.round_up(33, 32, 48) == 48


def test_option_scores_place_each_example_and_mask_absent_options():
    option_rows = [[[2, 30], [3, 30]], [[4, 5, 30]], [[2, 30], [3, 30]]]

    def rank(tokens, options):   # score: first input token * 10 + option's first token
        assert options.shape == (len(tokens), 2, 4)
        return tokens[:, :1] * 10.0 + options[:, :, 0]

    inputs = np.array([[1, 30], [2, 30], [3, 30]], np.int32)
    batches = ((r, p, inputs[p]) for r, p in inference.fixed_batches(3, 2))
    scores = inference.option_scores(rank, batches, option_rows, width=4)
    np.testing.assert_array_equal(scores, [[12, 13], [24, -np.inf], [32, 33]])
    assert inference.argmax_options(scores, [["x", "y"], ["z"], ["u", "v"]]) == ["y", "z", "v"]


def _first_real_token(row):
    """(position, id) of the first non-padding id of a decoded row."""
    p = int(np.flatnonzero(row)[0])
    return p, int(row[p])


def test_decoding_stops_at_the_vocabulary_eos(params):
    tokens = inference.pad_rows(inference.encode_prompts(VOCAB, ["abc", "hello"], 8)[0], 8)
    free = np.asarray(inference.InferenceModel(CONFIG, params, VOCAB).greedy(tokens, 6))
    p, stop = _first_real_token(free[0])
    assert stop != 30 and not (free[0] == 30).any()
    # The same model with a vocabulary whose EOS is the id row 0 emits at step p: the row ends there.
    vocab = LetterVocabulary(eos_id=stop)
    model = inference.InferenceModel(CONFIG, params, vocab)
    ended = np.asarray(model.greedy(tokens, 6))
    np.testing.assert_array_equal(ended[0], np.r_[free[0, :p + 1], np.zeros(5 - p, np.int32)])
    sampled = np.asarray(model.sample(tokens, 6, jax.random.PRNGKey(0), temperature=0.0))
    np.testing.assert_array_equal(sampled, ended)
    decoded = inference.decode_rows(vocab, ended)[0]
    assert decoded.ended and decoded.num_tokens == p
    assert decoded.text == vocab.decode([t for t in free[0, :p] if t])


def _vocabulary_that_ends(params, prompt: str = "abc"):
    """(a LetterVocabulary under which the greedy continuation of `prompt` (EOS-terminated by it) emits its EOS after
    at least one token, that Decoded): every candidate EOS is tried in one batch, decoding without stopping."""
    ids = LetterVocabulary()._encode(prompt)
    candidates = [e for e in range(1, 32) if e not in ids]
    free = np.asarray(inference.greedy_tokens(CONFIG, params, inference.pad_rows([ids + [e] for e in candidates], 8),
                                              6, eos_id=-1))
    for e, row in zip(candidates, free):
        decoded = inference.decode_rows(LetterVocabulary(e), row[None])[0]
        if decoded.ended and decoded.num_tokens > 0:
            return LetterVocabulary(e), decoded
    raise AssertionError("no candidate EOS is ever generated")


def test_callers_cut_at_the_vocabulary_eos(params):
    """Self-Instruct's TextModel and self-consistency decode through the same path."""
    vocab, expected = _vocabulary_that_ends(params)
    text_model = TextModel(CONFIG, params, vocab, max_input_length=8, batch_size=2)
    assert text_model.generate(["abc"], 6, jax.random.PRNGKey(0)) == [(expected.text, False)]
    tokens = inference.pad_rows(inference.encode_prompts(vocab, ["abc"], 8)[0], 8)
    _, samples = self_consistency.sample_self_consistency(CONFIG, params, tokens, vocabulary=vocab,
                                                          rng=jax.random.PRNGKey(0), num_samples=2, temperature=0.0,
                                                          max_decode_len=6)
    assert samples == [[expected.text, expected.text]]
    scores = text_model.option_scores(["abc", "ab", "a"], ["yes", "no"])
    assert scores.shape == (3, 2) and scores.dtype == np.float32 and np.isfinite(scores).all()
    assert text_model.truncated_prompts == 0
    text_model.generate(["abcdefghij"], 2, jax.random.PRNGKey(0))
    assert text_model.truncated_prompts == 1
