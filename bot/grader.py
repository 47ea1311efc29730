"""SPIN grader: one label S / P / I / N / O per rep utterance, by an LLM or a trained classifier.

Both follow the coding guide (shared spec spin-labels.md, restated in prompts/grader.md).
The offline classifier is trained on evals/data/spin-train-*.jsonl (our own set) and
reads the buyer's previous line as context.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast

import joblib
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bot import prompts
from bot.config import EVALS_DIR
from bot.datasets import RepLine, read_jsonl
from bot.llm import ChatModel, EmbeddingModel, checked_json
from bot.text import Language, defuse_tags, detect_language

Label = Literal["S", "P", "I", "N", "O"]
LABELS: tuple[Label, ...] = ("S", "P", "I", "N", "O")
TRAIN_GLOB = "spin-train-*.jsonl"
# The training half of the external set (public example questions, split by source).
EXTERNAL_TRAIN_GLOB = "external/train-*.jsonl"
TRAIN_DIR = EVALS_DIR / "data"
# Bump when features or model change, so stored models are retrained.
MODEL_VERSION = "6"
SEED = 13
# How much the buyer's previous line counts beside the rep's own words. At full weight a problem-heavy
# buyer line pulled plain fact and difficulty questions to I ("how many days a year do they run?" after
# a line about power bills); chosen on a context-adversarial set written for it (evals/README.md).
CONTEXT_WEIGHT = 0.25

LABEL_NAMES: dict[Language, dict[Label, str]] = {
    "zh": {"S": "背景问题", "P": "难点问题", "I": "暗示问题", "N": "需求-效益问题", "O": "其他"},
    "en": {"S": "Situation", "P": "Problem", "I": "Implication", "N": "Need-payoff", "O": "Other"},
}
_REASONS: dict[Language, dict[Label, str]] = {
    "zh": {
        "S": "询问客户现状的事实和背景，没有涉及难点。",
        "P": "询问客户现状中的困难、不满或问题。",
        "I": "把难点当作已知，追问它带来的后果和影响。",
        "N": "请客户说出解决问题的价值和好处。",
        "O": "不是四类 SPIN 提问：陈述、产品介绍、寒暄、程序性问题、总结或承诺请求。",
    },
    "en": {
        "S": "Asks for facts and background about the current situation, with no difficulty implied.",
        "P": "Asks about difficulties, dissatisfaction or problems with the current situation.",
        "I": "Takes a problem as given and asks about its consequences or effects.",
        "N": "Asks the buyer to state the value or usefulness of solving the problem.",
        "O": "Not one of the four SPIN questions: a statement, pitch, small talk, procedural question, "
        "summary or commitment request.",
    },
}
_LAST_QUESTION_NOTE = {"zh": "（有多个问题时按最后一个判断）", "en": " (several questions: the last one decides)"}


@dataclass(frozen=True)
class Grade:
    """A label with its reason; label None means ungraded (the reason says why)."""

    label: Label | None
    reason: str
    better_question: str | None = None
    grader: str = "offline"
    confidence: float | None = None

    @property
    def graded(self) -> bool:
        return self.label is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "reason": self.reason,
            "better_question": self.better_question,
            "grader": self.grader,
            "confidence": None if self.confidence is None else round(self.confidence, 3),
        }


class Grader(Protocol):
    name: str

    def grade(self, utterance: str, context: str = "") -> Grade: ...


class LabelledUtterance(RepLine):
    """One line of a labelled set (spin-labels.md data format)."""

    model_config = ConfigDict(extra="forbid")
    label: Label
    note: str | None = None
    source: str | None = None  # where an external item was published
    source_title: str | None = None


def grade_many(
    grader: Grader,
    items: Sequence[tuple[str, str]],
    *,
    concurrency: int = 1,
    on_done: Callable[[], None] = lambda: None,
) -> list[Grade]:
    """Grade (utterance, context) pairs in order, with at most `concurrency` in flight."""

    def one(item: tuple[str, str]) -> Grade:
        try:
            return grader.grade(item[0], item[1])
        finally:
            on_done()

    if concurrency <= 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, items))


# --- LLM grader ---------------------------------------------------------------------------------


class GradeReply(BaseModel):
    """The JSON the LLM grader must return."""

    label: Label
    reason: str = Field(min_length=1, max_length=400)
    better_question: str | None = Field(default=None, max_length=400)


class LLMGrader:
    """Grades with a chat model; an invalid reply is retried once, then left ungraded."""

    def __init__(self, model: ChatModel) -> None:
        self._model = model
        self.name = f"llm:{model.name}"

    def grade(self, utterance: str, context: str = "") -> Grade:
        language = detect_language(utterance)
        messages = prompts.render(
            "grader",
            context=defuse_tags(context.strip(), "context", "utterance") or "(none)",
            utterance=defuse_tags(utterance.strip(), "context", "utterance"),
            reason_language="Simplified Chinese" if language == "zh" else "English",
        )
        reply = checked_json(self._model, messages, GradeReply, "grader")
        if isinstance(reply, str):
            return Grade(None, reply, grader=self.name)
        better = (reply.better_question or "").strip() or None
        return Grade(reply.label, reply.reason.strip(), better, grader=self.name)


# --- offline grader -----------------------------------------------------------------------------

# A sentence ends at Chinese stops, at ! ? ; anywhere, and at an English full stop before a space.
_SENTENCE = re.compile(r"(?:[^。！？!?；;\n.]|\.(?!\s))+(?:[。！？!?；;\n]+|\.(?=\s)|$)")
_QUESTION_END = ("?", "？")


def _embedded_context(context: str) -> str:
    """The text embedded for the buyer's line (a placeholder when there is none)."""
    return context or "(none)"


