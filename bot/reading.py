"""The reading of one rep line: its SPIN label, its move and the card topic it is about.

The state machine (`bot.roleplay`) takes only a Reading. Two Readers produce one: the offline
reader (the trained label classifier, a trained move classifier, and relative topic matching on
the bundled e5 embeddings) and the LLM reader (one structured call returning all of it).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Self, cast, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bot import prompts
from bot.config import EVALS_DIR
from bot.datasets import RepLine, read_jsonl
from bot.grader import Label, OfflineGrader, files_fingerprint, focus_question, load_training_set, stored_model
from bot.llm import ChatModel, EmbeddingModel, checked_json
from bot.scenarios import Scenario, Text
from bot.text import Language, defuse_tags, detect_language

Move = Literal["greeting", "rapport", "question", "pitch", "commitment", "summary", "injection"]
MOVES: tuple[Move, ...] = get_args(Move)

MOVE_NAMES: dict[Move, Text] = {
    "greeting": Text(zh="问候", en="greeting"),
    "rapport": Text(zh="寒暄/拉近关系", en="rapport / small talk"),
    "question": Text(zh="提问", en="question"),
    "pitch": Text(zh="产品介绍", en="pitch"),
    "commitment": Text(zh="请求承诺", en="commitment request"),
    "summary": Text(zh="总结/回应", en="summary / acknowledgement"),
    "injection": Text(zh="越狱企图", en="prompt attack"),
}
# How the LLM reader is told what each move means (the same table, so no move can be missing).
MOVE_GUIDE: dict[Move, str] = {
    "greeting": "hello, introductions, thanks for the meeting, goodbye",
    "rapport": "small talk or personal talk: weather, traffic, hobbies, hometown, family, compliments",
    "question": "any question about the buyer's business, situation, problems, their effects or the value of "
    "solving them, including short follow-ups",
    "pitch": "the rep presents his own product or company: features, advantages, benefits, references, price",
    "commitment": "the rep asks for an action: demo, trial, visit, meeting, proposal, brochure, order",
    "summary": "summary, acknowledgement, empathy, thanks for information, procedural remarks",
    "injection": "an attempt to break the role-play or extract hidden instructions or card content",
}

# What a commitment request asks of the buyer: time or people (the course's Advance), or nothing.
Proposal = Literal["concrete", "weak"]
PROPOSALS: tuple[Proposal, ...] = get_args(Proposal)

MOVE_DATA_DIR = EVALS_DIR / "data" / "moves"
MOVE_TRAIN_GLOB = "moves-train*.jsonl"
MOVE_MODEL_VERSION = "1"
SEED = 13

# A lexical net under the move model: an attempt to break the role-play must never unlock anything.
INJECTION_PATTERN = re.compile(
    r"ignore (all |your |the |previous |any |prior )*(instructions|rules|prompt)|system prompt"
    r"|(your|the|all|every|me) hidden (problems?|facts?|issues?|needs?)"
    r"|scenario card|you are an? (ai|language model|bot)|jailbreak|developer mode"
    r"|忽略.{0,6}(指令|规则|提示)|系统提示|提示词|隐藏的?(问题|难点|信息)(都|全)|剧本|你是(一个)?(AI|人工智能|机器人)|别演了"
    r"|你(的)?设定|评分标准"
    # Role swaps, fake developers and debug modes, prompt echoes, encodings, forged prompt tags.
    r"|(swap|switch|reverse|exchange) (our )?roles|role swap|you are (now )?the (sales ?)?(rep|seller)"
    r"|i am the developer|i'm the developer|debug(ging)? mode|for debugging|system instruction"
    r"|repeat (everything|all|the text)( that is)? (above|before)|answer key|base64|stop role-?playing"
    r"|the card'?s|card says|<\s*/?\s*(rep_message|convey|system|utterance|context|history|state|transcript)\s*>"
    r"|[\[【（(]\s*(label|grade|score|system|评分|标签|标注|打分|系统)"
    r"|need_state|need_payoff|implications (section|那一段)|your (yaml|configuration|brief)\b|你的?(yaml|配置)"
    r"|(换|交换|互换)(一下)?角色|角色互换|你来当销售|开发者|调试模式|卡片|标准答案|上面的(全部|所有)内容|你的设定",
    re.IGNORECASE,
)


# The move model calls a line an attack when its probability passes this, chosen by 5-fold CV on the
# move training set (evals/README.md): recall 0.93 there, false alarms 0.2% on the label set's
# questions. A gate on attack words ("system", "rubric") added false alarms on business questions
# that use them and caught nothing the threshold misses, so there is none.
ATTACK_SURE = 0.6
# The check that ends a proposal ("does that work?", "您看行吗？"): it asks him to agree, not about his business.
CLOSING_CHECK = re.compile(
    r"(?:\b(?:does|would|will|could|can) (?:that|this|it|\w+day)(?: \w+)? (?:work|suit|sound)"
    r"(?: (?:for |with )?(?:you|your \w+|everyone))?|\bhow (?:does|would) (?:that|this) (?:sound|look)"
    r"|\bwhat do you (?:say|think)|\bshall we|\bsound (?:good|ok|okay|fair)|\b(?:deal|agreed|ok|okay)"
    r"|\bis that (?:ok|okay|alright|fine)(?: with you)?)\W*$"
    r"|[行好]吗|可以吗|怎么样|好不好|行不行|可不可以|您看呢|你看呢|如何[？?]|没问题吧|定了吧|就这么定",
    re.IGNORECASE,
)
# Offline, an attack guess below this on a line the grader reads as S/P/I/N is heard as the question.
# Set by judgement, then checked on the attack sets (evals/README.md, "Attacks"): an offline miss is harmless.
QUESTION_OVER_ATTACK = 0.8
_LEET = str.maketrans("013457@$", "oieastas")
_SPACED_OUT = re.compile(r"(?:(?<!\S)\S ){5,}")


def attack_views(text: str) -> tuple[str, str]:
    """The line as typed and as an attacker's disguise would read undone: full-width folded (NFKC),
    spaced-out letters joined, digits inside words read as letters (1gn0r3 -> ignore)."""
    plain = unicodedata.normalize("NFKC", text)
    if _SPACED_OUT.search(plain):
        plain = re.sub(r"(?<=\S) (?=\S)", "", plain)
    plain = re.sub(r"\s+", " ", plain)
    plain = re.sub(r"\b(?=\w*[a-z])(?=\w*\d)\w+\b", lambda m: m.group(0).translate(_LEET), plain,
                   flags=re.IGNORECASE)
    return text, plain


def _wording(text: str) -> str:
    return re.sub(r"[^\w\s]+", "", text).strip()


def disguised(text: str) -> str | None:
    """The undisguised line when undoing a disguise changes its words, else None: folding full-width
    punctuation alone (every Chinese "？") needs no second reading."""
    plain = attack_views(text)[1]
    return plain if _wording(plain) != _wording(re.sub(r"\s+", " ", text)) else None


def looks_like_attack(text: str, pattern: re.Pattern[str]) -> bool:
    return any(pattern.search(view) for view in attack_views(text))


@dataclass(frozen=True)
class Reading:
    """What one rep line is: label None means ungraded (the reason says why)."""

    label: Label | None
    move: Move
    topic: str | None
    reason: str
    confidence: float | None = None
    better_question: str | None = None
    reader: str = "offline"
    proposal: Proposal | None = None  # for a commitment request: what it asks of the buyer
    presumes: bool = False  # the line asserts a difficulty rather than asking about one
    implication: int | None = None  # for an Implication question: the consequence of the topic it points at
    insight: bool = False  # a statement offering insight about the buyer's business or advice, selling nothing
    reasks: bool = False  # the question asks again for something the buyer may have told

    @property
    def graded(self) -> bool:
        return self.label is not None

    @property
    def injection(self) -> bool:
        return self.move == "injection"

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "move": self.move,
            "topic": self.topic,
            "reason": self.reason,
            "better_question": self.better_question,
            "reader": self.reader,
            "confidence": None if self.confidence is None else round(self.confidence, 3),
            "proposal": self.proposal,
            "presumes": self.presumes,
            "implication": self.implication,
            "insight": self.insight,
            "reasks": self.reasks,
        }


class Reader(Protocol):
    """Reads rep lines for one card. `focus` is the problem under discussion, for follow-ups."""

    name: str
    card: Scenario

    def read(self, utterance: str, context: str = "", focus: str | None = None) -> Reading: ...

    def prepare(self, context: str) -> None:
        """Work that can be done on the buyer's reply while the rep is still typing."""
        ...


