"""The scenario state machine shared by both engines: the rules control, the LLM only speaks.

Each rep utterance arrives as a Reading (its SPIN label, move and card topic, from `bot.reading`).
`step` turns the current CallState into the next one and a Reaction: what the buyer discloses or
does now. No embeddings and no model here: only rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from bot.reading import Reading, topic_kind
from bot.scenarios import Difficulty, Scenario, Text
from bot.text import Language

Outcome = Literal["Order", "Advance", "Continuation", "No-sale"]


@dataclass(frozen=True)
class Rules:
    """Thresholds that the difficulty level sets."""

    start_trust: float
    problem_trust: float  # trust needed before the buyer admits a problem
    situation_limit: int  # Situation questions in a row before impatience


RULES: dict[Difficulty, Rules] = {
    "easy": Rules(0.6, 0.3, 5),
    "normal": Rules(0.5, 0.4, 4),
    "hard": Rules(0.4, 0.5, 3),
}
RAPPORT_GAIN, RAPPORT_MAX = 0.1, 3
PROGRESS_GAIN = 0.03
PITCH_PENALTY, INJECTION_PENALTY, IMPATIENCE_PENALTY = 0.15, 0.1, 0.05
@dataclass(frozen=True)
class CallState:
    """Everything the buyer knows about the call so far; saved with every turn."""

    scenario_id: str
    difficulty: Difficulty
    turn: int = 0
    trust: float = 0.5
    facts: tuple[str, ...] = ()
    implied: tuple[str, ...] = ()
    implications: dict[str, int] = field(default_factory=dict)
    explicit: tuple[str, ...] = ()
    objections: int = 0
    premature_pitches: int = 0
    rapport_moves: int = 0
    situation_streak: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys("SPINO", 0))
    line_cursor: dict[str, int] = field(default_factory=dict)
    focus: str | None = None
    outcome: Outcome | None = None

    @property
    def ended(self) -> bool:
        return self.outcome is not None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["facts"], data["implied"], data["explicit"] = list(self.facts), list(self.implied), list(self.explicit)
        data["trust"] = round(self.trust, 3)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CallState:
        known = cls.__dataclass_fields__
        values = {k: v for k, v in data.items() if k in known}
        for key in ("facts", "implied", "explicit"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)


def unfinished_outcome(state: CallState) -> Outcome:
    """How a call ends when the rep stops without asking for commitment."""
    return "Continuation" if state.explicit or state.implied else "No-sale"


def start(card: Scenario) -> CallState:
    return CallState(scenario_id=card.id, difficulty=card.difficulty, trust=RULES[card.difficulty].start_trust)


ReactionKind = Literal[
    "fact", "implied", "implication", "explicit", "objection", "benefit", "advance", "continuation",
    "no_sale", "rapport", "greeting", "vague", "nothing_more", "impatient", "premature_payoff",
    "not_yet", "deflect", "ack",
]


@dataclass(frozen=True)
class Reaction:
    """What the buyer does this turn: disclose a card text, or answer with a line of a kind."""

    kind: ReactionKind
    disclosure: Text | None = None
    unlocked: tuple[str, ...] = ()
    topic: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "unlocked": list(self.unlocked), "topic": self.topic}


def step(card: Scenario, state: CallState, reading: Reading) -> tuple[CallState, Reaction]:
    """The next state and the buyer's reaction to one read rep utterance."""
    if state.ended:
        raise ValueError("the call has ended")
    rules = RULES[card.difficulty]
    label = reading.label
    counts = dict(state.counts)
    if label in counts:
        counts[label] += 1
    state = replace(state, turn=state.turn + 1, counts=counts)
    streak = state.situation_streak + 1 if label == "S" else 0
    state = replace(state, situation_streak=streak)

    if reading.injection:
        return _trust(state, -INJECTION_PENALTY), Reaction("deflect")
    if label is None:
        # Ungraded (the LLM reader failed): unlock nothing rather than guess.
        return state, Reaction("vague")
    if reading.move in ("rapport", "greeting"):
        # Rule 7: a rapport question is O even when it asks for a fact; the buyer hears small talk.
        return _other(card, state, reading)
    if label == "S" and topic_kind(card, reading.topic) == "problem":
        # A fact asked about a problem ("how many wrong shipments a month?") touches the problem itself.
        return _problem(card, state, reading, rules)
    if label == "S":
        return _situation(card, state, reading, rules)
    if label == "P":
        return _problem(card, state, reading, rules)
    if label == "I":
        return _implication(card, state, reading)
    if label == "N":
        return _need_payoff(card, state, reading)
    return _other(card, state, reading)


def _trust(state: CallState, delta: float) -> CallState:
    return replace(state, trust=min(1.0, max(0.0, state.trust + delta)))


def _situation(card: Scenario, state: CallState, reading: Reading, rules: Rules) -> tuple[CallState, Reaction]:
    if state.situation_streak > rules.situation_limit:
        return _trust(state, -IMPATIENCE_PENALTY), Reaction("impatient")
    fact_id = reading.topic
    if fact_id is None or topic_kind(card, fact_id) != "fact":
        return state, Reaction("vague")
    if fact_id in state.facts:
        return state, Reaction("nothing_more", topic=fact_id)
    fact = card.fact(fact_id)
    return replace(state, facts=(*state.facts, fact_id)), Reaction(
        "fact", fact.reply, (f"fact:{fact_id}",), fact_id
    )


