"""The web app in a real browser: Debian chromium, driven by Playwright, on the offline engine.

One app per module (127.0.0.1, a free port, a SPINBOT_HOME whose index and grader model already
exist); every test opens its own browser context and leaves a full-page screenshot in
test-output/screenshots/<test name>.png.

The README screenshots (docs/screenshots/practice.png and debrief.png) are written by
test_readme_screenshots into test-output/screenshots/readme-*.png on every run, and into
docs/screenshots/ only when asked: `SPINBOT_UPDATE_SCREENSHOTS=1 .venv/bin/pytest tests/test_browser.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from bot import scenarios
from bot.config import Settings
from bot.runtime import Runtime

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "test-output" / "screenshots"
DOCS_SCREENSHOTS = REPO / "docs" / "screenshots"
# Read at import: the autouse _offline fixture removes SPINBOT_* variables before each test.
UPDATE_DOCS = os.environ.get("SPINBOT_UPDATE_SCREENSHOTS") == "1"
VIEWPORT = {"width": 1280, "height": 900}
SLOW = 30_000  # ms: the first turn warms the grader and the analyzer
WAREHOUSE, HOSPITAL = "warehouse-extrinsic-01", "hospital-intrinsic-01"
WAREHOUSE_LINES = [  # S, P and I questions on the warehouse card
    "你们两个仓一共有多少员工？", "拣货的时候会不会经常拣错货、发错货？", "错发之后，对客户和罚款有什么影响？",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: the browser tests need Debian chromium (`make test` "
        "installs it with scripts/system-deps.sh)"
    ),
]


@dataclass
class App:
    url: str
    runtime: Runtime

    @property
    def transcripts(self) -> set[Path]:
        folder = self.runtime.settings.transcripts_dir
        return set(folder.glob("*.jsonl")) if folder.is_dir() else set()


@pytest.fixture(scope="module")
def app(ui_settings: Settings) -> Iterator[App]:
    """The web app on the offline engine, warmed up: nothing is built, trained or embedded on a first click."""
    import gradio as gr

    import bot.ui
    from bot.testing import closed_port

    runtime = Runtime(ui_settings)
    assert runtime.engine == "offline"
    assert not runtime.index.ensure().built, "the index should have been copied into the home"
    runtime.offline_grader.grade("你们有多少员工？")  # loaded from home/models, not trained
    for card in (WAREHOUSE, HOSPITAL):
        runtime.offline_reader(scenarios.get(card))
    port = closed_port()
    blocks: gr.Blocks = bot.ui.build_app(runtime)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        blocks.queue().launch(
            server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=bot.ui.CSS,
            allowed_paths=[str(runtime.settings.transcripts_dir)],
        )
    try:
        yield App(f"http://127.0.0.1:{port}/", runtime)
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=15_000)  # a loaded 2-core CI machine is slower than the 5 s default
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Pages:
    """Opens pages of the app, each in its own browser context (its own Gradio session)."""

    browser: Browser
    url: str
    opened: list[Page]

    def open(self) -> Page:
        context = self.browser.new_context(viewport=VIEWPORT, accept_downloads=True, locale="zh-CN")
        context.set_default_timeout(15_000)
        page = context.new_page()
        page.goto(self.url)
        expect(page.locator("#start-call")).to_be_visible()
        self.opened.append(page)
        return page


@pytest.fixture
def pages(app: App, browser: Browser, request: pytest.FixtureRequest) -> Iterator[Pages]:
    """A page factory; at teardown every page leaves a full-page screenshot, then its context closes."""
    opened = Pages(browser, app.url, [])
    try:
        yield opened
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for number, page in enumerate(opened.opened):
            suffix = "" if number == 0 else f"-{number + 1}"
            try:
                page.screenshot(path=str(SCREENSHOTS / f"{request.node.name}{suffix}.png"), full_page=True)
            finally:
                page.context.close()


@pytest.fixture
def page(pages: Pages) -> Page:
    return pages.open()


# ---- helpers ------------------------------------------------------------------------------------------


def scenario_label(scenario_id: str) -> str:
    from bot.ui import _scenario_choices

    return next(label for label, value in _scenario_choices() if value == scenario_id)


def wait_idle(page: Page) -> None:
    """Wait until no Gradio event is pending or streaming (every status tracker hidden)."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=status-tracker]')]"
        ".every(e => e.classList.contains('hide'))",
        timeout=SLOW,
    )


