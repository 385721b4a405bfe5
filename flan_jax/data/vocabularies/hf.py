"""Vocabularies of Hugging Face checkpoints (no download): `tokenizer.json` (HF `tokenizers`: Llama 3, Qwen2) or
`tokenizer.model` (SentencePiece: Gemma) as a seqio.Vocabulary, and the checkpoint's chat template.

Ids. The whole pipeline keeps T5's convention: 0 pads (and starts every decoder segment), 1 ends a sequence. In Llama
3's and Qwen2's vocabularies 0 and 1 are ordinary tokens ("!" and '"'), so this vocabulary swaps two pairs of ids:
seqio id 0 <-> the checkpoint's start token (BOS: `<|begin_of_text|>`, Gemma's `<bos>`), seqio id 1 <-> its EOS.
Every other id is the checkpoint's own. `hf_order` (seqio id -> checkpoint id) puts the embedding and output rows into
this order: `embedding[hf_order]` (flan_jax.checkpoints.vocab_rows); its inverse puts them back on export. The start
token is what a padded-in 0 becomes, so a decoder sees BOS where HF's would. INIT_CHECKPOINT from an HF directory
reorders the rows when the training task's vocabulary is one of these; training checkpoints record the swaps and
`flan-jax convert` to HF puts the rows back.

Chat templates are the checkpoint's own Jinja2 template (`chat_template` in tokenizer_config.json), rendered in
jinja2's ImmutableSandboxedEnvironment (as transformers renders them): templates cannot reach Python attributes,
files or mutate their inputs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

import sentencepiece
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_JSON, TOKENIZER_MODEL, TOKENIZER_CONFIG = 'tokenizer.json', 'tokenizer.model', 'tokenizer_config.json'



def order_from_swaps(size: int, swaps: Sequence[Sequence[int]]) -> np.ndarray:
    """new id -> old id: the identity with the transpositions (i, j) applied in turn."""
    order = np.arange(size, dtype=np.int64)
    for i, j in swaps:
        order[[i, j]] = order[[j, i]]
    return order


def _token_name(value) -> Optional[str]:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts ({'content': ...})."""
    return value.get('content') if isinstance(value, dict) else value


def tokenizer_config(path: str) -> dict:
    """tokenizer_config.json beside a tokenizer file (or in a checkpoint directory); {} when absent."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(folder, TOKENIZER_CONFIG)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def named_token_id(vocab: 'HFTokenizerVocabulary', key: str) -> Optional[int]:
    """The tokenizer's own id (not the swapped seqio id) of the special token tokenizer_config.json names under `key`
    ('pad_token', 'unk_token', ...); None when it names none or the tokenizer lacks it."""
    name = _token_name(tokenizer_config(vocab.path).get(key))
    found = vocab.backend.token_id(name) if name else None
    return None if found is None else int(found)


def _tokenizer_file(path: str) -> str:
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'no tokenizer at {path}')
        return path
    for name in (TOKENIZER_JSON, TOKENIZER_MODEL):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f'{path}: neither {TOKENIZER_JSON} nor {TOKENIZER_MODEL} in this checkpoint directory')


class _Backend:
    """The tokenizer in the checkpoint's own ids: tokenizers.Tokenizer or a SentencePieceProcessor."""

    def __init__(self, file: str):
        if file.endswith('.json'):
            import tokenizers  # lazy: only Hugging Face tokenizer.json vocabularies need it
            self.hf = tokenizers.Tokenizer.from_file(file)
            self.sp = None
        else:
            self.hf, self.sp = None, sentencepiece.SentencePieceProcessor(model_file=file)

    def size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True) if self.hf else self.sp.get_piece_size()

    def token_id(self, token: str) -> Optional[int]:
        if self.hf:
            return self.hf.token_to_id(token)
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def encode(self, text: str) -> list:
        # Special tokens written in the text (a chat template's markers) become their ids in both backends' calls.
        return self.hf.encode(text, add_special_tokens=False).ids if self.hf else self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True) if self.hf else self.sp.decode(list(ids))

    def unk_id(self) -> Optional[int]:
        if self.sp:
            return self.sp.unk_id()
        model = json.loads(self.hf.to_str())['model']
        return self.hf.token_to_id(model['unk_token']) if model.get('unk_token') else None


