"""The index on a Chroma server (CHROMA_HOST): a real `chroma run` process on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bot.config import Settings
from bot.knowledge import KnowledgeIndex
from bot.testing import FakeEmbeddingModel

pytestmark = pytest.mark.chroma_server

CHROMA = Path(sys.executable).parent / "chroma"
START_TIMEOUT = 60.0


@pytest.fixture
def chroma_server(tmp_path: Path, free_port: int) -> Iterator[int]:
    """A `chroma run` server on 127.0.0.1:<free port>, stopped after the test; yields the port."""
    if not CHROMA.exists():
        pytest.skip(f"{CHROMA} is not installed (chromadb's CLI)")
    log = (tmp_path / "chroma.log").open("wb")
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
    process = subprocess.Popen(
        [str(CHROMA), "run", "--path", str(tmp_path / "chroma-data"), "--host", "127.0.0.1", "--port", str(free_port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        url = f"http://127.0.0.1:{free_port}/api/v2/heartbeat"
        while True:
            if process.poll() is not None:
                pytest.fail(f"chroma run exited with {process.returncode}: {(tmp_path / 'chroma.log').read_text()}")
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"chroma run did not answer {url} within {START_TIMEOUT:g} s")
            time.sleep(0.2)
        yield free_port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def test_index_on_a_chroma_server(
    chroma_server: int, tiny_knowledge: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHROMA_HOST", "127.0.0.1")
    monkeypatch.setenv("CHROMA_PORT", str(chroma_server))
    settings = Settings()
    assert settings.chroma_host == "127.0.0.1" and settings.chroma_port == chroma_server

    embed = FakeEmbeddingModel()
    first = KnowledgeIndex(settings, embed, tiny_knowledge)
    report = first.ensure()
    assert report.built and report.chunks == 5
    assert not settings.index_dir.exists(), "server mode must not create a local index folder"

    embed.calls.clear()
    second = KnowledgeIndex(Settings(), embed, tiny_knowledge)  # as another process would
    assert second.is_current()
    again = second.ensure()
    assert not again.built and again.fingerprint == report.fingerprint
    assert embed.calls == []

    passages = second.search("信任 易受伤害之处", k=2)
    assert len(passages) == 2
    assert passages[0].source == "concepts/trust.zh.md#信任的定义"
    assert "易受伤害之处" in passages[0].text