def start_call(page: Page, scenario_id: str) -> None:
    """Pick the scenario in the dropdown, press Start, wait for the buyer's opening line."""
    page.locator("#scenario input").click()
    page.get_by_role("option", name=scenario_label(scenario_id), exact=True).click()
    expect(page.locator("#scenario input")).to_have_value(scenario_label(scenario_id))
    page.locator("#start-call").click()
    opening = scenarios.get(scenario_id).opening("zh")
    expect(page.locator("#call [data-testid=bot]")).to_have_count(1, timeout=SLOW)
    expect(page.locator("#call [data-testid=bot]").first).to_have_text(opening)
    wait_idle(page)


def send(page: Page, line: str) -> None:
    """Type a rep line and press Enter (without waiting for the turn)."""
    box = page.locator("#rep-line textarea")
    box.fill(line)
    box.press("Enter")


def wait_turn(page: Page, turn: int) -> None:
    """Wait until turn `turn` is finished: its badge and the buyer's reply are shown, the event is over."""
    expect(page.locator("#call .spin-badge")).to_have_count(turn, timeout=SLOW)
    expect(page.locator("#call [data-testid=bot]")).to_have_count(turn + 1, timeout=SLOW)
    wait_idle(page)
    expect(page.locator("#rep-line textarea")).to_have_value("")


def play(page: Page, lines: list[str]) -> None:
    for turn, line in enumerate(lines, start=1):
        send(page, line)
        wait_turn(page, turn)


def badges(page: Page) -> list[str]:
    """The label of every badge in the call, checked against its colour class.

    The badge's text is its label: Gradio's HTML sanitizer strips data-* attributes (data-label)
    from chat messages, so the browser never sees them."""
    labels = []
    for badge in page.locator("#call .spin-badge").all():
        label = badge.inner_text().strip()
        assert label in ("S", "P", "I", "N", "O"), label
        assert f"spin-{label}" in (badge.get_attribute("class") or "").split()
        labels.append(label)
    return labels


def image_loaded(page: Page, selector: str) -> None:
    """Wait until the image has loaded (Gradio's images load lazily: scroll them into view first)."""
    image = page.locator(selector)
    expect(image).to_have_count(1, timeout=SLOW)
    image.scroll_into_view_if_needed()
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return !!i && i.complete && i.naturalWidth > 0; }",
        arg=selector, timeout=SLOW,
    )


def chat_text(page: Page, who: str) -> list[str]:
    return [m.inner_text().strip() for m in page.locator(f"#call [data-testid={who}]").all()]


def no_traceback(page: Page) -> None:
    assert "Traceback" not in page.content()


# ---- tests ----------------------------------------------------------------------------------------------


def test_page_loads_with_title_engine_line_and_offline_banner(page: Page) -> None:
    assert page.title() == "spinbot"
    expect(page.locator("#title")).to_contain_text("spinbot · SPIN 销售练习")
    expect(page.locator("#engine-line")).to_be_visible()
    expect(page.locator("#engine-line")).to_contain_text("offline engine")
    expect(page.locator("#offline-banner")).to_be_visible()
    expect(page.locator("#offline-banner")).to_contain_text("离线引擎")
    expect(page.locator("#state-panel")).to_contain_text("先选择场景并开始通话。")
    expect(page.get_by_role("tab")).to_have_text(["练习", "教练", "复盘"])


