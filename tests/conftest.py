"""Shared fixtures. Every test runs offline by construction: no remote network, no inherited settings."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bot.config import Settings
from bot.testing import FakeChatModel, FakeChatReply, FakeOpenAIServer, forbid_remote_network

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
