"""The simulated buyer's voice. The state machine decides what it says; a buyer only phrases it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from langchain_core.messages import AIMessage, HumanMessage

from bot import prompts
from bot.coach import Retriever
from bot.llm import ChatModel
from bot.roleplay import REACTIONS, CallState, Reaction
from bot.scenarios import Scenario
from bot.text import Language, defuse_tags
from bot.tokens import count_message_tokens, fit_passages, trim_history

HISTORY_BUDGET = 700
# The whole rendered prompt stays within this; late in a call the disclosures grow, so the history
# (which repeats them anyway) gets what is left, down to MIN_HISTORY_BUDGET.
PROMPT_BUDGET = 1900
MIN_HISTORY_BUDGET = 150
CONCEPT_BUDGET = 350
LANGUAGE_NAMES: dict[Language, str] = {"zh": "Simplified Chinese", "en": "English"}
VALUE_TYPES = {
    "intrinsic": "an intrinsic-value customer (内在价值型): you buy the product itself, want it cheaper and "
    "hassle-free, and believe you know it better than any rep",
    "extrinsic": "an extrinsic-value customer (外在价值型): you value advice and help beyond the product, "
    "a 'bigger cake'",
    "strategic": "a strategic-value customer (战略价值型): you want a partner whose capabilities serve your "
    "strategy, a 'balanced meal'",
}
CONCEPT_QUERIES = {
    "intrinsic": "内在价值型客户 追求低价 更便宜的没有麻烦的蛋糕",
    "extrinsic": "外在价值型客户 期待销售人员创造额外价值 更大的蛋糕",
    "strategic": "战略价值型客户 利用供应商的企业竞争力 平衡的膳食",
}


@dataclass(frozen=True)
class BuyerTurn:
    """What a buyer needs for one reply; `planned` is the card's own wording of it."""

    card: Scenario
    state: CallState
    reaction: Reaction
    planned: str
    rep_text: str
    history: Sequence[tuple[str, str]]
    language: Language


class Buyer(Protocol):
    name: str
    streams: bool

    def reply(self, turn: BuyerTurn) -> Iterator[str]: ...


class OfflineBuyer:
    """Says the card's line as it is."""

    name = "offline"
    streams = False

    def reply(self, turn: BuyerTurn) -> Iterator[str]:
        yield turn.planned


class LLMBuyer:
    """Phrases the planned reply in persona; the prompt holds only what is already disclosed or disclosed now."""

    streams = True

    def __init__(self, model: ChatModel, retriever: Retriever | None = None) -> None:
        self._model = model
        self._retriever = retriever
        self.name = f"llm:{model.name}"
        self._concepts: dict[str, str] = {}

    def messages(self, turn: BuyerTurn) -> list[object]:
        card, language = turn.card, turn.language
        history = []
        for rep, buyer in turn.history:
            history += [HumanMessage(f"Rep: {_data(rep)}"), AIMessage(f"You: {_data(buyer)}")]
        values: dict[str, Any] = dict(
            buyer_name=card.buyer.name(language),
            buyer_role=card.buyer.role(language),
            industry=card.industry(language),
            personality=card.buyer.personality(language),
            background=card.buyer.background(language),
            decision_role=card.buyer.decision_role.replace("_", " "),
            value_type=VALUE_TYPES[card.value_type],
            seller=card.seller(language),
            disclosed=disclosed(card, turn.state, language) or "(nothing yet)",
            trust=trust_words(turn.state.trust),
            concepts=self._course_notes(card),
            instruction=REACTIONS[turn.reaction.kind].instruction,
            convey=turn.planned,
            language_name=LANGUAGE_NAMES[language],
            rep_message=_data(turn.rep_text),
        )
        rest = count_message_tokens(prompts.render("buyer", history="", **values))
        budget = max(MIN_HISTORY_BUDGET, min(HISTORY_BUDGET, PROMPT_BUDGET - rest))
        kept = trim_history(history, budget)
        text = "\n".join(m.text for m in kept) or "(the call has just started)"
        return list(prompts.render("buyer", history=text, **values))

    def reply(self, turn: BuyerTurn) -> Iterator[str]:
        yield from self._model.stream(self.messages(turn), temperature=0.7)  # type: ignore[arg-type]

    def _course_notes(self, card: Scenario) -> str:
        if card.value_type not in self._concepts:
            notes = ""
            if self._retriever is not None:
                passages = self._retriever.search(CONCEPT_QUERIES[card.value_type], k=2)
                notes = "\n".join(fit_passages([p.text for p in passages], CONCEPT_BUDGET))
            self._concepts[card.value_type] = notes or VALUE_TYPES[card.value_type]
        return self._concepts[card.value_type]


def _data(text: str) -> str:
    """Untrusted call text, unable to close or open the prompt's delimited blocks."""
    return defuse_tags(text, "rep_message", "convey")


def disclosed(card: Scenario, state: CallState, language: Language) -> str:
    """Everything the buyer has already said from the card: only unlocked content."""
    lines = [f"- {card.fact(f).reply(language)}" for f in state.facts]
    for problem_id in state.implied:
        problem = card.problem(problem_id)
        lines.append(f"- {problem.implied(language)}")
        lines += [f"- {problem.implications[i](language)}" for i in state.implications.get(problem_id, ())]
        if problem_id in state.explicit:
            lines.append(f"- {problem.need_payoff(language)}")
    return "\n".join(lines)


def trust_words(trust: float) -> str:
    if trust >= 0.7:
        return "high: you are open and willing to talk about difficulties"
    if trust >= 0.45:
        return "moderate: polite and businesslike"
    return "low: guarded, short answers"
