"""`flan-jax convert --verify`: the exported directory, loaded as a user would (AutoTokenizer + AutoModelFor...),
encodes prompts into our vocabulary's ids and greedy-generates exactly the tokens our own greedy decoding does.

transformers and torch are optional (the `hf` extra): they are imported only here, only when verifying.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from flan_jax.data.vocabularies import special_ids
from flan_jax.data.vocabularies.hf import HFTokenizerVocabulary

INSTALL_HINT = "pip install 'flan_jax[hf]'"
# Default prompts: instructions of several shapes (newlines, digits, repeated spaces, punctuation).
PROMPTS = (
    'Translate to French: The weather is nice today.',
    'What is 17 plus 25?',
    'Is this review positive or negative?\nA lovely film, take 3.',
    'Answer the question.\nQuestion: Which planet is the largest?\nAnswer:',
    'Summarize:  the meeting moved to Tuesday, 10:30,  in room 4B.',
    'Write a short poem about the sea.',
    'Premise: A dog runs in the park.\nHypothesis: An animal is outside.\nDoes the premise entail the hypothesis?',
    'List three colors:',
)


class MissingDependency(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class PromptCheck:
    prompt: str
    expected_ids: list       # our ids of the prompt, in the tokenizer's ids (with our special tokens, see verify)
    tokenizer_ids: list      # what the exported tokenizer makes of the prompt
    ours: list               # generated ids up to EOS, in the tokenizer's ids
    theirs: list
    text_ours: str
    text_theirs: str

    @property
    def tokens_match(self) -> bool:
        return self.tokenizer_ids == self.expected_ids

    @property
    def generation_match(self) -> bool:
        return self.ours == self.theirs


@dataclasses.dataclass(frozen=True)
class Report:
    checks: list

    @property
    def ok(self) -> bool:
        return all(c.tokens_match and c.generation_match for c in self.checks)

    def verdict(self) -> str:
        n = len(self.checks)
        tokens = sum(c.tokens_match for c in self.checks)
        same = sum(c.generation_match for c in self.checks)
        texts = sum(c.text_ours == c.text_theirs for c in self.checks)
        head = 'verify OK' if self.ok else 'verify MISMATCH'
        line = (f'{head}: transformers tokenizer matches our ids on {tokens}/{n} prompts; greedy generate matches ours '
                f'token for token on {same}/{n} ({texts}/{n} texts equal)')
        differ = [c for c in self.checks if c.text_ours != c.text_theirs]
        if self.ok and differ and all('\ufffd' in c.text_ours for c in differ):
            line += '; the texts differ only in bytes that are not UTF-8, which HF decodes a run at a time'
        first = next((c for c in self.checks if not (c.tokens_match and c.generation_match)), None)
        if first is not None:
            line += f'; first mismatch {first.prompt[:40]!r}: ours {first.ours[:12]} vs HF {first.theirs[:12]}'
            if not first.tokens_match:
                line += f', tokenizer {first.tokenizer_ids[:12]} vs ours {first.expected_ids[:12]}'
        return line


def import_transformers():
    """(torch, transformers), or MissingDependency saying how to install them."""
    try:
        import torch  # lazy: optional (the hf extra), only --verify loads the export in PyTorch
        import transformers  # lazy: as above
    except ImportError as e:
        raise MissingDependency(f'--verify loads the export with transformers and torch, which are not installed '
                                f'({e}); {INSTALL_HINT}') from None
    return torch, transformers


def _to_hf(vocab) -> Callable[[Sequence[int]], list]:
    order = getattr(vocab, 'hf_order', None)
    return (lambda ids: [int(i) for i in ids]) if order is None else (lambda ids: [int(order[i]) for i in ids])


def model_input_ids(vocab, text: str, encoder_decoder: bool) -> list:
    """Our layout of a prompt (T5: text + EOS; decoders: start + text + EOS), in the tokenizer's ids."""
    ids = special_ids(vocab)
    ours = list(vocab.encode(text)) + [ids.eos]
    return _to_hf(vocab)(ours if encoder_decoder else [ids.pad] + ours)


def verify(out_dir: str, vocab, prompts: Sequence[str], our_greedy: Callable[[list], list], *,
           encoder_decoder: bool, max_new_tokens: int = 32) -> Report:
    """Loads out_dir with transformers and compares, per prompt, the tokenizer's ids with ours and HF's greedy
    `generate` with our_greedy(prompts) (generated ids in our vocabulary, up to EOS, max_new_tokens at most).

    Copied HF tokenizers keep their own special tokens (Llama 3 adds BOS, no EOS): for them only the text's ids are
    compared; the model reads our layout either way."""
    torch, transformers = import_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    auto = transformers.AutoModelForSeq2SeqLM if encoder_decoder else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(out_dir).float().eval()   # float32 whatever the stored dtype
    copied = isinstance(vocab, HFTokenizerVocabulary)
    ids, to_hf = special_ids(vocab), _to_hf(vocab)
    checks = []
    for prompt, ours in zip(prompts, our_greedy(list(prompts))):
        input_ids = model_input_ids(vocab, prompt, encoder_decoder)
        if copied:
            expected, got = to_hf(vocab.encode(prompt)), tokenizer(prompt, add_special_tokens=False)['input_ids']
        else:
            expected, got = input_ids, tokenizer(prompt)['input_ids']
        theirs = _generate(torch, model, input_ids, max_new_tokens, encoder_decoder, to_hf([ids.eos])[0])
        checks.append(PromptCheck(prompt, expected, list(got), to_hf(ours), theirs,
                                  vocab.decode([t for t in ours if t != ids.pad]),
                                  tokenizer.decode(theirs, skip_special_tokens=True)))
    return Report(checks)


def _generate(torch, model, input_ids: list, max_new_tokens: int, encoder_decoder: bool, eos: int) -> list:
    """HF greedy generate of one prompt: the new ids up to (not including) EOS."""
    with torch.no_grad():
        out = model.generate(torch.tensor([input_ids]), attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
                             do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)[0].tolist()
    new = out[1:] if encoder_decoder else out[len(input_ids):]   # T5's output starts with the decoder start
    return new[:new.index(eos)] if eos in new else new
