"""The buyer's conformance suite: scripted archetype calls and the outcome a trainer expects of each.

Dataset: `evals/data/roleplay/<card>.yaml` (lines per archetype and language, written for this suite and
kept out of every training set). Solver: a practice session plays the lines until the call ends.
Scorer: one check per archetype, from the table below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bot.config import EVALS_DIR
from bot.datasets import DataError
from bot.roleplay import CallState
from bot.scenarios import Scenario, Text
from bot.session import PracticeSession, TurnResult
from bot.text import Language

ROLEPLAY_DIR = EVALS_DIR / "data" / "roleplay"
Archetype = Literal[
    "skilled", "feature_dumper", "lazy_generic", "off_topic", "guessed_implications", "early_close",
    "situation_run", "repeats", "pitch_mixed",
]
ARCHETYPES: tuple[Archetype, ...] = get_args(Archetype)
LANGUAGES: tuple[Language, ...] = ("zh", "en")


class ScriptedCalls(BaseModel):
    """One card's archetype calls: archetype -> language -> rep lines."""

    model_config = ConfigDict(extra="forbid")
    card: str
    calls: dict[Archetype, dict[Language, list[str]]] = Field(min_length=1)


@dataclass(frozen=True)
class PlayedCall:
    card: Scenario
    archetype: Archetype
    language: Language
    turns: list[TurnResult]
    final: CallState
    start_trust: float

    def unlocked(self, prefix: str = "") -> list[str]:
        return [u for t in self.turns for u in t.reaction.unlocked if u.startswith(prefix)]

    def kinds(self) -> list[str]:
        return [t.reaction.kind for t in self.turns]


@dataclass(frozen=True)
class Expectation:
    """What a trainer expects of one archetype; `check` names what went wrong, or returns None."""

    expected: Text
    check: Callable[[PlayedCall], str | None]


def _won(call: PlayedCall) -> bool:
    return call.final.outcome in ("Advance", "Order")


def _ended_as(call: PlayedCall) -> str:
    return f"outcome {call.final.outcome}, explicit needs {list(call.final.explicit)}"


def _skilled(call: PlayedCall) -> str | None:
    return None if _won(call) else _ended_as(call)


def _feature_dumper(call: PlayedCall) -> str | None:
    return _ended_as(call) if call.final.explicit or call.final.outcome != "No-sale" else None


def _lazy(call: PlayedCall) -> str | None:
    return _ended_as(call) if call.final.explicit or _won(call) else None


def _nothing_unlocked(call: PlayedCall) -> str | None:
    unlocked = call.unlocked()
    return f"unlocked {unlocked}" if unlocked else None


def _no_problem_unlocked(call: PlayedCall) -> str | None:
    unlocked = [u for u in call.unlocked() if not u.startswith("fact:")]
    return f"unlocked {unlocked}" if unlocked else None


def _early_close(call: PlayedCall) -> str | None:
    kinds = call.kinds()
    if "pushback" not in kinds:
        return f"no pushback (reactions {kinds})"
    if kinds.index("pushback") == len(kinds) - 1 or call.turns[kinds.index("pushback")].state.ended:
        return "the call did not go on after the early close"
    return "won the call" if _won(call) else None


def _trust_falls(call: PlayedCall) -> str | None:
    if call.final.trust >= call.start_trust:
        return f"trust {call.start_trust:.2f} -> {call.final.trust:.2f}"
    return None


def _not_won(call: PlayedCall) -> str | None:
    return f"outcome {call.final.outcome}" if _won(call) else None


class _ExpectationTable(TypedDict):
    skilled: Expectation
    feature_dumper: Expectation
    lazy_generic: Expectation
    off_topic: Expectation
    guessed_implications: Expectation
    early_close: Expectation
    situation_run: Expectation
    repeats: Expectation
    pitch_mixed: Expectation


EXPECTATIONS: _ExpectationTable = {
    "skilled": Expectation(Text(zh="晋级或订单", en="Advance or Order"), _skilled),
    "feature_dumper": Expectation(Text(zh="未成交，没有明确需求", en="No-sale, no explicit need"), _feature_dumper),
    "lazy_generic": Expectation(Text(zh="没有明确需求，没有晋级", en="no explicit need, no Advance"), _lazy),
    "off_topic": Expectation(Text(zh="什么都没解锁", en="nothing unlocked"), _nothing_unlocked),
    "guessed_implications": Expectation(Text(zh="没有解锁任何难点", en="no problem unlocked"), _no_problem_unlocked),
    "early_close": Expectation(Text(zh="被推回，通话继续", en="pushback, the call goes on"), _early_close),
    "situation_run": Expectation(Text(zh="信任下降", en="trust falls"), _trust_falls),
    "repeats": Expectation(Text(zh="信任下降", en="trust falls"), _trust_falls),
    "pitch_mixed": Expectation(Text(zh="没有晋级", en="no Advance"), _not_won),
}


@dataclass(frozen=True)
class CallVerdict:
    card: str
    archetype: Archetype
    language: Language
    outcome: str
    trust: float
    failure: str | None

    @property
    def passed(self) -> bool:
        return self.failure is None


def load_scripts(directory: Path = ROLEPLAY_DIR) -> list[ScriptedCalls]:
    """Every card's scripted calls, or DataError naming the file and the field."""
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise DataError(f"{directory}: no scripted calls (*.yaml)")
    scripts = []
    for path in files:
        try:
            scripts.append(ScriptedCalls.model_validate(yaml.safe_load(path.read_text(encoding="utf-8"))))
        except yaml.YAMLError as exc:
            raise DataError(f"{path}: invalid YAML ({exc})") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            raise DataError(f"{path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    return scripts


def play(
    session: PracticeSession, archetype: Archetype, lines: Sequence[str]
) -> PlayedCall:
    """Plays the lines until the call ends; a call the rep never closes ends as `end()` does."""
    start_trust = session.state.trust
    turns = []
    for line in lines:
        if session.state.ended:
            break
        turns.append(session.play(line))
    final = session.end()
    return PlayedCall(session.card, archetype, session.language, turns, final, start_trust)


def verdict(call: PlayedCall) -> CallVerdict:
    failure = EXPECTATIONS[call.archetype].check(call)
    return CallVerdict(call.card.id, call.archetype, call.language, call.final.outcome or "-",
                       round(call.final.trust, 3), failure)


def run(
    new_session: Callable[[Scenario, Language], PracticeSession],
    cards: Callable[[str], Scenario],
    scripts: Sequence[ScriptedCalls] | None = None,
) -> Iterator[CallVerdict]:
    """Every scripted call of every card, in both languages, one verdict each."""
    for script in scripts if scripts is not None else load_scripts():
        card = cards(script.card)
        for archetype, by_language in script.calls.items():
            for language, lines in by_language.items():
                yield verdict(play(new_session(card, language), archetype, lines))
