"""The tokenizer of a Hugging Face export: files with which `AutoTokenizer.from_pretrained(OUT)` encodes a prompt into
exactly the ids the model was trained and evaluated on, for each kind of vocabulary a run can have.

  SentencePiece (a run's MODEL_DIR/vocabulary.model)  tokenizer.json rebuilt from the model proto (BPE or Unigram,
      byte fallback, user-defined pieces, the normalizer spec: it encodes as SentencePieceProcessor does), read by
      PreTrainedTokenizerFast; the .model itself is kept beside it as spiece.model. Not T5TokenizerFast or
      LlamaTokenizerFast: transformers 5 rebuilds those from the pieces with the family's own pre-tokenizer (T5's
      splits on whitespace, losing the newlines and repeated spaces our vocabularies keep).
  bytes (seqio.ByteVocabulary)  T5: a ByT5Tokenizer config; decoders: a byte-level tokenizer.json (ByT5 adds no
      start token).
  HF tokenizers (flan_jax.data.vocabularies.hf)  their files copied: the exported rows are in the tokenizer's ids.

Special tokens are laid out as flan_jax.evaluation.inference encodes prompts: T5's encoder reads text + EOS; a decoder
reads start (our id 0) + text + EOS, the start token being what the decoder family prefills before a prompt.
Decoding matches SentencePiece's except for bytes that are not UTF-8 next to multi-byte characters (HF's
ByteFallback replaces such a run whole, SentencePiece byte by byte).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Optional

import seqio
from etils import epath
from sentencepiece import sentencepiece_model_pb2

from flan_jax.checkpoints import vocab_rows
from flan_jax.data.vocabularies import special_ids
from flan_jax.data.vocabularies import hf as hf_vocab

VOCABULARY_FILE = 'vocabulary.model'   # the SentencePiece model the trainer copies into MODEL_DIR
COPIED_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json', 'special_tokens_map.json',
                'added_tokens.json', 'vocab.json', 'merges.txt', 'spiece.model', 'chat_template.jinja',
                'chat_template.json')
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4   # SentencePiece piece types


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """Special ids in the exported tokenizer's own ids (config.json, generation_config.json)."""
    start: int   # T5's decoder start, a decoder's BOS: our id 0
    eos: int
    pad: int


def token_ids(vocab) -> TokenIds:
    ids = special_ids(vocab)
    order = getattr(vocab, 'hf_order', None)
    if order is None:
        return TokenIds(start=ids.pad, eos=ids.eos, pad=ids.pad)
    start, eos = int(order[ids.pad]), int(order[ids.eos])
    pad = hf_vocab.named_token_id(vocab, 'pad_token')
    return TokenIds(start=start, eos=eos, pad=eos if pad is None else pad)   # no pad token: HF pads with EOS


def rows_in_tokenizer_ids(config, params, vocab):
    """params with vocabulary rows put from our ids into an HF tokenizer's own (data/vocabularies/hf.py swaps ids);
    unchanged for other vocabularies."""
    order = getattr(vocab, 'hf_order', None)
    return params if order is None else vocab_rows.reorder_vocabulary_rows(config, params, vocab_rows.inverse(order))


def rows_in_our_ids(config, params, vocab):
    """The inverse of rows_in_tokenizer_ids: what our own decoding reads."""
    order = getattr(vocab, 'hf_order', None)
    return params if order is None else vocab_rows.reorder_vocabulary_rows(config, params, order)


# --- which vocabulary a run used --------------------------------------------------------------------------------------
def vocabulary_record(vocab) -> Optional[dict]:
    """JSON-ready description of a run's vocabulary, kept in its checkpoints' metadata so that an export finds it."""
    if isinstance(vocab, hf_vocab.HFTokenizerVocabulary):
        return {'kind': 'hf', 'path': vocab.path, 'start_token': vocab.start_token, 'eos_token': vocab.eos_token}
    if isinstance(vocab, seqio.ByteVocabulary):
        return {'kind': 'byte', 'extra_ids': int(vocab.extra_ids)}
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        return {'kind': 'sentencepiece'}   # the model itself is MODEL_DIR/vocabulary.model
    return None


def open_vocabulary(spec: str):
    """A vocabulary from a --vocabulary value: 'byte', a SentencePiece .model, or an HF tokenizer file or directory."""
    if spec == 'byte':
        return seqio.ByteVocabulary()
    if not os.path.exists(spec):
        raise FileNotFoundError(f'--vocabulary {spec}: no such file or directory')
    if spec.endswith('.model') and os.path.isfile(spec) and not hf_vocab.tokenizer_config(spec):
        return seqio.SentencePieceVocabulary(spec)
    return hf_vocab.HFTokenizerVocabulary(spec)


