"""Shared fixtures. Every test runs offline by construction: no remote network, no inherited settings."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from bot.config import Settings
from bot.testing import FakeChatModel, FakeChatReply, FakeOpenAIServer, closed_port, forbid_remote_network

if TYPE_CHECKING:
    from bot.knowledge import KnowledgeIndex

# Settings a developer's shell may carry; a test must never pick up a real key, URL or index server.
_INHERITED_PREFIXES = ("OPENAI_", "SPINBOT_", "CHROMA_")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Block remote connections and give each test a clean environment and its own SPINBOT_HOME."""
    forbid_remote_network(monkeypatch)
    for name in list(os.environ):
        if name.startswith(_INHERITED_PREFIXES):
            monkeypatch.delenv(name)
    # A developer's .env (read relative to the cwd) must not leak a real key into tests either.
    monkeypatch.setitem(Settings.model_config, "env_file", None)
    monkeypatch.setenv("ANONYMIZED_TELEMETRY", "False")  # chromadb
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SPINBOT_HOME", str(tmp_path / "spinbot-home"))


@pytest.fixture
def fake_server() -> Iterator[FakeOpenAIServer]:
    """A started FakeOpenAIServer; its `.base_url` goes where OPENAI_BASE_URL would."""
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def fake_chat() -> Callable[..., FakeChatModel]:
    """Factory: `fake_chat("reply 1", {"label": "S"}, name="grader")` -> FakeChatModel."""

    def make(*replies: FakeChatReply, name: str = "fake") -> FakeChatModel:
        return FakeChatModel(replies, name=name)

    return make


# ---- Fixtures for other parts of spinbot go below this line. ----


def _clean_settings(**values: str) -> Settings:
    """Settings built from `values` alone: no inherited OPENAI_/SPINBOT_/CHROMA_ variable, no .env file."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(_INHERITED_PREFIXES):
                patch.delenv(name)
        patch.setenv("ANONYMIZED_TELEMETRY", "False")
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def knowledge_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SPINBOT_HOME whose index of the real knowledge/ (bundled e5) is built once per session.

    Point SPINBOT_HOME here (monkeypatch.setenv) to use the real index without rebuilding it (~20-30 s).
    """
    from bot.knowledge import KnowledgeIndex, bundled_embeddings

    home = tmp_path_factory.mktemp("knowledge-home")
    KnowledgeIndex(_clean_settings(SPINBOT_HOME=str(home)), bundled_embeddings()).ensure()
    return home


@pytest.fixture(scope="session")
def real_index(knowledge_home: Path) -> KnowledgeIndex:
    """The session's KnowledgeIndex over the real knowledge/ (bundled e5), already built."""
    from bot.knowledge import KnowledgeIndex, bundled_embeddings

    index = KnowledgeIndex(_clean_settings(SPINBOT_HOME=str(knowledge_home)), bundled_embeddings())
    assert not index.ensure().built, "the session index should have been built by knowledge_home"
    return index


TINY_COURSE = "课程标题：SPIN销售\n暗示问题追问难点的后果和影响。\n需求效益问题让客户说出解决方案的价值。\n"
TINY_SECTIONS = """sections:
  - {start: 1, end: 1, title: {zh: 课程标题, en: Course title}}
  - {start: 2, end: 3, title: {zh: 暗示与需求效益, en: Implication and need-payoff}}
"""
TINY_CONCEPT_EN = """# Objections

## Preventing objections

Most objections are caused by the seller pitching too early, before the buyer sees the need.

## Pricing

A price objection often means the value was not built: ask more implication questions.
"""
TINY_CONCEPT_ZH = "# 信任\n\n## 信任的定义\n\n信任就是向别人暴露你的易受伤害之处。\n"


@pytest.fixture
def tiny_knowledge(tmp_path: Path) -> Path:
    """A small knowledge/ folder: one course file with its section map and two concept notes (5 chunks)."""
    root = tmp_path / "knowledge"
    (root / "course").mkdir(parents=True)
    (root / "concepts").mkdir()
    (root / "course" / "mini-course-zh.txt").write_text(TINY_COURSE, encoding="utf-8")
    (root / "course" / "sections.yaml").write_text(TINY_SECTIONS, encoding="utf-8")
    (root / "concepts" / "objections.en.md").write_text(TINY_CONCEPT_EN, encoding="utf-8")
    (root / "concepts" / "trust.zh.md").write_text(TINY_CONCEPT_ZH, encoding="utf-8")
    return root


