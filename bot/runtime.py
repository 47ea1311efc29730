"""Wires the engine chosen by the settings: models per role, embeddings, index, coach."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property

from bot import scenarios
from bot.buyer import Buyer, LLMBuyer, OfflineBuyer
from bot.coach import Coach
from bot.config import Engine, Role, Settings
from bot.grader import Grader, LLMGrader, OfflineGrader
from bot.knowledge import KnowledgeIndex, bundled_embeddings
from bot.llm import ChatModel, EmbeddingModel, chat_model_from_settings, embedding_model_from_settings
from bot.reading import (
    InsightModel,
    LLMReader,
    MemoEmbeddings,
    MoveModel,
    OfflineReader,
    ProposalBank,
    Reader,
    TopicGate,
    TopicMatcher,
    load_or_train_insights,
    load_or_train_moves,
    load_or_train_topic_gate,
)
from bot.scenarios import Scenario
from bot.session import PracticeSession
from bot.text import Language
from bot.transcripts import new_path

# SPINBOT_EMBED_MODEL value that keeps the bundled embeddings on the LLM engine
# (for providers without an embeddings endpoint, such as DeepSeek).
BUNDLED_EMBEDDINGS = "bundled"


@dataclass
class Runtime:
    """Everything a session needs, built lazily so the CLI pays only for what it uses."""

    settings: Settings
    models: dict[Role, ChatModel] = field(default_factory=dict)
    embedding_override: EmbeddingModel | None = None

    @property
    def engine(self) -> Engine:
        return self.settings.engine

    def model(self, role: Role) -> ChatModel | None:
        """The chat model for a role, or None on the offline engine."""
        if role in self.models:
            return self.models[role]
        if self.engine == "offline":
            return None
        self.models[role] = chat_model_from_settings(self.settings, role)
        return self.models[role]

    @cached_property
    def embeddings(self) -> EmbeddingModel:
        if self.embedding_override is not None:
            return self.embedding_override
        if self.engine == "offline" or self.settings.spinbot_embed_model == BUNDLED_EMBEDDINGS:
            return bundled_embeddings()
        return embedding_model_from_settings(self.settings)

    @cached_property
    def index(self) -> KnowledgeIndex:
        return KnowledgeIndex(self.settings, self.embeddings)

    @cached_property
    def coach(self) -> Coach:
        return Coach(self.index, self.model("coach"))

    @cached_property
    def reading_embeddings(self) -> MemoEmbeddings:
        """The bundled e5 behind every offline reading: the models were trained on it, and the thresholds
        are set for it, so both engines read alike. Memoised: one line is embedded once per turn."""
        return MemoEmbeddings(bundled_embeddings())

    @cached_property
    def offline_grader(self) -> OfflineGrader:
        return OfflineGrader.load_or_train(self.reading_embeddings, self.settings.spinbot_home / "models")

    @cached_property
    def move_model(self) -> MoveModel:
        return load_or_train_moves(self.reading_embeddings, self.settings.spinbot_home / "models")

    @cached_property
    def topic_gate(self) -> TopicGate:
        return load_or_train_topic_gate(self.reading_embeddings, self.settings.spinbot_home / "models")

    def grader(self, kind: Engine | None = None) -> Grader:
        """The grader of the engine in use, or of the kind asked for."""
        kind = kind or self.engine
        if kind == "offline":
            return self.offline_grader
        model = self.models.get("grader") or chat_model_from_settings(self.settings, "grader")
        return LLMGrader(model)

    _matchers: dict[str, TopicMatcher] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def topic_matcher(self, card: Scenario) -> TopicMatcher:
        """Topic matching for a card, built once even when many calls start at once."""
        with self._lock:
            if card.id not in self._matchers:
                self._matchers[card.id] = TopicMatcher(card, self.reading_embeddings, self.topic_gate)
            return self._matchers[card.id]

    @cached_property
    def insight_model(self) -> InsightModel:
        return load_or_train_insights(self.reading_embeddings, self.settings.spinbot_home / "models")

    @cached_property
    def proposal_bank(self) -> ProposalBank:
        return ProposalBank(self.reading_embeddings)

    def offline_reader(self, card: Scenario) -> OfflineReader:
        return OfflineReader(card, self.offline_grader, self.move_model, self.topic_matcher(card), self.proposal_bank,
                             self.insight_model)

    def reader(self, card: Scenario, kind: Engine | None = None) -> Reader:
        """The reader of the engine in use (or of the kind asked for) for one card."""
        kind = kind or self.engine
        if kind == "offline":
            return self.offline_reader(card)
        model = self.models.get("grader") or chat_model_from_settings(self.settings, "grader")
        offline = self.offline_reader(card)
        return LLMReader(card, model, lambda text: offline.read_move(text) == "injection",
                         offline.topics.pointed_implication)

    def buyer(self) -> Buyer:
        model = self.model("buyer")
        return OfflineBuyer() if model is None else LLMBuyer(model, self.index)

    def model_names(self) -> str:
        if self.engine == "offline":
            return "offline"
        return ", ".join(f"{r}={self.settings.model_for(r)}" for r in ("buyer", "grader", "coach"))

    def new_session(self, scenario_id: str, language: Language, *, save: bool = True) -> PracticeSession:
        """A practice call; its transcript goes under SPINBOT_HOME/transcripts."""
        card = scenarios.get(scenario_id)
        path = new_path(self.settings.transcripts_dir, card.id) if save else None
        return PracticeSession(
            card, language, reader=self.reader(card), buyer=self.buyer(),
            transcript=path, engine=self.engine, model=self.model_names(),
            predictor=self.offline_reader(card) if self.engine == "llm" else None,
        )

    def describe(self) -> str:
        """One line for banners and logs: engine and models, never the key."""
        if self.engine == "offline":
            return "offline engine (no LLM): bundled e5 embeddings, extractive coach"
        where = self.settings.openai_base_url or "OpenAI"
        roles = ", ".join(f"{r} {self.settings.model_for(r)}" for r in ("buyer", "grader", "coach"))
        return f"LLM engine at {where}: {roles}; embeddings {self.embeddings.name}"
