"""Smoke test of the web app: a real Gradio server on 127.0.0.1, asked through gradio_client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings
from bot.runtime import Runtime


@pytest.fixture
def ui_url(knowledge_home: Path, free_port: int) -> Iterator[str]:
    from bot.ui import build_app

    runtime = Runtime(Settings(SPINBOT_HOME=str(knowledge_home)))  # type: ignore[call-arg]
    assert runtime.engine == "offline"
    app = build_app(runtime)
    app.queue().launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{free_port}/"
    finally:
        app.close()


def _last_assistant_text(history: list[dict[str, Any]]) -> str:
    message = history[-1]
    assert message["role"] == "assistant"
    content = message["content"]
    if isinstance(content, list):  # gradio 6: a list of {"type": "text", "text": ...}
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def test_coach_answers_a_chinese_question_in_the_web_app(ui_url: str) -> None:
    from gradio_client import Client

    client = Client(ui_url, verbose=False)
    api = client.view_api(return_format="dict", print_info=False)
    assert "/coach_ask" in api["named_endpoints"], json.dumps(api["named_endpoints"], ensure_ascii=False)[:500]

    history, question_box, sources = client.predict("什么是暗示问题?", [], api_name="/coach_ask")
    reply = _last_assistant_text(history)
    assert history[0]["role"] == "user"
    assert reply.startswith("课程中最相关的内容：")
    assert "[1]" in reply and "暗示问题" in reply
    assert question_box == "", "the question box is cleared after an answer"
    assert "<summary>[1] " in sources
    assert "concepts/" in sources or "course/spin-course-zh.txt#L" in sources


def test_empty_question_is_shown_as_an_error(ui_url: str) -> None:
    from gradio_client import Client

    client = Client(ui_url, verbose=False)
    with pytest.raises(Exception, match="empty"):
        client.predict("   ", [], api_name="/coach_ask")
