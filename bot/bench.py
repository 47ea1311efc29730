"""`make bench`: speed, overlap, prompt size and memory, measured against the issue's targets.

Writes BENCHMARKS.md and evals/results/bench.json. Everything runs offline: the LLM engine is
measured against the fake OpenAI server with a fixed latency, so the figures are the program's
own overhead, not a provider's.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from langchain_core.messages import BaseMessage
from pydantic import BaseModel

from bot.config import EVALS_DIR, REPO_ROOT, Settings
from bot.grader import LLMGrader, load_training_set
from bot.llm import OpenAIChatModel
from bot.reading import LLMReader
from bot.runtime import Runtime
from bot.testing import FakeOpenAIServer

FAKE_LATENCY = 0.3
T = TypeVar("T", bound=BaseModel)


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str
    ok: bool | None
    detail: str = ""


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _timed(fn: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def _each(fn: Callable[[Any], object], items: Sequence[Any]) -> list[float]:
    """Seconds per call of fn(item)."""
    times = []
    for item in items:
        started = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - started)
    return times


class TimedChatModel:
    """Wraps a chat model and records when each call waited on the server."""

    def __init__(self, inner: OpenAIChatModel) -> None:
        self._inner = inner
        self.name = inner.name
        self.intervals: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    def _record(self, kind: str, started: float) -> None:
        with self._lock:
            self.intervals.append((kind, started, time.perf_counter()))

    def complete(self, messages: Sequence[BaseMessage], **kw: Any) -> str:
        started = time.perf_counter()
        try:
            return self._inner.complete(messages, **kw)
        finally:
            self._record("complete", started)

    def stream(self, messages: Sequence[BaseMessage], **kw: Any) -> Iterator[str]:
        started = time.perf_counter()
        try:
            yield from self._inner.stream(messages, **kw)
        finally:
            self._record("stream", started)

    def complete_json(self, messages: Sequence[BaseMessage], schema: type[T], **kw: Any) -> T:
        started = time.perf_counter()
        try:
            return self._inner.complete_json(messages, schema, **kw)
        finally:
            self._record("json", started)


def _union(intervals: Sequence[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def _fake_handler(runtime: Runtime) -> Callable[[dict[str, Any]], str]:
    """Grader requests get the offline label (so speculation behaves as with a good grader); the
    buyer gets its planned line back; anything else a short text."""
    from bot import scenarios

    grader = runtime.offline_grader
    reader = runtime.offline_reader(scenarios.get("warehouse-extrinsic-01"))

    def handle(body: dict[str, Any]) -> str:
        system = str(body["messages"][0]["content"])
        user = str(body["messages"][-1]["content"])
        utterance = re.search(r"<utterance>\n(.*?)\n</utterance>", user, re.S)
        context = re.search(r"<context>\n(.*?)\n</context>", user, re.S)
        said, before = utterance.group(1) if utterance else "", context.group(1) if context else ""
        if system.startswith("You grade"):
            label = grader.grade(said, before).label
            return json.dumps({"label": label or "O", "reason": "benchmark", "better_question": None})
        if system.startswith("You read"):
            focus = re.search(r"Problem under discussion: ([\w-]+)", system)
            reading = reader.read(said, before, focus.group(1) if focus and focus.group(1) != "none" else None)
            return json.dumps({"label": reading.label or "O", "move": reading.move, "topic": reading.topic or "none",
                               "proposal": reading.proposal, "reason": "benchmark", "better_question": None})
        convey = re.search(r"<convey>\n(.*?)\n</convey>", system, re.S)
        return convey.group(1) if convey else "OK."

    return handle


# --- the measurements -----------------------------------------------------------------------------


def bench_index(runtime: Runtime) -> list[float]:
    return _timed(lambda: runtime.index.ensure(rebuild=True), 3)


def bench_retrieval(runtime: Runtime) -> list[float]:
    questions = [
        "什么是暗示问题？", "What is a Need-payoff question?", "信任的定义是什么?", "Which customer type wants a "
        "bigger cake?", "大客户经理这份职业有哪些机遇?", "How do I prevent objections?", "销售会谈的四个阶段",
        "What are Features, Advantages and Benefits?", "观察客户时可以注意哪些细节?", "What is an Advance?",
    ]
    runtime.index.search(questions[0])
    return _each(runtime.index.search, questions * 10)


def bench_grading(runtime: Runtime, n: int = 1000) -> tuple[list[float], float]:
    items = load_training_set()[:n]
    grader = runtime.offline_grader
    grader.grade("warm up")
    started = time.perf_counter()
    per_call = _each(lambda item: grader.grade(item.utterance, item.context), items)
    return per_call, len(items) / (time.perf_counter() - started)


def bench_reading(runtime: Runtime, n: int = 300) -> tuple[list[float], list[float]]:
    """Held-out lines no model trained on, with the embedding memo emptied first (training leaves the
    last lines it embedded there, which would flatter the figure): label, move and topic per line.
    First as a call runs them (the buyer's line the rep answers was prepared while the rep typed,
    untimed), then with nothing prepared."""
    from bot import scenarios
    from bot.datasets import read_jsonl
    from bot.reading import LabelledMove

    reader = runtime.offline_reader(scenarios.get("warehouse-extrinsic-01"))
    reader.read("warm up")
    items = read_jsonl(EVALS_DIR / "data" / "moves" / "moves-test.jsonl", LabelledMove)[:n]
    in_a_call: list[float] = []
    runtime.reading_embeddings.clear()
    for item in items:
        reader.prepare(item.context)
        in_a_call += _each(lambda item: reader.read(item.utterance, item.context, "walking"), [item])
    runtime.reading_embeddings.clear()
    cold = _each(lambda item: reader.read(item.utterance, item.context, "walking"), items)
    return in_a_call, cold


SCRIPT = {
    "warehouse-extrinsic-01": [
        "您好，谢谢您抽时间见我。", "你们两个仓一共有多少员工？", "现在用的是什么WMS系统？",
        "拣货的时候会不会经常拣错货、发错货？", "错发之后，对客户和罚款有什么影响？", "那对明年续约会有什么影响？",
        "如果能把错发率稳定压在万分之三以下，对您有什么帮助？", "拣货员每天要走很多路吗？效率怎么样？",
        "效率低的话，加班费大概多出来多少？", "如果拣货员少走一半路，对您意味着什么？",
    ],
}


def bench_offline_turns(runtime: Runtime) -> list[float]:
    times: list[float] = []
    for _ in range(3):
        session = runtime.new_session("warehouse-extrinsic-01", "zh", save=True)
        times += _each(session.play, SCRIPT["warehouse-extrinsic-01"])
        session.close()
    return times


def bench_llm_turns(runtime: Runtime, server: FakeOpenAIServer) -> dict[str, Any]:
    from bot.buyer import LLMBuyer
    from bot.session import PracticeSession

    model = TimedChatModel(OpenAIChatModel("fake-model", api_key="sk-bench", base_url=server.base_url,
                                           max_retries=0, timeout=10))
    card_id = "warehouse-extrinsic-01"
    from bot import scenarios

    card = scenarios.get(card_id)
    overheads, turn_times, overlaps = [], [], 0
    for _ in range(2):
        session = PracticeSession(
            card, "zh", reader=LLMReader(card, model), buyer=LLMBuyer(model, runtime.index),  # type: ignore[arg-type]
            transcript=None, engine="llm", model="fake", predictor=runtime.offline_reader(card),
        )
        for line in SCRIPT[card_id]:
            model.intervals.clear()
            started = time.perf_counter()
            session.play(line)
            elapsed = time.perf_counter() - started
            spans = [(a, b) for _, a, b in model.intervals]
            turn_times.append(elapsed)
            overheads.append(elapsed - _union(spans))
            grades = [(a, b) for kind, a, b in model.intervals if kind == "json"]
            replies = [(a, b) for kind, a, b in model.intervals if kind == "stream"]
            if grades and replies and _overlap(grades[0], replies[-1]) > FAKE_LATENCY / 2:
                overlaps += 1
    return {"turns": turn_times, "overheads": overheads, "overlapping": overlaps, "n": len(turn_times)}


def bench_llm_eval(runtime: Runtime, server: FakeOpenAIServer, n: int = 1000) -> float:
    from bot.grader import grade_many

    items = load_training_set()[:n]
    # A constant reply: the server's own work must not be what is measured.
    server.chat_handler = lambda body: json.dumps({"label": "S", "reason": "benchmark"})
    model = OpenAIChatModel("fake-model", api_key="sk-bench", base_url=server.base_url, max_retries=1, timeout=10)
    started = time.perf_counter()
    grades = grade_many(LLMGrader(model), [(i.utterance, i.context) for i in items],
                        concurrency=runtime.settings.spinbot_concurrency)
    elapsed = time.perf_counter() - started
    if sum(not g.graded for g in grades):
        raise RuntimeError(f"{sum(not g.graded for g in grades)} utterances were left ungraded")
    return elapsed


def bench_prompt_tokens(runtime: Runtime) -> dict[int, int]:
    """Tokens in the buyer prompt at turns 1, 10 and 30 of a long Chinese call."""
    from bot import roleplay, scenarios
    from bot.buyer import BuyerTurn, LLMBuyer
    from bot.testing import FakeChatModel
    from bot.tokens import count_message_tokens

    card = scenarios.get("warehouse-extrinsic-01")
    buyer = LLMBuyer(FakeChatModel([]), runtime.index)
    reader = runtime.offline_reader(card)
    lines = SCRIPT[card.id] * 3
    state = roleplay.start(card)
    history: list[tuple[str, str]] = []
    sizes = {}
    for turn, line in enumerate(lines, start=1):
        state, reaction = roleplay.step(card, state, reader.read(line, "", state.focus))
        state, planned = roleplay.speak(card, state, reaction, "zh")
        messages = buyer.messages(BuyerTurn(card, state, reaction, planned, line, tuple(history), "zh"))
        if turn in (1, 10, 30):
            sizes[turn] = count_message_tokens(messages)  # type: ignore[arg-type]
        history.append((line, planned))
        if state.ended:
            state = roleplay.start(card)
    return sizes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def ui_process(home: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = _free_port()
    env = {**os.environ, "SPINBOT_HOME": str(home), "SPINBOT_ENGINE": "offline", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("OPENAI_API_KEY", None)
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "spinbot"), "ui", "--port", str(port)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        import httpx

        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            raise RuntimeError("the UI process did not start within 180 s")
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=30)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    threads = os.environ.get("OMP_NUM_THREADS") or f"{os.cpu_count()} (all cores)"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}){memory}, "
            f"Python {platform.python_version()}, embedding threads {threads}")


def run() -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="spinbot-bench-"))
    settings = Settings(SPINBOT_HOME=home, SPINBOT_ENGINE="offline", _env_file=None)  # type: ignore[call-arg]
    runtime = Runtime(settings)
    figures: list[Figure] = []

    def add(name: str, values: Sequence[float], unit: str, target: str, limit: float | None, scale: float = 1.0,
            detail: str = "") -> None:
        median, p95 = statistics.median(values) * scale, percentile(values, 95) * scale
        figures.append(Figure(f"{name} median", round(median, 2), unit, "", None, detail))
        figures.append(Figure(f"{name} p95", round(p95, 2), unit, target, None if limit is None else p95 <= limit,
                              detail))

    print("index build …", flush=True)
    add("index build (247 chunks, bundled e5)", bench_index(runtime), "s", "", None)
    print("retrieval …", flush=True)
    add("retrieval (k=4, hybrid)", bench_retrieval(runtime), "ms", "p95 ≤ 30 ms", 30, 1000)
    print("offline grading …", flush=True)
    per_call, throughput = bench_grading(runtime)
    add("offline grade, one utterance", per_call, "ms", "", None, 1000)
    figures.append(Figure("offline grading throughput", round(throughput, 1), "utterances/s", "", None))
    print("offline reading …", flush=True)
    in_a_call, cold = bench_reading(runtime)
    add("offline reading (label, move, topic), one line in a call", in_a_call, "ms", "p95 ≤ 50 ms", 50, 1000)
    add("offline reading, one line, buyer's line not prepared", cold, "ms", "", None, 1000)
    print("offline turns …", flush=True)
    add("offline practice turn, end to end", bench_offline_turns(runtime), "ms", "p95 ≤ 150 ms", 150, 1000)
    with FakeOpenAIServer() as server:
        server.latency = FAKE_LATENCY
        server.chat_handler = _fake_handler(runtime)
        print("LLM turns …", flush=True)
        llm = bench_llm_turns(runtime, server)
        add("LLM turn, total (fake server, 300 ms per call)", llm["turns"], "ms", "", None, 1000)
        add("LLM turn overhead (turn − time waiting on server)", llm["overheads"], "ms", "p95 ≤ 50 ms", 50, 1000)
        figures.append(Figure("LLM turns where grading and buyer reply overlap", llm["overlapping"], f"of {llm['n']}",
                              "overlap", llm["overlapping"] == llm["n"]))
        print("LLM eval of 1,000 utterances …", flush=True)
        elapsed = bench_llm_eval(runtime, server)
        figures.append(Figure(f"eval grader --grader llm, 1,000 utterances (concurrency "
                              f"{settings.spinbot_concurrency})", round(elapsed, 2), "s", "≤ 15 s", elapsed <= 15))
    tokens = bench_prompt_tokens(runtime)
    for turn, size in tokens.items():
        figures.append(Figure(f"buyer prompt tokens at turn {turn}", size, "tokens",
                              "≤ 2,000 at turn 30" if turn == 30 else "", size <= 2000 if turn == 30 else None))
    print("UI process under load …", flush=True)
    from bot.loadtest import run_load

    with ui_process(home) as (url, process):
        report = run_load(url, sessions=20, turns=10, transcripts_dir=settings.transcripts_dir)
        peak = peak_rss_mb(process.pid)
    figures.append(Figure("load: 20 sessions × 10 turns, turns completed", report.turns_completed, "turns",
                          "200, zero errors", report.turns_completed == 200 and not report.errors,
                          f"{len(report.errors)} errors; {report.transcript_turns} turns in transcripts"))
    figures.append(Figure("load: turn latency median", round(report.p50 * 1000), "ms", "", None))
    figures.append(Figure("load: turn latency p95", round(report.p95 * 1000), "ms", "reported", None))
    figures.append(Figure("UI process peak memory (after the load)", round(peak), "MB", "≤ 700 MB", peak <= 700))
    return {
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "figures": [f.__dict__ for f in figures],
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` on {result['date']}: {result['machine']}.",
        "The LLM engine is measured against the fake OpenAI server (`bot/testing.py`) with a fixed "
        f"{int(FAKE_LATENCY * 1000)} ms latency per call, so the LLM figures are spinbot's own cost.",
        "",
        "| what | value | target | met |",
        "|---|---|---|---|",
    ]
    for f in result["figures"]:
        met = "" if f["ok"] is None else ("yes" if f["ok"] else "**no**")
        detail = f" ({f['detail']})" if f["detail"] else ""
        lines.append(f"| {f['name']}{detail} | {f['value']} {f['unit']} | {f['target']} | {met} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    result = run()
    out = REPO_ROOT / "evals" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (REPO_ROOT / "BENCHMARKS.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
