"""Scenario cards (knowledge/scenarios/*.yaml): bilingual buyers for the role-play, validated on load."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bot.config import KNOWLEDGE_DIR
from bot.text import Language

SCENARIOS_DIR = KNOWLEDGE_DIR / "scenarios"
ValueType = Literal["intrinsic", "extrinsic", "strategic"]
SalesType = Literal["transactional", "consultative", "enterprise"]
NeedState = Literal["must_meet", "not_urgent", "not_discovered", "no_need"]
Difficulty = Literal["easy", "normal", "hard"]
DecisionRole = Literal["economic_buyer", "decision_maker", "influencer", "user", "gatekeeper"]
# The buyer's stock lines, by situation: a card words each one its own way (at least one variant).
LineKey = Literal[
    "greeting", "rapport", "vague", "nothing_more", "impatient", "premature_payoff", "unfelt", "not_yet",
    "sceptical", "insight", "benefit", "pushback", "walk_out", "deflect", "ack",
]
LINE_KEYS: tuple[LineKey, ...] = get_args(LineKey)
# The course pairs each customer value type with one sales type.
SALES_TYPE_FOR: dict[ValueType, SalesType] = {
    "intrinsic": "transactional", "extrinsic": "consultative", "strategic": "enterprise",
}


class ScenarioError(ValueError):
    """A card is malformed; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Text(_Strict):
    """One text in both languages."""

    zh: str = Field(min_length=1)
    en: str = Field(min_length=1)

    def __call__(self, language: Language) -> str:
        return self.zh if language == "zh" else self.en


class Buyer(_Strict):
    name: Text
    role: Text
    decision_role: DecisionRole
    personality: Text
    background: Text


class Fact(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    topic: Text
    reply: Text


class Problem(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    topic: Text
    implied: Text
    implications: list[Text] = Field(min_length=1, max_length=5)
    need_payoff: Text


class Advance(_Strict):
    requires_explicit_needs: int = Field(ge=1, le=4)
    yes: Text
    continuation: Text
    no_sale: Text
    order: Text | None = None  # transactional sales only: the buyer places the order then and there

    @model_validator(mode="before")
    @classmethod
    def _yaml_yes(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare `yes:` key as the boolean True.
        if isinstance(data, dict) and True in data:
            data = {("yes" if k is True else k): v for k, v in data.items()}
        return data


class Scenario(_Strict):
    """A scenario card: company, buyer, what each question type can unlock, how the call can end."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    title: Text
    industry: Text
    value_type: ValueType
    sales_type: SalesType
    need_state: NeedState
    difficulty: Difficulty
    seller: Text
    buyer: Buyer
    opening: Text
    facts: list[Fact] = Field(min_length=2)
    problems: list[Problem] = Field(min_length=2, max_length=4)
    objections: list[Text] = Field(min_length=1)
    advance: Advance
    lines: dict[str, list[Text]]  # keyed by LineKey; checked below so the error names the key

    @field_validator("lines")
    @classmethod
    def _all_lines(cls, lines: dict[str, list[Text]]) -> dict[str, list[Text]]:
        missing = [k for k in LINE_KEYS if not lines.get(k)]
        if missing:
            raise ValueError(f"missing reply lines: {', '.join(missing)}")
        unknown = sorted(set(lines) - set(LINE_KEYS))
        if unknown:
            raise ValueError(f"unknown reply lines: {', '.join(unknown)}")
        return lines

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        ids = [f.id for f in self.facts] + [p.id for p in self.problems]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate fact/problem ids: {', '.join(duplicates)}")
        if self.advance.requires_explicit_needs > len(self.problems):
            raise ValueError("advance.requires_explicit_needs is more than the number of problems")
        if (self.advance.order is not None) != (self.sales_type == "transactional"):
            raise ValueError("advance.order is for transactional sales, and a transactional card needs one")
        return self

    def coherence(self) -> list[str]:
        """What does not fit the card's value type, sales type and need state (empty when it all fits)."""
        problems: list[str] = []
        expected = SALES_TYPE_FOR[self.value_type]
        if self.sales_type != expected:
            problems.append(
                f"sales_type: the course pairs a {self.value_type}-value buyer with {expected} selling, "
                f"not {self.sales_type}"
            )
        needs = self.advance.requires_explicit_needs
        if self.sales_type == "transactional" and needs > 1:
            problems.append("advance.requires_explicit_needs: a transactional sale is won in a short call (1 need)")
        if self.sales_type != "transactional" and needs < 2:
            problems.append(
                f"advance.requires_explicit_needs: a {self.sales_type} sale needs at least 2 explicit needs"
            )
        if self.need_state == "no_need" and self.difficulty == "easy":
            problems.append("difficulty: a buyer with no need is not an easy call")
        return problems

    def problem(self, problem_id: str) -> Problem:
        return next(p for p in self.problems if p.id == problem_id)

    def fact(self, fact_id: str) -> Fact:
        return next(f for f in self.facts if f.id == fact_id)

    def summary(self) -> dict[str, str]:
        return {
            "id": self.id,
            "title": self.title.en,
            "title_zh": self.title.zh,
            "value_type": self.value_type,
            "sales_type": self.sales_type,
            "difficulty": self.difficulty,
            "need_state": self.need_state,
            "decision_role": self.buyer.decision_role,
        }


def load_card(path: Path) -> Scenario:
    """One card, or ScenarioError naming the file and the field."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        raise ScenarioError(f"{path}: {where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: a card must be a YAML mapping")
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "card"
        raise ScenarioError(f"{path}: {field}: {err['msg']}") from None
    if scenario.id != path.stem:
        raise ScenarioError(f"{path}: id: '{scenario.id}' must match the file name '{path.stem}'")
    return scenario


def load_all(directory: Path = SCENARIOS_DIR) -> list[Scenario]:
    paths = sorted(directory.glob("*.yaml")) if directory.is_dir() else [directory]
    if not paths:
        raise ScenarioError(f"{directory}: no scenario cards (*.yaml)")
    return [load_card(p) for p in paths]


@cache
def _builtin() -> dict[str, Scenario]:
    return {s.id: s for s in load_all(SCENARIOS_DIR)}


def get(scenario_id: str) -> Scenario:
    """A built-in card by id, or ScenarioError listing the ids there are."""
    cards = _builtin()
    if scenario_id not in cards:
        raise ScenarioError(f"unknown scenario '{scenario_id}': choose one of {', '.join(sorted(cards))}")
    return cards[scenario_id]


def builtin() -> list[Scenario]:
    return list(_builtin().values())
