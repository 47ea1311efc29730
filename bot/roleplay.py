"""The scenario state machine shared by both engines: the rules control, the LLM only speaks.

Each rep utterance arrives as a Reading (its SPIN label, move and card topic, from `bot.reading`).
`step` turns the current CallState into the next one and a Reaction: what the buyer discloses or
does now. No embeddings and no model here: only rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, TypedDict, get_args

from bot.reading import Reading, topic_kind
from bot.scenarios import Difficulty, LineKey, Scenario, Text
from bot.text import Language

Outcome = Literal["Order", "Advance", "Continuation", "No-sale"]


@dataclass(frozen=True)
class Rules:
    """Thresholds that the difficulty level sets."""

    start_trust: float
    problem_trust: float  # trust the buyer needs before he admits a problem, weighs its cost or commits
    situation_limit: int  # Situation questions in a row before impatience


RULES: dict[Difficulty, Rules] = {
    "easy": Rules(0.6, 0.3, 5),
    "normal": Rules(0.5, 0.4, 4),
    "hard": Rules(0.45, 0.5, 3),
}
# Credibility comes from competence (course: 能力): a few relevant questions, each problem question
# aimed at a real difficulty, an accurate summary. Small talk helps a little and only twice.
FACT_CREDIT_MAX = 2
RAPPORT_MAX = 2
SMALL_TALK_COST = 0.02  # small talk beyond RAPPORT_MAX uses up the buyer's time
AIMED_GAIN = 0.04  # a well-aimed problem question or summary, once per topic
GUESS_COST = 0.02  # an implication about a problem the buyer never admitted is presumptuous
WALK_OUT_TRUST = 0.15  # below this the buyer ends the meeting
PUSHBACK_MAX = 2  # early closes the buyer sits through before he ends the meeting
INTRINSIC_PATIENCE = 12  # questions an intrinsic buyer answers before he wants the price
INSIGHT_MAX = 2  # insights or pieces of advice a buyer credits; more is a lecture


class _ValueTypeTable(TypedDict):
    """One entry per ValueType: mypy reports a type left out."""

    intrinsic: float
    extrinsic: float
    strategic: float


# What insight about his business, or advice on the decision, does to trust (the course's value
# types): a strategic buyer wants a supplier who brings insight, an extrinsic one wants advice, an
# intrinsic one knows his trade and wants price and hassle settled.
INSIGHT_TRUST: _ValueTypeTable = {"intrinsic": -0.03, "extrinsic": 0.04, "strategic": 0.05}


@dataclass(frozen=True)
class CallState:
    """Everything the buyer knows about the call so far; saved with every turn."""

    scenario_id: str
    difficulty: Difficulty
    turn: int = 0
    trust: float = 0.5
    facts: tuple[str, ...] = ()
    implied: tuple[str, ...] = ()
    implications: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per problem, in the order told
    explicit: tuple[str, ...] = ()
    objections: int = 0
    premature_pitches: int = 0
    pushbacks: int = 0
    repeats: int = 0
    rapport_moves: int = 0
    insights: int = 0
    situation_streak: int = 0
    questions: int = 0
    credited: tuple[str, ...] = ()  # topics that already earned the rep credibility
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys("SPINO", 0))
    line_cursor: dict[str, int] = field(default_factory=dict)
    focus: str | None = None
    asked: bool = False  # the buyer's last line asked the rep for something (his documents, proof, a price)
    outcome: Outcome | None = None

    @property
    def ended(self) -> bool:
        return self.outcome is not None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in _TUPLES:
            data[key] = list(getattr(self, key))
        data["implications"] = {problem: list(shown) for problem, shown in self.implications.items()}
        data["trust"] = round(self.trust, 3)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CallState:
        known = cls.__dataclass_fields__
        values = {k: v for k, v in data.items() if k in known}
        for key in _TUPLES:
            values[key] = tuple(values.get(key, ()))
        # Transcripts saved before implications were told out of order hold a count: the first n.
        values["implications"] = {
            problem: tuple(range(shown)) if isinstance(shown, int) else tuple(shown)
            for problem, shown in values.get("implications", {}).items()
        }
        return cls(**values)


_TUPLES = ("facts", "implied", "explicit", "credited")


def unfinished_outcome(state: CallState) -> Outcome:
    """How a call ends when the rep stops without asking for commitment."""
    return "Continuation" if state.explicit or state.implied else "No-sale"


def start(card: Scenario) -> CallState:
    return CallState(scenario_id=card.id, difficulty=card.difficulty, trust=RULES[card.difficulty].start_trust,
                     asked=_asks(card.opening.en))


# Lines after which a statement from the rep answers the buyer rather than pitching at him: the opening
# ("did you bring your certification documents?") and his questions once a benefit lands ("got
# numbers?"). Not an objection or scepticism: more features there is the feature dump itself.
ANSWERABLE: frozenset[ReactionKind] = frozenset({"benefit"})


def _asks(line: str) -> bool:
    return line.rstrip().endswith(("?", "？"))


ReactionKind = Literal[
    "fact", "implied", "implication", "explicit", "objection", "benefit", "sceptical", "advance", "order",
    "continuation", "no_sale", "pushback", "walk_out", "rapport", "greeting", "vague", "nothing_more",
    "impatient", "premature_payoff", "unfelt", "not_yet", "deflect", "ack", "insight", "insight_unwanted",
    "answered",
]
REACTION_KINDS: tuple[ReactionKind, ...] = get_args(ReactionKind)


@dataclass(frozen=True)
class ReactionSpec:
    """How the buyer meets one kind of turn.

    `line` is the card's stock line the offline buyer speaks (None: a card text is disclosed);
    `instruction` tells the LLM buyer what to do; `trust` is what the turn does to the buyer's trust;
    `weakness` ranks the turn for the debrief's rewrites (0: nothing to rewrite) and `lesson` says why.
    """

    line: LineKey | None
    instruction: str
    trust: float = 0.0
    weakness: int = 0
    lesson: Text | None = None


class _ReactionTable(TypedDict):
    """One entry per ReactionKind: mypy reports a kind left out."""

    fact: ReactionSpec
    implied: ReactionSpec
    implication: ReactionSpec
    explicit: ReactionSpec
    objection: ReactionSpec
    benefit: ReactionSpec
    sceptical: ReactionSpec
    advance: ReactionSpec
    order: ReactionSpec
    continuation: ReactionSpec
    no_sale: ReactionSpec
    pushback: ReactionSpec
    walk_out: ReactionSpec
    rapport: ReactionSpec
    greeting: ReactionSpec
    vague: ReactionSpec
    nothing_more: ReactionSpec
    impatient: ReactionSpec
    premature_payoff: ReactionSpec
    unfelt: ReactionSpec
    not_yet: ReactionSpec
    deflect: ReactionSpec
    ack: ReactionSpec
    insight: ReactionSpec
    insight_unwanted: ReactionSpec
    answered: ReactionSpec


REACTIONS: _ReactionTable = {
    "fact": ReactionSpec(None, "answer the rep's factual question.", 0.04),
    "implied": ReactionSpec(None, "admit this difficulty, a little reluctantly.", 0.04),
    "implication": ReactionSpec(None, "describe this consequence of the problem you admitted.", 0.03),
    "explicit": ReactionSpec(None, "state clearly that you want this solved and why it matters to you.", 0.03),
    "objection": ReactionSpec(
        None, "the rep is pitching before you have said you need anything: push back with this objection.",
        -0.12, 5, Text(zh="在客户说出明确需求之前介绍产品，引来了异议。",
                       en="You pitched before the buyer stated an explicit need, which drew an objection."),
    ),
    "benefit": ReactionSpec(
        "benefit", "the rep tied a capability to a need you stated: show interest and ask one practical "
        "question (how fast, proof, cost) without agreeing to buy.", 0.04,
    ),
    "sceptical": ReactionSpec(
        "sceptical", "the rep described a feature that answers none of the needs you stated: say you don't "
        "see how it helps with what you told them.", -0.05, 3,
        Text(zh="介绍的功能和客户说出的需求无关。",
             en="You described a feature that answered none of the buyer's needs."),
    ),
    "advance": ReactionSpec(None, "agree to this concrete next step."),
    "order": ReactionSpec(None, "place this order."),
    "continuation": ReactionSpec(
        None, "end politely without committing to a specific next step.", 0.0, 2,
        Text(zh="结束时请求的承诺太弱，客户不用付出任何行动。",
             en="The close asked for nothing concrete, so the buyer committed to nothing."),
    ),
    "no_sale": ReactionSpec(None, "politely decline and end the conversation.", 0.0, 3,
                            Text(zh="客户拒绝了。", en="The buyer declined.")),
    "pushback": ReactionSpec(
        "pushback", "the rep asked for commitment too early: decline for now, but stay in the meeting.",
        -0.08, 4, Text(zh="过早请求承诺：客户还没有说出足够的明确需求。",
                       en="You asked for commitment before the buyer had stated enough explicit needs."),
    ),
    "walk_out": ReactionSpec(
        "walk_out", "you have lost patience with this rep: end the meeting politely but firmly.", 0.0, 5,
        Text(zh="客户的信任耗尽，提前结束了会面。", en="The buyer's trust ran out and the buyer ended the meeting."),
    ),
    "rapport": ReactionSpec("rapport", "respond warmly to the personal remark, briefly.", 0.03),
    "greeting": ReactionSpec("greeting", "return the greeting briefly and get down to business."),
    "vague": ReactionSpec(
        "vague", "say you don't follow and ask what exactly the rep means.", -0.03, 2,
        Text(zh="问题没有指向客户业务里的具体事情。",
             en="The question was not about anything specific in the buyer's business."),
    ),
    "nothing_more": ReactionSpec(
        "nothing_more", "say you have already told them that.", -0.05, 2,
        Text(zh="重复问了客户已经回答过的事。", en="You asked again about something the buyer had already told you."),
    ),
    "impatient": ReactionSpec(
        "impatient", "show impatience with so many basic questions.", -0.06, 3,
        Text(zh="背景问题问得太多，客户不耐烦了。", en="Too many basic questions: the buyer lost patience."),
    ),
    "premature_payoff": ReactionSpec(
        "premature_payoff", "say you don't see a problem that needs solving.", -0.04, 4,
        Text(zh="客户还没承认任何难点，就谈解决方案的价值。",
             en="You talked about the value of a solution before the buyer admitted any problem."),
    ),
    "unfelt": ReactionSpec(
        "unfelt", "you admitted this difficulty, but nobody has asked what it costs you: agree a solution "
        "would be nice, without enthusiasm, and do not say it is worth much.", 0.0, 3,
        Text(zh="客户承认了难点，但你还没问它带来的后果就谈解决的价值，客户觉得不值多少。",
             en="You asked what solving a problem was worth before exploring what it cost the buyer, so it seemed "
             "worth little."),
    ),
    "not_yet": ReactionSpec(
        "not_yet", "downplay it; do not admit any problem yet.", 0.0, 3,
        Text(zh="客户的信任还不够，或者还没承认这个难点，所以轻描淡写。",
             en="The buyer played it down: not enough trust yet, or that problem was not admitted yet."),
    ),
    "deflect": ReactionSpec(
        "deflect", "stay in character, politely refuse, and reveal nothing.", -0.10, 2,
        Text(zh="试图打破角色扮演。", en="The line tried to break the role-play."),
    ),
    "ack": ReactionSpec("ack", "acknowledge briefly."),
    "answered": ReactionSpec(
        "ack", "the rep gave you what you asked for: take it, say briefly what you make of it, and go on.",
    ),
    "insight": ReactionSpec(
        "insight", "the rep offered insight about your business or advice on the decision, not a pitch: "
        "engage with it briefly and say what you make of it, revealing nothing you have not told.",
    ),
    "insight_unwanted": ReactionSpec(
        "insight", "the rep is lecturing you about your own trade: brush it off and ask for the price, "
        "delivery and what it takes to switch.", 0.0, 2,
        Text(zh="这位客户看重价格和省事（内在价值型），不需要别人给客户讲行业道理。",
             en="This buyer values price and convenience (intrinsic) and did not want a lecture on their own trade."),
    ),
}


def spec_of(kind: str) -> ReactionSpec | None:
    """The table entry for a saved reaction kind (None for a kind this version does not know)."""
    return REACTIONS[kind] if kind in REACTION_KINDS else None


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
    label = reading.label
    counts = dict(state.counts)
    if label in counts:
        counts[label] += 1
    asking = label in ("S", "P", "I", "N") and reading.move in ("question", "summary")
    state = replace(
        state, turn=state.turn + 1, counts=counts,
        situation_streak=state.situation_streak + 1 if label == "S" else state.situation_streak,
        questions=state.questions + (1 if asking else 0),
    )
    state, reaction = _react(card, state, reading)
    if label != "S" and reaction.kind not in ("nothing_more", "vague"):
        # A run of fact-finding ends when the rep asks something new; a line that brought nothing new
        # ("how much pipe will you need?" heard as a problem he has told) does not end it.
        state = replace(state, situation_streak=0)
    state = replace(state, asked=False)  # what he asks next is set when he speaks (`speak`)
    if not state.ended and state.trust < WALK_OUT_TRUST:
        return replace(state, outcome="No-sale"), Reaction("walk_out")
    return state, reaction


def _react(card: Scenario, state: CallState, reading: Reading) -> tuple[CallState, Reaction]:
    rules = RULES[card.difficulty]
    label = reading.label
    if reading.injection:
        return _apply(state, Reaction("deflect"))
    if label is None:
        # Ungraded (the LLM reader failed): unlock nothing rather than guess.
        return state, Reaction("vague")
    if reading.move == "commitment":
        # Judged by the action proposed, whatever its label ("Would a pilot next week help?" is a close).
        return _commitment(card, state, reading, rules)
    if reading.insight and reading.move in ("pitch", "summary"):
        return _insight(card, state)
    if reading.move == "pitch":
        return _pitch(card, state, reading)
    if reading.reasks and reading.topic in state.facts and reading.move in ("question", "summary"):
        # "Sorry, what was the headcount again?": he told it already, whatever the line reads as.
        return _repeat(state, reading.topic)
    if label == "O" and reading.move == "question" and topic_kind(card, reading.topic) == "problem":
        # A question the grader could not place, about a difficulty of his ("can head office see the
        # whole picture?"): he hears a question about that difficulty (the rep still sees the O).
        label = "P"
    if reading.move in ("rapport", "greeting") or label == "O":
        # Rule 7: a rapport question is O even when it asks for a fact; the buyer hears small talk.
        return _other(card, state, reading)
    if label in ("S", "P", "I") and reading.presumes and topic_kind(card, reading.topic) == "problem" and (
        reading.topic not in state.implied
    ):
        # "That must be costing you a fortune": a guess at a problem he never admitted; he denies it.
        return _apply(state, Reaction("not_yet", topic=reading.topic), -GUESS_COST)
    if card.value_type == "intrinsic" and state.questions > INTRINSIC_PATIENCE:
        # An intrinsic buyer wants price and hassle settled, not a long investigation.
        return _apply(state, Reaction("impatient"))
    if label == "S" and topic_kind(card, reading.topic) == "problem":
        if reading.topic in state.implied:
            # A detail of a problem he has admitted: nothing new to tell, but no sign of not listening,
            # and the talk is now on that problem.
            return _apply(replace(state, focus=reading.topic), Reaction("nothing_more", topic=reading.topic), 0.0)
        # A fact asked about a problem ("how many wrong shipments a month?") touches the problem itself.
        return _problem(card, state, reading, rules)
    if label == "S":
        return _situation(card, state, reading, rules)
    if label == "P":
        return _problem(card, state, reading, rules)
    if label == "I":
        return _implication(card, state, reading, rules)
    return _need_payoff(card, state, reading, rules)


def _apply(state: CallState, reaction: Reaction, trust: float | None = None) -> tuple[CallState, Reaction]:
    """The state after the reaction's trust change (the table's, unless a rule gives its own)."""
    delta = REACTIONS[reaction.kind].trust if trust is None else trust
    # Rounded so that thresholds compare as written (0.46 + 0.04 is 0.5, not 0.49999).
    return replace(state, trust=round(min(1.0, max(0.0, state.trust + delta)), 4)), reaction


def _repeat(state: CallState, topic: str) -> tuple[CallState, Reaction]:
    """A fact asked for again: each repeat costs more than the last (the rep is not listening)."""
    state = replace(state, repeats=state.repeats + 1)
    return _apply(state, Reaction("nothing_more", topic=topic), REACTIONS["nothing_more"].trust * state.repeats)


def _credit(state: CallState, topic: str, reaction: Reaction) -> tuple[CallState, Reaction]:
    """A well-aimed question or summary earns credibility once per topic."""
    if topic in state.credited:
        return _apply(state, reaction, 0.0)
    return _apply(replace(state, credited=(*state.credited, topic)), reaction, AIMED_GAIN)


def _situation(card: Scenario, state: CallState, reading: Reading, rules: Rules) -> tuple[CallState, Reaction]:
    if state.situation_streak > rules.situation_limit:
        return _apply(state, Reaction("impatient"))
    fact_id = reading.topic
    if fact_id is None or topic_kind(card, fact_id) != "fact":
        return _apply(state, Reaction("vague"))
    if fact_id in state.facts:
        return _repeat(state, fact_id)
    fact = card.fact(fact_id)
    reaction = Reaction("fact", fact.reply, (f"fact:{fact_id}",), fact_id)
    # A couple of relevant questions show competence; more of them show homework not done.
    gain = None if len(state.facts) < FACT_CREDIT_MAX else 0.0
    return _apply(replace(state, facts=(*state.facts, fact_id)), reaction, gain)


def _problem(card: Scenario, state: CallState, reading: Reading, rules: Rules) -> tuple[CallState, Reaction]:
    problem_id = reading.topic
    if problem_id is None or topic_kind(card, problem_id) != "problem":
        return _apply(state, Reaction("vague"))
    if problem_id in state.implied:
        # Back to a problem he has admitted: he said it already, and the talk is on it again. Digging into
        # it is good questioning and costs nothing; asking again in so many words shows no listening.
        return _apply(
            replace(state, focus=problem_id), Reaction("nothing_more", topic=problem_id),
            None if reading.reasks else 0.0,
        )
    if state.trust < rules.problem_trust:
        # Not yet, but a question aimed at a real difficulty tells the buyer the rep knows the trade.
        return _credit(state, problem_id, Reaction("not_yet", topic=problem_id))
    problem = card.problem(problem_id)
    state = replace(state, implied=(*state.implied, problem_id), focus=problem_id)
    return _apply(state, Reaction("implied", problem.implied, (f"implied:{problem_id}",), problem_id))


def _implication(card: Scenario, state: CallState, reading: Reading, rules: Rules) -> tuple[CallState, Reaction]:
    problem_id = reading.topic
    if problem_id is None or topic_kind(card, problem_id) != "problem":
        return _apply(state, Reaction("vague"))
    if problem_id not in state.implied:
        if problem_id in state.credited and state.trust >= rules.problem_trust:
            # A Problem question on it was turned down for want of trust; pressed again now that trust is
            # earned, he admits it (`credited` holds a bare problem id only from that turn).
            return _problem(card, state, reading, rules)
        # The consequence of a problem he has not admitted is a guess: it unlocks nothing and earns no
        # credit (a rep who skips the problem question has not shown he knows the trade).
        return _apply(state, Reaction("not_yet", topic=problem_id))
    if state.trust < rules.problem_trust:
        return _apply(state, Reaction("not_yet", topic=problem_id))
    shown = state.implications.get(problem_id, ())
    problem = card.problem(problem_id)
    untold = [i for i in range(len(problem.implications)) if i not in shown]
    if not untold:
        return _apply(state, Reaction("nothing_more", topic=problem_id))
    # The consequence the question points at; else (a general question, or one he has answered) the
    # next one he would raise himself. The reader points at the nearest consequence even for a general
    # question, so "I told you" here would stonewall "what else does it affect?".
    told = reading.implication if reading.implication in untold else untold[0]
    implications = {**state.implications, problem_id: (*shown, told)}
    state = replace(state, implications=implications, focus=problem_id)
    return _apply(state, Reaction(
        "implication", problem.implications[told], (f"implication:{problem_id}:{told + 1}",), problem_id
    ))


def _need_payoff(card: Scenario, state: CallState, reading: Reading, rules: Rules) -> tuple[CallState, Reaction]:
    if not state.implied:
        return _apply(state, Reaction("premature_payoff"))
    problem_id = reading.topic
    if problem_id is None or topic_kind(card, problem_id) != "problem":
        return _apply(state, Reaction("vague"))
    if problem_id in state.explicit:
        return _apply(state, Reaction("nothing_more", topic=problem_id))
    if problem_id not in state.implied or state.trust < rules.problem_trust:
        return _apply(state, Reaction("not_yet", topic=problem_id))
    if not state.implications.get(problem_id):
        # Admitted but not yet felt: a solution to a nuisance is worth little (he does not deny it, though).
        return _apply(state, Reaction("unfelt", topic=problem_id))
    problem = card.problem(problem_id)
    state = replace(state, explicit=(*state.explicit, problem_id), focus=problem_id)
    return _apply(state, Reaction("explicit", problem.need_payoff, (f"explicit:{problem_id}",), problem_id))


def _pitch(card: Scenario, state: CallState, reading: Reading) -> tuple[CallState, Reaction]:
    """Benefits (a capability for a need the buyer stated) work; features and advantages do not."""
    need = reading.topic if topic_kind(card, reading.topic) == "problem" else None
    if need is not None and need in state.explicit:
        return _apply(state, Reaction("benefit", topic=need))
    if state.asked:
        # He asked for it (his documents, proof, a price): handing it over answers him.
        return _apply(state, Reaction("answered", topic=need))
    if not state.explicit or (need is not None and need in state.implied):
        state = replace(state, objections=state.objections + 1, premature_pitches=state.premature_pitches + 1)
        objection = card.objections[(state.objections - 1) % len(card.objections)]
        return _apply(state, Reaction("objection", objection, topic=need))
    return _apply(state, Reaction("sceptical", topic=need))


def _insight(card: Scenario, state: CallState) -> tuple[CallState, Reaction]:
    """A statement about the buyer's business or the decision, selling nothing: judged by value type."""
    state = replace(state, insights=state.insights + 1)
    kind: ReactionKind = "insight_unwanted" if card.value_type == "intrinsic" else "insight"
    trust = INSIGHT_TRUST[card.value_type]
    if trust > 0 and state.insights > INSIGHT_MAX:
        trust = -SMALL_TALK_COST  # a third lesson in a row uses up his time
    return _apply(state, Reaction(kind), trust)


