"""Load test of the web app: 20 reps practise at once, each in its own Gradio session.

The app runs in-process on the offline engine with the queue settings `spinbot ui` uses; the reps
drive it through gradio_client (bot.loadtest, also used by the benchmark). Latency is printed and
recorded, never asserted: this test is about correctness under concurrency.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.config import load_settings
from bot.runtime import Runtime

SESSIONS, TURNS = 20, 10


@pytest.fixture
def load_app_url(chat_home: Path, free_port: int) -> Iterator[str]:
    """The web app on the offline engine at 127.0.0.1 (SPINBOT_HOME=chat_home: trained grader, no index)."""
    import bot.ui

    runtime = Runtime(load_settings())
    assert runtime.engine == "offline"
    assert runtime.settings.spinbot_home == chat_home
    app = bot.ui.build_app(runtime)
    app.queue(default_concurrency_limit=8).launch(
        server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, css=bot.ui.CSS, quiet=True,
    )
    try:
        yield f"http://127.0.0.1:{free_port}/"
    finally:
        app.close()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:::gradio.queueing")  # pandas deprecations inside gradio's queue stats
def test_twenty_concurrent_reps_each_get_their_own_complete_call(
    load_app_url: str, chat_home: Path, record_property: pytest.RecordProperty
) -> None:
    from bot.loadtest import plan, run_load
    from bot.transcripts import load

    transcripts = chat_home / "transcripts"
    assert not list(transcripts.glob("*.jsonl")), "the home starts without saved calls"

    report = run_load(load_app_url, sessions=SESSIONS, turns=TURNS, language="zh", transcripts_dir=transcripts)
    print(f"\nload: {report.summary()}")
    print(f"load p95: {report.p95:.3f}s")
    for name in ("p50", "p95", "max", "wall_seconds"):
        record_property(name, round(getattr(report, name), 3))

    assert report.errors == []
    assert report.turns_completed == SESSIONS * TURNS
    assert len(report.latencies) == SESSIONS * TURNS
    assert report.transcript_turns == SESSIONS * TURNS

    files = sorted(transcripts.glob("*.jsonl"))
    assert len(files) == SESSIONS, [p.name for p in files]
    assert sorted(report.transcript_files) == [str(p) for p in files]
    calls: Counter[tuple[str, tuple[str, ...]]] = Counter()
    for path in files:
        transcript = load(path)
        scenario = transcript.header.scenario
        assert f"-{scenario}" in path.name, path.name
        assert [t.turn for t in transcript.turns] == list(range(1, TURNS + 1)), path.name
        # Every turn is this call's: the state it saved is of this card and counts up one by one.
        assert {t.state["scenario_id"] for t in transcript.turns} == {scenario}, path.name
        assert [t.state["turn"] for t in transcript.turns] == list(range(1, TURNS + 1)), path.name
        assert all(t.label in ("S", "P", "I", "N", "O") and t.buyer.strip() for t in transcript.turns), path.name
        calls[(scenario, tuple(t.rep for t in transcript.turns))] += 1

    # No mixing between sessions: each file holds exactly one rep's questions, in that rep's order.
    expected = Counter((card.id, tuple(questions)) for card, questions in plan(sessions=SESSIONS, turns=TURNS))
    assert calls == expected