@pytest.fixture
def free_port() -> int:
    """A 127.0.0.1 port that was free a moment ago."""
    return closed_port()


# ---- Role-play fixtures: the trained offline grader and move model, readers per card, practice sessions. ----

if TYPE_CHECKING:
    from bot.buyer import Buyer
    from bot.grader import OfflineGrader
    from bot.reading import InsightModel, MoveModel, OfflineReader, TopicGate
    from bot.scenarios import Scenario
    from bot.session import PracticeSession


@pytest.fixture(scope="session")
def offline_grader(tmp_path_factory: pytest.TempPathFactory) -> OfflineGrader:
    """The real offline grader (bundled e5), trained once per session into a temporary store (~20 s)."""
    from bot.grader import OfflineGrader
    from bot.knowledge import bundled_embeddings

    return OfflineGrader.load_or_train(bundled_embeddings(), tmp_path_factory.mktemp("grader-store"))


@pytest.fixture(scope="session")
def move_model(tmp_path_factory: pytest.TempPathFactory) -> MoveModel:
    """The real move model (bundled e5), trained once per session into a temporary store."""
    from bot.knowledge import bundled_embeddings
    from bot.reading import load_or_train_moves

    return load_or_train_moves(bundled_embeddings(), tmp_path_factory.mktemp("move-store"))


@pytest.fixture(scope="session")
def topic_gate(tmp_path_factory: pytest.TempPathFactory) -> TopicGate:
    """The real topic gate (bundled e5), trained once per session on the topic tune files."""
    from bot.knowledge import bundled_embeddings
    from bot.reading import load_or_train_topic_gate

    return load_or_train_topic_gate(bundled_embeddings(), tmp_path_factory.mktemp("topic-store"))


@pytest.fixture(scope="session")
def insight_model(tmp_path_factory: pytest.TempPathFactory) -> InsightModel:
    """The real insight-or-selling classifier (bundled e5), trained once per session on the tune file."""
    from bot.knowledge import bundled_embeddings
    from bot.reading import load_or_train_insights

    return load_or_train_insights(bundled_embeddings(), tmp_path_factory.mktemp("insight-store"))


@pytest.fixture(scope="session")
def card_reader(
    offline_grader: OfflineGrader, move_model: MoveModel, topic_gate: TopicGate, insight_model: InsightModel
) -> Callable[[Scenario], OfflineReader]:
    """Factory: the real OfflineReader (bundled e5) for a card; its topic matcher is built once per card."""
    from bot.knowledge import bundled_embeddings
    from bot.reading import OfflineReader, ProposalBank, TopicMatcher

    built: dict[str, TopicMatcher] = {}
    proposals = ProposalBank(bundled_embeddings())

    def make(card: Scenario) -> OfflineReader:
        if card.id not in built:
            built[card.id] = TopicMatcher(card, bundled_embeddings(), topic_gate)
        return OfflineReader(card, offline_grader, move_model, built[card.id], proposals, insight_model)

    return make


@pytest.fixture
def practice(card_reader: Callable[[Scenario], OfflineReader]) -> Callable[..., PracticeSession]:
    """Factory: `practice("warehouse-extrinsic-01", "zh", buyer=None, transcript=None)` -> an offline
    PracticeSession on the real reader (the OfflineBuyer unless a buyer is given)."""
    from bot import scenarios
    from bot.buyer import OfflineBuyer
    from bot.session import PracticeSession

    def make(
        scenario_id: str, language: str = "zh", *, buyer: Buyer | None = None, transcript: Path | None = None
    ) -> PracticeSession:
        card = scenarios.get(scenario_id)
        return PracticeSession(
            card, language,  # type: ignore[arg-type]
            reader=card_reader(card), buyer=buyer or OfflineBuyer(),
            transcript=transcript, engine="offline" if buyer is None else "llm",
            model=getattr(buyer, "name", "offline"),
        )

    return make


# ---- Chat CLI and transcript fixtures: SPINBOT_HOMEs where the grader model (and index) already exist. ----