def _other(card: Scenario, state: CallState, reading: Reading) -> tuple[CallState, Reaction]:
    if reading.move == "rapport":
        if state.rapport_moves < RAPPORT_MAX:
            return _apply(replace(state, rapport_moves=state.rapport_moves + 1), Reaction("rapport"))
        return _apply(state, Reaction("rapport"), -SMALL_TALK_COST)
    if reading.move == "greeting":
        return state, Reaction("greeting")
    if reading.move == "summary" and reading.topic in state.implied:
        # An accurate summary of what the buyer said shows he was heard.
        return _credit(state, f"summary:{reading.topic}", Reaction("ack", topic=reading.topic))
    if reading.move == "question" and reading.topic is None:
        # A question about nothing in the buyer's business (the coffee machine, the traffic).
        return _apply(state, Reaction("vague"))
    return state, Reaction("ack")


def _commitment(card: Scenario, state: CallState, reading: Reading, rules: Rules) -> tuple[CallState, Reaction]:
    """An Advance needs a concrete action, enough explicit needs and enough trust; a proposal that
    costs the buyer nothing ends the call as a Continuation at best; an early close draws pushback."""
    concrete = reading.proposal == "concrete"
    if concrete and len(state.explicit) >= card.advance.requires_explicit_needs and (
        state.trust >= rules.problem_trust
    ):
        if card.advance.order is not None:
            return replace(state, outcome="Order"), Reaction("order", card.advance.order)
        return replace(state, outcome="Advance"), Reaction("advance", card.advance.yes)
    # Too early: a concrete step before enough needs, or anything at all before the first one. He says
    # so and the rep can still find a need, until he has sat through PUSHBACK_MAX of them.
    if (concrete or not state.explicit) and state.pushbacks < PUSHBACK_MAX:
        return _apply(replace(state, pushbacks=state.pushbacks + 1), Reaction("pushback"))
    return _close(card, state)


def _close(card: Scenario, state: CallState) -> tuple[CallState, Reaction]:
    if state.explicit or (state.implied and state.premature_pitches == 0 and card.need_state != "no_need"):
        return replace(state, outcome="Continuation"), Reaction("continuation", card.advance.continuation)
    return replace(state, outcome="No-sale"), Reaction("no_sale", card.advance.no_sale)


# --- offline speech -------------------------------------------------------------------------------


def speak(card: Scenario, state: CallState, reaction: Reaction, language: Language) -> tuple[CallState, str]:
    """The offline buyer's words: the disclosed card text, or the next variant of a stock line.

    Variants rotate per kind, so the buyer never says the same stock line twice in a row.
    """
    if reaction.disclosure is not None:
        return state, reaction.disclosure(language)
    key = REACTIONS[reaction.kind].line
    if key is None:
        raise ValueError(f"a '{reaction.kind}' reaction needs the card text it discloses")
    variants = card.lines[key]
    cursor = state.line_cursor.get(key, 0)
    text = variants[cursor % len(variants)](language)
    asked = reaction.kind in ANSWERABLE and _asks(text)
    return replace(state, line_cursor={**state.line_cursor, key: cursor + 1}, asked=asked), text
