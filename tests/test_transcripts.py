"""Transcripts: every turn is on disk before it is shown; load() survives a torn last line; eval transcripts."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot import roleplay, scenarios
from bot.buyer import LLMBuyer, OfflineBuyer
from bot.cli import app
from bot.grader import Label
from bot.reading import Reading
from bot.roleplay import CallState
from bot.session import PracticeSession, TurnResult
from bot.testing import FakeChatModel
from bot.transcripts import Header, TranscriptError, TranscriptWriter, Turn, header_now, load, load_many

SCENARIO = "warehouse-extrinsic-01"


class ScriptedReader:
    """Gives the labels it is told, in order (about no topic); records the (utterance, context) pairs it saw."""

    name = "scripted"

    def __init__(self, labels: Sequence[Label]) -> None:
        self._labels = list(labels)
        self.seen: list[tuple[str, str]] = []
        self.prepared: list[str] = []
        self.card = scenarios.get(SCENARIO)

    def read(self, utterance: str, context: str = "", focus: str | None = None) -> Reading:
        self.seen.append((utterance, context))
        label = self._labels.pop(0)
        return Reading(label, "summary" if label == "O" else "question", None, "scripted reason", reader=self.name)

    def prepare(self, context: str) -> None:
        self.prepared.append(context)


def _session(path: Path, labels: Sequence[Label], *, buyer: object | None = None) -> PracticeSession:
    card = scenarios.get(SCENARIO)
    return PracticeSession(
        card, "zh", reader=ScriptedReader(labels), buyer=buyer or OfflineBuyer(),  # type: ignore[arg-type]
        transcript=path, engine="offline", model="offline",
    )


def _lines_on_disk(path: Path) -> list[dict[str, object]]:
    """The file as another reader sees it right now (a separate handle, not the writer's)."""
    with path.open(encoding="utf-8") as other:
        return [json.loads(line) for line in other.read().split("\n") if line]


def _turns_on_disk(path: Path) -> list[dict[str, object]]:
    return [r for r in _lines_on_disk(path) if r["kind"] == "turn"]


def test_each_turn_is_on_disk_before_play_stream_yields_it(tmp_path: Path) -> None:
    path = tmp_path / "call.jsonl"
    session = _session(path, ["O", "S"])
    header = _lines_on_disk(path)[0]
    assert header["kind"] == "header"
    assert {k: header[k] for k in ("scenario", "engine", "model", "language")} == {
        "scenario": SCENARIO, "engine": "offline", "model": "offline", "language": "zh",
    }
    datetime.fromisoformat(str(header["started"]))  # a real timestamp
    assert _turns_on_disk(path) == []

    for number, rep in enumerate(["您好，谢谢您抽时间见我。", "你们仓库有多大？"], start=1):
        seen = []
        for part in session.play_stream(rep):
            # At the moment the buyer's text (or the result) is handed out, the turn is already saved.
            on_disk = _turns_on_disk(path)
            assert len(on_disk) == number
            saved = on_disk[-1]
            if isinstance(part, TurnResult):
                assert saved == {"kind": "turn", **part.to_json()}
            else:
                assert saved["buyer"] == part
            assert saved["rep"] == rep and saved["turn"] == number
            assert {"label", "reason", "buyer", "state"} <= saved.keys()
            seen.append(part)
        assert [type(p) for p in seen] == [str, TurnResult]
    session.close()


def test_streaming_buyer_turn_is_on_disk_before_the_result(tmp_path: Path) -> None:
    path = tmp_path / "call.jsonl"
    model = FakeChatModel(["你好，叫我老周就行。"], name="fake-buyer")
    session = _session(path, ["O"], buyer=LLMBuyer(model))
    parts = list(_observe(session, "您好，谢谢您抽时间见我。", path))
    deltas = [p for p, _ in parts if isinstance(p, str)]
    assert "".join(deltas) == "你好，叫我老周就行。"
    result, turns_then = parts[-1]
    assert isinstance(result, TurnResult)
    assert turns_then == 1 and _turns_on_disk(path)[0]["buyer"] == "你好，叫我老周就行。"
    session.close()


def _observe(session: PracticeSession, rep: str, path: Path) -> list[tuple[object, int]]:
    return [(part, len(_turns_on_disk(path))) for part in session.play_stream(rep)]


def test_the_reader_prepares_each_buyer_line_before_the_rep_answers_it(tmp_path: Path) -> None:
    session = _session(tmp_path / "call.jsonl", ["O", "S"])
    reader: ScriptedReader = session._reader  # type: ignore[assignment]
    first = session.play("您好，谢谢您抽时间见我。")
    expected = [f"buyer: {session.opening}", f"buyer: {first.buyer}"]
    for _ in range(200):  # prepared on a background thread
        if len(reader.prepared) == 2:
            break
        time.sleep(0.01)
    assert reader.prepared == expected
    session.play("你们仓库有多大？")
    assert reader.seen[1][1] == expected[1]  # the reply prepared is the context the next line is read in


def test_header_now_and_writer_never_overwrites(tmp_path: Path) -> None:
    header = header_now(SCENARIO, "llm", "buyer=m1, grader=m2, coach=m3", "en")
    assert (header.scenario, header.engine, header.model, header.language) == (
        SCENARIO, "llm", "buyer=m1, grader=m2, coach=m3", "en",
    )
    assert datetime.fromisoformat(header.started).tzinfo is not None
    path = tmp_path / "saved.jsonl"
    path.write_text("an earlier call\n", encoding="utf-8")
    with pytest.raises(FileExistsError):
        TranscriptWriter(path, header)
    assert path.read_text(encoding="utf-8") == "an earlier call\n"


def test_rejected_message_saves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "call.jsonl"
    session = _session(path, ["S"])
    with pytest.raises(ValueError, match="empty"):
        list(session.play_stream("\u200b\u200d "))
    assert _turns_on_disk(path) == []
    session.close()


# --- load / load_many ------------------------------------------------------------------------------


def _state(**changes: object) -> dict[str, object]:
    base = roleplay.start(scenarios.get(SCENARIO))
    return replace(base, **changes).to_json()  # type: ignore[arg-type]


def _write(path: Path, turns: Sequence[Turn], *, language: str = "zh", scenario: str = SCENARIO) -> Path:
    writer = TranscriptWriter(path, header_now(scenario, "offline", "offline", language))  # type: ignore[arg-type]
    for turn in turns:
        writer.append(turn)
    writer.close()
    return path


def _turn(number: int, label: str | None, state: dict[str, object], rep: str = "问题？") -> Turn:
    return Turn(turn=number, rep=rep, label=label, reason="r", buyer="嗯。", state=state,
                reaction={"kind": "ack", "unlocked": [], "topic": None})


def test_load_round_trip(tmp_path: Path) -> None:
    turns = [_turn(1, "S", _state(turn=1)), _turn(2, "P", _state(turn=2))]
    transcript = load(_write(tmp_path / "a.jsonl", turns))
    assert transcript.header.scenario == SCENARIO
    assert [t.model_dump() for t in transcript.turns] == [t.model_dump() for t in turns]
    assert transcript.path == str(tmp_path / "a.jsonl")


def test_load_ignores_a_torn_last_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", [_turn(1, "S", _state(turn=1)), _turn(2, "P", _state(turn=2))])
    full = json.dumps(_turn(3, "I", _state(turn=3)).model_dump(), ensure_ascii=False)
    with path.open("a", encoding="utf-8") as f:
        f.write(full[: len(full) // 2])  # the process died mid-write
    assert [t.turn for t in load(path).turns] == [1, 2]


def test_load_names_file_and_line_of_a_broken_middle_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", [_turn(1, "S", _state(turn=1)), _turn(2, "P", _state(turn=2))])
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[1] = lines[1][:40]
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(TranscriptError, match=rf"^{_re(path)}:2: invalid JSON"):
        load(path)


def test_load_names_the_line_of_an_invalid_turn_after_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", [_turn(1, "S", _state(turn=1))])
    with path.open("a", encoding="utf-8") as f:
        f.write("\n\n" + json.dumps({"kind": "turn", "turn": 0, "rep": "x"}) + "\n")
    with pytest.raises(TranscriptError, match=rf"^{_re(path)}:5: "):
        load(path)


def test_load_keeps_texts_with_unicode_line_separators(tmp_path: Path) -> None:
    """json.dumps leaves U+2028/U+2029/U+0085 unescaped: they must not split a saved line."""
    rep = "第一句\u2028第二句\u2029第三句\x85？"
    path = _write(tmp_path / "a.jsonl", [_turn(1, "S", _state(turn=1), rep=rep), _turn(2, "P", _state(turn=2))])
    transcript = load(path)
    assert [t.rep for t in transcript.turns] == [rep, "问题？"]


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(TranscriptError, match=rf"^{_re(empty)}:1: empty"):
        load(empty)
    torn_header = tmp_path / "torn.jsonl"
    torn_header.write_text('{"kind": "header", "scen', encoding="utf-8")
    with pytest.raises(TranscriptError, match=rf"^{_re(torn_header)}:1: "):
        load(torn_header)
    bad_header = tmp_path / "bad.jsonl"
    bad_header.write_text(json.dumps({"kind": "header", "scenario": SCENARIO}) + "\n", encoding="utf-8")
    with pytest.raises(TranscriptError, match=rf"^{_re(bad_header)}:1: header: "):
        load(bad_header)


def test_load_many_on_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "calls"
    folder.mkdir()
    _write(folder / "b.jsonl", [_turn(1, "S", _state(turn=1))])
    _write(folder / "a.jsonl", [_turn(1, "P", _state(turn=1)), _turn(2, "I", _state(turn=2))])
    (folder / "notes.txt").write_text("not a transcript", encoding="utf-8")
    loaded = load_many(folder)
    assert [Path(t.path or "").name for t in loaded] == ["a.jsonl", "b.jsonl"]
    assert [len(t.turns) for t in loaded] == [2, 1]
    assert len(load_many(folder / "a.jsonl")) == 1
    with pytest.raises(TranscriptError, match="no transcripts"):
        load_many(tmp_path)
    with pytest.raises(TranscriptError, match="no such file"):
        load_many(tmp_path / "missing")


# --- spinbot eval transcripts ----------------------------------------------------------------------


def _eval_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "calls"
    folder.mkdir()
    counts1 = {"S": 1, "P": 1, "I": 1, "N": 1, "O": 1}
    final1 = _state(turn=5, implied=("pick-errors", "walking"), explicit=("pick-errors",),
                    implications={"pick-errors": (0,)}, counts=counts1, outcome="Continuation")
    labels1 = ["S", "P", "I", "N", "O"]
    turns1 = [_turn(i, label, _state(turn=i)) for i, label in enumerate(labels1[:-1], start=1)]
    _write(folder / "1-call.jsonl", [*turns1, _turn(5, "O", final1)])
    counts2 = {"S": 2, "P": 0, "I": 0, "N": 0, "O": 1}
    final2 = _state(turn=3, counts=counts2, premature_pitches=1, objections=1)
    _write(folder / "2-call.jsonl", [_turn(1, "S", _state(turn=1)), _turn(2, "S", _state(turn=2)),
                                     _turn(3, "O", final2)], language="en")
    return folder


def test_eval_transcripts_cli(tmp_path: Path) -> None:
    folder = _eval_folder(tmp_path)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", "transcripts", str(folder), "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["n"] == 2
    first, second = data["calls"]
    assert Path(first["path"]).name == "1-call.jsonl"
    assert (first["scenario"], first["engine"], first["language"], first["turns"]) == (SCENARIO, "offline", "zh", 5)
    assert first["counts"] == {"S": 1, "P": 1, "I": 1, "N": 1, "O": 1}
    assert first["mix"] == {"S": 0.2, "P": 0.2, "I": 0.2, "N": 0.2, "O": 0.2}
    assert (first["implied_needs"], first["explicit_needs"], first["outcome"]) == (2, 1, "Continuation")
    assert (second["language"], second["turns"]) == ("en", 3)
    assert second["counts"] == {"S": 2, "P": 0, "I": 0, "N": 0, "O": 1}
    assert (second["implied_needs"], second["explicit_needs"], second["premature_pitches"]) == (0, 0, 1)
    assert second["outcome"] == "No-sale"  # an unfinished call with nothing uncovered
    totals = data["totals"]
    assert totals["turns"] == 8
    assert totals["counts"] == {"S": 3, "P": 1, "I": 1, "N": 1, "O": 2}
    assert totals["mix"] == {"S": 0.375, "P": 0.125, "I": 0.125, "N": 0.125, "O": 0.25}
    assert (totals["implied_needs"], totals["explicit_needs"]) == (2, 1)
    assert totals["outcomes"] == {"Continuation": 1, "No-sale": 1}
    # The same figures on stdout, for one file.
    single = CliRunner().invoke(app, ["eval", "transcripts", str(folder / "2-call.jsonl"), "--json", "-"])
    assert single.exit_code == 0
    assert json.loads(single.stdout)["calls"] == [second]


def test_eval_transcripts_cli_bad_transcript_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    folder = _eval_folder(tmp_path)
    broken = folder / "2-call.jsonl"
    lines = broken.read_text(encoding="utf-8").split("\n")
    lines[2] = "{not json"
    broken.write_text("\n".join(lines), encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", "transcripts", str(folder), "--json", "-"])
    assert result.exit_code == 2
    assert result.stdout == ""
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert f"{broken}:3:" in message and "Traceback" not in message


def test_eval_transcripts_cli_unknown_scenario_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "odd.jsonl", [_turn(1, "S", _state(turn=1))], scenario="no-such-card")
    result = CliRunner().invoke(app, ["eval", "transcripts", str(path)])
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert f"{path}:1:" in message and "no-such-card" in message


def test_eval_transcripts_cli_missing_target(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "transcripts", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "nowhere" in result.stderr


def _re(path: Path) -> str:
    import re

    return re.escape(str(path))


def test_call_state_round_trips_through_a_saved_turn(tmp_path: Path) -> None:
    state = replace(roleplay.start(scenarios.get(SCENARIO)), turn=2, facts=("scale",), trust=0.533333)
    path = _write(tmp_path / "a.jsonl", [_turn(1, "S", state.to_json())])
    again = CallState.from_json(load(path).turns[0].state)
    assert again == replace(state, trust=0.533)
    assert isinstance(Header.model_validate(_lines_on_disk(path)[0]), Header)