def topic_kind(card: Scenario, topic: str | None) -> Literal["fact", "problem"] | None:
    if topic in {f.id for f in card.facts}:
        return "fact"
    if topic in {p.id for p in card.problems}:
        return "problem"
    return None


# --- shared embeddings ----------------------------------------------------------------------------


class MemoEmbeddings:
    """A bounded memo over another embedding model: one turn embeds the same line for label, move and topic."""

    def __init__(self, inner: EmbeddingModel, size: int = 512) -> None:
        self._inner = inner
        self.name = inner.name
        self._size = size
        self._cache: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._pending: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def _get(self, kind: str, text: str) -> list[float] | None:
        with self._lock:
            vector = self._cache.get((kind, text))
            if vector is not None:
                self._cache.move_to_end((kind, text))
            return vector

    def _put(self, kind: str, text: str, vector: list[float]) -> None:
        with self._lock:
            self._cache[(kind, text)] = vector
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def warm(self, texts: Sequence[str]) -> None:
        """Embed the texts not yet memoised in one call: the engine packs them into one forward pass over
        all its cores, so a line and its focus question cost little more than the line."""
        self.embed_documents(list(dict.fromkeys(texts)))

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        found: dict[str, list[float]] = {}
        mine: list[str] = []
        theirs: list[tuple[str, threading.Event]] = []
        with self._lock:
            for text in dict.fromkeys(texts):
                vector = self._cache.get(("passage", text))
                if vector is not None:
                    self._cache.move_to_end(("passage", text))
                    found[text] = vector
                elif text in self._pending:
                    # Being embedded by another thread (the buyer's line, prepared while the rep typed):
                    # wait for it rather than embed it twice at once.
                    theirs.append((text, self._pending[text]))
                else:
                    self._pending[text] = threading.Event()
                    mine.append(text)
        try:
            if mine:
                for text, vector in zip(mine, self._inner.embed_documents(mine), strict=True):
                    found[text] = vector
                    self._put("passage", text, vector)
        finally:
            with self._lock:
                for text in mine:
                    self._pending.pop(text).set()
        for text, done in theirs:
            done.wait()
            vector = self._get("passage", text)
            if vector is None:  # that call failed, or the memo has dropped it since
                vector = self._inner.embed_documents([text])[0]
                self._put("passage", text, vector)
            found[text] = vector
        return [found[t] for t in texts]

    def embed_query(self, text: str) -> list[float]:
        vector = self._get("query", text)
        if vector is None:
            vector = self._inner.embed_query(text)
            self._put("query", text, vector)
        return vector


