"""The coach: answers questions about the course from retrieved passages, with citations."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot import prompts
from bot.knowledge import Passage
from bot.llm import ChatModel
from bot.text import Language, clean_message, detect_language
from bot.tokens import fit_passages, truncate

CONTEXT_BUDGET = 1800
QUOTE_BUDGET = 160
_CITATION = re.compile(r"\[(\d{1,2})\]")
# The prompt fences data in <passages> and <question>; data must not be able to close a fence.
_FENCE_TAG = re.compile(r"<\s*/?\s*(?:passages|question)\s*>", re.IGNORECASE)

NOT_COVERED: dict[Language, str] = {
    "zh": "课程里没有讲到这个问题。",
    "en": "The course does not cover this question.",
}
LANGUAGE_NAMES: dict[Language, str] = {"zh": "Simplified Chinese", "en": "English"}
# Below this cosine similarity (bundled e5) no chunk is really about the question.
OFFLINE_MIN_SIMILARITY = 0.85


class Retriever(Protocol):
    def search(self, query: str, k: int = 4) -> list[Passage]: ...

    def best_similarity(self, query: str) -> float: ...


@dataclass
class CoachAnswer:
    question: str
    language: Language
    text: str
    sources: list[Passage]
    covered: bool
    engine: str
    retrieved: list[Passage] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "language": self.language,
            "answer": self.text,
            "covered": self.covered,
            "engine": self.engine,
            "sources": [{"n": i, **p.to_json()} for i, p in enumerate(self.retrieved, start=1)
                        if p in self.sources],
        }


def _defenced(text: str) -> str:
    """Text with any <passages>/<question> tag defused, so it stays inside its block."""
    return _FENCE_TAG.sub(lambda m: m.group(0).replace("<", "‹").replace(">", "›"), text)


def cited_numbers(text: str) -> list[int]:
    """Citation numbers in order of first appearance."""
    seen: list[int] = []
    for match in _CITATION.finditer(text):
        number = int(match.group(1))
        if number not in seen:
            seen.append(number)
    return seen


class Coach:
    """LLM coach when given a chat model, else the extractive offline coach."""

    def __init__(self, retriever: Retriever, model: ChatModel | None = None, *, k: int = 4) -> None:
        self._retriever = retriever
        self._model = model
        self._k = k

    @property
    def engine(self) -> str:
        return "llm" if self._model is not None else "offline"

    def answer(self, question: str) -> CoachAnswer:
        question = clean_message(question, what="question")
        language = detect_language(question)
        passages = self._retriever.search(question, k=self._k)
        if self._model is None:
            return self._extractive(question, language, passages)
        messages = self._messages(question, language, passages)
        return self._finish(question, language, passages, self._model.complete(messages, temperature=0.2))

    def stream(self, question: str) -> Iterator[str | CoachAnswer]:
        """Yield text as it arrives (LLM engine), then the finished CoachAnswer."""
        question = clean_message(question, what="question")
        language = detect_language(question)
        passages = self._retriever.search(question, k=self._k)
        if self._model is None:
            answer = self._extractive(question, language, passages)
            yield answer.text
            yield answer
            return
        parts: list[str] = []
        for delta in self._model.stream(self._messages(question, language, passages), temperature=0.2):
            parts.append(delta)
            yield delta
        yield self._finish(question, language, passages, "".join(parts))

    def _messages(self, question: str, language: Language, passages: list[Passage]) -> Any:
        blocks = [f"[{i}] ({p.source})\n{p.text}" for i, p in enumerate(passages, start=1)]
        kept = fit_passages(blocks, CONTEXT_BUDGET)
        return prompts.render(
            "coach",
            language_name=LANGUAGE_NAMES[language],
            max_words=180 if language == "en" else 300,
            not_covered=NOT_COVERED[language],
            passages=_defenced("\n\n".join(kept)),
            question=_defenced(question),
        )

    def _finish(self, question: str, language: Language, passages: list[Passage], text: str) -> CoachAnswer:
        text = text.strip()
        valid = [n for n in cited_numbers(text) if 1 <= n <= len(passages)]
        # A citation to a passage that was never shown is a hallucination: drop the marker.
        text = _CITATION.sub(lambda m: m.group(0) if 1 <= int(m.group(1)) <= len(passages) else "", text)
        covered = bool(valid) and NOT_COVERED[language] not in text
        sources = [passages[n - 1] for n in valid]
        return CoachAnswer(question, language, text, sources, covered, "llm", passages)

    def _extractive(self, question: str, language: Language, passages: list[Passage]) -> CoachAnswer:
        covered = bool(passages) and self._retriever.best_similarity(question) >= OFFLINE_MIN_SIMILARITY
        if not covered:
            return CoachAnswer(question, language, NOT_COVERED[language], [], False, "offline", passages)
        intro = "课程中最相关的内容：" if language == "zh" else "The most relevant passages of the course:"
        lines = [intro]
        for i, passage in enumerate(passages, start=1):
            title, _, body = passage.text.partition("\n")
            quote = truncate(" ".join(body.split()), QUOTE_BUDGET)
            if quote != " ".join(body.split()):
                quote += "…"
            lines.append(f"[{i}] **{title}**\n> {quote}\n")
        return CoachAnswer(question, language, "\n".join(lines).strip(), list(passages), True, "offline", passages)