@pytest.fixture(scope="session")
def grader_models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models/ folder holding the trained offline grader, move model, topic gate and insight model, as
    spinbot stores them.

    Kept in pytest's cache between runs (keyed by the training fingerprint, so stale models are
    replaced); otherwise taken from the session's `offline_grader` instead of training a second time.
    """
    import joblib

    from bot.grader import training_fingerprint
    from bot.knowledge import bundled_embeddings

    cache = getattr(request.config, "cache", None)
    store = cache.mkdir("spinbot-grader-models") if cache is not None else tmp_path_factory.mktemp("grader-models")
    from bot.reading import insight_fingerprint, move_fingerprint, topic_fingerprint

    stored = {
        f"offline-grader-{training_fingerprint(bundled_embeddings())}.joblib": ("offline-grader", "offline_grader"),
        f"move-model-{move_fingerprint(bundled_embeddings())}.joblib": ("move-model", "move_model"),
        f"topic-gate-{topic_fingerprint(bundled_embeddings())}.joblib": ("topic-gate", "topic_gate"),
        f"insight-model-{insight_fingerprint(bundled_embeddings())}.joblib": ("insight-model", "insight_model"),
    }
    for name, (prefix, fixture) in stored.items():
        path = store / name
        if path.exists():
            continue
        model = request.getfixturevalue(fixture)
        for old in store.glob(f"{prefix}-*.joblib"):
            old.unlink(missing_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        joblib.dump(getattr(model, "_model", model), tmp)
        tmp.replace(path)
    return store


@pytest.fixture(scope="session")
def stored_grader(grader_models: Path) -> OfflineGrader:
    """The offline grader exactly as `spinbot` loads it from SPINBOT_HOME/models (no training)."""
    from bot.grader import OfflineGrader
    from bot.knowledge import bundled_embeddings

    return OfflineGrader.load_or_train(bundled_embeddings(), grader_models)


@pytest.fixture
def chat_home(tmp_path: Path, grader_models: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SPINBOT_HOME (set in the environment) with the trained grader model in models/."""
    import shutil

    home = tmp_path / "chat-home"
    shutil.copytree(grader_models, home / "models", ignore=shutil.ignore_patterns("*.tmp"))
    monkeypatch.setenv("SPINBOT_HOME", str(home))
    return home


@pytest.fixture
def llm_chat_home(chat_home: Path, knowledge_home: Path) -> Path:
    """chat_home plus a copy of the session's index of knowledge/ (bundled e5), for the LLM buyer's notes."""
    import shutil

    shutil.copytree(knowledge_home / "index", chat_home / "index")
    return chat_home


# ---- Faults, bad input and security (test_faults.py, test_bad_input.py, test_security.py). ----


class ScriptedProvider:
    """A chat_handler for FakeOpenAIServer that answers by what a request is for, not by its order.

    Grader requests get `{"label": labels.get(utterance, "O")}`, reader requests also a move
    (`moves`, else question for S/P/I/N and summary for O) and a topic (`topics`, else "none");
    buyer requests speak the planned line (the text inside <convey>); coach and debrief requests get
    fixed answers. `faults[kind]` (kind is grader, buyer, coach or debrief) is a queue of replies served
    first, one per request (retries included); `fail_on[text]` answers every grader or buyer request
    about that rep line with the given reply.
    """

    COACH_ANSWER = "暗示问题追问难点带来的后果和影响[1]。"
    DEBRIEF = '{"advice": "下次在请求承诺前多问暗示问题。", "rewrites": []}'

    def __init__(self) -> None:
        from collections import deque

        from bot.testing import FakeReply

        self.labels: dict[str, str] = {}
        self.moves: dict[str, str] = {}
        self.topics: dict[str, str] = {}
        self.faults: dict[str, deque[str | FakeReply]] = {
            kind: deque() for kind in ("grader", "buyer", "coach", "debrief", "other")
        }
        self.fail_on: dict[str, FakeReply] = {}
        self.bodies: dict[str, list[dict[str, object]]] = {kind: [] for kind in self.faults}

    @staticmethod
    def content(message: dict[str, object]) -> str:
        content = message.get("content") or ""
        if isinstance(content, list):
            return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        return str(content)

    @staticmethod
    def between(text: str, tag: str) -> str | None:
        import re

        match = re.search(rf"<{tag}>\n?(.*?)\n?</{tag}>", text, re.DOTALL)
        return match.group(1).strip() if match else None

    def kind(self, body: dict[str, object]) -> str:
        messages = body["messages"]
        assert isinstance(messages, list)
        system = self.content(messages[0]) if messages and messages[0]["role"] == "system" else ""
        if system.startswith(("You grade", "You read")):
            return "grader"
        if "<convey>" in system:
            return "buyer"
        if system.startswith("You are the coach"):
            return "coach"
        if "debrief" in system:
            return "debrief"
        return "other"

    def __call__(self, body: dict[str, object]) -> object:
        import json

        from bot.testing import FakeReply

        kind = self.kind(body)
        self.bodies[kind].append(body)
        messages = body["messages"]
        assert isinstance(messages, list)
        system, user = self.content(messages[0]), self.content(messages[-1])
        rep = self.between(user, "utterance") if kind == "grader" else self.between(user, "rep_message")
        if self.faults[kind]:
            return self.faults[kind].popleft()
        if rep is not None and rep in self.fail_on:
            return self.fail_on[rep]
        if kind == "grader":
            label = self.labels.get(rep or "", "O")
            reply: dict[str, object] = {"label": label, "reason": f"scripted grade {label}"}
            if system.startswith("You read"):
                reply["move"] = self.moves.get(rep or "", "summary" if label == "O" else "question")
                reply["topic"] = self.topics.get(rep or "", "none")
            return FakeReply(content=json.dumps(reply))
        if kind == "buyer":
            return self.between(system, "convey") or "嗯。"
        if kind == "coach":
            return self.COACH_ANSWER
        if kind == "debrief":
            return self.DEBRIEF
        return "OK"