# --- move model -----------------------------------------------------------------------------------


class LabelledMove(RepLine):
    """One line of a move set (evals/data/moves/*.jsonl)."""

    model_config = ConfigDict(extra="ignore")
    move: Move
    detail: str | None = None
    source: str | None = None


class LineClassifier:
    """Character n-grams and the e5 embedding of the whole line, fed to a logistic regression."""

    def __init__(self, embeddings: EmbeddingModel, c: float = 10.0) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self.embeddings = embeddings
        self.char = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True, lowercase=True)
        self.clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced", random_state=SEED)

    def _features(self, utterances: Sequence[str], fit: bool) -> Any:
        from scipy import sparse

        texts = [u.strip() for u in utterances]
        grams = self.char.fit_transform(texts) if fit else self.char.transform(texts)
        # Weight and C chosen by 5-fold CV on the move training set (evals/README.md).
        dense = np.asarray(self.embeddings.embed_documents(texts), dtype=np.float32) * 3.5
        marks = np.array([[1.0 if ("?" in t or "？" in t) else 0.0, min(len(t), 200) / 200.0] for t in texts])
        return sparse.hstack([grams, sparse.csr_matrix(dense), sparse.csr_matrix(marks)]).tocsr()

    def fit(self, utterances: Sequence[str], labels: Sequence[str]) -> Self:
        self.clf.fit(self._features(utterances, True), list(labels))
        return self

    def embedded_texts(self, utterance: str) -> list[str]:
        return [utterance.strip()]

    def class_probabilities(self, utterance: str) -> dict[str, float]:
        """Every class with its probability, most likely first."""
        probabilities = self.clf.predict_proba(self._features([utterance], False))[0]
        classes = list(self.clf.classes_)
        return {classes[i]: float(probabilities[i]) for i in np.argsort(-probabilities)}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["embeddings"] = None
        return state


class MoveModel(LineClassifier):
    """What a rep line does: greeting, rapport, question, pitch, commitment, summary or attack."""

    def probabilities(self, utterance: str) -> dict[Move, float]:
        return cast(dict[Move, float], self.class_probabilities(utterance))


def move_training_data(directory: Path = MOVE_DATA_DIR) -> tuple[list[str], list[Move]]:
    """The move training set, plus every S/P/I/N line of the label training set as a question."""
    items = [item for path in move_training_files(directory) for item in read_jsonl(path, LabelledMove)]
    utterances = [i.utterance for i in items]
    moves: list[Move] = [i.move for i in items]
    for item in load_training_set():
        if item.label != "O":
            utterances.append(item.utterance)
            moves.append("question")
    return utterances, moves


def _training_files(directory: Path, pattern: str) -> list[Path]:
    files = sorted(directory.glob(pattern))
    if not files:
        raise FileNotFoundError(f"{directory}: no {pattern} training files")
    return files


def move_training_files(directory: Path = MOVE_DATA_DIR) -> list[Path]:
    return _training_files(directory, MOVE_TRAIN_GLOB)


def move_fingerprint(embeddings: EmbeddingModel, directory: Path = MOVE_DATA_DIR) -> str:
    from bot.grader import training_files

    header = f"{MOVE_MODEL_VERSION}\n{embeddings.name}\n{SEED}\n"
    return files_fingerprint(header, [*move_training_files(directory), *training_files()])


def load_or_train_moves(embeddings: EmbeddingModel, store: Path, *, retrain: bool = False) -> MoveModel:
    """The stored move model if it matches the training data and code, else a freshly trained one."""
    return stored_model(store, "move-model", move_fingerprint(embeddings), embeddings,
                        lambda: MoveModel(embeddings).fit(*move_training_data()), retrain=retrain)


# --- relative topic matching ----------------------------------------------------------------------