def test_practice_call_shows_a_badge_per_turn_and_the_call_state(page: Page) -> None:
    start_call(page, WAREHOUSE)
    expect(page.locator("#state-panel")).to_contain_text("周经理")
    play(page, WAREHOUSE_LINES)

    labels = badges(page)
    assert len(labels) == 3
    for message, label, line in zip(chat_text(page, "user"), labels, WAREHOUSE_LINES, strict=True):
        assert message.startswith(f"{label}{line}"), message  # badge, then the rep's line
    replies = chat_text(page, "bot")[1:]
    assert all(replies) and len(set(replies)) == 3, replies

    panel = page.locator("#state-panel")
    expect(panel).to_contain_text("信任度")
    expect(panel).to_contain_text("提问统计")
    trust = re.search(r"信任度: [█░]{10} (\d\.\d\d)", panel.inner_text())
    assert trust is not None and 0 <= float(trust.group(1)) <= 1, panel.inner_text()
    counts = dict(re.findall(r"\b([SPINO]) (\d+)\b", panel.inner_text()))
    assert {k: int(v) for k, v in counts.items()} == {k: labels.count(k) for k in "SPINO"}
    no_traceback(page)


def test_end_call_shows_debrief_chart_and_downloads_the_transcript(page: Page, tmp_path: Path) -> None:
    start_call(page, WAREHOUSE)
    play(page, WAREHOUSE_LINES)
    labels = badges(page)

    page.locator("#end-call").click()
    expect(page.locator("#debrief")).to_contain_text("复盘", timeout=SLOW)
    expect(page.locator("#debrief")).to_contain_text("结果")
    image_loaded(page, "#debrief-chart img")
    expect(page.locator("#state-panel")).to_contain_text("先选择场景并开始通话。")

    download = page.locator("#download-transcript")
    expect(download).to_be_visible()
    with page.expect_download() as info:
        download.click()
    saved = tmp_path / info.value.suggested_filename
    info.value.save_as(saved)
    assert saved.name.endswith(f"-{WAREHOUSE}.jsonl")
    lines = [json.loads(line) for line in saved.read_text(encoding="utf-8").splitlines() if line.strip()]
    header, turns = lines[0], lines[1:]
    assert header["kind"] == "header" and header["scenario"] == WAREHOUSE and header["engine"] == "offline"
    assert len(turns) == 3
    for number, (turn, line, label) in enumerate(zip(turns, WAREHOUSE_LINES, labels, strict=True), start=1):
        assert turn["kind"] == "turn" and turn["turn"] == number
        assert turn["rep"] == line and turn["label"] == label
        assert turn["reason"] and turn["buyer"] and isinstance(turn["state"], dict)
    no_traceback(page)


def test_coach_answers_chinese_and_english_with_citations(page: Page) -> None:
    page.locator("#tab-coach-button").click()
    box = page.locator("#coach-question textarea")
    expect(box).to_be_visible()
    answers, sources = page.locator("#coach-chat [data-testid=bot]"), page.locator("#coach-sources")
    shown = []
    for number, question in enumerate(["什么是暗示问题？", "What is a Need-payoff question?"], start=1):
        box.fill(question)
        box.press("Enter")
        expect(answers).to_have_count(number, timeout=SLOW)
        wait_idle(page)
        expect(answers.nth(number - 1)).to_contain_text("[1]")
        expect(page.locator("#coach-chat [data-testid=user]").nth(number - 1)).to_have_text(question)
        expect(sources.locator("summary").first).to_contain_text("[1] ")
        expect(box).to_have_value("")
        shown.append(sources.inner_text())
    assert shown[0] != shown[1], "the sources follow the latest answer"
    assert "Need-payoff" in shown[1]
    assert "暗示问题" in answers.nth(0).inner_text()
    assert re.search(r"need[- ]payoff", answers.nth(1).inner_text(), re.IGNORECASE)
    no_traceback(page)


