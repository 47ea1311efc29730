"""Small text helpers shared by every engine: language detection and input checks."""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

Language = Literal["zh", "en"]

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")

MAX_MESSAGE_CHARS = 2000


class InputError(ValueError):
    """User input that cannot be used; the message says what is wrong."""


def detect_language(text: str) -> Language:
    """zh when Chinese characters carry the text, else en."""
    cjk = len(_CJK.findall(text))
    latin_words = len(_LATIN_WORD.findall(text))
    # One Chinese character carries about as much as one English word.
    return "zh" if cjk and cjk >= latin_words else "en"


def clean_message(text: str, *, limit: int = MAX_MESSAGE_CHARS, what: str = "message") -> str:
    """Normalise a user message, or raise InputError naming the problem.

    Control and zero-width characters are dropped (they hide text from the
    grader and the reader alike); empty and oversized messages are refused.
    """
    if not isinstance(text, str):
        raise InputError(f"the {what} is not text")
    normalised = unicodedata.normalize("NFC", text)
    kept = "".join(
        ch for ch in normalised if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co")
    )
    kept = kept.strip()
    if not kept:
        raise InputError(f"the {what} is empty: type a question or statement first")
    if len(kept) > limit:
        raise InputError(f"the {what} is too long ({len(kept)} characters; the limit is {limit})")
    return kept


def defuse_tags(text: str, *tags: str) -> str:
    """Text with any <tag> or </tag> of the given names made inert (‹tag›), so untrusted text put inside
    a delimited block of a prompt cannot close it early or open another."""
    pattern = re.compile(r"<\s*/?\s*(?:" + "|".join(map(re.escape, tags)) + r")\s*>", re.IGNORECASE)
    return pattern.sub(lambda m: m.group(0).replace("<", "‹").replace(">", "›"), text)
