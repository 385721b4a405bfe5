"""Chat conversations as records: one record per assistant turn.

A conversation record holds {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}.
`ChatTurnsSource` turns each assistant turn into one record {"conversation": <the turns before it, rendered>,
"reply": <its content>}; `registry.register_chat_task` registers them with the template "{conversation}" ->
"{reply}", so the conversation so far is the example's inputs and the assistant turn its targets.

The chat format (plain text, so any vocabulary encodes it): each turn is a role marker line and its content,

    <|system|>
    You answer briefly.
    <|user|>
    Hi!
    <|assistant|>

and the inputs end with an open "<|assistant|>" marker line: the target is the reply alone.

Why one example per assistant turn: the decoder's prefix-LM converter (`flan_jax.packing`) gives an example exactly
one loss-free prefix (its inputs) and one target span with loss. So every assistant turn gets the loss once, as a
target, and no system or user token ever does; earlier assistant turns reappear in later inputs, where they carry
no loss. One sequence per conversation would need a loss mask over several spans and causal attention over the
earlier turns (the prefix is attended both ways), which no converter here has. The price is reading the earlier
turns again for each later assistant turn: quadratic in the conversation's length, small for chat-length ones.

Malformed conversations are not raised: each yields one `SkippedRecord` whose reason the registry counts per task
("wrong_type:messages", "chat_unknown_role", "chat_content_not_a_string", "chat_empty_assistant_turn",
"chat_no_assistant_turn", ...). A record the base source could not read (None) passes through as None.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from flan_jax.data.sources import MalformedRecordError, Record, RecordSource, SkippedRecord

ROLES = ("system", "user", "assistant")
CONVERSATION_FIELD, REPLY_FIELD = "conversation", "reply"


def render_turns(messages: Sequence[Mapping[str, str]]) -> str:
    """The turns in the chat format: a "<|role|>" line, then the content, then a newline, per turn."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)


def chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The inputs before an assistant turn: the turns so far and an open assistant marker."""
    return render_turns(messages) + "<|assistant|>\n"


def check_messages(record: Any, messages_field: str = "messages") -> list[Mapping[str, str]]:
    """The record's messages, validated; raises MalformedRecordError naming what is wrong."""
    if not isinstance(record, Mapping):
        raise MalformedRecordError("record_not_a_mapping", type(record).__name__)
    if messages_field not in record:
        raise MalformedRecordError(f"missing_field:{messages_field}")
    messages = record[messages_field]
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise MalformedRecordError(f"wrong_type:{messages_field}", f"expected a list, got {type(messages).__name__}")
    for position, message in enumerate(messages):
        _check_message(message, position)
    if not any(m["role"] == "assistant" for m in messages):
        raise MalformedRecordError("chat_no_assistant_turn", f"{len(messages)} message(s)")
    return list(messages)


def _check_message(message: Any, position: int) -> None:
    if not isinstance(message, Mapping):
        raise MalformedRecordError("chat_message_not_a_mapping", f"message {position}: {type(message).__name__}")
    if message.get("role") not in ROLES:
        raise MalformedRecordError("chat_unknown_role", f"message {position}: role {message.get('role')!r}")
    if not isinstance(message.get("content"), str):
        raise MalformedRecordError("chat_content_not_a_string",
                                   f"message {position}: {type(message.get('content')).__name__}")
    if message["role"] == "assistant" and not message["content"].strip():
        raise MalformedRecordError("chat_empty_assistant_turn", f"message {position}")


def conversation_turns(record: Any, messages_field: str = "messages") -> list[Record | SkippedRecord | None]:
    """One {"conversation", "reply"} record per assistant turn; [SkippedRecord] for a malformed conversation."""
    if record is None:
        return [None]
    try:
        messages = check_messages(record, messages_field)
    except MalformedRecordError as e:
        return [SkippedRecord(e.reason, e.detail)]
    return [{CONVERSATION_FIELD: chat_prompt(messages[:i]), REPLY_FIELD: m["content"]}
            for i, m in enumerate(messages) if m["role"] == "assistant"]


class ChatTurnsSource(RecordSource):
    """`base`'s conversation records, one record per assistant turn (see the module docstring).

    Indices count the turn records of a split, so sharding and `max_examples` caps apply to turns. Split sizes
    come from one pass over `base` when the source is created, unless `num_examples` declares them.
    """

    def __init__(self, base: RecordSource, messages_field: str = "messages",
                 num_examples: Mapping[str, int] | None = None):
        self.base, self.messages_field = base, messages_field
        if num_examples is None:
            num_examples = {split: sum(len(self._turns(r)) for _, r in base.records(split)) for split in base.splits}
        super().__init__(base.splits, num_examples)

    def _turns(self, record: Any) -> list:
        return conversation_turns(record, self.messages_field)

    def _iter_split(self, split: str) -> Iterable[Record]:
        for _, record in self.base.records(split):
            yield from self._turns(record)

    def describe(self) -> str:
        return f"ChatTurns({self.base.describe()})"
