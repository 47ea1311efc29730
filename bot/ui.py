"""The Gradio web app: practice, coach and review. Thin: it calls the package and turns errors
into plain warnings; every browser session keeps its own call in gr.State."""

from __future__ import annotations

import contextlib
import html
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from bot import debrief as debriefs
from bot import prompts, scenarios
from bot.charts import spin_timeline_png
from bot.coach import CoachAnswer
from bot.datasets import DataError
from bot.grader import LABEL_NAMES
from bot.llm import LLMError
from bot.runtime import Runtime
from bot.scenarios import ScenarioError
from bot.session import PracticeSession, TurnResult
from bot.text import InputError, Language
from bot.transcripts import Transcript, TranscriptError, Turn, load

MAX_UPLOAD = "2mb"
T: dict[str, dict[Language, str]] = {
    "title": {"zh": "# spinbot · SPIN 销售练习", "en": "# spinbot · SPIN selling practice"},
    "ui_language": {"zh": "界面语言", "en": "Interface language"},
    "banner": {
        "zh": "**离线引擎**：无需 API 密钥、无需联网；买方按场景卡片回答，评分用内置分类器，"
              "教练直接引用课程原文。要使用大模型，请设置 `OPENAI_API_KEY`"
              "（DeepSeek、通义千问、Ollama、vLLM 等再设置 `OPENAI_BASE_URL`）后重启。",
        "en": "**Offline engine**: no API key, no network. The buyer answers from the scenario card, a built-in "
              "classifier grades, and the coach quotes the course. To use an LLM, set `OPENAI_API_KEY` (and "
              "`OPENAI_BASE_URL` for DeepSeek, Qwen, Ollama, vLLM…) and restart.",
    },
    "tab_practice": {"zh": "练习", "en": "Practice"},
    "tab_coach": {"zh": "教练", "en": "Coach"},
    "tab_review": {"zh": "复盘", "en": "Review"},
    "scenario": {"zh": "场景", "en": "Scenario"},
    "call_language": {"zh": "通话语言", "en": "Call language"},
    "start": {"zh": "开始通话", "en": "Start call"},
    "call": {"zh": "通话", "en": "Call"},
    "your_line": {"zh": "你说", "en": "You say"},
    "placeholder": {"zh": "输入你的问题，回车发送", "en": "Type your question and press Enter"},
    "send": {"zh": "发送", "en": "Send"},
    "hint": {"zh": "提示", "en": "Hint"},
    "end_call": {"zh": "结束通话", "en": "End call"},
    "panel": {"zh": "通话状态", "en": "Call state"},
    "debrief_chart": {"zh": "SPIN 提问分布", "en": "SPIN mix"},
    "download": {"zh": "下载通话记录 (JSONL)", "en": "Download transcript (JSONL)"},
    "coach_question": {"zh": "问题", "en": "Question"},
    "coach_placeholder": {"zh": "什么是暗示问题？/ What is a Need-payoff question?",
                          "en": "What is a Need-payoff question? / 什么是暗示问题？"},
    "coach_chat": {"zh": "教练", "en": "Coach"},
    "saved_calls": {"zh": "已保存的通话", "en": "Saved calls"},
    "refresh": {"zh": "刷新", "en": "Refresh"},
    "open_call": {"zh": "打开", "en": "Open"},
    "upload_transcript": {"zh": "上传通话记录 (JSONL)", "en": "Upload a transcript (JSONL)"},
    "upload_labelled": {"zh": "上传标注数据 (JSONL) 评估评分器",
                        "en": "Upload a labelled set (JSONL) to evaluate the grader"},
    "confusion": {"zh": "混淆矩阵", "en": "Confusion matrix"},
    "per_label": {"zh": "各类别指标", "en": "Per label"},
    "no_call": {"zh": "先选择场景并开始通话。", "en": "Pick a scenario and start a call first."},
    "call_over": {"zh": "通话已结束，点击“结束通话”查看复盘，或重新开始。",
                  "en": "The call has ended: press End call for the debrief, or start a new one."},
    "why": {"zh": "为什么", "en": "why"},
    "better": {"zh": "更好的问法", "en": "better question"},
    "trust": {"zh": "信任度", "en": "Trust"},
    "implied": {"zh": "隐含需求", "en": "Implied needs"},
    "explicit": {"zh": "明确需求", "en": "Explicit needs"},
    "counts": {"zh": "提问统计", "en": "Questions"},
    "outcome": {"zh": "结果", "en": "Outcome"},
}
CSS = """
.spin-badge{display:inline-block;min-width:1.6em;padding:0 .4em;margin-right:.4em;border-radius:.5em;
  color:#fff;font-weight:700;text-align:center}
.spin-S{background:#4e79a7}.spin-P{background:#f28e2b}.spin-I{background:#e15759}
.spin-N{background:#59a14f}.spin-O{background:#9c9c9c}.spin-X{background:#333}
.spin-why{font-size:.85em;opacity:.85}
"""


