"""The Gradio web app. Thin: it calls the package and turns errors into plain warnings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from bot.coach import CoachAnswer
from bot.llm import LLMError
from bot.runtime import Runtime
from bot.text import InputError

OFFLINE_BANNER = (
    "**Offline engine / 离线引擎**: runs with no API key and no network; the coach quotes the course "
    "extractively. To use an LLM, set `OPENAI_API_KEY` (and `OPENAI_BASE_URL` for DeepSeek, Qwen, "
    "Ollama, vLLM…) and restart. 设置 `OPENAI_API_KEY` 后重启即可使用大模型。"
)


def _sources_markdown(answer: CoachAnswer) -> str:
    if not answer.sources:
        return ""
    lines = []
    for i, passage in enumerate(answer.retrieved, start=1):
        if passage in answer.sources:
            lines.append(f"<details><summary>[{i}] {passage.source}</summary>\n\n{passage.text}\n\n</details>")
    return "\n".join(lines)


def build_app(runtime: Runtime) -> gr.Blocks:
    """The page: for now the coach; practice and review tabs come with the role-play."""
    coach = runtime.coach

    def ask(question: str, history: list[dict[str, Any]]) -> Iterator[tuple[list[dict[str, Any]], str, str]]:
        history = list(history or [])
        try:
            history.append({"role": "user", "content": question})
            history.append({"role": "assistant", "content": ""})
            for part in coach.stream(question):
                if isinstance(part, CoachAnswer):
                    history[-1]["content"] = part.text
                    yield history, "", _sources_markdown(part)
                else:
                    history[-1]["content"] += part
                    yield history, "", ""
        except InputError as exc:
            raise gr.Error(str(exc)) from None
        except LLMError as exc:
            gr.Warning(str(exc))
            history[-1]["content"] = "⚠️ " + str(exc)
            yield history, question, ""

    app: gr.Blocks
    with gr.Blocks(title="spinbot") as app:
        gr.Markdown("# spinbot · SPIN 销售练习")
        gr.Markdown(f"`{runtime.describe()}`", elem_id="engine-line")
        if runtime.engine == "offline":
            gr.Markdown(OFFLINE_BANNER, elem_id="offline-banner")
        with gr.Tab("教练 Coach", id="coach"):
            chat = gr.Chatbot(label="Coach", height=420, elem_id="coach-chat")
            question = gr.Textbox(
                label="Question / 问题", placeholder="什么是暗示问题？ / What is a Need-payoff question?",
                elem_id="coach-question",
            )
            sources = gr.Markdown(elem_id="coach-sources")
            question.submit(ask, [question, chat], [chat, question, sources], api_name="coach_ask")
    return app


def serve(runtime: Runtime, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Build the index if needed and serve the page."""
    runtime.index.ensure()
    build_app(runtime).queue(default_concurrency_limit=8).launch(
        server_name=host, server_port=port, show_error=False, quiet=False
    )