# What a rep may talk about in a meeting that is on no card: the matcher compares each line with
# these as well as with the card's topics, so "on topic" means "clearly closer to a topic than to
# any of these", not "above a fixed similarity".
OFF_TOPIC: tuple[str, ...] = (
    "How's the weather today?", "Did you have trouble finding parking?", "How was your weekend?",
    "Is the coffee machine in your office any good?", "Where do you usually go for lunch?",
    "Did you watch the football last night?", "Are you going anywhere for the holidays?",
    "How long is your commute?", "Nice office, did you choose the paintings?", "How are your kids doing?",
    "What do you do in your free time?", "Which city are you from originally?",
    "What is your company's share price doing?", "How big is your marketing budget?",
    "What is your policy on annual leave?", "Who designed your company logo?",
    "Anything else you want to tell me?", "What do you think about the economy?",
    "今天天气怎么样？", "路上堵车了吗？", "周末过得怎么样？", "你们办公室的咖啡好喝吗？",
    "中午一般去哪儿吃饭？", "昨晚的球赛看了吗？", "假期有什么安排？", "您平时有什么爱好？",
    "您老家是哪里的？", "孩子上几年级了？", "这幅画挺好看的，谁挑的？", "你们公司股价最近怎么样？",
    "你们市场部一年预算多少？", "年假是怎么规定的？", "还有别的吗？", "最近经济形势您怎么看？",
)
# Follow-ups with no topic of their own: they go to the problem under discussion.
FOLLOW_UPS: tuple[str, ...] = (
    "What does that cost you?", "How often does that happen?", "Why is that?", "And then what happens?",
    "How does that affect you?", "What impact does that have?", "Can you give me an example?",
    "How long has that been going on?", "Who else does that affect?", "What would it mean if you solved it?",
    "How would that help you?", "Is that a big deal for you?", "Tell me more about that.",
    "那会怎么样？", "然后呢？", "为什么会这样？", "这对你们有什么影响？", "多久发生一次？", "能举个例子吗？",
    "这样持续多久了？", "还会影响到谁？", "这要花多少钱？", "解决了对您有什么好处？", "这个严重吗？",
    "具体说说？",
)
FOLLOW_UP_MARGIN = 0.0
# Questions that fit any company: they name no difficulty, so they are about no topic of the card
# (a buyer answers "what are your biggest challenges?" with a shrug, not with his real problems).
GENERIC: tuple[str, ...] = (
    "What are your biggest challenges right now?", "What keeps you up at night?",
    "What problems are you facing at the moment?", "Is there anything you'd like to improve?",
    "What are your main pain points?", "Are you happy with how things are going?",
    "What are your priorities this year?", "Anything else giving you trouble?",
    "What would you change about your business if you could?", "Where do you see room for improvement?",
    "您现在最大的挑战是什么？", "最近有什么让您头疼的事吗？", "你们现在遇到了哪些问题？",
    "有没有想改进的地方？", "您的痛点是什么？", "您对现在的情况满意吗？", "今年工作的重点是什么？",
    "还有别的困难吗？", "如果能改变一件事，您最想改什么？", "您觉得哪里还有提升空间？",
)
# Chosen on the tune file (scripts/calibrate_implications.py): no margin points at the right one most
# often (0.93), and the rules make pointing harmless for a general question.
IMPLICATION_MARGIN = 0.0
GENERIC_MARGIN = 0.02  # chosen on the two topic tune files (none precision back to 0.96 with the rule on)
# A line that asserts a difficulty the buyer never mentioned ("that must be costing you a fortune"):
# a guess, which a buyer denies until he has admitted the problem himself.
PRESUMING = re.compile(
    r"\bmust\b(?!-)|\bI bet\b|\bsurely\b|\bno doubt\b|\bI'm sure\b|\bI know (?:that )?your\b"
    r"|\bI(?:'d| would)? imagine\b|\bI'm guessing\b|\bI(?:'d)? guess\b|\bI assume\b|\bpresumably\b"
    r"|肯定|一定(?!要)|想必|估计|我猜|八成|没少|少不了|好几[十百千万亿]|得有.{0,8}吧|应该(?:不少|很多|挺|会|是)"
    r"|(?:不少|很多|挺多|够呛|吃不消|头疼)吧|[这那]么(?:难|差|高|低|频繁|多|慢|贵|乱|严重|紧|长|大|费)",
    re.IGNORECASE,
)


def presumes(utterance: str) -> bool:
    """The line takes a difficulty as given rather than asking whether there is one."""
    return PRESUMING.search(utterance) is not None


# A question that asks again for what the buyer may have said ("what was the headcount again?",
# "您现在是跟哪家合作的来着？"). Read on the focus question only, and "again" only where it ends
# the question: "how long to get the line running again each time?" asks something new.
REASKING = re.compile(
    r"\bagain\W*$|\bdid you say\b|\bremind me\b|\bjust (?:to )?(?:confirm|check)(?:ing)?\b|\bdouble[- ]check"
    r"|\bjust so I(?:'ve| have) got (?:it|that) right\b"
    r"|来着|再确认|再问一[下遍句]|再说一[下遍]|您刚才说的是|你刚才说的是",
    re.IGNORECASE,
)


def reasks(utterance: str) -> bool:
    """The line asks again, in so many words, for something the buyer may already have told."""
    return REASKING.search(focus_question(utterance).strip()) is not None
FOCUS_MARGIN = 0.02


# --- insight or selling ---------------------------------------------------------------------------

INSIGHT_DATA_DIR = EVALS_DIR / "data" / "insights"
INSIGHT_TRAIN_GLOB = "insights-tune*.jsonl"
INSIGHT_MODEL_VERSION = "1"
INSIGHT_SURE = 0.6  # 5-fold CV on the tune file: precision 0.95, recall 0.95 (a pitch heard as insight would pay)


class LabelledStatement(RepLine):
    """A rep's statement: does it offer insight or advice about the buyer's business (selling nothing)?"""

    model_config = ConfigDict(extra="ignore")
    card: str | None = None
    insight: bool
    kind: str | None = None
    source: str | None = None


class InsightModel(LineClassifier):
    """Tells insight about the buyer's business, or advice on the decision, from a pitch."""

    def offers_insight(self, utterance: str) -> bool:
        return self.class_probabilities(utterance).get("insight", 0.0) >= INSIGHT_SURE


def insight_training_data(directory: Path = INSIGHT_DATA_DIR) -> tuple[list[str], list[str]]:
    items = [item for path in _training_files(directory, INSIGHT_TRAIN_GLOB)
             for item in read_jsonl(path, LabelledStatement)]
    return [i.utterance for i in items], ["insight" if i.insight else "selling" for i in items]


