"""A load driver for the running web app: many simulated reps practise at once through gradio_client.

Each rep has its own `gradio_client.Client`, hence its own Gradio session and its own gr.State
(the PracticeSession stays on the server). A rep starts a call on a built-in card (/start_call), then
asks `turns` natural SPIN questions written from that card (/send), timing every turn. The test suite
and the benchmark both use `run_load`; `python -m bot.loadtest URL` prints the report as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bot import scenarios
from bot.scenarios import Scenario
from bot.text import Language

# Question templates per SPIN type; "{topic}" is a fact or problem topic from the card.
TEMPLATES: dict[Language, dict[str, tuple[str, ...]]] = {
    "zh": {
        "S": ("想了解一下{topic}的情况？", "能介绍一下{topic}吗？", "请问{topic}现在是什么情况？"),
        "P": ("在{topic}方面有没有遇到什么困难？", "{topic}这块，您对现状满意吗？",
              "{topic}方面有没有让您头疼的地方？"),
        "I": ("这对成本和客户有什么影响？", "这个问题会带来什么后果？", "这对您的团队和业务有什么影响？"),
        "N": ("如果这个问题解决了，对您有什么帮助？", "如果能解决这个问题，对您来说价值在哪里？",
              "要是这个问题没了，对您有什么好处？"),
    },
    "en": {
        "S": ("Could you tell me about {topic}?", "What does {topic} look like today?",
              "Can you walk me through {topic}?"),
        "P": ("Have you run into any difficulties with {topic}?", "Are you satisfied with {topic} at the moment?",
              "What problems do you see with {topic}?"),
        "I": ("What effect does that have on your costs and your customers?",
              "What are the consequences of that problem?", "How does that affect your team and the business?"),
        "N": ("If that problem were solved, how would it help you?", "What would it be worth to you to solve that?",
              "How would fixing that help you?"),
    },
}
UI_LANGUAGE: dict[Language, str] = {"zh": "中文", "en": "English"}


@dataclass
class LoadReport:
    """What one load run measured. Latencies are seconds per /send turn, in completion order."""

    sessions: int
    turns_requested: int
    turns_completed: int
    errors: list[str]
    latencies: list[float]
    p50: float
    p95: float
    max: float
    wall_seconds: float
    transcript_turns: int
    """Turn lines in the transcripts created during the run (SPINBOT_HOME/transcripts); 0 if not readable."""
    start_latencies: list[float] = field(default_factory=list)
    """Seconds per /start_call."""
    transcript_files: list[str] = field(default_factory=list)
    """Transcript files created during the run (full paths, sorted)."""

    def summary(self) -> str:
        """One line for logs and test output."""
        return (
            f"{self.sessions} sessions x {self.turns_requested // max(self.sessions, 1)} turns: "
            f"{self.turns_completed}/{self.turns_requested} turns, {len(self.errors)} errors, "
            f"p50 {self.p50:.3f}s, p95 {self.p95:.3f}s, max {self.max:.3f}s, wall {self.wall_seconds:.1f}s, "
            f"{self.transcript_turns} transcript turns in {len(self.transcript_files)} files"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def script_for(card: Scenario, language: Language, turns: int, rng: random.Random) -> list[str]:
    """`turns` rep questions for a card: Situation on the first facts, then Problem, Implication and
    Need-payoff per problem, then the remaining facts; repeated if more turns are asked for.

    Deterministic for a given rng state (the rng only picks among the template wordings).
    """
    words = TEMPLATES[language]
    facts = [f.topic(language) for f in card.facts]
    plan: list[tuple[str, str]] = [("S", topic) for topic in facts[:2]]
    for problem in card.problems:
        topic = problem.topic(language)
        plan += [("P", topic), ("I", topic), ("N", topic)]
    plan += [("S", topic) for topic in facts[2:]]
    return [rng.choice(words[kind]).format(topic=topic) for kind, topic in
            (plan[i % len(plan)] for i in range(turns))]


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # gradio 6: [{"type": "text", "text": ...}]
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content or "")


def _default_transcripts_dir() -> Path | None:
    from bot.config import ConfigError, load_settings

    try:
        return load_settings().transcripts_dir
    except ConfigError:
        return None


def _jsonl_files(directory: Path | None) -> set[Path]:
    return set(directory.glob("*.jsonl")) if directory is not None and directory.is_dir() else set()


def _count_turns(paths: Sequence[Path], errors: list[str]) -> int:
    from bot.transcripts import TranscriptError, load

    total = 0
    for path in paths:
        try:
            total += len(load(path).turns)
        except TranscriptError as exc:
            errors.append(f"transcript {path.name}: {exc}")
    return total


class _Rep:
    """One simulated rep: its own client (Gradio session), one call, `turns` questions."""

    def __init__(self, index: int, base_url: str, card: Scenario, questions: list[str], language: Language,
                 timeout: float) -> None:
        self.index = index
        self.base_url = base_url
        self.card = card
        self.questions = questions
        self.language = language
        self.timeout = timeout
        self.latencies: list[float] = []
        self.start_latency: float | None = None
        self.errors: list[str] = []

    def _error(self, where: str, exc: BaseException | str) -> None:
        detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.errors.append(f"session {self.index} ({self.card.id}) {where}: {detail}")

    def run(self, ready: threading.Barrier) -> None:
        from gradio_client import Client

        client = None
        try:
            client = Client(self.base_url, verbose=False, download_files=False, analytics_enabled=False,
                            max_workers=2, httpx_kwargs={"timeout": self.timeout})
        except Exception as exc:
            self._error("connect", exc)
        with contextlib.suppress(threading.BrokenBarrierError):  # every rep starts its call at once
            ready.wait(timeout=self.timeout)
        if client is None:
            return
        try:
            self._call(client)
        finally:
            client.close()

    def _call(self, client: Any) -> None:
        ui = UI_LANGUAGE[self.language]
        began = time.perf_counter()
        try:
            started = client.submit(self.card.id, self.language, ui, api_name="/start_call").result(
                timeout=self.timeout)
        except Exception as exc:
            self._error("start_call", exc)
            return
        self.start_latency = time.perf_counter() - began
        chat: list[dict[str, Any]] = list(started[0])  # the State output is the client's, not ours
        for turn, question in enumerate(self.questions, start=1):
            began = time.perf_counter()
            try:
                out = client.submit(question, chat, ui, api_name="/send").result(timeout=self.timeout)
            except Exception as exc:
                self._error(f"turn {turn}", exc)
                return
            elapsed = time.perf_counter() - began
            new_chat = list(out[0])
            if len(new_chat) != len(chat) + 2 or out[1] != "" or not _message_text(new_chat[-1]).strip():
                self._error(f"turn {turn}", f"turn not taken (chat {len(chat)} -> {len(new_chat)} messages, "
                                            f"line box {out[1]!r})")
                return
            self.latencies.append(elapsed)
            chat = new_chat


def plan(*, sessions: int = 20, turns: int = 10, scenario_ids: list[str] | None = None, language: str = "zh",
         seed: int = 0) -> list[tuple[Scenario, list[str]]]:
    """What `run_load` will ask with the same arguments: per session, its card and its questions.

    Sessions take the cards of `scenario_ids` (default: every built-in card) in turn; each session's
    wording comes from a Random seeded with `seed`, its index, card and language.
    """
    if sessions < 1 or turns < 0:
        raise ValueError("sessions must be >= 1 and turns >= 0")
    if language not in ("zh", "en"):
        raise ValueError(f"language must be 'zh' or 'en', not {language!r}")
    lang: Language = "en" if language == "en" else "zh"
    cards = [scenarios.get(i) for i in scenario_ids] if scenario_ids else scenarios.builtin()
    if not cards:
        raise ValueError("no scenario cards to practise on")
    scripts = []
    for index in range(sessions):
        card = cards[index % len(cards)]
        rng = random.Random(f"{seed}:{index}:{card.id}:{lang}")
        scripts.append((card, script_for(card, lang, turns, rng)))
    return scripts


def run_load(
    base_url: str,
    *,
    sessions: int = 20,
    turns: int = 10,
    scenario_ids: list[str] | None = None,
    language: str = "zh",
    timeout: float = 120.0,
    seed: int = 0,
    transcripts_dir: Path | None = None,
) -> LoadReport:
    """Drive the running app at `base_url` with `sessions` concurrent reps of `turns` questions each.

    Reps take the cards of `scenario_ids` (default: every built-in card) in turn, asking the
    questions `plan` gives for the same arguments. Failures never
    raise: each is one line in `LoadReport.errors`, and that rep stops. `transcripts_dir` (default:
    the settings' SPINBOT_HOME/transcripts, meaningful when the app runs on this machine) is read
    after the run to count the turns the app saved.
    """
    lang: Language = "en" if language == "en" else "zh"
    scripts = plan(sessions=sessions, turns=turns, scenario_ids=scenario_ids, language=language, seed=seed)
    folder = transcripts_dir if transcripts_dir is not None else _default_transcripts_dir()
    before = _jsonl_files(folder)
    reps = [_Rep(index, base_url, card, questions, lang, timeout) for index, (card, questions) in enumerate(scripts)]
    ready = threading.Barrier(sessions)
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=sessions, thread_name_prefix="spinbot-rep") as pool:
        for future in [pool.submit(rep.run, ready) for rep in reps]:
            future.result()
    wall = time.perf_counter() - began

    errors = [e for rep in reps for e in rep.errors]
    latencies = [t for rep in reps for t in rep.latencies]
    created = sorted(_jsonl_files(folder) - before)
    return LoadReport(
        sessions=sessions,
        turns_requested=sessions * turns,
        turns_completed=len(latencies),
        errors=errors,
        latencies=latencies,
        p50=percentile(latencies, 50),
        p95=percentile(latencies, 95),
        max=max(latencies, default=0.0),
        wall_seconds=wall,
        transcript_turns=_count_turns(created, errors),
        start_latencies=[rep.start_latency for rep in reps if rep.start_latency is not None],
        transcript_files=[str(p) for p in created],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bot.loadtest http://127.0.0.1:7860/ --sessions 20 --turns 10`: the report as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bot.loadtest", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--scenario", action="append", dest="scenario_ids")
    parser.add_argument("--language", choices=["zh", "en"], default="zh")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--transcripts", type=Path, default=None)
    args = parser.parse_args(argv)
    report = run_load(args.url, sessions=args.sessions, turns=args.turns, scenario_ids=args.scenario_ids,
                      language=args.language, timeout=args.timeout, transcripts_dir=args.transcripts)
    print(json.dumps(report.to_json(), ensure_ascii=False, indent=2))
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