def test_interface_language_switches_to_english_and_back(page: Page) -> None:
    language = page.locator("#ui-language")
    language.get_by_text("English", exact=True).click()
    expect(page.locator("#start-call")).to_have_text("Start call")
    expect(page.get_by_role("tab")).to_have_text(["Practice", "Coach", "Review"])
    expect(page.locator("#rep-line [data-testid=block-info]")).to_have_text("You say")
    expect(page.locator("#rep-line textarea")).to_have_attribute("placeholder", "Type your question and press Enter")
    expect(page.locator("#end-call")).to_have_text("End call")
    expect(page.locator("#title")).to_contain_text("SPIN selling practice")
    expect(page.locator("#offline-banner")).to_contain_text("Offline engine")
    expect(page.locator("#state-panel")).to_contain_text("Pick a scenario and start a call first.")

    language.get_by_text("中文", exact=True).click()
    expect(page.locator("#start-call")).to_have_text("开始通话")
    expect(page.get_by_role("tab")).to_have_text(["练习", "教练", "复盘"])
    expect(page.locator("#rep-line [data-testid=block-info]")).to_have_text("你说")
    expect(page.locator("#offline-banner")).to_contain_text("离线引擎")


def test_two_sessions_at_once_do_not_mix(pages: Pages) -> None:
    first, second = pages.open(), pages.open()
    start_call(first, WAREHOUSE)
    start_call(second, HOSPITAL)
    # Both turns in flight at once.
    send(first, "你们两个仓一共有多少员工？")
    send(second, "你们医院一个月输液器和留置针大概用多少？")
    wait_turn(first, 1)
    wait_turn(second, 1)

    warehouse, hospital = scenarios.get(WAREHOUSE), scenarios.get(HOSPITAL)
    for page, own, other in ((first, warehouse, hospital), (second, hospital, warehouse)):
        bot_lines = chat_text(page, "bot")
        assert bot_lines[0] == own.opening("zh")
        assert other.opening("zh") not in page.locator("#call").inner_text()
        assert len(badges(page)) == 1 and len(chat_text(page, "user")) == 1
        expect(page.locator("#state-panel")).to_contain_text(own.buyer.name("zh"))
        expect(page.locator("#state-panel")).not_to_contain_text(other.buyer.name("zh"))
    assert chat_text(first, "user")[0].startswith(f"{badges(first)[0]}你们两个仓一共有多少员工？")
    assert chat_text(second, "user")[0].startswith(f"{badges(second)[0]}你们医院一个月输液器和留置针大概用多少？")
    assert "八十六" in chat_text(first, "bot")[1]  # each card answers its own question
    assert "九万" in chat_text(second, "bot")[1]


def test_empty_messages_are_refused_in_plain_words(page: Page) -> None:
    start_call(page, WAREHOUSE)
    send(page, "   ")
    warning = page.locator("[data-testid=toast-body].warning")
    expect(warning).to_be_visible()
    expect(warning.locator(".toast-message-text")).to_have_text(
        "the message is empty: type a question or statement first"
    )
    wait_idle(page)
    assert badges(page) == [] and len(chat_text(page, "user")) == 0

    page.locator("#tab-coach-button").click()
    question = page.locator("#coach-question textarea")
    question.fill("  \n ")
    question.press("Enter")
    error = page.locator("[data-testid=toast-body].error")
    expect(error).to_be_visible()
    expect(error.locator(".toast-message-text")).to_have_text(
        "the question is empty: type a question or statement first"
    )
    for toast in page.locator("[data-testid=toast-body]").all():
        assert "Traceback" not in toast.inner_text() and 'File "' not in toast.inner_text()
    no_traceback(page)


LABELLED = [
    {"id": "b-1", "lang": "zh", "utterance": "你们两个仓一共有多少员工？", "label": "S"},
    {"id": "b-2", "lang": "zh", "utterance": "拣货的时候会不会经常拣错货、发错货？", "label": "P"},
    {"id": "b-3", "lang": "zh", "utterance": "错发之后，对客户和罚款有什么影响？", "label": "I"},
    {"id": "b-4", "lang": "en", "utterance": "If the error rate dropped below 3 in 10,000, how would that help you?",
     "label": "N"},
]