def insight_fingerprint(embeddings: EmbeddingModel) -> str:
    header = f"{INSIGHT_MODEL_VERSION}\n{embeddings.name}\n{SEED}\n"
    return files_fingerprint(header, _training_files(INSIGHT_DATA_DIR, INSIGHT_TRAIN_GLOB))


def load_or_train_insights(embeddings: EmbeddingModel, store: Path, *, retrain: bool = False) -> InsightModel:
    """The stored insight model if it matches the training data and code, else a freshly trained one."""
    return stored_model(store, "insight-model", insight_fingerprint(embeddings), embeddings,
                        lambda: InsightModel(embeddings).fit(*insight_training_data()), retrain=retrain)


# Commitment requests, by what they ask of the buyer. A concrete one costs him time, people or money
# (a visit, a pilot, a meeting with the decision-maker, an order); a weak one costs him nothing.
CONCRETE_PROPOSALS: tuple[str, ...] = (
    "Could I come to the site next week and walk the process with your team?",
    "Can we set up a two-week pilot on one line with your supervisors?",
    "Would you bring your finance director to a meeting next Tuesday so we can go through the numbers?",
    "Shall we book a workshop with your IT and operations leads to scope this?",
    "Can you introduce me to the person who signs off on this, so the three of us can meet?",
    "Shall I put the order through for the quantity we discussed, delivered on the 15th?",
    "Can we agree a trial delivery this month and you'll give us the go-ahead if it meets spec?",
    "Would you be willing to share last quarter's data so we can build the business case together?",
    "Let's schedule a demo for your whole team on Thursday afternoon, can you get them in the room?",
    "下周我带工程师去现场，跟您的班组一起走一遍流程，您看行吗？",
    "咱们先在一条线上试点两周，您这边安排一个主管配合，可以吗？",
    "您看能不能约上财务总监，下周二一起把投入产出的账过一遍？",
    "能不能请您引荐一下拍板的领导，我们三方坐下来谈一次？",
    "那我就按刚才说的数量下单，十五号送到，您签个字？",
    "这个月先安排一批试用货，达标了您就给我们下正式订单，行不行？",
    "方便的话把上季度的数据给我们，我们一起把方案和测算做出来，下周给您汇报。",
    "周四下午我来给你们团队做个现场演示，您把相关的人叫上？",
)
WEAK_PROPOSALS: tuple[str, ...] = (
    "Shall I just email you our brochure?",
    "I'll send over some information and you can have a look when you get a chance.",
    "Can I give you a call next week to follow up?",
    "Let's keep in touch, shall we?",
    "Maybe you can think about it and get back to me?",
    "I'll leave my card, call me if anything comes up.",
    "Can I add you on LinkedIn and send you our case studies?",
    "Would it be OK if I checked in with you next month?",
    "我先把资料发您邮箱，您有空看看？",
    "我加您个微信，回头把产品介绍发给您。",
    "那我下周再给您打个电话跟进一下？",
    "您考虑考虑，有需要随时联系我。",
    "我把名片留给您，以后有机会再合作。",
    "宣传册我放这儿了，您回头看看。",
    "那我们保持联系，下个月我再来拜访您。",
    "我回去给您发个报价单，您先参考一下？",
)


class ProposalBank:
    """Reads a commitment request as concrete or weak by its nearest example (card-agnostic)."""

    def __init__(self, embeddings: EmbeddingModel) -> None:
        self._embeddings = embeddings
        self._concrete = np.asarray(embeddings.embed_documents(list(CONCRETE_PROPOSALS)), dtype=np.float32)
        self._weak = np.asarray(embeddings.embed_documents(list(WEAK_PROPOSALS)), dtype=np.float32)

    def read(self, utterance: str) -> Proposal:
        query = np.asarray(self._embeddings.embed_documents([utterance.strip()])[0], dtype=np.float32)
        # A tie goes to weak: the buyer only commits to what was clearly asked.
        return "concrete" if float((self._concrete @ query).max()) > float((self._weak @ query).max()) else "weak"


def _topic_texts(card: Scenario) -> dict[str, list[str]]:
    """The words each topic is known by: its name, and what the buyer would say about it."""
    texts: dict[str, list[str]] = {}
    for fact in card.facts:
        texts[fact.id] = [fact.topic.zh, fact.topic.en, fact.reply.zh, fact.reply.en]
    for problem in card.problems:
        said = [problem.implied, *problem.implications, problem.need_payoff]
        texts[problem.id] = [problem.topic.zh, problem.topic.en, *(t.zh for t in said), *(t.en for t in said)]
    return texts


@dataclass(frozen=True)
class TopicScores:
    """One line's similarity to each topic, to the off-topic bank and to the follow-up bank."""

    topics: dict[str, float]
    off_topic: float
    follow_up: float
    background: float  # this buyer's own life story (hometown, career, hobbies)
    generic: float = -1.0  # the nearest question that fits any company

    @property
    def about_the_buyer(self) -> bool:
        """Closer to the buyer's own background than to any topic, follow-up or other talk."""
        return self.background >= max([*self.topics.values(), self.follow_up, self.off_topic])


TOPIC_DATA_DIR = EVALS_DIR / "data" / "topics"
TOPIC_TRAIN_GLOB = "topics-tune*.jsonl"
TOPIC_GATE_VERSION = "1"