def t(key: str, lang: Language) -> str:
    return T[key][lang]


def _lang(value: str | None) -> Language:
    return "en" if value in ("en", "English") else "zh"


def _scenario_choices() -> list[tuple[str, str]]:
    return [
        (f"{s.title.zh} / {s.title.en} · {s.value_type} · {s.sales_type} · {s.difficulty}", s.id)
        for s in scenarios.builtin()
    ]


def rep_message(result: TurnResult, ui: Language) -> str:
    """The rep's line with its S/P/I/N/O badge; reason and better question fold out on demand."""
    label = result.reading.label or "?"
    name = LABEL_NAMES[ui][result.reading.label] if result.reading.label else "?"
    details = f"{html.escape(result.reading.reason)}"
    if result.reading.better_question:
        details += f"<br>{t('better', ui)}: {html.escape(result.reading.better_question)}"
    css_label = label if label in "SPINO" else "X"
    return (
        f'<span class="spin-badge spin-{css_label}" title="{name}">{label}</span>'
        f"{html.escape(result.rep)}"
        f'<details class="spin-why"><summary>{t("why", ui)}</summary>{details}</details>'
    )


def state_panel(session: PracticeSession | None, ui: Language) -> str:
    if session is None:
        return t("no_call", ui)
    state, card, lang = session.state, session.card, session.language
    implied = [card.problem(p).topic(lang) + (" ✓" if p in state.explicit else "") for p in state.implied]
    counts = " · ".join(f"{k} {state.counts[k]}" for k in "SPINO")
    lines = [
        f"**{card.buyer.name(lang)}** · {card.buyer.role(lang)}",
        f"**{t('trust', ui)}**: {'█' * round(state.trust * 10)}{'░' * (10 - round(state.trust * 10))} "
        f"{state.trust:.2f}",
        f"**{t('implied', ui)} → {t('explicit', ui)}**: {len(state.implied)} → {len(state.explicit)}",
        *[f"- {item}" for item in implied],
        f"**{t('counts', ui)}**: {counts}",
    ]
    if state.outcome:
        lines.append(f"**{t('outcome', ui)}**: {state.outcome}")
    return "\n\n".join(lines)


def _sources_markdown(answer: CoachAnswer) -> str:
    lines = []
    for i, passage in enumerate(answer.retrieved, start=1):
        if passage in answer.sources:
            lines.append(
                f"<details><summary>[{i}] {html.escape(passage.source)}</summary>\n\n{passage.text}\n\n</details>"
            )
    return "\n".join(lines)


def saved_call_path(folder: Path, name: str) -> Path:
    """The saved call `name` directly inside `folder`, or InputError: no paths, no '..', no links out of
    the folder, and no names the file system refuses (NUL bytes, overlong names)."""
    plain = bool(name) and name not in (".", "..") and name == Path(name).name and "\\" not in name
    try:
        root = folder.resolve()
        path = (root / name).resolve()
        inside = plain and path.parent == root and path.is_file()
    except (OSError, ValueError):
        inside = False
    if not inside:
        shown = name if len(name) <= 80 else name[:80] + "…"
        raise InputError(f"{shown!r}: not a saved call")
    return path