def test_review_tab_opens_a_saved_call_and_evaluates_an_uploaded_set(page: Page, app: App, tmp_path: Path) -> None:
    before = app.transcripts
    start_call(page, WAREHOUSE)
    play(page, WAREHOUSE_LINES[:2])
    page.locator("#end-call").click()
    expect(page.locator("#debrief")).to_contain_text("复盘", timeout=SLOW)
    (saved,) = app.transcripts - before

    page.locator("#tab-review-button").click()
    calls = page.locator("#saved-calls input")
    calls.click()
    page.get_by_role("option", name=saved.name, exact=True).click()
    expect(calls).to_have_value(saved.name)
    page.locator("#open-call").click()
    expect(page.locator("#review-debrief")).to_contain_text("复盘", timeout=SLOW)
    # The saved call's own content: the problem its second line uncovered.
    expect(page.locator("#review-debrief")).to_contain_text(scenarios.get(WAREHOUSE).problem("pick-errors").topic.zh)
    image_loaded(page, "#review-chart img")

    labelled = tmp_path / "tiny-labelled.jsonl"
    labelled.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in LABELLED), encoding="utf-8")
    page.locator("#upload-labelled input[type=file]").set_input_files(str(labelled))
    expect(page.locator("#eval-report")).to_contain_text("tiny-labelled.jsonl", timeout=SLOW)
    image_loaded(page, "#eval-confusion img")
    table = page.locator("#eval-table")
    expect(table).to_contain_text("precision")
    expect(table).to_contain_text("support")
    cells = [c.strip() for c in table.inner_text().split("support", 1)[1].split("\n") if c.strip()]
    rows = {row[0]: row[1:] for row in (cells[i:i + 5] for i in range(0, len(cells), 5))}
    assert set(rows) == set("SPINO"), cells
    assert [rows[k][-1] for k in "SPINO"] == ["1", "1", "1", "1", "0"], rows  # support
    no_traceback(page)


def region(page: Page, top: str, bottom: str, margin: int = 16) -> dict[str, float]:
    """A full-width clip (page coordinates) from the top of one element to the bottom of another."""
    page.evaluate("window.scrollTo(0, 0)")
    first, last = page.locator(top).bounding_box(), page.locator(bottom).bounding_box()
    assert first is not None and last is not None
    y = max(0.0, first["y"] - margin)
    return {"x": 0, "y": y, "width": VIEWPORT["width"], "height": last["y"] + last["height"] + margin - y}


def test_readme_screenshots(page: Page) -> None:
    """docs/screenshots/practice.png (mid-call, Chinese UI) and debrief.png (debrief and chart), 1280 wide."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    start_call(page, WAREHOUSE)
    play(page, [*WAREHOUSE_LINES, "要是能把错发率压到万分之三以下，对你们明年续约有什么帮助？"])
    expect(page.locator("#state-panel")).to_contain_text("✓")  # the need became explicit
    page.mouse.move(0, 0)
    # Once the chat's own smooth scroll has reached the bottom, scroll back to the third turn so that
    # two badges (I, N) and the buyer's replies show together.
    log = page.locator("#call [role=log]")
    log.evaluate("l => new Promise(done => { const check = () => l.scrollTop + l.clientHeight >= l.scrollHeight - 1"
                 " ? setTimeout(done, 300) : requestAnimationFrame(check); check(); })")
    page.locator("#call [data-testid=user]").nth(2).evaluate(
        "m => { const log = m.closest('[role=log]'); log.scrollTop += m.getBoundingClientRect().top"
        " - log.getBoundingClientRect().top - 40; }"
    )
    practice = SCREENSHOTS / "readme-practice.png"
    page.screenshot(path=str(practice), full_page=True, clip=region(page, "body", "#end-call"))

    page.locator("#end-call").click()
    expect(page.locator("#debrief")).to_contain_text("复盘", timeout=SLOW)
    image_loaded(page, "#debrief-chart img")
    wait_idle(page)
    debrief = SCREENSHOTS / "readme-debrief.png"
    page.screenshot(path=str(debrief), full_page=True, clip=region(page, "#debrief", "#debrief-chart"))
    if UPDATE_DOCS:
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(practice, DOCS_SCREENSHOTS / "practice.png")
        shutil.copyfile(debrief, DOCS_SCREENSHOTS / "debrief.png")
