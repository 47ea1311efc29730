"""Bad input: empty, oversized and invisible-character messages, malformed data files and cards, path
tricks in the web app's review tab, oversized uploads. Each is refused with a clear line; nothing saved
is lost, overwritten or added to."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bot import scenarios
from bot.cli import app
from bot.config import Settings
from bot.runtime import Runtime
from bot.session import PracticeSession
from bot.text import MAX_MESSAGE_CHARS, InputError
from bot.transcripts import TranscriptWriter, header_now, load, new_path

WAREHOUSE = "warehouse-extrinsic-01"
GOOD_LINE = "你们仓库有多大，多少员工？"
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u202e\u2066\x00\x07\x1b\x7f\x85\x0b\x0c"

EMPTY = ["", " ", "   \t  ", "\n\n", "\u3000", " \r\n "]
ONLY_INVISIBLE = [INVISIBLE, "\u200b", "\x00\x00", "\ufeff \u200d\t\u2060", "\x1b\x1b"]


def _saved_turns(path: Path) -> list[Any]:
    return load(path).turns


@pytest.fixture
def saved_session(practice: Callable[..., PracticeSession], tmp_path: Path) -> PracticeSession:
    session = practice(WAREHOUSE, "zh", transcript=tmp_path / "calls" / "call.jsonl")
    assert session.play(GOOD_LINE).reading.label == "S"
    return session


# --------------------------------------------------------------------------------------------------
# Messages


@pytest.mark.parametrize("text", EMPTY + ONLY_INVISIBLE, ids=lambda t: repr(t)[:24])
def test_empty_or_invisible_message_is_refused_and_nothing_saved(saved_session: PracticeSession, text: str) -> None:
    path = saved_session.transcript_path
    assert path is not None
    before = path.read_bytes()
    state = saved_session.state
    with pytest.raises(InputError) as caught:
        saved_session.play(text)
    message = str(caught.value)
    assert "empty" in message and "\n" not in message
    assert path.read_bytes() == before and len(_saved_turns(path)) == 1
    assert saved_session.state == state and len(saved_session.results) == 1
    # ... and the call goes on.
    assert saved_session.play("现在拣货的时候，会不会经常出现拣错货的情况？").turn == 2


@pytest.mark.parametrize("size", [MAX_MESSAGE_CHARS + 1, 50_000])
def test_oversized_message_is_refused_naming_the_limit(saved_session: PracticeSession, size: int) -> None:
    path = saved_session.transcript_path
    assert path is not None
    before = path.read_bytes()
    with pytest.raises(InputError) as caught:
        saved_session.play(("拣货" * size)[:size])
    message = str(caught.value)
    assert "\n" not in message and len(message) < 200
    assert "too long" in message and str(MAX_MESSAGE_CHARS) in message and str(size) in message
    assert path.read_bytes() == before


def test_a_message_at_the_limit_is_accepted(saved_session: PracticeSession) -> None:
    text = ("你们仓库每天发多少单？" * 200)[:MAX_MESSAGE_CHARS]
    assert saved_session.play(text).rep == text


def test_control_and_zero_width_characters_are_stripped_before_saving(saved_session: PracticeSession) -> None:
    dirty = f"{INVISIBLE}现在\u200b拣货的\x07时候，会不会\u202e经常\ufeff出现\x1b拣错货的\u2060情况？{INVISIBLE}"
    result = saved_session.play(dirty)
    clean = "现在拣货的时候，会不会经常出现拣错货的情况？"
    assert result.rep == clean
    saved = _saved_turns(saved_session.transcript_path)  # type: ignore[arg-type]
    assert saved[-1].rep == clean
    raw = saved_session.transcript_path.read_text(encoding="utf-8")  # type: ignore[union-attr]
    for char in INVISIBLE:
        assert char not in raw and json.dumps(char)[1:-1] not in raw.replace("\\n", "")


def test_the_web_app_refuses_bad_messages_with_a_warning_and_saves_nothing(chat_home: Path) -> None:
    from bot.ui import build_app

    runtime = Runtime(Settings(SPINBOT_HOME=str(chat_home)))  # type: ignore[call-arg]
    blocks = build_app(runtime)
    start = _handler(blocks, "start_call")
    send = _handler(blocks, "send")
    session, chat, *_ = start(WAREHOUSE, "zh", "中文", None)
    path = session.transcript_path
    for text in ["   ", INVISIBLE, "拣" * 50_000]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs = list(send(text, chat, session, "中文"))
        assert outputs == [(chat, text, outputs[0][2])]  # the chat is untouched, the text stays in the box
        (warning,) = [str(w.message) for w in caught]
        assert "\n" not in warning and ("empty" in warning or str(MAX_MESSAGE_CHARS) in warning)
    assert load(path).turns == []
    *_, (chat, box, _) = send(GOOD_LINE, chat, session, "中文")
    assert box == "" and len(load(path).turns) == 1


def _handler(blocks: Any, api_name: str) -> Callable[..., Any]:
    (fn,) = [f.fn for f in blocks.fns.values() if f.api_name == api_name]
    return fn  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------------
# Malformed data files: exit 2, one line naming the file and the line


def _one_line(result: Any) -> str:
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


GOOD_LABELLED = json.dumps({"id": "a", "lang": "zh", "context": "", "utterance": "你们有几个仓？", "label": "S"},
                           ensure_ascii=False)
GOOD_QUESTION = json.dumps({"id": "q", "lang": "zh", "question": "什么是暗示问题?", "all_of": [["暗示"]]},
                           ensure_ascii=False)
BAD_GRADER_FILES = {
    "broken-json": ([GOOD_LABELLED, "", '{"id": "b", "lang": "zh",'], 3, "invalid JSON"),
    "bad-label": ([GOOD_LABELLED, GOOD_LABELLED.replace('"S"', '"Q"')], 2, "label"),
    "missing-utterance": ([json.dumps({"id": "c", "lang": "en", "label": "S"})], 1, "utterance"),
    "not-an-object": ([GOOD_LABELLED, "[1, 2, 3]"], 2, ""),
}
BAD_RETRIEVAL_FILES = {
    "broken-json": ([GOOD_QUESTION, "{oops}"], 2, "invalid JSON"),
    "empty-all-of": ([GOOD_QUESTION, GOOD_QUESTION, GOOD_QUESTION.replace('[["暗示"]]', "[]")], 3, "all_of"),
    "no-question": ([json.dumps({"id": "x", "all_of": [["a"]]})], 1, "question"),
}


@pytest.mark.parametrize("case", list(BAD_GRADER_FILES))
def test_eval_grader_malformed_jsonl_exits_2_naming_file_and_line(tmp_path: Path, case: str) -> None:
    lines, number, field = BAD_GRADER_FILES[case]
    data = tmp_path / f"{case}.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", "grader", "--data", str(data), "--json", "-"])
    message = _one_line(result)
    assert f"{data}:{number}:" in message and field in message
    assert result.stdout == ""
    assert not (tmp_path / "spinbot-home" / "models").exists()  # refused before loading any grader


@pytest.mark.parametrize("case", list(BAD_RETRIEVAL_FILES))
def test_eval_retrieval_malformed_jsonl_exits_2_naming_file_and_line(
    tmp_path: Path, knowledge_home: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.setenv("SPINBOT_HOME", str(knowledge_home))
    lines, number, field = BAD_RETRIEVAL_FILES[case]
    data = tmp_path / f"{case}.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", "retrieval", "--data", str(data), "--json", "-"])
    message = _one_line(result)
    assert f"{data}:{number}:" in message and field in message


@pytest.mark.parametrize("command", [["eval", "grader", "--data"], ["eval", "retrieval", "--data"]])
def test_eval_non_utf8_or_missing_data_exits_2(
    tmp_path: Path, knowledge_home: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv("SPINBOT_HOME", str(knowledge_home))
    data = tmp_path / "latin1.jsonl"
    data.write_bytes('{"id": "é"}\n'.encode("latin-1"))
    assert str(data) in _one_line(CliRunner().invoke(app, [*command, str(data)]))
    missing = tmp_path / "missing.jsonl"
    assert str(missing) in _one_line(CliRunner().invoke(app, [*command, str(missing)]))


def _transcript_lines() -> list[str]:
    header = header_now(WAREHOUSE, "offline", "offline", "zh").model_dump()
    turn = {"kind": "turn", "turn": 1, "rep": GOOD_LINE, "label": "S", "reason": "r", "buyer": "b",
            "state": {"turn": 1}}
    return [json.dumps(header, ensure_ascii=False), json.dumps(turn, ensure_ascii=False)]


@pytest.mark.parametrize(
    ("broken", "number", "field"),
    [
        (lambda lines: [lines[0], "{not json", lines[1]], 2, "invalid JSON"),
        (lambda lines: [lines[0], lines[1], lines[1].replace('"turn": 1,', '"turn": "one",', 1), lines[1]], 3,
         "turn"),
        (lambda lines: ['{"kind": "header"}', lines[1]], 1, "header"),
    ],
    ids=["broken-json", "bad-turn-number", "bad-header"],
)
def test_eval_transcripts_malformed_file_exits_2_naming_file_and_line(
    tmp_path: Path, broken: Callable[[list[str]], list[str]], number: int, field: str
) -> None:
    folder = tmp_path / "calls"
    folder.mkdir()
    (folder / "a-good.jsonl").write_text("\n".join(_transcript_lines()) + "\n", encoding="utf-8")
    bad = folder / "b-bad.jsonl"
    bad.write_text("\n".join(broken(_transcript_lines())) + "\n", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for target in (bad, folder):
        message = _one_line(CliRunner().invoke(app, ["eval", "transcripts", str(target), "--json", "-"]))
        assert f"{bad}:{number}:" in message and field in message
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # evaluating changes nothing


# --------------------------------------------------------------------------------------------------
# Malformed scenario cards: exit 2, one line naming the file and the field

CARD = scenarios.SCENARIOS_DIR / f"{WAREHOUSE}.yaml"
CARD_BREAKS: dict[str, tuple[Callable[[str], str], str]] = {
    "yaml-syntax": (lambda text: text.replace("value_type: extrinsic", "value_type: [extrinsic"), "invalid YAML"),
    "tab-indent": (lambda text: text.replace("  name: {zh:", "\tname: {zh:", 1), "invalid YAML"),
    "unknown-value-type": (lambda text: text.replace("value_type: extrinsic", "value_type: cheap"), "value_type"),
    "missing-buyer-name": (lambda text: text.replace("  name: {zh: \"周经理\", en: \"Manager Zhou\"}\n", ""),
                           "buyer.name"),
    "empty-english-title": (lambda text: text.replace('en: "Warehouse operations head at a regional 3PL"', 'en: ""'),
                            "title.en"),
    "extra-field": (lambda text: text + "\nsecret_notes: hi\n", "secret_notes"),
    "bad-difficulty": (lambda text: text.replace("difficulty: normal", "difficulty: 3"), "difficulty"),
    "not-a-mapping": (lambda text: "- just\n- a list\n", "mapping"),
    "empty-file": (lambda text: "", "mapping"),
}


@pytest.mark.parametrize("case", list(CARD_BREAKS))
def test_scenarios_validate_names_file_and_field(tmp_path: Path, case: str) -> None:
    broken, field = CARD_BREAKS[case]
    folder = tmp_path / "cards"
    folder.mkdir()
    good = folder / "construction-extrinsic-01.yaml"
    shutil.copy(scenarios.SCENARIOS_DIR / good.name, good)
    text = CARD.read_text(encoding="utf-8")
    bad = folder / CARD.name
    bad.write_text(broken(text), encoding="utf-8")
    assert broken(text) != text
    for target in (bad, folder):
        message = _one_line(CliRunner().invoke(app, ["scenarios", "validate", str(target)]))
        assert f"{bad}: " in message and field in message
    assert CliRunner().invoke(app, ["scenarios", "validate", str(good)]).exit_code == 0


def test_scenarios_validate_card_id_must_match_its_file(tmp_path: Path) -> None:
    renamed = tmp_path / "renamed.yaml"
    shutil.copy(CARD, renamed)
    message = _one_line(CliRunner().invoke(app, ["scenarios", "validate", str(renamed)]))
    assert f"{renamed}: id:" in message and WAREHOUSE in message


# --------------------------------------------------------------------------------------------------
# Saved calls: path tricks are refused, nothing is ever overwritten


TRICKS = [
    "../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "..%2F..", "..", ".", "", "calls/../x.jsonl",
    "..\\..\\etc\\passwd", "escape.jsonl", "outside-dir", "a\x00b.jsonl", "x" * 5000 + ".jsonl", "~/.bashrc",
    "file:///etc/passwd", "missing.jsonl",
]


@pytest.fixture
def transcripts_dir(tmp_path: Path) -> Path:
    """A transcripts folder with one real call, a link to a file outside it and a link to a folder outside."""
    folder = tmp_path / "home" / "transcripts"
    folder.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jsonl"
    secret.write_text("\n".join(_transcript_lines()) + "\n", encoding="utf-8")
    (folder / "escape.jsonl").symlink_to(secret)
    (folder / "outside-dir").symlink_to(outside)
    writer = TranscriptWriter(folder / "real.jsonl", header_now(WAREHOUSE, "offline", "offline", "zh"))
    writer.close()
    return folder


@pytest.mark.parametrize("name", TRICKS, ids=lambda n: repr(n)[:30])
def test_open_saved_refuses_names_outside_the_transcripts_folder(transcripts_dir: Path, name: str) -> None:
    from bot.ui import saved_call_path

    with pytest.raises(InputError) as caught:
        saved_call_path(transcripts_dir, name)
    message = str(caught.value)
    assert message.endswith("not a saved call") and "\n" not in message and len(message) < 120


def test_open_saved_accepts_a_saved_call_and_follows_the_folder_itself(transcripts_dir: Path, tmp_path: Path) -> None:
    from bot.ui import saved_call_path

    assert saved_call_path(transcripts_dir, "real.jsonl") == (transcripts_dir / "real.jsonl").resolve()
    # SPINBOT_HOME itself may sit behind a link: only links out of the folder are refused.
    linked = tmp_path / "linked-transcripts"
    linked.symlink_to(transcripts_dir)
    assert saved_call_path(linked, "real.jsonl") == (transcripts_dir / "real.jsonl").resolve()
    with pytest.raises(InputError):
        saved_call_path(linked, "escape.jsonl")


def test_the_running_app_refuses_path_tricks(
    llm_chat_home: Path, tmp_path: Path, served_app: Callable[..., dict[str, Any]]
) -> None:
    from gradio_client import Client

    folder = llm_chat_home / "transcripts"
    folder.mkdir()
    (folder / "escape.jsonl").symlink_to("/etc/passwd")
    served = served_app(Runtime(Settings(SPINBOT_HOME=str(llm_chat_home))))  # type: ignore[call-arg]
    client = Client(served["url"], verbose=False)
    for name in ["../../etc/passwd", "/etc/passwd", "..%2F..", "escape.jsonl"]:
        with pytest.raises(Exception) as caught:
            client.predict(name, "中文", api_name="/open_call")
        assert "root:" not in str(caught.value)
    # The handler behind the button refuses too, whatever the dropdown lets through.
    import gradio as gr

    open_call = _handler(served["app"], "open_call")
    for name in ["../../etc/passwd", "/etc/passwd", "..%2F..", "escape.jsonl", "a\x00b", "x" * 5000]:
        with pytest.raises(gr.Error, match="not a saved call"):
            open_call(name, "中文")


def test_uploads_over_the_limit_are_refused(
    llm_chat_home: Path, served_app: Callable[..., dict[str, Any]]
) -> None:
    import httpx

    from bot.ui import MAX_UPLOAD

    served = served_app(Runtime(Settings(SPINBOT_HOME=str(llm_chat_home))))  # type: ignore[call-arg]
    assert served["options"]["max_file_size"] == MAX_UPLOAD == "2mb"
    url = f"{served['url']}gradio_api/upload"
    small = httpx.post(url, files={"files": ("call.jsonl", b'{"kind": "header"}\n', "application/octet-stream")})
    assert small.status_code == 200, small.text
    big = httpx.post(url, files={"files": ("big.jsonl", b"x" * (3 * 1024 * 1024), "application/octet-stream")})
    assert big.status_code == 413, big.text
    assert "size" in big.text.lower()


def test_transcripts_never_overwrite_a_saved_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bot.transcripts as transcripts

    folder = tmp_path / "transcripts"
    header = header_now(WAREHOUSE, "offline", "offline", "zh")
    existing = folder / "call.jsonl"
    folder.mkdir()
    existing.write_text("precious\n", encoding="utf-8")
    with pytest.raises(FileExistsError):
        TranscriptWriter(existing, header)
    assert existing.read_text(encoding="utf-8") == "precious\n"

    # The clock repeats (or steps back): a new call gets a new name, the old one is untouched.
    class Frozen:
        @staticmethod
        def now(tz: object = None) -> Any:
            from datetime import UTC, datetime

            return datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

    monkeypatch.setattr(transcripts, "datetime", Frozen)
    paths = []
    for _ in range(3):
        path = new_path(folder, WAREHOUSE)
        TranscriptWriter(path, header).close()
        paths.append(path)
    assert len(set(paths)) == 3 and all(p.parent == folder for p in paths)
    assert existing.read_text(encoding="utf-8") == "precious\n"
    assert sorted(os.listdir(folder)) == sorted(["call.jsonl", *(p.name for p in paths)])