def build_app(runtime: Runtime) -> gr.Blocks:
    """The whole page."""
    coach = runtime.coach
    charts_dir = Path(tempfile.gettempdir()) / "spinbot-charts"

    def debrief_outputs(card: scenarios.Scenario, turns: list[Turn], lang: Language,
                        outcome: str | None) -> tuple[str, str]:
        report = debriefs.build(card, turns, lang, outcome=outcome, grader=runtime.grader())
        model = runtime.model("coach")
        if model is not None:
            report = debriefs.with_llm(report, card, turns, model)
        chart = spin_timeline_png(
            report.timeline, report.counts, f"{card.title(lang)} · {debriefs.outcome_name(report.outcome, lang)}",
            charts_dir / f"{uuid.uuid4().hex}.png",
        )
        return debriefs.markdown(report), str(chart)

    # --- practice ---------------------------------------------------------------------------------

    def start_call(scenario_id: str, call_lang: str, ui_value: str, old: PracticeSession | None) -> Any:
        ui = _lang(ui_value)
        if old is not None:
            old.close()
        try:
            session = runtime.new_session(scenario_id, _lang(call_lang))
        except ScenarioError as exc:
            raise gr.Error(str(exc)) from None
        chat = [{"role": "assistant", "content": session.opening}]
        return session, chat, state_panel(session, ui), "", None, gr.update(value=None, visible=False)

    def send(text: str, chat: list[dict[str, Any]], session: PracticeSession | None,
             ui_value: str) -> Iterator[Any]:
        ui = _lang(ui_value)
        if session is None:
            gr.Warning(t("no_call", ui))
            yield chat, text, state_panel(session, ui)
            return
        if session.state.ended:
            gr.Warning(t("call_over", ui))
            yield chat, text, state_panel(session, ui)
            return
        chat = list(chat or [])
        try:
            stream = session.play_stream(text)
            first = next(stream)
        except InputError as exc:
            gr.Warning(str(exc))
            yield chat, text, state_panel(session, ui)
            return
        chat.append({"role": "user", "content": html.escape(text)})
        chat.append({"role": "assistant", "content": ""})
        for part in [first, *stream]:
            if isinstance(part, TurnResult):
                chat[-2]["content"] = rep_message(part, ui)
                chat[-1]["content"] = part.buyer
                if part.notice:
                    gr.Warning(part.notice)
                yield chat, "", state_panel(session, ui)
            else:
                chat[-1]["content"] += part
                yield chat, "", state_panel(session, ui)

    def hint(session: PracticeSession | None, ui_value: str) -> str:
        ui = _lang(ui_value)
        if session is None:
            gr.Warning(t("no_call", ui))
            return ""
        label, example = debriefs.next_step(session.card, session.state, session.language)
        offline = f"**{label} · {LABEL_NAMES[ui][label]}**: {example}"  # type: ignore[index]
        model = runtime.model("coach")
        if model is None:
            return offline
        history = "\n".join(f"Rep: {r}\nBuyer: {b}" for r, b in session.history[-6:])
        state = (f"scenario: {session.card.title(session.language)}; trust {session.state.trust:.2f}; "
                 f"questions so far {session.state.counts}; implied needs "
                 f"{[session.card.problem(p).topic(session.language) for p in session.state.implied]}; "
                 f"explicit needs {[session.card.problem(p).topic(session.language) for p in session.state.explicit]};"
                 f" suggested next step: {label}: {example}")
        try:
            return model.complete(
                prompts.render("hint", language_name="Simplified Chinese" if session.language == "zh"
                               else "English", state=state, history=history or "(none)"),
                temperature=0.3,
            )
        except LLMError as exc:
            gr.Warning(str(exc))
            return offline

    def end_call(session: PracticeSession | None, ui_value: str) -> Any:
        ui = _lang(ui_value)
        if session is None:
            gr.Warning(t("no_call", ui))
            return session, "", None, gr.update(visible=False), state_panel(session, ui)
        state = session.end()
        turns = [Turn.model_validate(r.to_json()) for r in session.results]
        markdown, chart = debrief_outputs(session.card, turns, session.language, state.outcome)
        path = session.transcript_path
        download = gr.update(value=str(path), visible=True) if path is not None and path.exists() else None
        return None, markdown, chart, download, state_panel(None, ui)

    # --- coach ------------------------------------------------------------------------------------

    def ask(question: str, history: list[dict[str, Any]]) -> Iterator[tuple[list[dict[str, Any]], str, str]]:
        history = list(history or [])
        try:
            parts = coach.stream(question)
            first = next(parts)
        except InputError as exc:
            raise gr.Error(str(exc)) from None
        except LLMError as exc:
            gr.Warning(str(exc))
            yield history, question, ""
            return
        history.append({"role": "user", "content": question})
        history.append({"role": "assistant", "content": ""})
        try:
            for part in [first, *parts]:
                if isinstance(part, CoachAnswer):
                    history[-1]["content"] = part.text
                    yield history, "", _sources_markdown(part)
                else:
                    history[-1]["content"] += part
                    yield history, "", ""
        except LLMError as exc:
            gr.Warning(str(exc))
            history[-1]["content"] = "⚠️ " + str(exc)
            yield history, question, ""

    # --- review -----------------------------------------------------------------------------------

    def saved_calls() -> Any:
        folder = runtime.settings.transcripts_dir
        files = sorted(folder.glob("*.jsonl"), reverse=True) if folder.is_dir() else []
        return gr.update(choices=[p.name for p in files], value=None)

    def review(transcript: Transcript, ui: Language) -> tuple[str, str]:
        card = scenarios.get(transcript.header.scenario)
        return debrief_outputs(card, transcript.turns, transcript.header.language, None)

    def open_saved(name: str | None, ui_value: str) -> tuple[str, str | None]:
        ui = _lang(ui_value)
        if not name:
            gr.Warning(t("saved_calls", ui) + ": ?")
            return "", None
        try:
            path = saved_call_path(runtime.settings.transcripts_dir, name)
        except InputError as exc:
            raise gr.Error(str(exc)) from None
        try:
            return review(load(path), ui)
        except (TranscriptError, ScenarioError) as exc:
            raise gr.Error(str(exc)) from None

    def open_upload(file: str | None, ui_value: str) -> tuple[str, str | None]:
        if not file:
            return "", None
        try:
            return review(load(Path(file)), _lang(ui_value))
        except (TranscriptError, ScenarioError) as exc:
            raise gr.Error(str(exc).replace(str(Path(file).parent) + "/", "")) from None

    def eval_upload(file: str | None) -> tuple[str, str | None, list[list[Any]]]:
        if not file:
            return "", None, []
        from bot.evaluation import confusion_png, eval_grader, grader_report_markdown

        path = Path(file)
        try:
            result = eval_grader(runtime.grader(), path, concurrency=runtime.settings.spinbot_concurrency)
        except DataError as exc:
            raise gr.Error(str(exc).replace(str(path.parent) + "/", "")) from None
        png = confusion_png(result, charts_dir / f"{uuid.uuid4().hex}.png", f"{result['grader']} · {path.name}")
        table = [[k, round(m["precision"], 3), round(m["recall"], 3), round(m["f1"], 3), m["support"]]
                 for k, m in result["per_label"].items()]
        report = grader_report_markdown(result, path).split("\n## Disagreements")[0]
        return report, str(png), table

    # --- layout -----------------------------------------------------------------------------------

    charts_dir.mkdir(parents=True, exist_ok=True)
    first: Language = "zh"
    app: gr.Blocks
    with gr.Blocks(title="spinbot", analytics_enabled=False) as app:
        session_state = gr.State(None)
        with gr.Row():
            title = gr.Markdown(t("title", first), elem_id="title")
            ui_language = gr.Radio(["中文", "English"], value="中文", label=t("ui_language", first),
                                   elem_id="ui-language", scale=0)
        gr.Markdown(f"`{runtime.describe()}`", elem_id="engine-line")
        banner = gr.Markdown(t("banner", first), elem_id="offline-banner", visible=runtime.engine == "offline")

        with gr.Tab(t("tab_practice", first), id="practice", elem_id="tab-practice") as tab_practice:
            with gr.Row():
                scenario = gr.Dropdown(_scenario_choices(), value=scenarios.builtin()[0].id,
                                       label=t("scenario", first), elem_id="scenario", scale=3)
                call_language = gr.Radio([("中文", "zh"), ("English", "en")], value="zh",
                                         label=t("call_language", first), elem_id="call-language", scale=1)
                start = gr.Button(t("start", first), variant="primary", elem_id="start-call", scale=1)
            with gr.Row():
                with gr.Column(scale=3):
                    call = gr.Chatbot(label=t("call", first), height=460, elem_id="call", sanitize_html=True)
                    with gr.Row():
                        line = gr.Textbox(label=t("your_line", first), placeholder=t("placeholder", first),
                                          elem_id="rep-line", scale=4)
                        send_button = gr.Button(t("send", first), elem_id="send", scale=1)
                    with gr.Row():
                        hint_button = gr.Button(t("hint", first), elem_id="hint")
                        end_button = gr.Button(t("end_call", first), variant="stop", elem_id="end-call")
                    hint_box = gr.Markdown(elem_id="hint-box")
                with gr.Column(scale=2):
                    panel = gr.Markdown(state_panel(None, first), elem_id="state-panel",
                                        label=t("panel", first))
            debrief_md = gr.Markdown(elem_id="debrief")
            debrief_chart = gr.Image(label=t("debrief_chart", first), elem_id="debrief-chart", type="filepath")
            download = gr.DownloadButton(t("download", first), visible=False, elem_id="download-transcript")

        with gr.Tab(t("tab_coach", first), id="coach", elem_id="tab-coach") as tab_coach:
            coach_chat = gr.Chatbot(label=t("coach_chat", first), height=420, elem_id="coach-chat")
            question = gr.Textbox(label=t("coach_question", first), placeholder=t("coach_placeholder", first),
                                  elem_id="coach-question")
            sources = gr.Markdown(elem_id="coach-sources")

        with gr.Tab(t("tab_review", first), id="review", elem_id="tab-review") as tab_review:
            with gr.Row():
                calls = gr.Dropdown([], label=t("saved_calls", first), elem_id="saved-calls", scale=3)
                refresh = gr.Button(t("refresh", first), elem_id="refresh-calls", scale=1)
                open_button = gr.Button(t("open_call", first), elem_id="open-call", scale=1)
            upload_call = gr.File(label=t("upload_transcript", first), file_types=[".jsonl"],
                                  elem_id="upload-transcript", type="filepath")
            review_md = gr.Markdown(elem_id="review-debrief")
            review_chart = gr.Image(label=t("debrief_chart", first), elem_id="review-chart", type="filepath")
            upload_set = gr.File(label=t("upload_labelled", first), file_types=[".jsonl"],
                                 elem_id="upload-labelled", type="filepath")
            eval_md = gr.Markdown(elem_id="eval-report")
            eval_png = gr.Image(label=t("confusion", first), elem_id="eval-confusion", type="filepath")
            eval_table = gr.Dataframe(headers=["label", "precision", "recall", "F1", "support"],
                                      label=t("per_label", first), elem_id="eval-table")

        start.click(start_call, [scenario, call_language, ui_language, session_state],
                    [session_state, call, panel, debrief_md, debrief_chart, download], api_name="start_call")
        send_inputs = [line, call, session_state, ui_language]
        line.submit(send, send_inputs, [call, line, panel], api_name="send")
        send_button.click(send, send_inputs, [call, line, panel], api_visibility="private")
        hint_button.click(hint, [session_state, ui_language], [hint_box], api_name="hint")
        end_button.click(end_call, [session_state, ui_language],
                         [session_state, debrief_md, debrief_chart, download, panel], api_name="end_call")
        question.submit(ask, [question, coach_chat], [coach_chat, question, sources], api_name="coach_ask")
        refresh.click(saved_calls, None, [calls], api_visibility="private")
        tab_review.select(saved_calls, None, [calls], api_visibility="private")
        open_button.click(open_saved, [calls, ui_language], [review_md, review_chart], api_name="open_call")
        upload_call.upload(open_upload, [upload_call, ui_language], [review_md, review_chart], api_visibility="private")
        upload_set.upload(eval_upload, [upload_set], [eval_md, eval_png, eval_table], api_visibility="private")

        def switch(ui_value: str, session: PracticeSession | None) -> list[Any]:
            ui = _lang(ui_value)
            return [
                gr.update(value=t("title", ui)), gr.update(label=t("ui_language", ui)),
                gr.update(value=t("banner", ui)),
                gr.update(label=t("tab_practice", ui)), gr.update(label=t("tab_coach", ui)),
                gr.update(label=t("tab_review", ui)),
                gr.update(label=t("scenario", ui)), gr.update(label=t("call_language", ui)),
                gr.update(value=t("start", ui)), gr.update(label=t("call", ui)),
                gr.update(label=t("your_line", ui), placeholder=t("placeholder", ui)),
                gr.update(value=t("send", ui)), gr.update(value=t("hint", ui)), gr.update(value=t("end_call", ui)),
                gr.update(value=state_panel(session, ui)), gr.update(label=t("debrief_chart", ui)),
                gr.update(label=t("download", ui)),
                gr.update(label=t("coach_chat", ui)),
                gr.update(label=t("coach_question", ui), placeholder=t("coach_placeholder", ui)),
                gr.update(label=t("saved_calls", ui)), gr.update(value=t("refresh", ui)),
                gr.update(value=t("open_call", ui)), gr.update(label=t("upload_transcript", ui)),
                gr.update(label=t("debrief_chart", ui)), gr.update(label=t("upload_labelled", ui)),
                gr.update(label=t("confusion", ui)), gr.update(label=t("per_label", ui)),
            ]

        ui_language.change(
            switch, [ui_language, session_state],
            [title, ui_language, banner, tab_practice, tab_coach, tab_review, scenario, call_language, start,
             call, line, send_button, hint_button, end_button, panel, debrief_chart, download, coach_chat, question,
             calls, refresh, open_button, upload_call, review_chart, upload_set, eval_png, eval_table],
            api_visibility="private",
        )
    return app


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (like MALLOC_ARENA_MAX) before the server starts its threads.

    Each thread that allocates while another does gets an arena of its own, and each arena keeps its
    high-water mark: with readings running two at a time under 20 sessions the UI process grew from
    about 610 to 790 MB (`make bench`). Elsewhere than glibc this does nothing."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        m_arena_max = -8  # from glibc's malloc.h
        ctypes.CDLL(name).mallopt(m_arena_max, arenas)


def serve(runtime: Runtime, host: str = "127.0.0.1", port: int = 7860, *, no_auth: bool = False) -> None:
    """Build the index if needed and serve the page (password-protected off loopback)."""
    limit_malloc_arenas()
    auth = runtime.settings.ui_auth(host, no_auth=no_auth)
    runtime.index.ensure()
    build_app(runtime).queue(default_concurrency_limit=8).launch(
        server_name=host, server_port=port, show_error=False, css=CSS, max_file_size=MAX_UPLOAD,
        allowed_paths=[str(runtime.settings.transcripts_dir)], auth=auth,
    )
