"""The SPIN grader: LLM path over real HTTP, offline classifier on held-out hard cases, eval metrics."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli import app
from bot.datasets import read_jsonl
from bot.evaluation import grader_metrics, score_grades
from bot.grader import (
    TRAIN_DIR,
    CachedEmbeddings,
    Grade,
    LabelledUtterance,
    LLMGrader,
    OfflineGrader,
    focus_question,
    load_training_set,
)
from bot.knowledge import bundled_embeddings
from bot.llm import OpenAIChatModel
from bot.testing import FakeOpenAIServer, FakeReply

REPO = Path(__file__).resolve().parents[1]
SHARED_DEV = REPO.parent / "shared" / "data" / "spin-dev.jsonl"
HARD_CASES = sorted((REPO / "evals" / "data").glob("hard-cases-*.jsonl"))
EXTERNAL_TEST = sorted((REPO / "evals" / "data" / "external").glob("test-*.jsonl"))
CONTEXT_TUNE = REPO / "evals" / "data" / "context" / "context-weight-tune.jsonl"


@pytest.fixture(scope="session")
def offline_grader(tmp_path_factory: pytest.TempPathFactory) -> OfflineGrader:
    return OfflineGrader.load_or_train(bundled_embeddings(), tmp_path_factory.mktemp("models"))


def _llm_grader(server: FakeOpenAIServer) -> LLMGrader:
    model = OpenAIChatModel("fake-model", api_key="sk-test-grader", base_url=server.base_url, max_retries=0)
    return LLMGrader(model)


# --- LLM grader -----------------------------------------------------------------------------------


def test_llm_grader_request_carries_guide_and_context(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(
        json.dumps({"label": "I", "reason": "Asks what the late trucks cost.", "better_question": None})
    )
    grade = _llm_grader(fake_server).grade(
        "When labels jam, what happens to the trucks waiting?", "buyer: Our printers jam in December."
    )
    assert grade == Grade("I", "Asks what the late trucks cost.", None, grader="llm:fake-model")
    body = fake_server.chat_requests()[0]
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    assert "Rules for hard cases" in system and "Implication (暗示问题)" in system
    assert "<context>\nbuyer: Our printers jam in December.\n</context>" in user
    assert "<utterance>\nWhen labels jam, what happens to the trucks waiting?\n</utterance>" in user
    assert body["response_format"]["type"] == "json_schema"
    fake_server.assert_complete()


def test_llm_grader_reason_language_follows_the_rep(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(json.dumps({"label": "S", "reason": "询问事实。", "better_question": "盘点准吗？"}))
    grade = _llm_grader(fake_server).grade("你们每周盘点几次？")
    assert (grade.label, grade.better_question) == ("S", "盘点准吗？")
    assert "Simplified Chinese" in fake_server.chat_requests()[0]["messages"][0]["content"]


@pytest.mark.parametrize(
    "bad_reply",
    [
        "this is not json at all",
        json.dumps({"label": "X", "reason": "made-up label"}),
        json.dumps({"reason": "no label"}),
    ],
)
def test_invalid_replies_twice_end_ungraded_not_guessed(fake_server: FakeOpenAIServer, bad_reply: str) -> None:
    fake_server.enqueue(bad_reply, bad_reply)
    grade = _llm_grader(fake_server).grade("How many vans do you run?")
    assert grade.label is None and not grade.graded
    assert grade.reason.startswith("ungraded:")
    assert len(fake_server.chat_requests()) == 2
    fake_server.assert_complete()


def test_invalid_reply_is_retried_once_then_accepted(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue("{broken", json.dumps({"label": "P", "reason": "Asks about a difficulty."}))
    grade = _llm_grader(fake_server).grade("Are the counts accurate?")
    assert grade.label == "P"
    assert len(fake_server.chat_requests()) == 2


def test_server_failure_leaves_utterance_ungraded(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(FakeReply(status=500, error_message="boom"))
    grade = _llm_grader(fake_server).grade("Are the counts accurate?")
    assert grade.label is None and "ungraded" in grade.reason


# --- offline grader -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("utterance", "focus"),
    [
        ("I see. How many people handle returns?", "How many people handle returns?"),
        ("你们用什么系统？盘点准不准？", "盘点准不准？"),
        ("Our new dashboard is great.", "Our new dashboard is great."),
    ],
)
def test_focus_question_is_the_last_question(utterance: str, focus: str) -> None:
    assert focus_question(utterance) == focus


@pytest.mark.parametrize("path", HARD_CASES, ids=lambda p: p.stem)
def test_offline_grader_gets_held_out_hard_cases_right(offline_grader: OfflineGrader, path: Path) -> None:
    items = read_jsonl(path, LabelledUtterance)
    grades = offline_grader.grade_batch([(i.utterance, i.context) for i in items])
    correct = sum(g.label == i.label for g, i in zip(grades, items, strict=True))
    # Held-out hard cases are the guide's edge cases: most, not all, must come out right.
    assert correct / len(items) >= 0.8, f"{path.name}: {correct}/{len(items)}"


@pytest.mark.parametrize(
    ("utterance", "context", "label"),
    [
        ("How many technicians are on the night shift?", "", "S"),
        ("Is the night shift struggling to keep up with call-outs?", "", "P"),
        ("您也是在成都长大的吗？", "", "O"),
        ("如果交货期能稳定在三天以内，对您拿下大客户有什么帮助？", "buyer: 交货期老是拖。", "N"),
    ],
)
def test_offline_grader_clear_cases(offline_grader: OfflineGrader, utterance: str, context: str, label: str) -> None:
    grade = offline_grader.grade(utterance, context)
    assert grade.label == label
    assert grade.reason and grade.confidence is not None


def test_offline_reason_speaks_the_reps_language(offline_grader: OfflineGrader) -> None:
    assert re.search(r"[\u4e00-\u9fff]", offline_grader.grade("你们现在有几个仓库？").reason)
    assert not re.search(r"[\u4e00-\u9fff]", offline_grader.grade("How many warehouses do you run?").reason)


def test_stored_model_is_reused_and_retrained_when_data_changes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    items = load_training_set()[:60] + load_training_set()[-60:]
    (data / "spin-train-a.jsonl").write_text(
        "\n".join(i.model_dump_json(exclude_none=True) for i in items), encoding="utf-8"
    )
    store = tmp_path / "models"
    embeddings = CachedEmbeddings(bundled_embeddings())
    OfflineGrader.load_or_train(embeddings, store, data)
    first = sorted(store.glob("*.joblib"))
    OfflineGrader.load_or_train(embeddings, store, data)
    assert sorted(store.glob("*.joblib")) == first
    with (data / "spin-train-a.jsonl").open("a", encoding="utf-8") as handle:
        handle.write("\n" + items[0].model_copy(update={"id": "extra-1", "utterance": "Which ERP?"}).model_dump_json())
    OfflineGrader.load_or_train(embeddings, store, data)
    second = sorted(store.glob("*.joblib"))
    assert len(second) == 1 and second != first


def test_training_set_shape() -> None:
    items = load_training_set()
    assert len(items) >= 800
    for lang in ("zh", "en"):
        share = sum(i.lang == lang for i in items) / len(items)
        assert 0.4 <= share <= 0.6, f"{lang} share {share:.2f}"
    assert {i.label for i in items} == {"S", "P", "I", "N", "O"}
    assert len({i.utterance for i in items}) == len(items)


@pytest.mark.skipif(not SHARED_DEV.exists(), reason="shared dev set not present")
def test_dev_set_never_leaks_into_training() -> None:
    def norm(text: str) -> str:
        return re.sub(r"[\W_]+", "", text).casefold()

    dev = {norm(i.utterance) for i in read_jsonl(SHARED_DEV, LabelledUtterance)}
    training = {norm(i.utterance) for i in load_training_set(TRAIN_DIR)}
    held_out = {norm(i.utterance) for p in HARD_CASES for i in read_jsonl(p, LabelledUtterance)}
    external = {norm(i.utterance) for p in EXTERNAL_TEST for i in read_jsonl(p, LabelledUtterance)}
    context_tune = {norm(i.utterance) for i in read_jsonl(CONTEXT_TUNE, LabelledUtterance)}
    assert EXTERNAL_TEST and not dev & training
    assert len(context_tune) == 200 and not context_tune & training, "the context-weight tune file is for tuning"
    assert not held_out & training
    assert not external & training, "a held-out external question is in the training data"


# --- metrics --------------------------------------------------------------------------------------


def test_metrics_match_hand_computed_values() -> None:
    gold = ["S", "S", "P", "I", "N", "O"]
    predicted = ["S", "P", "P", "I", "O", "O"]
    m = grader_metrics(gold, predicted)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Per-label F1: S 2/3, P 2/3, I 1, N 0, O 2/3 -> macro 3/5.
    assert m["macro_f1"] == pytest.approx(3 / 5)
    # p_o = 4/6; p_e = (2*1 + 1*2 + 1*1 + 1*0 + 1*2) / 36 = 7/36.
    assert m["kappa"] == pytest.approx(float((Fraction(4, 6) - Fraction(7, 36)) / (1 - Fraction(7, 36))))
    assert m["confusion"] == [
        [1, 1, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1],
        [0, 0, 0, 0, 1],
    ]
    assert m["per_label"]["N"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_ungraded_counts_as_wrong() -> None:
    items = [
        LabelledUtterance(id="a", lang="en", utterance="How many?", label="S"),
        LabelledUtterance(id="b", lang="zh", utterance="难吗？", label="P"),
    ]
    result = score_grades(items, [Grade("S", "ok"), Grade(None, "ungraded: timeout")], "t")
    assert result["accuracy"] == 0.5 and result["ungraded"] == 1
    assert result["by_language"]["zh"]["accuracy"] == 0.0
    assert result["samples"][1]["predicted"] is None


def test_eval_grader_cli_writes_json_markdown_and_png(tmp_path: Path) -> None:
    data = tmp_path / "tiny.jsonl"
    rows = [
        {"id": "t1", "lang": "en", "context": "", "utterance": "How many sites do you run?", "label": "S"},
        {"id": "t2", "lang": "zh", "context": "", "utterance": "您也喜欢钓鱼吗？", "label": "O"},
    ]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    out = tmp_path / "out" / "eval.json"
    out.parent.mkdir()
    result = CliRunner().invoke(app, ["eval", "grader", "--data", str(data), "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text(encoding="utf-8"))
    assert {"n", "accuracy", "macro_f1", "kappa", "per_label", "confusion", "samples"} <= payload.keys()
    assert payload["n"] == 2 and set(payload["by_language"]) == {"en", "zh"}
    assert (out.parent / "eval.md").read_text(encoding="utf-8").startswith("# Grader eval")
    assert (out.parent / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_grader_cli_names_file_and_line_of_bad_data(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": "a", "lang": "en", "utterance": "Hi", "label": "O"}\n{"id": "b", "label": "Z"}\n')
    result = CliRunner().invoke(app, ["eval", "grader", "--data", str(data)])
    assert result.exit_code == 2
    assert f"{data}:2:" in result.output


def test_grade_cli_llm_engine(fake_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-cli")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_server.base_url)
    monkeypatch.setenv("SPINBOT_MAX_RETRIES", "0")
    fake_server.enqueue(json.dumps({"label": "N", "reason": "Value of a fix.", "better_question": None}))
    result = CliRunner().invoke(app, ["grade", "Would live stock levels help you?", "--json", "-"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["label"] == "N" and payload["grader"] == "llm:gpt-4o-mini"
    assert "sk-test-cli" not in result.output


def test_eval_grader_compare_offline_and_llm(
    fake_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-compare")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_server.base_url)
    monkeypatch.setenv("SPINBOT_CONCURRENCY", "3")
    fake_server.chat_handler = lambda body: json.dumps({"label": "S", "reason": "facts"})
    data = tmp_path / "tiny.jsonl"
    rows = [
        ("How many sites do you run?", "S"),
        ("Which ERP do you use today?", "S"),
        ("您也喜欢钓鱼吗？", "O"),
        ("Would you like to book a demo next week?", "O"),
    ]
    data.write_text(
        "\n".join(
            json.dumps({"id": f"c{i}", "lang": "zh" if "钓" in u else "en", "context": "", "utterance": u, "label": g})
            for i, (u, g) in enumerate(rows)
        ),
        encoding="utf-8",
    )
    out = tmp_path / "cmp.json"
    result = CliRunner().invoke(
        app, ["eval", "grader", "--data", str(data), "--compare", "offline,llm", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text(encoding="utf-8"))
    offline_labels = [s["predicted"] for s in payload["samples"]]
    expected = sum(label == "S" for label in offline_labels) / len(rows)
    assert payload["compare"]["other"] == "llm"
    assert payload["compare"]["agreement"] == pytest.approx(expected)
    assert payload["compare"]["other_metrics"]["accuracy"] == pytest.approx(0.5)
    assert len(fake_server.chat_requests()) == len(rows)
