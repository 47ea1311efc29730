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
from bot.roleplay import CallState, spec_of, unfinished_outcome
from bot.scenarios import Scenario, Text
from bot.text import Language
from bot.transcripts import Turn

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
    ending: list[str] = field(default_factory=list)  # why the call ended as it did, headline first
    pattern: list[str] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    advice: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def next_step(card: Scenario, state: CallState, language: Language) -> tuple[str, str]:
    """The next SPIN move as (label, example question). It names only what the buyer has already
    said: a hint teaches the kind of question, never the card's locked answers."""
    zh = language == "zh"
    if len(state.explicit) >= card.advance.requires_explicit_needs:
        if card.advance.order is not None:
            return "O", ("您看按刚才说的，我们今天把订单和交货时间定下来？" if zh
                         else "Based on what we've discussed, shall we settle the order and delivery date today?")
        return "O", ("您看下周我带方案到现场，请相关负责人一起看一下，可以吗？" if zh
                     else "Could I bring a proposal to your site next week and go through it with the people involved?")
    for problem_id in state.implied:
        if not state.implications.get(problem_id):
            topic = card.problem(problem_id).topic(language)
            return "I", (f"您刚才提到{topic}，这对成本、客户或者其他部门带来了什么影响？" if zh
                         else f"You mentioned {topic}. What does that do to your costs, customers or other teams?")
    for problem_id in state.implied:
        if problem_id not in state.explicit:
            topic = card.problem(problem_id).topic(language)
            # The topic is the card's phrase ("carpenters hard to hire and labour costs rising"): quoted
            # back as what he said, not fitted into the sentence.
            return "N", (f"您刚才提到{topic}。如果这件事解决了，对您有什么帮助？" if zh
                         else f"You mentioned {topic}. If that were sorted out, how would it help you?")
    if state.facts:
        topic = card.fact(state.facts[-1]).topic(language)
        return "P", (f"说到{topic}，这方面有没有让您不太满意、或者比较费劲的地方？" if zh
                     else f"On {topic}: is anything there causing you difficulty or dissatisfaction?")
    # Nothing said yet: a Situation question about the work the rep's offer touches, in general words.
    return "S", ("您这边这块工作现在具体是怎么做的？大概是什么规模？" if zh
                 else "How does your team handle this part of the work today, and at what scale?")


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
    debrief.ending = _ending(card, turns, final, debrief.outcome, language)
    debrief.pattern = _pattern(card, debrief, language)
    debrief.rewrites = _rewrites(card, turns, language, grader)
    debrief.advice = _advice(debrief, language)
    return debrief


def _pattern(card: Scenario, d: Debrief, language: Language) -> list[str]:
    """The SPIN mix judged for this kind of sale and against how the call ended, never alone."""
    zh = language == "zh"
    asked = sum(d.counts[k] for k in "SPIN") or 1
    share = {k: d.counts[k] / asked for k in "SPIN"}
    developing = share["I"] + share["N"]
    large = card.sales_type in LARGE_SALE_TYPES
    won = d.outcome in ("Advance", "Order")
    notes = []
    if large:
        notes.append("这是大生意：研究显示成功的拜访多问暗示问题和需求-效益问题，少问背景问题。" if zh else
                     "This is a large sale: in the research, successful calls ask more Implication and "
                     "Need-payoff questions and fewer Situation questions.")
    else:
        notes.append("这是小额的交易型销售：客户要的是一次高效的拜访，谈清价格和省事，长时间的调查反而让客户不耐烦。"
                     if zh else
                     "This is a small, transactional sale: the buyer wants an efficient call about price and "
                     "hassle, and a long investigation tries their patience.")
    if share["S"] > 0.4:
        notes.append(f"背景问题占 {share['S']:.0%}，偏多；事先做功课，把时间留给难点和暗示问题。" if zh else
                     f"Situation questions were {share['S']:.0%} of your questions: too many. Do the homework "
                     "beforehand and spend the time on Problem and Implication questions.")
    if developing < 0.35 and large:
        notes.append(f"暗示和需求-效益问题只占 {developing:.0%}；发现难点后要追问后果，再请客户说出价值。"
                     if zh else
                     f"Implication and Need-payoff questions were only {developing:.0%}: once a "
                     "problem is out, ask about its consequences, then let the buyer state the value.")
    elif d.explicit and won:
        if zh:
            praise = "，符合大生意的成功模式。" if large else "。"
            notes.append(f"暗示和需求-效益问题占 {developing:.0%}，把难点发展成了明确需求{praise}")
        else:
            praise = ": the pattern of successful large-sale calls." if large else "."
            notes.append(f"Implication and Need-payoff questions made up {developing:.0%} and turned problems "
                         f"into explicit needs{praise}")
    elif d.explicit:
        # A good share that did not win is not praise: the debrief says what was missing.
        needed = card.advance.requires_explicit_needs
        notes.append(f"暗示和需求-效益问题占 {developing:.0%}，发展出 {len(d.explicit)} 个明确需求，"
                     f"但还不足以让这位客户承诺（需要 {needed} 个）。" if zh else
                     f"Implication and Need-payoff questions made up {developing:.0%} and developed "
                     f"{len(d.explicit)} explicit need(s), not yet enough for this buyer to commit "
                     f"({needed} needed).")
    elif developing > 0:
        # The share alone proves nothing: these questions only count when they develop a real problem.
        notes.append(f"暗示和需求-效益问题占 {developing:.0%}，但没有落在客户承认的难点上，"
                     "一个明确需求也没有形成。" if zh else
                     f"Implication and Need-payoff questions made up {developing:.0%}, but they did "
                     "not build on a problem the buyer had admitted, so no explicit need came of them.")
    if d.premature_pitches:
        notes.append(f"在客户说出明确需求之前介绍了 {d.premature_pitches} 次产品，引来了异议。" if zh else
                     f"You pitched {d.premature_pitches} time(s) before the buyer stated an explicit need, "
                     "which drew objections.")
    return notes