def _problem(card: Scenario, state: CallState, reading: Reading, rules: Rules) -> tuple[CallState, Reaction]:
    problem_id = reading.topic
    if problem_id is None or topic_kind(card, problem_id) != "problem":
        return state, Reaction("vague")
    if problem_id in state.implied:
        return state, Reaction("nothing_more", topic=problem_id)
    if state.trust < rules.problem_trust:
        return state, Reaction("not_yet", topic=problem_id)
    problem = card.problem(problem_id)
    state = replace(state, implied=(*state.implied, problem_id), focus=problem_id)
    return _trust(state, PROGRESS_GAIN), Reaction(
        "implied", problem.implied, (f"implied:{problem_id}",), problem_id
    )


def _implication(card: Scenario, state: CallState, reading: Reading) -> tuple[CallState, Reaction]:
    problem_id = reading.topic
    if problem_id is None or topic_kind(card, problem_id) != "problem":
        return state, Reaction("vague")
    if problem_id not in state.implied:
        return state, Reaction("not_yet", topic=problem_id)
    shown = state.implications.get(problem_id, 0)
    problem = card.problem(problem_id)
    if shown >= len(problem.implications):
        return state, Reaction("nothing_more", topic=problem_id)
    implications = {**state.implications, problem_id: shown + 1}
    state = replace(state, implications=implications, focus=problem_id)
    return _trust(state, PROGRESS_GAIN), Reaction(
        "implication", problem.implications[shown], (f"implication:{problem_id}:{shown + 1}",), problem_id
    )


def _need_payoff(card: Scenario, state: CallState, reading: Reading) -> tuple[CallState, Reaction]:
    if not state.implied:
        return state, Reaction("premature_payoff")
    problem_id = reading.topic
    if problem_id is None or problem_id not in state.implied or state.implications.get(problem_id, 0) == 0:
        # The value of a solution means nothing until the buyer has felt the problem's cost.
        return state, Reaction("premature_payoff", topic=problem_id)
    if problem_id in state.explicit:
        return state, Reaction("nothing_more", topic=problem_id)
    problem = card.problem(problem_id)
    state = replace(state, explicit=(*state.explicit, problem_id), focus=problem_id)
    return _trust(state, PROGRESS_GAIN), Reaction(
        "explicit", problem.need_payoff, (f"explicit:{problem_id}",), problem_id
    )


def _other(card: Scenario, state: CallState, reading: Reading) -> tuple[CallState, Reaction]:
    if reading.move == "pitch":
        if not state.explicit:
            state = replace(state, objections=state.objections + 1, premature_pitches=state.premature_pitches + 1)
            objection = card.objections[(state.objections - 1) % len(card.objections)]
            return _trust(state, -PITCH_PENALTY), Reaction("objection", objection)
        return state, Reaction("benefit")
    if reading.move == "commitment":
        return _commitment(card, state)
    if reading.move == "rapport":
        if state.rapport_moves < RAPPORT_MAX:
            state = _trust(replace(state, rapport_moves=state.rapport_moves + 1), RAPPORT_GAIN)
        return state, Reaction("rapport")
    if reading.move == "greeting":
        return state, Reaction("greeting")
    return state, Reaction("ack")


def _commitment(card: Scenario, state: CallState) -> tuple[CallState, Reaction]:
    needed = card.advance.requires_explicit_needs
    if len(state.explicit) >= needed:
        return replace(state, outcome="Advance"), Reaction("advance", card.advance.yes)
    if state.explicit or (state.implied and state.premature_pitches == 0 and card.need_state != "no_need"):
        return replace(state, outcome="Continuation"), Reaction("continuation", card.advance.continuation)
    return replace(state, outcome="No-sale"), Reaction("no_sale", card.advance.no_sale)


# --- offline speech -------------------------------------------------------------------------------

_LINE_FOR: dict[str, str] = {
    "benefit": "pitch",
    "rapport": "rapport",
    "greeting": "greeting",
    "vague": "vague",
    "nothing_more": "nothing_more",
    "impatient": "impatient",
    "premature_payoff": "premature_payoff",
    "not_yet": "not_yet",
    "deflect": "deflect",
    "ack": "ack",
}


def speak(card: Scenario, state: CallState, reaction: Reaction, language: Language) -> tuple[CallState, str]:
    """The offline buyer's words: the disclosed card text, or the next variant of a stock line.

    Variants rotate per kind, so the buyer never says the same stock line twice in a row.
    """
    if reaction.disclosure is not None:
        return state, reaction.disclosure(language)
    key = _LINE_FOR[reaction.kind]
    variants = card.lines[key]
    cursor = state.line_cursor.get(key, 0)
    text = variants[cursor % len(variants)](language)
    return replace(state, line_cursor={**state.line_cursor, key: cursor + 1}), text