def focus_question(utterance: str) -> str:
    """The part the buyer will answer: the last question (rules 1 and 2), else the last sentence."""
    sentences: list[str] = [s.strip() for s in _SENTENCE.findall(utterance) if s.strip()]
    if not sentences:
        return utterance.strip()
    questions = [s for s in sentences if s.endswith(_QUESTION_END)]
    return questions[-1] if questions else sentences[-1]


def question_count(utterance: str) -> int:
    return sum(utterance.count(mark) for mark in _QUESTION_END)


_WORD = re.compile(r"[\w\u3400-\u9fff]")


def _mixed_tokens(text: str) -> list[str]:
    """jieba words for Chinese and English alike, keeping question words (how, what, 会不会)."""
    from bot.knowledge import _jieba

    return [t for t in (w.strip() for w in _jieba().lcut(text.lower())) if t and _WORD.search(t)]


class OfflineModel:
    """Character and word n-grams of the focus question, e5 embeddings of it and of the context,
    fed to a logistic regression."""

    def __init__(self, embeddings: EmbeddingModel, c: float = 8.0, context_weight: float = CONTEXT_WEIGHT) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self.embeddings = embeddings
        self.context_weight = context_weight
        # Chosen by 5-fold CV on the training set (evals/README.md): plain char 1-5 grams beat
        # char_wb 1-4, and word trigrams catch English frames like "what would it".
        self.char = TfidfVectorizer(analyzer="char", ngram_range=(1, 5), sublinear_tf=True, max_df=0.9)
        self.words = TfidfVectorizer(
            tokenizer=_mixed_tokens, token_pattern=None, lowercase=False, ngram_range=(1, 3), sublinear_tf=True
        )
        self.context_char = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True)
        self.clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced", random_state=SEED)

    def _dense(self, focus: Sequence[str], contexts: Sequence[str]) -> Any:
        from scipy import sparse

        focus_vectors = np.asarray(self.embeddings.embed_documents(list(focus)), dtype=np.float32)
        context_texts = [_embedded_context(c) for c in contexts]
        context_vectors = np.asarray(self.embeddings.embed_documents(context_texts), dtype=np.float32)
        has_context = np.array([[1.0 if c else 0.0] for c in contexts], dtype=np.float32)
        context_vectors *= has_context * (0.5 * self.context_weight)
        marks = np.array([[min(question_count(u), 3) / 3.0] for u in focus], dtype=np.float32)
        return sparse.csr_matrix(np.hstack([focus_vectors * 2.0, context_vectors, marks]))

    def _features(self, utterances: Sequence[str], contexts: Sequence[str], fit: bool) -> Any:
        from scipy import sparse

        focus = [focus_question(u) for u in utterances]
        if fit:
            blocks = [
                self.char.fit_transform(focus),
                self.words.fit_transform(focus),
                self.context_char.fit_transform(contexts) * (0.3 * self.context_weight),
            ]
        else:
            blocks = [
                self.char.transform(focus),
                self.words.transform(focus),
                self.context_char.transform(contexts) * (0.3 * self.context_weight),
            ]
        return sparse.hstack([*blocks, self._dense(focus, contexts)]).tocsr()

    def embedded_texts(self, utterance: str, context: str) -> list[str]:
        """What grading this line embeds: its focus question and the line it answers."""
        return [focus_question(utterance), _embedded_context(_strip_speaker(context))]

    def fit(self, items: Sequence[LabelledUtterance]) -> OfflineModel:
        features = self._features([i.utterance for i in items], [_strip_speaker(i.context) for i in items], True)
        self.clf.fit(features, [i.label for i in items])
        return self

    def predict_proba(self, utterances: Sequence[str], contexts: Sequence[str]) -> tuple[list[Label], Any]:
        features = self._features(list(utterances), [_strip_speaker(c) for c in contexts], False)
        probabilities = self.clf.predict_proba(features)
        classes = list(self.clf.classes_)
        return [classes[i] for i in probabilities.argmax(axis=1)], probabilities.max(axis=1)

    def __getstate__(self) -> dict[str, Any]:
        # The embedding model is a live C handle: re-attached on load.
        state = dict(self.__dict__)
        state["embeddings"] = None
        return state


def _strip_speaker(context: str) -> str:
    context = context.strip()
    for prefix in ("buyer:", "Buyer:", "买方:", "客户:", "buyer：", "客户："):
        if context.startswith(prefix):
            return context[len(prefix) :].strip()
    return context