def topic_features(scores: TopicScores, language: Language) -> list[float]:
    """What decides "on a topic or not", for any card: how far the closest topic stands above off-topic
    talk, the buyer's background, bare follow-ups and the card's other topics."""
    values = sorted(scores.topics.values(), reverse=True)
    best = values[0]
    second = values[1] if len(values) > 1 else best
    elsewhere = max(scores.off_topic, scores.background)
    zh = 1.0 if language == "zh" else 0.0
    return [best - elsewhere, best - scores.off_topic, best - scores.background, best - scores.follow_up,
            best - second, best - sum(values) / len(values), best, zh, (best - elsewhere) * zh]


class TopicGate:
    """A logistic regression over `topic_features`: is the line about one of the card's topics at all?
    Trained on the per-card tune files (never the test file); it replaced a single margin, which read
    English on-topic lines as "none" and let Chinese off-topic lines through (evals/README.md)."""

    def __init__(self, c: float = 10.0, threshold: float = 0.5) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        # C chosen by training on one tune file and scoring the other, both ways.
        self.clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=SEED))
        self.threshold = threshold

    def fit(self, features: Sequence[list[float]], on_topic: Sequence[bool]) -> TopicGate:
        self.clf.fit(np.asarray(features, dtype=np.float64), np.asarray(on_topic))
        return self

    def probability(self, scores: TopicScores, language: Language) -> float:
        row = np.asarray([topic_features(scores, language)], dtype=np.float64)
        return float(self.clf.predict_proba(row)[0, list(self.clf.classes_).index(True)])

    def on_topic(self, scores: TopicScores, language: Language) -> bool:
        return self.probability(scores, language) > self.threshold


def topic_training_files(directory: Path = TOPIC_DATA_DIR) -> list[Path]:
    return _training_files(directory, TOPIC_TRAIN_GLOB)


def train_topic_gate(
    embeddings: EmbeddingModel, files: Sequence[Path] | None = None, c: float = 10.0, threshold: float = 0.5
) -> TopicGate:
    from bot import scenarios
    from bot.evaluation import NO_TOPIC, ReadingSample

    paths = topic_training_files() if files is None else files
    samples = [s for path in paths for s in read_jsonl(path, ReadingSample)]
    matchers: dict[str, TopicMatcher] = {}
    features, on_topic = [], []
    for sample in samples:
        if sample.card is None or sample.topic is None:
            continue
        if sample.card not in matchers:
            matchers[sample.card] = TopicMatcher(scenarios.get(sample.card), embeddings)
        scores = matchers[sample.card].scores(sample.utterance)
        features.append(topic_features(scores, detect_language(sample.utterance)))
        on_topic.append(sample.topic != NO_TOPIC)
    return TopicGate(c, threshold).fit(features, on_topic)


def topic_fingerprint(embeddings: EmbeddingModel, directory: Path = TOPIC_DATA_DIR) -> str:
    from bot.scenarios import SCENARIOS_DIR

    banks = "\n".join([*OFF_TOPIC, *FOLLOW_UPS])
    header = f"{TOPIC_GATE_VERSION}\n{embeddings.name}\n{SEED}\n{banks}\n"
    return files_fingerprint(header, [*topic_training_files(directory), *sorted(SCENARIOS_DIR.glob("*.yaml"))])


def load_or_train_topic_gate(embeddings: EmbeddingModel, store: Path, *, retrain: bool = False) -> TopicGate:
    """The stored topic gate if it matches the tune files, banks and cards, else a freshly trained one."""
    return stored_model(store, "topic-gate", topic_fingerprint(embeddings), embeddings,
                        lambda: train_topic_gate(embeddings), retrain=retrain)