class HFTokenizerVocabulary(seqio.Vocabulary):
    """seqio.Vocabulary over a checkpoint's tokenizer.json or tokenizer.model (see the module doc for the ids).

    path: the tokenizer file or the checkpoint directory holding it (tokenizer.json preferred).
    start_token / eos_token: default from tokenizer_config.json (bos_token, eos_token); a tokenizer without a BOS
    (Qwen2) needs start_token, e.g. '<|im_start|>' or '<|endoftext|>' when that is not the EOS.
    """

    def __init__(self, path: str, *, start_token: Optional[str] = None, eos_token: Optional[str] = None):
        super().__init__(extra_ids=0)
        self.path = os.path.abspath(_tokenizer_file(path))
        config = tokenizer_config(self.path)
        self.start_token = start_token or _token_name(config.get('bos_token'))
        self.eos_token = eos_token or _token_name(config.get('eos_token'))
        for key, token in (('start_token', self.start_token), ('eos_token', self.eos_token)):
            if not token:
                raise ValueError(f'HFTokenizerVocabulary({self.path}): no {key} given and tokenizer_config.json '
                                 f'names none')
        if self.start_token == self.eos_token:
            raise ValueError(f'HFTokenizerVocabulary({self.path}): start_token and eos_token are both '
                             f'{self.eos_token!r}; pass another start_token')
        self._backend = None
        self.swaps = self._swaps()   # recorded in training checkpoints, so export can put the rows back
        self.hf_order = order_from_swaps(self.backend.size(), self.swaps)
        self._from_hf = np.argsort(self.hf_order)

    # --- ids ---------------------------------------------------------------------------------------------------------
    @property
    def backend(self) -> _Backend:
        if self._backend is None:
            self._backend = _Backend(self.path)
        return self._backend

    def _hf_id(self, token: str, key: str) -> int:
        i = self.backend.token_id(token)
        if i is None:
            raise ValueError(f'HFTokenizerVocabulary({self.path}): {key} {token!r} is not in the vocabulary')
        return int(i)

    def _swaps(self) -> tuple:
        """The transpositions (seqio slot, checkpoint id's current place) that build hf_order from the identity."""
        order, swaps = np.arange(self.backend.size(), dtype=np.int64), []
        for slot, token, key in ((0, self.start_token, 'start_token'), (1, self.eos_token, 'eos_token')):
            at = int(np.flatnonzero(order == self._hf_id(token, key))[0])
            order[[slot, at]] = order[[at, slot]]
            swaps.append((slot, at))
        return tuple(swaps)

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> Optional[int]:
        unk = self.backend.unk_id()
        return None if unk is None else int(self._from_hf[unk])

    @property
    def _base_vocab_size(self) -> int:
        return len(self.hf_order)

    def _encode(self, s: str) -> Sequence[int]:
        return [int(i) for i in self._from_hf[np.asarray(self.backend.encode(s), np.int64)]]

    def _decode(self, ids) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < len(self.hf_order)]
        return self.backend.decode([int(self.hf_order[i]) for i in ids])

    # --- TensorFlow (seqio's tokenize preprocessor runs inside tf.data) ------------------------------------------------
    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        encode = lambda text: np.asarray(self._encode(text.decode('utf-8')), np.int32)
        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode(batch):
            rows = np.asarray(batch).reshape(-1, np.shape(batch)[-1] if np.ndim(batch) else 1)
            out = np.asarray([self.decode(row).encode('utf-8') for row in rows], object)
            return out.reshape(np.shape(batch)[:-1])
        text = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        text.set_shape(ids.shape[:-1])
        return text

    # --- identity, pickling (gin and tf.data copy vocabularies) ------------------------------------------------------
    def __eq__(self, other) -> bool:
        return (isinstance(other, HFTokenizerVocabulary) and other.path == self.path
                and other.start_token == self.start_token and other.eos_token == self.eos_token)

    def __hash__(self):
        return hash((self.path, self.start_token, self.eos_token))

    def __getstate__(self):
        return {**self.__dict__, '_backend': None}


# --- chat templates ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A checkpoint's chat template applied to (prompt, target): one user turn, the answer as the assistant turn.

    inputs = the rendered conversation up to the assistant's turn (the template's generation prompt); targets = the
    rest of the rendered two-turn conversation (the answer and the template's end-of-turn marker), so inputs +
    targets is exactly what the template renders for the whole exchange.
    """
    template: str
    system: Optional[str] = None
    special_tokens: tuple = ()   # (name, value) pairs the template may read, e.g. ('eos_token', '<|eot_id|>')

    @classmethod
    def from_checkpoint(cls, path: str, system: Optional[str] = None) -> 'ChatFormat':
        config = tokenizer_config(path)
        template = config.get('chat_template')
        if isinstance(template, list):  # named templates: [{'name': 'default', 'template': ...}, ...]
            template = next((t['template'] for t in template if t.get('name') == 'default'), None)
        if not template:
            raise ValueError(f'{path}: tokenizer_config.json has no chat_template')
        names = ('eos_token', 'unk_token', 'pad_token')
        specials = tuple((n, _token_name(config[n])) for n in names if _token_name(config.get(n)))
        return cls(template, system, specials)

    def _render(self, messages: list, add_generation_prompt: bool) -> str:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise ValueError(f'chat template: {message}')
        env.globals['raise_exception'] = raise_exception
        # bos_token renders empty: the pipeline starts every segment with the start token (seqio id 0) itself.
        return env.from_string(self.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                     bos_token='', **dict(self.special_tokens))

    def apply(self, prompt: str, target: str) -> tuple[str, str]:
        head = [{'role': 'system', 'content': self.system}] if self.system else []
        user = head + [{'role': 'user', 'content': prompt}]
        inputs = self._render(user, add_generation_prompt=True)
        whole = self._render(user + [{'role': 'assistant', 'content': target}], add_generation_prompt=False)
        if not whole.startswith(inputs):
            raise ValueError('chat template: the rendered conversation does not start with its generation prompt '
                             f'({inputs[-40:]!r}); cannot split it into inputs and targets')
        return inputs, whole[len(inputs):]


def chat_format_preprocessor(dataset: tf.data.Dataset, chat_format: ChatFormat) -> tf.data.Dataset:
    """seqio preprocessor (before tokenization): 'inputs' and 'targets' strings put into the chat format."""
    def apply(inputs, targets):
        a, b = chat_format.apply(inputs.decode('utf-8'), targets.decode('utf-8'))
        return a.encode('utf-8'), b.encode('utf-8')

    def one(example):
        inputs, targets = tf.numpy_function(apply, [example['inputs'], example['targets']], [tf.string, tf.string],
                                            stateful=False)
        inputs.set_shape([])
        targets.set_shape([])
        return {**example, 'inputs': inputs, 'targets': targets}
    return dataset.map(one, num_parallel_calls=tf.data.AUTOTUNE)
