"""The `spinbot` command line: the contract in design.md (JSON shapes, exit codes, one-line errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import bot.runtime
from bot.cli import app
from bot.testing import FakeEmbeddingModel, FakeOpenAIServer

COACH_DEV = Path(__file__).parents[2] / "shared" / "data" / "coach-dev.jsonl"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def real_home(knowledge_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """SPINBOT_HOME with the session's prebuilt index of the real knowledge/."""
    monkeypatch.setenv("SPINBOT_HOME", str(knowledge_home))
    return knowledge_home


def _one_line_error(result: object) -> str:
    stderr = result.stderr.strip()  # type: ignore[attr-defined]
    assert stderr.startswith("error:"), stderr
    assert "\n" not in stderr, f"expected one line, got:\n{stderr}"
    assert "Traceback" not in stderr
    return stderr


# --- index -------------------------------------------------------------------------------------------


def test_index_builds_then_reports_up_to_date(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh SPINBOT_HOME (from conftest) and hash embeddings keep this fast.
    fake = FakeEmbeddingModel(name="fake-embed")
    monkeypatch.setattr(bot.runtime, "bundled_embeddings", lambda: fake)
    first = runner.invoke(app, ["index"])
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("index built: ") and "(fake-embed)" in first.stdout
    second = runner.invoke(app, ["index"])
    assert second.exit_code == 0, second.output
    assert second.stdout.startswith("index up to date: ")
    chunks = first.stdout.split(": ", 1)[1].split(" chunks")[0]
    assert second.stdout.split(": ", 1)[1].split(" chunks")[0] == chunks
    forced = runner.invoke(app, ["index", "--rebuild"])
    assert forced.exit_code == 0 and forced.stdout.startswith("index built: ")


def test_index_on_the_session_home_is_up_to_date(runner: CliRunner, real_home: Path) -> None:
    result = runner.invoke(app, ["index"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("index up to date: ")
    assert "multilingual-e5-small" in result.stdout


# --- retrieve and coach --------------------------------------------------------------------------------


def test_retrieve_json_to_stdout(runner: CliRunner, real_home: Path) -> None:
    result = runner.invoke(app, ["retrieve", "什么是暗示问题?", "--k", "3", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert data["k"] == 3 and data["question"] == "什么是暗示问题?"
    assert len(data["passages"]) == 3
    for passage in data["passages"]:
        assert passage["text"] and passage["source"] and isinstance(passage["score"], float)
    assert "暗示问题" in data["passages"][0]["text"]


def test_retrieve_prints_passages_for_people(runner: CliRunner, real_home: Path) -> None:
    result = runner.invoke(app, ["retrieve", "德能勤绩", "--k", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("[1] course/spin-course-zh.txt#L33-L46  (score ")


def test_retrieve_k_out_of_range_is_a_usage_error(runner: CliRunner, real_home: Path) -> None:
    result = runner.invoke(app, ["retrieve", "暗示问题", "--k", "0"])
    assert result.exit_code == 2


def test_coach_json_file(runner: CliRunner, real_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "answer.json"
    result = runner.invoke(app, ["coach", "什么是暗示问题?", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["engine"] == "offline" and data["covered"] is True and data["language"] == "zh"
    assert "[1]" in data["answer"]
    assert [s["n"] for s in data["sources"]] == [1, 2, 3, 4]
    assert all(s["source"] and s["text"] for s in data["sources"])
    # The human-readable answer is still printed, with its sources.
    assert "[1] **" in result.stdout and "Sources" in result.stdout
    assert f"[1] {data['sources'][0]['source']}" in result.stdout


def test_coach_through_the_llm_engine(
    runner: CliRunner,
    real_home: Path,
    fake_server: FakeOpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake-cli-key-123456")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_server.base_url)
    monkeypatch.setenv("SPINBOT_EMBED_MODEL", "bundled")  # keep the bundled embeddings: no rebuild
    monkeypatch.setenv("SPINBOT_COACH_MODEL", "fake-coach")
    monkeypatch.setenv("SPINBOT_MAX_RETRIES", "0")
    fake_server.enqueue("暗示问题追问难点带来的后果和影响[1]，让客户看清问题的严重程度[2]。")
    out = tmp_path / "llm-answer.json"
    result = runner.invoke(app, ["coach", "什么是暗示问题?", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "暗示问题追问难点带来的后果和影响[1]，让客户看清问题的严重程度[2]。" in result.stdout
    assert "Sources" in result.stdout and "[1] concepts/" in result.stdout and "[2] " in result.stdout
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["engine"] == "llm" and data["covered"] is True
    assert [s["n"] for s in data["sources"]] == [1, 2]
    (body,) = fake_server.chat_requests()
    assert body["model"] == "fake-coach"
    assert "<passages>" in body["messages"][1]["content"]
    assert "sk-fake-cli-key-123456" not in result.output
    fake_server.assert_complete()


def test_llm_server_down_is_exit_1_with_one_line(
    runner: CliRunner, real_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.testing import closed_port

    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake-cli-key-123456")
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{closed_port()}/v1")
    monkeypatch.setenv("SPINBOT_EMBED_MODEL", "bundled")
    monkeypatch.setenv("SPINBOT_MAX_RETRIES", "0")
    result = runner.invoke(app, ["coach", "什么是暗示问题?"])
    assert result.exit_code == 1
    stderr = result.stderr.strip()
    assert stderr.startswith("LLM error: Could not reach the model server") and "\n" not in stderr


# --- eval retrieval --------------------------------------------------------------------------------------


def test_eval_retrieval_on_coach_dev(runner: CliRunner, real_home: Path, tmp_path: Path) -> None:
    if not COACH_DEV.is_file():
        pytest.skip(f"{COACH_DEV} is absent (the shared data folder is not checked out beside the repo)")
    out = tmp_path / "retrieval.json"
    result = runner.invoke(app, ["eval", "retrieval", "--data", str(COACH_DEV), "--k", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text(encoding="utf-8"))
    assert {"n", "hit_rate", "samples"} <= set(data)
    assert data["n"] == len(data["samples"]) == sum(1 for line in COACH_DEV.open(encoding="utf-8") if line.strip())
    assert data["hit_rate"] >= 0.9, [s["id"] for s in data["samples"] if not s["hit"]]
    assert all(len(s["sources"]) == 4 for s in data["samples"])
    assert "hit_rate=" in result.stdout


def test_eval_retrieval_counts_misses(runner: CliRunner, real_home: Path, tmp_path: Path) -> None:
    data = tmp_path / "mini.jsonl"
    rows = [
        {"id": "hit", "lang": "zh", "question": "信任的定义是什么?", "all_of": [["易受伤害之处"]]},
        {"id": "miss", "lang": "en", "question": "What is trust?", "all_of": [["no such words anywhere"]]},
    ]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["eval", "retrieval", "--data", str(data), "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 2 and report["hit_rate"] == 0.5
    assert {s["id"]: s["hit"] for s in report["samples"]} == {"hit": True, "miss": False}


# --- bad input: exit 2 and one line naming the file and line ----------------------------------------------


def test_malformed_jsonl_names_file_and_line(runner: CliRunner, real_home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "q", "all_of": [["x"]]}\n{"id": "b", "question": \n', encoding="utf-8")
    result = runner.invoke(app, ["eval", "retrieval", "--data", str(bad)])
    assert result.exit_code == 2
    line = _one_line_error(result)
    assert f"{bad}:2:" in line and "invalid JSON" in line


def test_invalid_record_names_the_field(runner: CliRunner, real_home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "q", "all_of": []}\n', encoding="utf-8")
    result = runner.invoke(app, ["eval", "retrieval", "--data", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:1: all_of" in _one_line_error(result)


def test_error_text_is_not_read_as_markup(runner: CliRunner, real_home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "x[bold][" / "red]"  # the path reads .../x[bold][/red]/bad.jsonl
    folder.mkdir(parents=True)
    assert "[/red]" in str(folder)
    bad = folder / "bad.jsonl"
    bad.write_text("\n[1, 2\n", encoding="utf-8")
    result = runner.invoke(app, ["eval", "retrieval", "--data", str(bad)])
    assert result.exit_code == 2, result.output
    assert f"{bad}:2:" in _one_line_error(result)


def test_missing_data_file(runner: CliRunner, real_home: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "retrieval", "--data", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2
    assert "nope.jsonl: file not found" in _one_line_error(result)


@pytest.mark.parametrize("command", ["coach", "retrieve"])
@pytest.mark.parametrize("question", ["", "   \n"])
def test_empty_question_exits_2(runner: CliRunner, real_home: Path, command: str, question: str) -> None:
    result = runner.invoke(app, [command, question, "--json", "-"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "question is empty" in _one_line_error(result)


def test_bad_engine_setting_exits_2_naming_the_variable(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINBOT_ENGINE", "bogus")
    result = runner.invoke(app, ["coach", "什么是暗示问题?"])
    assert result.exit_code == 2
    line = _one_line_error(result)
    assert "SPINBOT_ENGINE" in line and "auto, llm or offline" in line


def test_llm_engine_without_key_exits_2(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINBOT_ENGINE", "llm")
    result = runner.invoke(app, ["retrieve", "暗示问题"])
    assert result.exit_code == 2
    assert "OPENAI_API_KEY" in _one_line_error(result)
