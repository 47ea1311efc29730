"""The debrief after a call: SPIN mix against the research pattern, needs, pitches, outcome, rewrites."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from bot import prompts
from bot.grader import LABEL_NAMES, LABELS, Grader
from bot.llm import ChatModel, LLMError
from bot.roleplay import CallState, unfinished_outcome
from bot.scenarios import Scenario
from bot.text import Language
from bot.transcripts import Turn

# How bad a turn was, by the buyer's reaction: the worst ones are rewritten.
_WEAKNESS = {
    "objection": 5, "premature_payoff": 4, "impatient": 3, "not_yet": 3, "deflect": 2,
    "vague": 2, "nothing_more": 1,
}
LARGE_SALE_TYPES = ("consultative", "enterprise")


@dataclass(frozen=True)
class Rewrite:
    turn: int
    original: str
    original_label: str | None
    better: str
    label: str | None
    why: str


@dataclass
class Debrief:
    scenario_id: str
    language: Language
    turns: int
    counts: dict[str, int]
    mix: dict[str, float]
    timeline: list[str | None]
    implied: list[str]
    explicit: list[str]
    premature_pitches: int
    objections: int
    outcome: str
    pattern: list[str] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    advice: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def next_step(card: Scenario, state: CallState, language: Language) -> tuple[str, str]:
    """The next SPIN move toward a topic still locked, as (label, example question)."""
    zh = language == "zh"
    for problem in card.problems:
        if problem.id in state.implied and state.implications.get(problem.id, 0) == 0:
            topic = problem.topic(language)
            return "I", (f"{topic}这个问题，对成本、客户或者其他部门带来了什么影响？" if zh
                         else f"What effect does that ({topic}) have on your costs, customers or other teams?")
    for problem in card.problems:
        if problem.id in state.implied and problem.id not in state.explicit:
            topic = problem.topic(language)
            return "N", (f"如果{topic}的问题解决了，对您有什么帮助？" if zh
                         else f"If {topic} were solved, how would that help you?")
    for problem in card.problems:
        if problem.id not in state.implied:
            topic = problem.topic(language)
            return "P", (f"在{topic}这方面，现在有没有遇到什么困难？" if zh
                         else f"When it comes to {topic}, is anything causing you difficulty?")
    return "O", ("您看下一步我们能不能约个时间，把方案和相关负责人一起过一遍？" if zh
                 else "Would it make sense to set a date to walk through a proposal with the people involved?")


def build(
    card: Scenario,
    turns: Sequence[Turn],
    language: Language,
    *,
    outcome: str | None = None,
    grader: Grader | None = None,
) -> Debrief:
    """The offline debrief, from the saved turns (a live call's or a transcript's)."""
    counts: dict[str, int] = dict.fromkeys(LABELS, 0)
    for turn in turns:
        if turn.label in counts:
            counts[turn.label] += 1
    total = sum(counts.values()) or 1
    final = CallState.from_json(turns[-1].state) if turns else None
    debrief = Debrief(
        scenario_id=card.id,
        language=language,
        turns=len(turns),
        counts=counts,
        mix={k: round(v / total, 3) for k, v in counts.items()},
        timeline=[t.label for t in turns],
        implied=[card.problem(p).topic(language) for p in (final.implied if final else ())],
        explicit=[card.problem(p).topic(language) for p in (final.explicit if final else ())],
        premature_pitches=final.premature_pitches if final else 0,
        objections=final.objections if final else 0,
        outcome=outcome or (final.outcome or unfinished_outcome(final) if final else "No-sale"),
    )
    debrief.pattern = _pattern(card, debrief, language)
    debrief.rewrites = _rewrites(card, turns, language, grader)
    debrief.advice = _advice(debrief, language)
    return debrief


def _pattern(card: Scenario, d: Debrief, language: Language) -> list[str]:
    zh = language == "zh"
    asked = sum(d.counts[k] for k in "SPIN") or 1
    share = {k: d.counts[k] / asked for k in "SPIN"}
    notes = []
    if card.sales_type in LARGE_SALE_TYPES:
        notes.append("这是大生意：研究显示成功的拜访多问暗示问题和需求-效益问题，少问背景问题。" if zh else
                     "This is a large sale: in the research, successful calls ask more Implication and "
                     "Need-payoff questions and fewer Situation questions.")
    if share["S"] > 0.4:
        notes.append(f"背景问题占 {share['S']:.0%}，偏多；事先做功课，把时间留给难点和暗示问题。" if zh else
                     f"Situation questions were {share['S']:.0%} of your questions: too many. Do the homework "
                     "beforehand and spend the time on Problem and Implication questions.")
    if share["I"] + share["N"] < 0.35:
        notes.append(f"暗示和需求-效益问题只占 {share['I'] + share['N']:.0%}；发现难点后要追问后果，再请客户说出价值。"
                     if zh else
                     f"Implication and Need-payoff questions were only {share['I'] + share['N']:.0%}: once a "
                     "problem is out, ask about its consequences, then let the buyer state the value.")
    else:
        notes.append(f"暗示和需求-效益问题占 {share['I'] + share['N']:.0%}，符合大生意的成功模式。" if zh else
                     f"Implication and Need-payoff questions made up {share['I'] + share['N']:.0%}: "
                     "the pattern of successful large-sale calls.")
    if d.premature_pitches:
        notes.append(f"在客户说出明确需求之前介绍了 {d.premature_pitches} 次产品，引来了异议。" if zh else
                     f"You pitched {d.premature_pitches} time(s) before the buyer stated an explicit need, "
                     "which drew objections.")
    return notes


def _rewrites(card: Scenario, turns: Sequence[Turn], language: Language, grader: Grader | None) -> list[Rewrite]:
    scored = []
    for index, turn in enumerate(turns):
        kind = str(turn.reaction.get("kind", ""))
        weakness = _WEAKNESS.get(kind, 1 if turn.label == "S" and kind == "fact" else 0)
        if weakness:
            scored.append((weakness, index))
    chosen = sorted(sorted(scored, key=lambda x: (-x[0], x[1]))[:3], key=lambda x: x[1])
    rewrites: list[Rewrite] = []
    for _, index in chosen:
        turn = turns[index]
        before = CallState.from_json(turns[index - 1].state) if index else _initial(card)
        suggested_label, better = next_step(card, before, language)
        label: str | None = suggested_label
        if turn.better_question:
            better, label = turn.better_question, None
        if grader is not None:
            label = grader.grade(better, f"buyer: {turns[index - 1].buyer}" if index else "").label
        why = str(turn.reaction.get("kind", ""))
        if any(r.better == better for r in rewrites):
            continue
        rewrites.append(Rewrite(turn.turn, turn.rep, turn.label, better, label, why))
    return rewrites


def _initial(card: Scenario) -> CallState:
    from bot.roleplay import start

    return start(card)


def _advice(d: Debrief, language: Language) -> str:
    zh = language == "zh"
    names = LABEL_NAMES[language]
    mix = "、".join(f"{names[k]} {d.counts[k]}" for k in LABELS) if zh else ", ".join(
        f"{names[k]} {d.counts[k]}" for k in LABELS
    )
    if zh:
        return (f"结果：{_OUTCOMES_ZH.get(d.outcome, d.outcome)}。提问分布：{mix}。"
                f"发现隐含需求 {len(d.implied)} 个，发展成明确需求 {len(d.explicit)} 个。")
    return (f"Outcome: {d.outcome}. Questions: {mix}. Implied needs uncovered: {len(d.implied)}; "
            f"developed into explicit needs: {len(d.explicit)}.")


_OUTCOMES_ZH = {"Order": "订单", "Advance": "晋级", "Continuation": "延续", "No-sale": "未成交"}


def outcome_name(outcome: str, language: Language) -> str:
    return _OUTCOMES_ZH.get(outcome, outcome) if language == "zh" else outcome


class _LLMRewrite(BaseModel):
    turn: int
    better: str = Field(min_length=1, max_length=400)
    label: Literal["S", "P", "I", "N", "O"]


class _LLMDebrief(BaseModel):
    advice: str = Field(min_length=1, max_length=2000)
    rewrites: list[_LLMRewrite] = Field(max_length=3)


def with_llm(d: Debrief, card: Scenario, turns: Sequence[Turn], model: ChatModel) -> Debrief:
    """The LLM writes the coaching text and rewrites from the computed figures; offline ones stay on failure."""
    transcript = "\n".join(f"{t.turn}. [{t.label or '-'}] Rep: {t.rep}\n   Buyer: {t.buyer}" for t in turns)
    messages = prompts.render(
        "debrief",
        language_name="Simplified Chinese" if d.language == "zh" else "English",
        scenario=f"{card.title(d.language)} ({card.sales_type} sale, {card.value_type} value customer)",
        figures=json.dumps(
            {k: v for k, v in d.to_json().items() if k not in ("rewrites", "advice", "timeline")},
            ensure_ascii=False,
        ),
        weakest=", ".join(str(r.turn) for r in d.rewrites) or "(none)",
        transcript=transcript,
    )
    try:
        reply = model.complete_json(messages, _LLMDebrief, temperature=0.3)
    except LLMError:
        return d
    by_turn = {t.turn: t for t in turns}
    rewrites = [
        Rewrite(r.turn, by_turn[r.turn].rep, by_turn[r.turn].label, r.better, r.label, "llm")
        for r in reply.rewrites
        if r.turn in by_turn
    ]
    d.advice = reply.advice
    d.rewrites = rewrites or d.rewrites
    return d


def markdown(d: Debrief) -> str:
    """The debrief as Markdown, in the call's language."""
    zh = d.language == "zh"
    names = LABEL_NAMES[d.language]
    lines = [f"## {'复盘' if zh else 'Debrief'}", "", d.advice, ""]
    lines += [f"| {'类型' if zh else 'type'} | {'次数' if zh else 'count'} | {'占比' if zh else 'share'} |",
              "|---|---|---|"]
    lines += [f"| {k} {names[k]} | {d.counts[k]} | {d.mix[k]:.0%} |" for k in LABELS]
    lines += ["", *[f"- {note}" for note in d.pattern], ""]
    lines.append(f"**{'隐含需求' if zh else 'Implied needs'}**: {'; '.join(d.implied) or '-'}\n")
    lines.append(f"**{'明确需求' if zh else 'Explicit needs'}**: {'; '.join(d.explicit) or '-'}\n")
    lines.append(f"**{'过早介绍产品' if zh else 'Premature pitches'}**: {d.premature_pitches}")
    if d.rewrites:
        lines += ["", f"### {'可以问得更好的问题' if zh else 'Questions to ask better'}"]
        for r in d.rewrites:
            lines.append(f"- #{r.turn} ({r.original_label or '-'}) {r.original}")
            lines.append(f"  → ({r.label or '?'}) **{r.better}**")
    return "\n".join(lines) + "\n"
