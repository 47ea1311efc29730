"""Faults on the LLM engine: a practice call over the real openai client against FakeOpenAIServer.

Every fault (429, runs of 500s, timeouts, connection refused, a stream cut mid-reply, malformed grader
JSON) must leave the turn completed with a plain one-line notice, the call going on, and every completed
turn on disk in a transcript that loads. The coach's failures are clear LLMError lines, and a warning
(not a crash) in the web app.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage

from bot import scenarios
from bot.buyer import LLMBuyer
from bot.coach import Coach
from bot.config import Settings
from bot.knowledge import Passage
from bot.llm import LLMConnectionError, LLMError, LLMServerError, LLMTimeoutError, OpenAIChatModel
from bot.reading import LLMReader
from bot.runtime import Runtime
from bot.session import BUYER_FALLBACK_NOTICE, PracticeSession, TurnResult
from bot.testing import FakeOpenAIServer, FakeReply, closed_port
from bot.transcripts import load

KEY = "sk-test-faults-SECRET-4242"
WAREHOUSE = "warehouse-extrinsic-01"
SITUATION = "你们仓库有多大，多少员工？"
PROBLEM = "你们现在拣货的时候，拣错货、发错货的情况多吗？"
IMPLICATION = "那这些错发漏发对你们的成本有什么影响？"
LABELS = {SITUATION: "S", PROBLEM: "P", IMPLICATION: "I"}
TOPICS = {SITUATION: "scale", PROBLEM: "pick-errors", IMPLICATION: "pick-errors"}
FAST = {"retry-after-ms": "10"}  # the openai client waits 10 ms before retrying


def chat_model(base_url: str, *, timeout: float = 1.0, max_retries: int = 2) -> OpenAIChatModel:
    return OpenAIChatModel("fake-model", api_key=KEY, base_url=base_url, timeout=timeout, max_retries=max_retries)


class Switchable:
    """A ChatModel whose target can be swapped mid-call: the server goes away, then comes back."""

    def __init__(self, target: OpenAIChatModel) -> None:
        self.target = target
        self.name = "switchable"

    def complete(self, messages: Sequence[BaseMessage], **options: Any) -> str:
        return self.target.complete(messages, **options)

    def stream(self, messages: Sequence[BaseMessage], **options: Any) -> Iterator[str]:
        return self.target.stream(messages, **options)

    def complete_json(self, messages: Sequence[BaseMessage], schema: Any, **options: Any) -> Any:
        return self.target.complete_json(messages, schema, **options)


@pytest.fixture
def llm_session(tmp_path: Path) -> Callable[[Any], PracticeSession]:
    """Factory: a PracticeSession on the LLM engine (LLMReader + LLMBuyer over one model), saved to disk."""

    def make(model: Any) -> PracticeSession:
        card = scenarios.get(WAREHOUSE)
        return PracticeSession(
            card, "zh", reader=LLMReader(card, model), buyer=LLMBuyer(model),
            transcript=tmp_path / "calls" / "call.jsonl", engine="llm", model=model.name,
        )

    return make


def play(session: PracticeSession, text: str) -> tuple[list[str], TurnResult]:
    deltas: list[str] = []
    result = None
    for part in session.play_stream(text):
        if isinstance(part, TurnResult):
            result = part
        else:
            deltas.append(part)
    assert result is not None
    return deltas, result


def assert_plain(message: str | None) -> None:
    """One line a rep can read: no traceback, no key."""
    assert message, "expected a notice"
    assert "\n" not in message and "Traceback" not in message and 'File "' not in message
    assert KEY not in message and "SECRET" not in message


def assert_saved(session: PracticeSession) -> None:
    """The transcript on disk holds every completed turn, exactly as returned."""
    assert session.transcript_path is not None
    saved = load(session.transcript_path)
    assert saved.header.engine == "llm"
    assert [(t.turn, t.rep, t.label, t.buyer, t.notice) for t in saved.turns] == [
        (r.turn, r.rep, r.reading.label, r.buyer, r.notice) for r in session.results
    ]
    assert KEY not in session.transcript_path.read_text(encoding="utf-8")


def assert_normal(result: TurnResult, label: str) -> None:
    assert result.reading.label == label and result.notice is None


def error(status: int, **headers: str) -> FakeReply:
    return FakeReply(status=status, headers={**FAST, **headers})


# --------------------------------------------------------------------------------------------------
# One fault per call, between two normal turns


RETRIES = 2  # so a run of RETRIES + 1 failures exhausts them

FAULTS: dict[str, dict[str, list[Any]]] = {
    "429-then-success": {
        "grader": [FakeReply(status=429, headers={"Retry-After": "0.2"})],
        "buyer": [FakeReply(status=429, headers={"Retry-After": "0.2"})],
    },
    "grader-500s-exhaust-retries": {"grader": [error(500)] * (RETRIES + 1)},
    "grader-503-502-500": {"grader": [error(503), error(502), error(500)]},
    "buyer-500s-exhaust-retries": {"buyer": [error(500)] * (RETRIES + 1)},
    "grader-and-buyer-500s": {"grader": [error(500)] * (RETRIES + 1), "buyer": [error(502)] * (RETRIES + 1)},
    "grader-json-malformed-twice": {"grader": ["not json at all", '{"label": "P", "reason": ']},
    "grader-json-wrong-schema-twice": {"grader": ['{"label": "X", "reason": "?"}', '{"reason": "no label"}']},
    "grader-json-malformed-once": {"grader": ['{"label": "P" "reason": "missing comma"}']},
    "buyer-stream-cut": {"buyer": [FakeReply(content="这个嘛，要说毛病的话，错发漏发确实是有一些的，母婴那边……",
                                             cut_after_chunks=2)]},
    "buyer-stream-cut-twice-before-text": {"buyer": [FakeReply(content="嗯", cut_after_chunks=0)] * 2},
}
# What the faulted Problem turn must look like: graded or not, and whether the card spoke for the LLM.
EXPECTED: dict[str, tuple[bool, bool, str | None]] = {
    "429-then-success": (True, False, None),
    "grader-500s-exhaust-retries": (False, False, "500"),
    "grader-503-502-500": (False, False, "500"),
    "buyer-500s-exhaust-retries": (True, True, "500"),
    "grader-and-buyer-500s": (False, True, "502"),
    "grader-json-malformed-twice": (False, False, "invalid twice"),
    "grader-json-wrong-schema-twice": (False, False, "invalid twice"),
    "grader-json-malformed-once": (True, False, None),
    "buyer-stream-cut": (True, True, "cut off"),
    "buyer-stream-cut-twice-before-text": (True, False, None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_leaves_the_turn_complete_and_the_call_going(
    fault: str, llm_session: Callable[[Any], PracticeSession], fake_server: FakeOpenAIServer,
    provider: Any,
) -> None:
    provider.labels.update(LABELS)
    provider.topics.update(TOPICS)
    session = llm_session(chat_model(fake_server.base_url, max_retries=RETRIES))
    card = session.card

    assert_normal(play(session, SITUATION)[1], "S")
    for kind, replies in FAULTS[fault].items():
        provider.faults[kind].extend(replies)
    started = time.monotonic()
    deltas, result = play(session, PROBLEM)
    elapsed = time.monotonic() - started
    graded, fallback, notice = EXPECTED[fault]

    assert all(not queue for queue in provider.faults.values()), "every scripted fault was requested"
    assert result.turn == 2
    if graded:
        assert result.reading.label == "P"
        assert result.reaction.unlocked == ("implied:pick-errors",)
    else:
        # Ungraded: the state machine unlocks nothing rather than guess.
        assert result.reading.label is None and result.reading.reason.startswith("ungraded: ")
        assert result.reaction.kind == "vague" and result.reaction.unlocked == ()
        assert session.state.implied == ()
    if fallback:
        # The card speaks when the LLM cannot: its own wording of the planned reply.
        planned = card.problem("pick-errors").implied.zh if graded else None
        if planned is not None:
            assert result.buyer == planned
        else:
            assert result.buyer in {t.zh for t in card.lines["vague"]}
        assert result.notice is not None
        assert result.notice.startswith(BUYER_FALLBACK_NOTICE["zh"].split("（")[0])
    if notice is None:
        assert result.notice is None
    else:
        assert_plain(result.notice)
        assert result.notice is not None and notice in result.notice
    if fault == "429-then-success":
        assert elapsed >= 0.35, "Retry-After: 0.2 was honoured on both calls"
    if fault == "buyer-stream-cut":
        assert deltas and "".join(deltas) != result.buyer  # part of the reply was shown, then replaced
    assert_saved(session)

    # The call goes on: the next turn is normal, and (if the fault kept the Problem locked) unlocks it now.
    follow = IMPLICATION if graded else PROBLEM
    after = play(session, follow)[1]
    assert_normal(after, "I" if graded else "P")
    assert after.reaction.unlocked == (("implication:pick-errors:1",) if graded else ("implied:pick-errors",))
    assert after.buyer == (card.problem("pick-errors").implications[0].zh if graded
                           else card.problem("pick-errors").implied.zh)
    assert [r.turn for r in session.results] == [1, 2, 3]
    assert_saved(session)
    session.close()
    fake_server.assert_complete()


def test_timeouts_leave_the_turn_ungraded_with_the_cards_reply(
    llm_session: Callable[[Any], PracticeSession], fake_server: FakeOpenAIServer, provider: Any,
) -> None:
    provider.labels.update(LABELS)
    provider.topics.update(TOPICS)
    # A short timeout and one retry keep this test at a few seconds.
    session = llm_session(chat_model(fake_server.base_url, timeout=0.5, max_retries=1))
    provider.faults["grader"].extend([FakeReply(content="{}", delay=1.2)] * 2)
    provider.faults["buyer"].extend([FakeReply(content="嗯。", delay=1.2)] * 2)
    result = play(session, PROBLEM)[1]
    assert result.reading.label is None and "0.5 s timeout" in result.reading.reason
    assert result.reaction.unlocked == () and session.state.implied == ()
    assert result.buyer in {t.zh for t in session.card.lines["vague"]}
    assert_plain(result.notice)
    assert result.notice is not None and "SPINBOT_TIMEOUT" in result.notice
    assert_normal(play(session, PROBLEM)[1], "P")
    assert session.state.implied == ("pick-errors",)
    assert_saved(session)


def test_connection_refused_then_the_server_comes_back(
    llm_session: Callable[[Any], PracticeSession], fake_server: FakeOpenAIServer, provider: Any,
) -> None:
    provider.labels.update(LABELS)
    provider.topics.update(TOPICS)
    model = Switchable(chat_model(f"http://127.0.0.1:{closed_port()}/v1", max_retries=1))
    session = llm_session(model)
    result = play(session, PROBLEM)[1]
    assert result.reading.label is None and "Could not reach the model server" in result.reading.reason
    assert result.reaction.unlocked == ()
    assert result.buyer in {t.zh for t in session.card.lines["vague"]}
    assert_plain(result.notice)
    assert result.notice is not None and "OPENAI_BASE_URL" in result.notice
    model.target = chat_model(fake_server.base_url)
    assert_normal(play(session, PROBLEM)[1], "P")
    assert_normal(play(session, IMPLICATION)[1], "I")
    assert session.state.implications == {"pick-errors": (0,)}
    assert_saved(session)
    assert [t.notice is None for t in load(session.transcript_path).turns] == [False, True, True]  # type: ignore[arg-type]


def test_a_killed_server_mid_call_keeps_every_completed_turn(
    llm_session: Callable[[Any], PracticeSession], provider: Any,
) -> None:
    server = FakeOpenAIServer().start()
    server.chat_handler = provider  # type: ignore[assignment]
    provider.labels.update(LABELS)
    provider.topics.update(TOPICS)
    session = llm_session(chat_model(server.base_url, max_retries=0))
    assert_normal(play(session, SITUATION)[1], "S")
    server.stop()
    result = play(session, PROBLEM)[1]
    assert result.reading.label is None
    assert_plain(result.notice)
    assert_saved(session)
    assert len(load(session.transcript_path).turns) == 2  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# The coach on the LLM engine


class StubRetriever:
    def __init__(self) -> None:
        self.passages = [Passage("p1", "暗示问题 > 作用\n暗示问题追问难点带来的后果。", "concepts/i.zh.md#作用",
                                 "暗示问题", "zh")]

    def search(self, query: str, k: int = 4) -> list[Passage]:
        return self.passages[:k]

    def best_similarity(self, query: str) -> float:
        return 0.9


COACH_FAULTS: dict[str, tuple[list[FakeReply], type[LLMError]]] = {
    "500s": ([error(500)] * 3, LLMServerError),
    "timeouts": ([FakeReply(content="x", delay=1.0)] * 2, LLMTimeoutError),
}


@pytest.mark.parametrize("fault", list(COACH_FAULTS))
@pytest.mark.parametrize("streaming", [False, True], ids=["answer", "stream"])
def test_coach_failure_is_one_clear_llm_error(fault: str, streaming: bool, fake_server: FakeOpenAIServer) -> None:
    replies, expected = COACH_FAULTS[fault]
    fake_server.enqueue(*replies)
    retries = len(replies) - 1
    coach = Coach(StubRetriever(), chat_model(fake_server.base_url, timeout=0.5, max_retries=retries))
    with pytest.raises(expected) as caught:
        if streaming:
            list(coach.stream("什么是暗示问题?"))
        else:
            coach.answer("什么是暗示问题?")
    message = str(caught.value)
    assert_plain(message)
    assert fake_server.base_url.rstrip("/") in message
    assert "try again later" in message or "SPINBOT_TIMEOUT" in message
    printed = "".join(traceback.format_exception(caught.value))
    assert KEY not in printed
    fake_server.assert_complete()


def test_coach_connection_refused_is_one_clear_llm_error() -> None:
    coach = Coach(StubRetriever(), chat_model(f"http://127.0.0.1:{closed_port()}/v1", max_retries=0))
    with pytest.raises(LLMConnectionError) as caught:
        coach.answer("What is an Implication question?")
    assert_plain(str(caught.value))
    assert "check OPENAI_BASE_URL" in str(caught.value)


def _llm_runtime(home: Path, base_url: str) -> Runtime:
    settings = Settings(  # type: ignore[call-arg]
        SPINBOT_HOME=str(home), OPENAI_API_KEY=KEY, OPENAI_BASE_URL=base_url, SPINBOT_EMBED_MODEL="bundled",
        SPINBOT_TIMEOUT="1", SPINBOT_MAX_RETRIES="1",
    )
    runtime = Runtime(settings)
    assert runtime.engine == "llm"
    return runtime


def _handler(app: Any, api_name: str) -> Callable[..., Any]:
    (fn,) = [f.fn for f in app.fns.values() if f.api_name == api_name]
    return fn  # type: ignore[no-any-return]


def _text(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def test_coach_failure_in_the_web_app_is_a_plain_warning(
    knowledge_home: Path, fake_server: FakeOpenAIServer, provider: Any,
    served_app: Callable[..., dict[str, Any]],
) -> None:
    from gradio_client import Client

    served = served_app(_llm_runtime(knowledge_home, fake_server.base_url))
    client = Client(served["url"], verbose=False)

    # Through the running app: the server fails, the page gets its outputs back (no crash) ...
    provider.faults["coach"].extend([error(500)] * 2)
    history, box, sources = client.predict("什么是暗示问题?", [], api_name="/coach_ask")
    assert history == [] and box == "什么是暗示问题?" and sources == ""
    # ... and the next question is answered.
    history, box, _ = client.predict("什么是暗示问题?", [], api_name="/coach_ask")
    assert _text(history[-1]) == provider.COACH_ANSWER and box == ""

    # The handler itself: the failure is a warning of one plain line, not an exception.
    ask = _handler(served["app"], "coach_ask")
    provider.faults["coach"].extend([error(503)] * 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = list(ask("什么是需求效益问题?", []))
    assert outputs == [([], "什么是需求效益问题?", "")]
    (warning,) = [str(w.message) for w in caught]
    assert_plain(warning)
    assert "503" in warning and "try again later" in warning

    # A stream cut mid-answer: what was shown is replaced by the warning text.
    provider.faults["coach"].append(FakeReply(content="暗示问题追问难点带来的后果和影响，还有", cut_after_chunks=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = list(ask("什么是暗示问题?", []))
    history, box, _ = outputs[-1]
    assert box == "什么是暗示问题?" and _text(history[-1]).startswith("⚠️ ")
    (warning,) = [str(w.message) for w in caught]
    assert_plain(warning)
    assert "cut off" in warning