def run_vocabulary(checkpoint_dir: str, record: Optional[dict]):
    """The vocabulary of a training checkpoint: MODEL_DIR/vocabulary.model (checkpoint_<N>'s parent, or the one above
    MODEL_DIR/best), else what its metadata records; None when neither tells."""
    model_dir = epath.Path(checkpoint_dir).parent   # epath: gs:// model dirs too
    model_dir = model_dir.parent if model_dir.name == 'best' else model_dir
    if (model_dir / VOCABULARY_FILE).exists():
        return seqio.SentencePieceVocabulary(str(model_dir / VOCABULARY_FILE))
    kind = (record or {}).get('kind')
    if kind == 'byte':
        return seqio.ByteVocabulary(extra_ids=record.get('extra_ids', 0))
    if kind == 'hf' and os.path.exists(record['path']):
        return hf_vocab.HFTokenizerVocabulary(record['path'], start_token=record['start_token'],
                                              eos_token=record['eos_token'])
    return None


# --- writing ----------------------------------------------------------------------------------------------------------
def write_tokenizer(vocab, out_dir: str, *, encoder_decoder: bool) -> list[str]:
    """Writes the tokenizer files of `vocab` into out_dir; returns their names."""
    if isinstance(vocab, hf_vocab.HFTokenizerVocabulary):
        return copy_tokenizer_files(os.path.dirname(vocab.path), out_dir, also=vocab.path)
    if isinstance(vocab, seqio.ByteVocabulary) and encoder_decoder:
        return _write_byt5(vocab, out_dir)
    if isinstance(vocab, seqio.ByteVocabulary):
        return _write_fast(_byte_tokenizer(vocab, encoder_decoder), out_dir, ('<pad>', '</s>', '<unk>'),
                           encoder_decoder)
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        proto = sentencepiece_model_pb2.ModelProto.FromString(vocab.sp_model)
        names = tuple(proto.pieces[i].piece for i in (vocab.pad_id, vocab.eos_id, vocab.unk_id))
        tokenizer = _sentencepiece_tokenizer(proto, names, special_ids(vocab), encoder_decoder)
        with open(os.path.join(out_dir, 'spiece.model'), 'wb') as f:
            f.write(vocab.sp_model)
        return _write_fast(tokenizer, out_dir, names, encoder_decoder) + ['spiece.model']
    raise ValueError(f'export: no HF tokenizer for a {type(vocab).__name__}')


def copy_tokenizer_files(src_dir: str, out_dir: str, also: Optional[str] = None) -> list[str]:
    """Copies an HF checkpoint's tokenizer files (those present) into out_dir."""
    names = [n for n in COPIED_FILES if os.path.isfile(os.path.join(src_dir, n))]
    for name in names:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    if also and os.path.basename(also) not in names:   # a tokenizer file named otherwise
        shutil.copyfile(also, os.path.join(out_dir, os.path.basename(also)))
        names.append(os.path.basename(also))
    return names


def _write_fast(tokenizer, out_dir: str, names: tuple, encoder_decoder: bool) -> list[str]:
    pad, eos, unk = names
    tokenizer.save(os.path.join(out_dir, 'tokenizer.json'))
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'pad_token': pad, 'eos_token': eos, 'unk_token': unk,
              # our vocabularies decode without HF's " ." -> "." clean-up
              'clean_up_tokenization_spaces': False, 'model_max_length': 1 << 30,
              'padding_side': 'right' if encoder_decoder else 'left'}
    if not encoder_decoder:
        config['bos_token'] = pad   # the start token a decoder prompt begins with (our id 0)
    _write_json(os.path.join(out_dir, 'tokenizer_config.json'), config)
    return ['tokenizer.json', 'tokenizer_config.json']


def _write_byt5(vocab, out_dir: str) -> list[str]:
    config = {'tokenizer_class': 'ByT5Tokenizer', 'extra_ids': int(vocab.extra_ids), 'pad_token': '<pad>',
              'eos_token': '</s>', 'unk_token': '<unk>', 'model_max_length': 1 << 30}
    _write_json(os.path.join(out_dir, 'tokenizer_config.json'), config)
    return ['tokenizer_config.json']


def _write_json(path: str, value: dict) -> None:
    with open(path, 'w') as f:
        json.dump(value, f, indent=2, sort_keys=True)