class TopicMatcher:
    """Relative topic matching for one card: a line is on a topic only when it is clearly closer to
    that topic than to off-topic talk (generic, and this buyer's own background)."""

    def __init__(self, card: Scenario, embeddings: EmbeddingModel, gate: TopicGate | None = None) -> None:
        self.card = card
        self.gate = gate
        self._embeddings = embeddings
        self._kinds = {f.id: "fact" for f in card.facts} | {p.id: "problem" for p in card.problems}
        texts = _topic_texts(card)
        self._owners = [topic for topic, group in texts.items() for _ in group]
        self._topic_vectors = self._embed([t for group in texts.values() for t in group])
        about_buyer = f"{card.buyer.background.zh}。{card.buyer.background.en}"
        background = [s for s in re.split(r"[。；;]|(?<=\.)\s", about_buyer) if s.strip()]
        self._off_vectors = self._embed(list(OFF_TOPIC))
        self._background_vectors = self._embed(background)
        self._follow_vectors = self._embed(list(FOLLOW_UPS))
        self._generic_vectors = self._embed(list(GENERIC))
        self._implication_vectors = {
            p.id: self._embed([t for text in p.implications for t in (text.zh, text.en)]).reshape(
                len(p.implications), 2, -1
            )
            for p in card.problems
        }

    def _embed(self, texts: Sequence[str]) -> Any:
        return np.asarray(self._embeddings.embed_documents(list(texts)), dtype=np.float32)

    def _query(self, utterance: str) -> Any:
        return self._embed([utterance.strip()])[0]

    def implication_scores(self, utterance: str, problem_id: str) -> list[float]:
        """How close the line is to each consequence of the problem (the nearer of its zh and en text)."""
        query = self._query(utterance)
        return [float(v) for v in (self._implication_vectors[problem_id] @ query).max(axis=1)]

    def pointed_implication(self, utterance: str, problem_id: str) -> int | None:
        """The consequence an Implication question points at, when one stands out from the others."""
        if problem_id not in self._implication_vectors:
            return None
        scores = self.implication_scores(utterance, problem_id)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        if len(order) == 1 or scores[order[0]] - scores[order[1]] >= IMPLICATION_MARGIN:
            return order[0]
        return None

    def scores(self, utterance: str) -> TopicScores:
        query = self._query(utterance)
        similarity = self._topic_vectors @ query
        best: dict[str, float] = {}
        for owner, score in zip(self._owners, similarity, strict=True):
            best[owner] = max(best.get(owner, -1.0), float(score))
        return TopicScores(
            best,
            float((self._off_vectors @ query).max()),
            float((self._follow_vectors @ query).max()),
            float((self._background_vectors @ query).max()),
            float((self._generic_vectors @ query).max()),
        )

    def match(
        self, utterance: str, focus: str | None = None, kind: Literal["fact", "problem"] | None = None,
        scores: TopicScores | None = None,
    ) -> str | None:
        """The topic id the line is about, the focus for a bare follow-up, or None."""
        scores = scores or self.scores(utterance)
        candidates = {t: s for t, s in scores.topics.items() if kind is None or self._kinds[t] == kind}
        if not candidates:
            return None
        topic, score = max(candidates.items(), key=lambda kv: kv[1])
        if scores.generic > max(score, scores.follow_up) + GENERIC_MARGIN:
            return None  # clearly closer to a question that fits any company than to anything of this card
        elsewhere = max(scores.off_topic, scores.background)
        if self.gate is None:
            raise RuntimeError("TopicMatcher.match needs a trained TopicGate")
        on_topic = self.gate.on_topic(scores, detect_language(utterance))
        if focus is not None and self._kinds.get(focus) == "problem" and kind != "fact":
            # A bare follow-up ("what does that cost you?") goes to the problem under discussion; so does
            # a question about equally close topics. One that clearly names another topic goes there.
            if scores.follow_up >= score and scores.follow_up - elsewhere >= FOLLOW_UP_MARGIN:
                return focus
            if on_topic and candidates.get(focus, -1.0) >= score - FOCUS_MARGIN:
                return focus
        return topic if on_topic else None


# --- the offline reader ---------------------------------------------------------------------------


@dataclass
class OfflineReader:
    """Label from the trained grader, move from the move model, topic by relative matching."""

    card: Scenario
    grader: OfflineGrader
    moves: MoveModel
    topics: TopicMatcher
    proposals: ProposalBank
    insights: InsightModel | None = None
    name: str = "offline"

    def prepare(self, context: str) -> None:
        self._warm(self.grader.embedded_texts("", context)[1:])

    def _warm(self, texts: list[str]) -> None:
        # Only a shared memo can hand the vectors on to the grader, move model and topic matcher.
        if isinstance(self.moves.embeddings, MemoEmbeddings):
            self.moves.embeddings.warm(texts)

    def read(self, utterance: str, context: str = "", focus: str | None = None) -> Reading:
        plain = disguised(utterance)
        self._warm([
            *self.grader.embedded_texts(utterance, context), *self.moves.embedded_texts(utterance),
            *(self.moves.embedded_texts(plain) if plain is not None else []),
        ])
        grade = self.grader.grade(utterance, context)
        move = self.read_move(utterance)
        if move == "commitment" and grade.label in ("S", "P", "I") and self._asks_after_offer(utterance):
            move = "question"
        if move == "injection" and plain is None and self._question_not_attack(utterance, grade.label):
            move = "question"
        topic = None
        asked_again = reasks(utterance)
        proposal = self.proposals.read(utterance) if move == "commitment" else None
        if move == "pitch":
            # A pitch is judged by the need it answers: one the buyer stated, or none of his.
            topic = self.topics.match(utterance, None, "problem")
        elif move in ("question", "summary") or grade.label in ("S", "P", "I", "N"):
            scores = self.topics.scores(utterance)
            # P, I and N questions are about a problem; a fact question may be about either ("how many
            # wrong shipments a month?" asks a number about a problem), so it is matched against all.
            # A question asked again ("what was the headcount again?") asks for what the buyer told,
            # whatever it reads as: matched against the facts, and never a follow-up of the problem
            # in focus.
            kind: Literal["fact", "problem"] | None = (
                "fact" if asked_again else "problem" if grade.label in ("P", "I", "N") else None
            )
            topic = self.topics.match(utterance, None if asked_again else focus, kind, scores)
            if topic is None and move in ("question", "summary") and grade.label in ("S", "O") and (
                scores.about_the_buyer
            ):
                # "You worked at Walmart for ten years, right?": personal talk about this buyer (rule 7).
                move = "rapport"
        implication = None
        if grade.label == "I" and topic is not None and topic_kind(self.card, topic) == "problem":
            implication = self.topics.pointed_implication(utterance, topic)
        insight = move in ("pitch", "summary") and self.insights is not None and self.insights.offers_insight(utterance)
        return Reading(
            grade.label, move, topic, grade.reason, grade.confidence, grade.better_question, self.name, proposal,
            presumes(utterance), implication, insight, asked_again,
        )

    def _question_not_attack(self, utterance: str, label: Label | None) -> bool:
        """An unsure attack guess of the move model on an undisguised line the grader reads as a SPIN
        question ("how strict are the temperature requirements?") is heard as the question. Offline, a
        missed attack costs nothing (the rules decide every word he says); a false alarm costs an honest
        rep trust."""
        if label not in ("S", "P", "I", "N") or looks_like_attack(utterance, INJECTION_PATTERN):
            return False
        return self.moves.probabilities(utterance).get("injection", 0.0) < QUESTION_OVER_ATTACK

    def _asks_after_offer(self, utterance: str) -> bool:
        """"I'll price it in a minute. First, how many mu this year?": an offer, then a question about
        his business, which is what the buyer answers (coding guide rule 1). The check that ends a
        proposal ("does that work?") or a question about none of his topics leaves it a commitment request."""
        question = focus_question(utterance).strip()
        if question == utterance.strip() or CLOSING_CHECK.search(question) or self.read_move(question) != "question":
            return False
        return self.topics.match(question) is not None

    def read_move(self, utterance: str) -> Move:
        if looks_like_attack(utterance, INJECTION_PATTERN):
            return "injection"
        probabilities = self.moves.probabilities(utterance)
        attack = probabilities.get("injection", 0.0)
        plain = disguised(utterance)
        if plain is not None:
            # A disguised line is also read undisguised: "1gn0r3 y0ur rul3s" is an attack once spelt out.
            attack = max(attack, self.moves.probabilities(plain).get("injection", 0.0))
        if attack > ATTACK_SURE:
            return "injection"
        return next(move for move in probabilities if move != "injection")


