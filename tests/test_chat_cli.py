"""`spinbot chat`: a killed call keeps every completed turn; offline and LLM engines make the same moves."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bot import scenarios
from bot.cli import app
from bot.grader import OfflineGrader
from bot.reading import OfflineReader
from bot.scenarios import Scenario
from bot.testing import FakeOpenAIServer
from bot.transcripts import Transcript, TranscriptError, load

SCENARIO = "warehouse-extrinsic-01"
SPINBOT = Path(sys.executable).with_name("spinbot")

# A whole call on the warehouse card (zh): greeting, S, P on picking errors, two I follow-ups, N, pitch, commitment.
SCRIPT_ZH = [
    "您好，谢谢您抽时间见我。",
    "你们仓库有多大，多少员工？",
    "现在拣货的时候，会不会经常出现拣错货、发错货的情况？",
    "错发一单的话，对返工成本和货主的合同罚款有什么影响？",
    "这些错发会不会影响明年母婴品牌的续约？",
    "如果能把错发率稳定压到万分之三以下，对您明年续约有什么帮助？",
    "我们的产品有灯光拣选和RF手持，能帮您把拣错率降低80%。",
    "下周三晚上我能不能去一号仓跟一遍晚班拣货，再把你们IT也叫上？",
]
DEBRIEF_ADVICE = "你在发现拣错货的难点后追问了后果，做得好；下次在请求承诺前再发展一个明确需求。"


def _chat(*args: str) -> Any:
    return CliRunner().invoke(app, ["chat", "--scenario", SCENARIO, *args])


def _script(tmp_path: Path, lines: list[str], name: str = "script.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- killing the process mid-call ------------------------------------------------------------------


def _saved_call(home: Path) -> Transcript | None:
    files = sorted((home / "transcripts").glob("*.jsonl"))
    if not files:
        return None
    assert len(files) == 1, files
    try:
        return load(files[0])
    except TranscriptError:
        return None


def _wait_for_turns(home: Path, process: subprocess.Popen[bytes], count: int, timeout: float = 60) -> Transcript:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        call = _saved_call(home)
        if call is not None and len(call.turns) >= count:
            return call
        assert process.poll() is None, f"spinbot chat exited early ({process.returncode})"
        time.sleep(0.05)
    raise AssertionError(f"no {count} turn(s) saved within {timeout} s")


@pytest.mark.slow
def test_killed_chat_keeps_every_completed_turn(chat_home: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(SPINBOT_HOME=str(chat_home), OMP_NUM_THREADS="1")
    stderr = (tmp_path / "stderr.txt").open("wb")
    process = subprocess.Popen(
        [str(SPINBOT), "chat", "--scenario", SCENARIO, "--lang", "zh"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
    )
    assert process.stdin is not None
    completed = 3
    try:
        for number, line in enumerate(SCRIPT_ZH[:completed], start=1):
            process.stdin.write(f"{line}\n".encode())
            process.stdin.flush()
            call = _wait_for_turns(chat_home, process, number)
            assert len(call.turns) == number  # one line, one turn: nothing runs ahead
        # Mid-call: the next line is half typed when the process dies.
        process.stdin.write(SCRIPT_ZH[completed][:5].encode())
        process.stdin.flush()
        time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr.close()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()

    call = _saved_call(chat_home)
    assert call is not None
    assert (call.header.scenario, call.header.engine, call.header.language) == (SCENARIO, "offline", "zh")
    assert [t.turn for t in call.turns] == [1, 2, 3]
    assert [t.rep for t in call.turns] == SCRIPT_ZH[:completed]
    assert all(t.label in ("S", "P", "I", "N", "O") and t.buyer and t.state["turn"] == t.turn for t in call.turns)

    result = CliRunner().invoke(app, ["eval", "transcripts", str(chat_home / "transcripts"), "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 1 and report["calls"][0]["turns"] == completed
    assert sum(report["calls"][0]["counts"].values()) == completed


# --- offline engine vs LLM engine on the fake server -----------------------------------------------


def _tag(text: str, tag: str) -> str | None:
    match = re.search(rf"<{tag}>\n?(.*?)\n?</{tag}>", text, re.DOTALL)
    return match.group(1).strip() if match else None


def _content(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


class FakeProvider:
    """Answers the LLM engine's requests: reads with the offline reader (same utterance, context and
    focus) and grades with the offline grader, speaks the planned buyer line, writes a fixed debrief."""

    def __init__(self, grader: OfflineGrader, reader: OfflineReader) -> None:
        self.grader = grader
        self.reader = reader
        self.grades: list[tuple[str, str, str]] = []
        self.buyer_bodies: list[dict[str, Any]] = []

    def __call__(self, body: dict[str, Any]) -> str:
        messages = body["messages"]
        system = _content(messages[0]) if messages and messages[0]["role"] == "system" else ""
        user = _content(messages[-1])
        if "debrief" in system.lower():
            return json.dumps({"advice": DEBRIEF_ADVICE, "rewrites": []}, ensure_ascii=False)
        if system.startswith("You grade") or body.get("response_format"):
            utterance = _tag(user, "utterance")
            context = _tag(user, "context")
            assert utterance is not None and context is not None, user
            context = "" if context == "(none)" else context
            if system.startswith("You read"):
                focus = re.search(r"^Problem under discussion: ([\w-]+)", system, re.MULTILINE)
                reading = self.reader.read(utterance, context, focus.group(1) if focus and
                                           focus.group(1) != "none" else None)
                assert reading.label is not None
                self.grades.append((utterance, context, reading.label))
                return json.dumps({"label": reading.label, "move": reading.move, "topic": reading.topic or "none",
                                   "reason": "按离线分类器的判断。"}, ensure_ascii=False)
            label = self.grader.grade(utterance, context).label
            assert label is not None
            self.grades.append((utterance, context, label))
            return json.dumps({"label": label, "reason": "按离线分类器的判断。"}, ensure_ascii=False)
        self.buyer_bodies.append(body)
        planned = _tag(system, "convey")
        assert planned, system
        return planned


def _without_cursor(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != "line_cursor"}


@pytest.mark.slow
def test_offline_and_llm_engines_make_the_same_moves(
    llm_chat_home: Path, stored_grader: OfflineGrader, fake_server: FakeOpenAIServer,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, card_reader: Callable[[Scenario], OfflineReader],
) -> None:
    script = _script(tmp_path, SCRIPT_ZH)
    offline = _chat("--lang", "zh", "--script", str(script), "--json", "-")
    assert offline.exit_code == 0, offline.output
    off = json.loads(offline.stdout)
    assert off["header"]["engine"] == "offline"

    provider = FakeProvider(stored_grader, card_reader(scenarios.get(SCENARIO)))
    fake_server.chat_handler = provider
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_server.base_url)
    monkeypatch.setenv("SPINBOT_EMBED_MODEL", "bundled")
    monkeypatch.setenv("SPINBOT_MAX_RETRIES", "0")
    online = _chat("--lang", "zh", "--script", str(script), "--json", "-")
    assert online.exit_code == 0, online.output
    llm = json.loads(online.stdout)
    assert fake_server.unexpected == []
    assert llm["header"]["engine"] == "llm"

    # The script exercises the state machine: a fact, a problem, two implications, an explicit need.
    unlocked = [u for t in off["turns"] for u in t["reaction"]["unlocked"]]
    assert {"fact:scale", "implied:pick-errors", "implication:pick-errors:1", "explicit:pick-errors"} <= set(unlocked)
    assert len(off["turns"]) == len(llm["turns"]) == len(SCRIPT_ZH)

    # Same labels, same state transitions, same reactions, turn by turn.
    assert [t["label"] for t in llm["turns"]] == [t["label"] for t in off["turns"]]
    for a, b in zip(off["turns"], llm["turns"], strict=True):
        assert a["rep"] == b["rep"]
        assert _without_cursor(b["state"]) == _without_cursor(a["state"]), f"turn {a['turn']}"
        assert (b["reaction"]["kind"], b["reaction"]["unlocked"]) == (a["reaction"]["kind"], a["reaction"]["unlocked"])
        assert b["buyer"] == a["buyer"] and b["notice"] is None
    assert llm["outcome"] == off["outcome"]
    # The grader saw each rep line with the buyer's previous line as context, as offline.
    assert [u for u, _, _ in provider.grades] == SCRIPT_ZH
    assert provider.grades[0][1] == "buyer: " + scenarios.get(SCENARIO).opening("zh")

    # The rep's words reach the buyer model only inside <rep_message> delimiters.
    assert len(provider.buyer_bodies) == len(SCRIPT_ZH)
    for body, line in zip(provider.buyer_bodies, SCRIPT_ZH, strict=True):
        assert body.get("stream") is True
        user = _content(body["messages"][-1])
        assert _tag(user, "rep_message") == line
        assert all(line not in _content(m) for m in body["messages"][:-1])
    assert llm["debrief"]["advice"] == DEBRIEF_ADVICE
    # Both calls were saved and load back with the same turns.
    for run in (off, llm):
        saved = load(Path(run["transcript"]))
        assert [t.label for t in saved.turns] == [t["label"] for t in run["turns"]]


# --- bad input ------------------------------------------------------------------------------------


def test_chat_unknown_scenario_exits_2_naming_the_ids(tmp_path: Path) -> None:
    script = _script(tmp_path, SCRIPT_ZH[:1])
    result = CliRunner().invoke(app, ["chat", "--scenario", "no-such-card", "--script", str(script), "--json", "-"])
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "no-such-card" in message
    for card in scenarios.builtin():
        assert card.id in message
    assert not (tmp_path / "spinbot-home" / "transcripts").exists()


@pytest.mark.parametrize(
    ("lines", "bad_line"),
    [
        (["您好，谢谢您抽时间见我。", "\u200b\u200d\u2060\x07\x1b", "你们仓库有多大？"], 2),
        # \x0c and \x1c are dropped from a message, and must not shift the line numbers either.
        (["您好\x0c，谢谢您\x1c抽时间见我。", "", "\ufeff\u200b\u200c"], 3),
    ],
)
def test_chat_script_line_of_only_invisible_characters_exits_2(
    tmp_path: Path, lines: list[str], bad_line: int
) -> None:
    script = _script(tmp_path, lines)
    result = _chat("--script", str(script), "--json", "-")
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert f"{script}:{bad_line}:" in message and "empty" in message
    assert result.stdout == ""
    assert not (tmp_path / "spinbot-home" / "transcripts").exists()  # nothing saved


def test_chat_unknown_language_exits_2(tmp_path: Path) -> None:
    script = _script(tmp_path, SCRIPT_ZH[:1])
    result = _chat("--lang", "fr", "--script", str(script), "--json", "-")
    assert result.exit_code == 2
    assert "--lang" in result.stderr and "fr" in result.stderr
    assert not (tmp_path / "spinbot-home" / "transcripts").exists()