def _template(names: tuple, ids, encoder_decoder: bool):
    """T5: text + EOS; decoders: start + text + EOS (see the module doc)."""
    from tokenizers import processors  # lazy: tokenizers comes with the hf extra (transformers)
    pad, eos = names[0], names[1]
    single = ['$A', eos] if encoder_decoder else [pad, '$A', eos]
    pair = single + ['$B', eos]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[(pad, ids.pad), (eos, ids.eos)])


def _sentencepiece_tokenizer(proto, names: tuple, ids, encoder_decoder: bool):
    """A tokenizers.Tokenizer that encodes as the SentencePiece model does (checked on the default corpus and fuzzed
    strings: whitespace runs, newlines, digits, byte fallback)."""
    from tokenizers import AddedToken, Tokenizer  # lazy: tokenizers comes with the hf extra (transformers)
    from tokenizers.models import BPE, Unigram  # lazy: as above
    pieces = list(proto.pieces)
    user_defined = [p.piece for p in pieces if p.type == _USER_DEFINED]
    trainer = proto.trainer_spec
    if trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        model = BPE(vocab={p.piece: i for i, p in enumerate(pieces)}, merges=_bpe_merges(pieces),
                    unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=trainer.byte_fallback,
                    ignore_merges=bool(user_defined))
    elif trainer.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        model = Unigram([(p.piece, p.score) for p in pieces], trainer.unk_id, trainer.byte_fallback)
    else:
        raise ValueError(f'export: SentencePiece model type {trainer.model_type} (only BPE and Unigram convert)')
    tokenizer = Tokenizer(model)
    _sentencepiece_pipeline(tokenizer, proto.normalizer_spec, user_defined, trainer.byte_fallback)
    tokenizer.post_processor = _template(names, ids, encoder_decoder)
    tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                  for p in pieces if p.type in (_UNKNOWN, _CONTROL)])
    return tokenizer


def _bpe_merges(pieces) -> list:
    """Merges ranked as SentencePiece's BPE applies them: the merged piece's score, highest first."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
    ranked = [(-score, i, token[:k], token[k:]) for token, (score, i) in normal.items()
              for k in range(1, len(token)) if token[:k] in normal and token[k:] in normal]
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _sentencepiece_pipeline(tokenizer, spec, user_defined: list, byte_fallback: bool) -> None:
    """Normalizer, pre-tokenizer and decoder following the model's normalizer spec, in SentencePiece's order."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers  # lazy: as above
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:   # spaces only: SentencePiece keeps newlines
        steps += [normalizers.Replace(Regex(r'\A +| +\z'), ''), normalizers.Replace(Regex(' {2,}'), ' ')]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(' ', '▁'))
    if spec.add_dummy_prefix:   # Metaspace adds no prefix to text starting with '▁'; SentencePiece does
        steps.append(normalizers.Replace(Regex(r'\A▁'), '▁▁'))
    tokenizer.normalizer = normalizers.Sequence(steps)
    split = []
    if spec.add_dummy_prefix:
        split.append(pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='always', split=False))
    if user_defined:   # emitted whole, never merged
        pattern = '|'.join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        split.append(pre_tokenizers.Split(Regex(pattern), behavior='isolated'))
    if split:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(split)
    steps = [decoders.Replace('▁', ' ')]
    if byte_fallback:   # ASCII bytes decode alone, as in SentencePiece: HF's ByteFallback spoils a run with a bad byte
        steps += [decoders.Replace(f'<0x{b:02X}>', chr(b)) for b in range(128)] + [decoders.ByteFallback()]
    if spec.add_dummy_prefix:
        steps += [decoders.Fuse(), decoders.Strip(content=' ', left=1)]
    elif byte_fallback:
        steps.append(decoders.Fuse())
    tokenizer.decoder = decoders.Sequence(steps)


def _byte_tokenizer(vocab, encoder_decoder: bool):
    """seqio.ByteVocabulary's ids (pad 0, EOS 1, unk 2, byte b -> b + 3) as a byte-level tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers  # lazy: as above
    from tokenizers.models import BPE  # lazy: as above
    specials = ['<pad>', '</s>', '<unk>']
    table = _gpt2_byte_chars()
    vocabulary = {**{s: i for i, s in enumerate(specials)}, **{table[b]: b + 3 for b in range(256)}}
    tokenizer = Tokenizer(BPE(vocab=vocabulary, merges=[], unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _template(tuple(specials), special_ids(vocab), encoder_decoder)
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tokenizer


def _gpt2_byte_chars() -> dict:
    """byte -> the printable character byte-level tokenizers stand it for (GPT-2's table)."""
    kept = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