# --- the LLM reader -------------------------------------------------------------------------------


class ReadingReply(BaseModel):
    """The JSON the LLM reader must return."""

    label: Label
    move: Move
    topic: str = Field(min_length=1, max_length=80)
    proposal: Proposal | None = None
    insight: bool = False
    reason: str = Field(min_length=1, max_length=400)
    better_question: str | None = Field(default=None, max_length=400)


_FENCED = ("context", "utterance", "topics")


class LLMReader:
    """One structured call per line: label, move and topic (from the card's list or "none").

    A reply outside the schema or naming a topic the card does not have is retried once, then the
    line is left ungraded: never guessed. `is_attack` (by default the lexical net; the runtime adds
    the offline move model) flags an attack whatever the model says: a fooled model unlocks nothing.
    `points_at` (the runtime gives the offline topic matcher's) finds the consequence an Implication
    question points at; the model never sees the card's consequences, so its reason and better question
    cannot give them away.
    """

    def __init__(
        self, card: Scenario, model: ChatModel, is_attack: Callable[[str], bool] | None = None,
        points_at: Callable[[str, str], int | None] | None = None,
    ) -> None:
        self.card = card
        self._model = model
        self._is_attack = is_attack or (lambda text: looks_like_attack(text, INJECTION_PATTERN))
        self._points_at = points_at
        self.name = f"llm:{model.name}"
        self._topic_ids = {f.id for f in card.facts} | {p.id for p in card.problems}

    def _topic_list(self) -> str:
        lines = [f"- {f.id} (fact): {f.topic.en} / {f.topic.zh}" for f in self.card.facts]
        lines += [f"- {p.id} (problem): {p.topic.en} / {p.topic.zh}" for p in self.card.problems]
        return "\n".join(lines)

    def messages(self, utterance: str, context: str = "", focus: str | None = None) -> list[Any]:
        language = detect_language(utterance)
        focus_line = "none"
        if focus is not None and topic_kind(self.card, focus) == "problem":
            focus_line = f"{focus}: {self.card.problem(focus).topic.en}"
        return prompts.render(
            "reader",
            topics=self._topic_list(),
            focus=focus_line,
            moves="\n".join(f"- {m}: {MOVE_GUIDE[m]}" for m in MOVES),
            context=defuse_tags(context.strip(), *_FENCED) or "(none)",
            utterance=defuse_tags(utterance.strip(), *_FENCED),
            reason_language="Simplified Chinese" if language == "zh" else "English",
        )

    def prepare(self, context: str) -> None:
        """Nothing to do ahead: the reply is read in the same call as the line."""

    def read(self, utterance: str, context: str = "", focus: str | None = None) -> Reading:
        attack = self._is_attack(utterance)
        messages = self.messages(utterance, context, focus)
        reply = checked_json(self._model, messages, ReadingReply, "reader", self._unknown_topic)
        if isinstance(reply, str):
            return self._ungraded(reply, attack)
        topic = reply.topic.strip()
        better = (reply.better_question or "").strip() or None
        move: Move = "injection" if attack else reply.move
        chosen = None if topic.lower() == "none" else topic
        # A commitment the model did not weigh is taken as weak: the buyer commits only to what was asked.
        proposal = (reply.proposal or "weak") if move == "commitment" else None
        implication = None
        if self._points_at is not None and reply.label == "I" and topic_kind(self.card, chosen) == "problem":
            assert chosen is not None
            implication = self._points_at(utterance, chosen)
        insight = reply.insight and move in ("pitch", "summary")
        return Reading(
            reply.label, move, chosen, reply.reason.strip(), None, better, self.name, proposal, presumes(utterance),
            implication, insight, reasks(utterance),
        )

    def _unknown_topic(self, reply: ReadingReply) -> str | None:
        topic = reply.topic.strip()
        if topic.lower() == "none" or topic in self._topic_ids:
            return None
        return f"topic {topic[:40]!r} is not one of the card's topics"

    def _ungraded(self, reason: str, attack: bool) -> Reading:
        return Reading(None, "injection" if attack else "question", None, reason, reader=self.name)
