"""Vocabularies built without a download: a SentencePiece model trained on the fly from a collection's own text.

The embedded default collection is tokenized with a small BPE model trained on its rendered prompts (about 0.2 s).
Byte-level tokens cost a tiny model most of its capacity on spelling: with word-sized pieces the same examples are
2.8x shorter and the classification tasks become learnable in minutes on a CPU. Byte fallback keeps every string
encodable, so text the corpus never showed is still round-tripped exactly (never mapped to UNK).

The model is cached under FLAN_JAX_CACHE (default ~/.cache/flan_jax) keyed by a fingerprint of what generated the
corpus, and built on first use only: registering tasks with it costs nothing. The trainer copies it into MODEL_DIR.

Special ids: code that has a vocabulary asks it (`special_ids(vocab)`); code without one (the model layer, jitted
functions' defaults) uses PAD_ID / EOS_ID, T5's convention that every vocabulary of this package keeps.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from typing import Callable, Iterable

import seqio
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

CACHE_ENV = "FLAN_JAX_CACHE"

PAD_ID = seqio.PAD_ID   # 0: the models mask padding by it, so every vocabulary must reserve it
EOS_ID = 1              # T5's EOS, kept by the SentencePiece models trained here and by HFTokenizerVocabulary


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    pad: int
    eos: int


def special_ids(vocab: seqio.Vocabulary) -> SpecialIds:
    """The padding and EOS ids of `vocab`; generation needs an EOS, so a vocabulary without one is refused."""
    if vocab.eos_id is None:
        raise ValueError(f"vocabulary {vocab} has no EOS id: generated text could not end")
    return SpecialIds(pad=int(vocab.pad_id), eos=int(vocab.eos_id))


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "flan_jax")


def fingerprint(*parts: str | bytes) -> str:
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()[:12]


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = "bpe") -> bytes:
    """Returns a serialized SentencePiece model with T5's special ids (pad 0, eos 1, unk 2, no bos).

    No normalization keeps the text exactly (newlines, repeated spaces); digits are split so numbers stay
    compositional; `hard_vocab_limit=False` lets a small corpus end with fewer pieces than asked for."""
    model = tempfile.SpooledTemporaryFile()
    with tempfile.TemporaryDirectory() as tmp:
        # A one-rule normalizer that rewrites only the noncharacter U+FDD0: all other text stays as it is, like the
        # "identity" rule, but the model has a non-empty charsmap (with an empty one SentencePiece logs a line every
        # time TensorFlow loads the model, dozens per run).
        rule = os.path.join(tmp, "rule.tsv")
        with open(rule, "w") as f:
            f.write("FDD0\tFDD1\n")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, byte_fallback=True, split_digits=True, hard_vocab_limit=False,
            normalization_rule_tsv=rule, remove_extra_whitespaces=False, user_defined_symbols=["\n"],
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=2, bos_id=-1, num_threads=1, max_sentence_length=1 << 20,
            minloglevel=2)
    model.seek(0)
    proto = sentencepiece_model_pb2.ModelProto.FromString(model.read())
    for spec in (proto.normalizer_spec, proto.denormalizer_spec):  # a temporary path: the bytes must not depend on it
        spec.ClearField("normalization_rule_tsv")
    return proto.SerializeToString(deterministic=True)


def _write_atomically(path: str, data: bytes) -> None:
    """Writes under a unique name, then renames: concurrent builders (test workers, hosts) never see a torn file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class CorpusSentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """A seqio SentencePieceVocabulary whose model file is trained from `corpus_fn()` the first time it is needed.

    `corpus_fn` must be a module-level function (the vocabulary is pickled by gin and tf.data). `key` should change
    whenever the corpus would (e.g. a hash of the generator and template sources); stale keys only cost efficiency,
    since byte fallback keeps any text encodable."""

    def __init__(self, name: str, corpus_fn: Callable[[], Iterable[str]], vocab_size: int, key: str,
                 directory: str | None = None):
        path = os.path.join(directory or cache_dir(), f"{name}-{vocab_size}-{key}.model")
        super().__init__(path)
        self._corpus_fn, self._requested_size = corpus_fn, vocab_size

    def build(self) -> str:
        """Trains and writes the model if it is not cached yet; returns its path."""
        path = self._sentencepiece_model_file
        if os.path.exists(path):
            return path
        model = train_sentencepiece(self._corpus_fn(), self._requested_size)
        try:
            _write_atomically(path, model)
        except OSError as e:  # e.g. a read-only home directory: use the temp dir, and say so
            fallback = os.path.join(tempfile.gettempdir(), "flan_jax", os.path.basename(path))
            logging.warning("cannot write the vocabulary to %s (%s); using %s instead (set %s to choose)",
                            path, e, fallback, CACHE_ENV)
            _write_atomically(fallback, model)
            self._sentencepiece_model_file = path = fallback
        return path

    @property
    def corpus_fn(self) -> Callable[[], Iterable[str]]:
        """The function whose texts the model is (or will be) trained on."""
        return self._corpus_fn

    @property
    def is_built(self) -> bool:
        return os.path.exists(self._sentencepiece_model_file)

    def _model_context(self):
        if not self._model:
            self.build()
        return super()._model_context()

    @property
    def sentencepiece_model_file(self) -> str:
        return self.build()