def training_files(directory: Path = TRAIN_DIR) -> list[Path]:
    files = sorted(directory.glob(TRAIN_GLOB)) + sorted(directory.glob(EXTERNAL_TRAIN_GLOB))
    if not files:
        raise FileNotFoundError(f"{directory}: no {TRAIN_GLOB} training files")
    return files


def load_training_set(directory: Path = TRAIN_DIR) -> list[LabelledUtterance]:
    items: list[LabelledUtterance] = []
    for path in training_files(directory):
        items.extend(read_jsonl(path, LabelledUtterance))
    return items


def files_fingerprint(header: str, paths: Sequence[Path]) -> str:
    """A short digest of a header (model version, embedding model, seed) and each file's name and bytes."""
    digest = hashlib.sha256(header.encode())
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def training_fingerprint(embeddings: EmbeddingModel, directory: Path = TRAIN_DIR) -> str:
    return files_fingerprint(f"{MODEL_VERSION}\n{embeddings.name}\n{SEED}\n", training_files(directory))


M = TypeVar("M")


def stored_model(
    store: Path, prefix: str, fingerprint: str, embeddings: EmbeddingModel, train: Callable[[], M],
    *, retrain: bool = False,
) -> M:
    """The model stored under `prefix-fingerprint` if there is one, else `train()`, stored atomically
    (older versions removed). The embedding model, a live handle, is re-attached on load."""
    path = store / f"{prefix}-{fingerprint}.joblib"
    if path.exists() and not retrain:
        model: Any = joblib.load(path)
        model.embeddings = embeddings
        return cast(M, model)
    fresh = train()
    store.mkdir(parents=True, exist_ok=True)
    for old in store.glob(f"{prefix}-*.joblib"):
        old.unlink(missing_ok=True)
    tmp = path.with_suffix(".tmp")
    joblib.dump(fresh, tmp)
    tmp.replace(path)
    return fresh


class OfflineGrader:
    """The trained classifier behind the Grader protocol; trains itself when its model is missing."""

    name = "offline"

    def __init__(self, model: OfflineModel) -> None:
        self._model = model
        self._lock = threading.Lock()

    @classmethod
    def load_or_train(
        cls, embeddings: EmbeddingModel, store: Path, directory: Path = TRAIN_DIR, *, retrain: bool = False
    ) -> OfflineGrader:
        """The stored model if it matches the training data and code, else a freshly trained one."""
        model = stored_model(
            store, "offline-grader", training_fingerprint(embeddings, directory), embeddings,
            lambda: OfflineModel(embeddings).fit(load_training_set(directory)), retrain=retrain,
        )
        return cls(model)

    def embedded_texts(self, utterance: str, context: str = "") -> list[str]:
        return self._model.embedded_texts(utterance, context)

    def grade(self, utterance: str, context: str = "") -> Grade:
        return self.grade_batch([(utterance, context)])[0]

    def grade_batch(self, items: Iterable[tuple[str, str]]) -> list[Grade]:
        pairs = list(items)
        if not pairs:
            return []
        with self._lock:
            labels, confidences = self._model.predict_proba([u for u, _ in pairs], [c for _, c in pairs])
        grades = []
        for (utterance, _), label, confidence in zip(pairs, labels, confidences, strict=True):
            language = detect_language(utterance)
            reason = f"{LABEL_NAMES[language][label]}: {_REASONS[language][label]}"
            if question_count(utterance) > 1:
                reason += _LAST_QUESTION_NOTE[language]
            grades.append(Grade(label, reason, None, grader="offline", confidence=float(confidence)))
        return grades


def cross_validate(
    items: Sequence[LabelledUtterance], embeddings: EmbeddingModel, folds: int = 5
) -> tuple[list[Label], list[Label]]:
    """Out-of-fold predictions on the training set (stratified by label and language)."""
    from sklearn.model_selection import StratifiedKFold

    strata = [f"{i.lang}-{i.label}" for i in items]
    gold: list[Label] = []
    predicted: list[Label] = []
    order: list[int] = []
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=SEED)
    for train_idx, test_idx in splitter.split(np.zeros(len(items)), strata):
        model = OfflineModel(embeddings).fit([items[i] for i in train_idx])
        labels, _ = model.predict_proba([items[i].utterance for i in test_idx], [items[i].context for i in test_idx])
        predicted.extend(labels)
        gold.extend(items[i].label for i in test_idx)
        order.extend(test_idx)
    # Back to the input order so per-sample logs line up with the file.
    ranks = np.argsort(order)
    return [gold[i] for i in ranks], [predicted[i] for i in ranks]


class CachedEmbeddings:
    """Memoises another embedding model, for training runs that embed the same texts per fold."""

    def __init__(self, inner: EmbeddingModel) -> None:
        self._inner = inner
        self.name = inner.name
        self._cache: dict[str, list[float]] = {}

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            self._cache.update(zip(missing, self._inner.embed_documents(missing), strict=True))
        return [self._cache[t] for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._inner.embed_query(text)