def _ending(
    card: Scenario, turns: Sequence[Turn], final: CallState | None, outcome: str, language: Language
) -> list[str]:
    """Why the call ended as it did: the headline, then what led there."""
    kinds = [str(t.reaction.get("kind", "")) for t in turns]
    last = kinds[-1] if kinds else ""
    needed = card.advance.requires_explicit_needs
    implied = len(final.implied) if final else 0
    explicit = len(final.explicit) if final else 0
    if outcome in ("Advance", "Order"):
        return [Text(
            zh=f"客户同意了具体的下一步：客户说出了 {explicit} 个明确需求，而你提议的行动需要客户投入时间或人手。",
            en=f"The buyer agreed to a concrete next step: the buyer had stated {explicit} explicit need(s), and "
            "your proposal asked for their time or people.",
        )(language)]
    reasons: list[Text] = []
    if last == "walk_out":
        reasons.append(Text(zh="客户的信任耗尽，提前结束了会面。",
                            en="The buyer's trust ran out and the buyer ended the meeting."))
    elif last == "continuation" and explicit >= needed:
        reasons.append(Text(
            zh="需求已经足够，但结束时请求的承诺太弱（比如发资料、下周再联系），客户不用付出任何行动。",
            en="There were enough explicit needs, but the close asked for nothing concrete (a brochure, a call "
            "next week), so the buyer committed to nothing.",
        ))
    elif last == "no_sale" and explicit == 0:
        reasons.append(Text(zh="你请求了承诺，但客户一个明确需求都没有说出来，只能拒绝。",
                            en="You asked for a commitment before the buyer had stated a single need: declined."))
    elif last in ("continuation", "no_sale") and "pushback" in kinds:
        reasons.append(Text(zh="多次过早请求承诺，客户结束了会面。",
                            en="You kept asking for commitment too early, and the buyer ended the meeting."))
    elif last == "pushback":
        reasons.append(Text(
            zh=f"最后一次请求承诺来得太早：客户只说出了 {explicit} 个明确需求，这位客户需要 {needed} 个，"
            "通话就此结束。",
            en=f"Your last close came too early: the buyer had stated {explicit} explicit need(s) and this buyer "
            f"needs {needed}; the call ended there.",
        ))
    elif last not in ("continuation", "no_sale"):
        reasons.append(Text(zh="通话结束时没有请求承诺。", en="The call ended without asking for a commitment."))
    played_down, vague = kinds.count("not_yet"), kinds.count("vague")
    if implied == 0 and played_down:
        reasons.append(Text(
            zh=f"客户对 {played_down} 个问题轻描淡写：信任还不够时就问难点，或者猜测了客户没提过的问题的后果。",
            en=f"The buyer played down {played_down} question(s): problems asked before the buyer trusted you, or "
            "consequences of problems the buyer had never mentioned.",
        ))
    elif implied == 0 and vague:
        reasons.append(Text(
            zh=f"有 {vague} 个问题没有指向客户业务里的具体事情，一个难点也没发现。",
            en=f"{vague} question(s) were about nothing specific in the buyer's business, so no problem came out.",
        ))
    elif implied == 0:
        reasons.append(Text(zh="没有问难点问题，客户一个难点也没承认。",
                            en="No Problem questions were asked, so the buyer admitted no difficulty."))
    elif explicit < needed:
        reasons.append(Text(
            zh=f"需求停留在隐含阶段：发现了 {implied} 个难点，只有 {explicit} 个发展成明确需求，"
            f"这位客户需要 {needed} 个。",
            en=f"Needs stayed implied: {implied} problem(s) came out but only {explicit} became explicit needs; "
            f"this buyer needs {needed}.",
        ))
    if final and final.premature_pitches:
        reasons.append(Text(
            zh=f"在明确需求之前介绍了 {final.premature_pitches} 次产品，每次都消耗了信任。",
            en=f"You pitched {final.premature_pitches} time(s) before any explicit need, and each cost trust.",
        ))
    if "impatient" in kinds or "nothing_more" in kinds:
        reasons.append(Text(zh="背景问题太多或重复提问，客户失去了耐心。",
                            en="Too many basic or repeated questions cost the buyer's patience."))
    return [reason(language) for reason in reasons]


def _rewrites(card: Scenario, turns: Sequence[Turn], language: Language, grader: Grader | None) -> list[Rewrite]:
    scored = []
    for index, turn in enumerate(turns):
        kind = str(turn.reaction.get("kind", ""))
        spec = spec_of(kind)
        weakness = spec.weakness if spec is not None else 0
        if kind == "fact" and turn.label == "S":
            weakness = 1  # a Situation question could often have been homework
        if weakness:
            scored.append((weakness, index))
    chosen = sorted(sorted(scored, key=lambda x: (-x[0], x[1]))[:3], key=lambda x: x[1])
    rewrites: list[Rewrite] = []
    for _, index in chosen:
        turn = turns[index]
        before = CallState.from_json(turns[index - 1].state) if index else _initial(card)
        suggested_label, better = next_step(card, before, language)
        if suggested_label == turn.label and not turn.better_question:
            continue  # no better kind of question to offer at that moment
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
    if d.ending:
        lines += [f"**{'为什么是这个结果' if zh else 'Why it ended this way'}**", "",
                  *[f"- {reason}" for reason in d.ending], ""]
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