@pytest.fixture
def provider(fake_server: FakeOpenAIServer) -> ScriptedProvider:
    """A ScriptedProvider installed as the fake server's chat_handler."""
    scripted = ScriptedProvider()
    fake_server.chat_handler = scripted  # type: ignore[assignment]
    return scripted


@pytest.fixture
def served_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., dict[str, object]]]:
    """Factory: `served_app(runtime, host="127.0.0.1", no_auth=False)` runs `bot.ui.serve` exactly as
    `spinbot ui` does (auth, upload limit, allowed paths, show_error) but without blocking. Returns
    {"url": ..., "app": the Blocks, "options": the launch keyword arguments}; every app closes at teardown."""
    import gradio as gr

    from bot import ui

    launched: list[gr.Blocks] = []
    original = gr.Blocks.launch

    def launch(self: gr.Blocks, *args: object, **kwargs: object) -> object:
        kwargs.update(prevent_thread_lock=True, quiet=True)
        launched.append(self)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gr.Blocks, "launch", launch)

    def make(runtime: object, host: str = "127.0.0.1", *, no_auth: bool = False) -> dict[str, object]:
        captured: dict[str, object] = {}

        def recording(self: gr.Blocks, *args: object, **kwargs: object) -> object:
            captured.update(kwargs)
            return launch(self, *args, **kwargs)

        port = closed_port()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(gr.Blocks, "launch", recording)
            ui.serve(runtime, host=host, port=port, no_auth=no_auth)  # type: ignore[arg-type]
        return {"url": f"http://127.0.0.1:{port}/", "app": launched[-1], "options": captured}

    yield make
    for app in launched:
        app.close()


# ---- Web app fixtures: a SPINBOT_HOME where the index and the grader model already exist. ----


@pytest.fixture(scope="module")
def ui_home(tmp_path_factory: pytest.TempPathFactory, knowledge_home: Path, grader_models: Path) -> Path:
    """A fresh SPINBOT_HOME per test module: a copy of the session's index and of the trained grader
    model, so a Runtime on it builds and trains nothing; its transcripts/ starts empty."""
    import shutil

    home = tmp_path_factory.mktemp("ui-home")
    shutil.copytree(knowledge_home / "index", home / "index")
    shutil.copytree(grader_models, home / "models", ignore=shutil.ignore_patterns("*.tmp"))
    return home


@pytest.fixture(scope="module")
def ui_settings(ui_home: Path) -> Settings:
    """Offline-engine Settings on `ui_home`, built without any inherited variable or .env file."""
    settings = _clean_settings(SPINBOT_HOME=str(ui_home))
    assert settings.engine == "offline"
    return settings
