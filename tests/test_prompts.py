"""prompts/: strict rendering, and a snapshot of every prompt rendered with fixed sample values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage

from bot import prompts
from bot.prompts import PromptError

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE_HINT = "run `UPDATE_SNAPSHOTS=1 .venv/bin/pytest tests/test_prompts.py` to accept the new rendering"

# Fixed values for every prompt in prompts/, keyed by prompt name. A new prompt needs an entry here.
SAMPLE_VALUES: dict[str, dict[str, object]] = {
    "coach": {
        "language_name": "Simplified Chinese",
        "max_words": 300,
        "not_covered": "课程里没有讲到这个问题。",
        "passages": "[1] (concepts/implication-questions.zh.md#暗示问题的作用)\n暗示问题 > 暗示问题的作用\n"
        "暗示问题追问难点带来的后果。",
        "question": "什么是暗示问题?",
    },
    "grader": {
        "context": "We run three warehouses and stock counts are often wrong.",
        "reason_language": "English",
        "utterance": "How does a wrong stock count affect your delivery times?",
    },
    "reader": {
        "context": "buyer: We run three warehouses and stock counts are often wrong.",
        "focus": "stock-counts: stock counts that do not match the shelves",
        "moves": "- question: any question about the buyer's business\n- rapport: small talk",
        "reason_language": "English",
        "topics": "- sites (fact): number of warehouses / 仓库数量\n"
        "- stock-counts (problem): wrong stock counts / 盘点不准",
        "utterance": "How does a wrong stock count affect your delivery times?",
    },
    "buyer": {
        "buyer_name": "Manager Zhou",
        "buyer_role": "Head of warehouse operations",
        "industry": "third-party logistics",
        "personality": "practical, dislikes hassle",
        "background": "ex-army, fishes at weekends",
        "decision_role": "influencer",
        "value_type": "an extrinsic-value customer",
        "seller": "You sell pick-to-light systems.",
        "disclosed": "- Two warehouses, about eighty people.",
        "trust": "moderate: polite and businesslike",
        "concepts": "外在价值型客户: 更大的蛋糕",
        "instruction": "admit this difficulty, a little reluctantly.",
        "convey": "The sheet often doesn't match the shelves.",
        "language_name": "English",
        "history": "Rep: How many people work here?\nYou: About eighty.",
        "rep_message": "Are your stock counts ever off?",
    },
    "hint": {
        "language_name": "English",
        "state": "scenario: Warehouse lead; trust 0.55; implied needs ['picking mistakes']",
        "history": "Rep: Do pickers make mistakes?\nBuyer: Some, yes.",
    },
    "debrief": {
        "language_name": "English",
        "scenario": "Warehouse lead (consultative sale, extrinsic value customer)",
        "figures": '{"counts": {"S": 3, "P": 1}}',
        "weakest": "2, 4",
        "transcript": "1. [S] Rep: How many sites?\n   Buyer: Two.",
    },
}


def _as_text(messages: list[BaseMessage]) -> str:
    parts = []
    for message in messages:
        role = "system" if isinstance(message, SystemMessage) else "user" if isinstance(message, HumanMessage) else "?"
        parts.append(f"### {role}\n{message.text}\n")
    return "\n".join(parts)


def test_there_are_prompts_to_check() -> None:
    assert "coach" in prompts.names()


@pytest.mark.parametrize("name", prompts.names())
def test_prompt_matches_snapshot(name: str) -> None:
    if name not in SAMPLE_VALUES:
        pytest.fail(
            f"prompts/{name}.md has no sample values: add SAMPLE_VALUES[{name!r}] in tests/test_prompts.py "
            f"with the keys {sorted(prompts.variables(name))}, then {UPDATE_HINT}"
        )
    rendered = _as_text(prompts.render(name, **SAMPLE_VALUES[name]))
    for value in SAMPLE_VALUES[name].values():
        assert str(value) in rendered, f"prompts/{name}.md: sample value {value!r} did not reach the messages"
    snapshot = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        snapshot.write_text(rendered, encoding="utf-8")
    if not snapshot.is_file():
        pytest.fail(f"no snapshot tests/snapshots/{name}.txt for prompts/{name}.md: {UPDATE_HINT}")
    expected = snapshot.read_text(encoding="utf-8")
    if rendered != expected:
        import difflib

        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True), rendered.splitlines(keepends=True), "snapshot", "rendered"
            )
        )
        pytest.fail(f"prompts/{name}.md renders differently from tests/snapshots/{name}.txt; {UPDATE_HINT}\n{diff}")


def test_every_snapshot_has_a_prompt() -> None:
    stale = sorted(p.stem for p in SNAPSHOTS.glob("*.txt") if p.stem not in prompts.names())
    assert not stale, f"snapshots without a prompt (delete them): {stale}"


def test_every_sample_entry_has_a_prompt() -> None:
    stale = sorted(set(SAMPLE_VALUES) - set(prompts.names()))
    assert not stale, f"SAMPLE_VALUES entries for prompts that no longer exist: {stale}"


def test_coach_renders_system_then_user() -> None:
    messages = prompts.render("coach", **SAMPLE_VALUES["coach"])
    assert [type(m) for m in messages] == [SystemMessage, HumanMessage]
    assert "Simplified Chinese" in messages[0].text
    assert "<question>\n什么是暗示问题?\n</question>" in messages[1].text


def test_render_rejects_missing_variables() -> None:
    values = dict(SAMPLE_VALUES["coach"])
    del values["question"], values["passages"]
    with pytest.raises(PromptError) as caught:
        prompts.render("coach", **values)
    message = str(caught.value)
    assert "prompts/coach.md" in message
    assert "missing passages, question" in message
    assert "unknown" not in message


def test_render_rejects_unknown_variables() -> None:
    with pytest.raises(PromptError) as caught:
        prompts.render("coach", **SAMPLE_VALUES["coach"], temperature=0.2)
    message = str(caught.value)
    assert "unknown temperature" in message
    assert "missing" not in message


def test_render_names_missing_and_unknown_together() -> None:
    values = dict(SAMPLE_VALUES["coach"])
    del values["language_name"]
    with pytest.raises(PromptError, match=r"missing language_name; unknown languge_name"):
        prompts.render("coach", **values, languge_name="English")


def test_literal_braces_and_values_with_braces(tmp_path: Path) -> None:
    (tmp_path / "demo.md").write_text(
        "### system\nReply as JSON like {{\"label\": \"S\"}}.\n\n### user\n{text}\n", encoding="utf-8"
    )
    system, user = prompts.render("demo", tmp_path, text="a {curly} value")
    assert system.text == 'Reply as JSON like {"label": "S"}.'
    assert user.text == "a {curly} value"  # values are inserted as is, never re-parsed as templates
    assert prompts.variables("demo", tmp_path) == {"text"}


def test_prompt_without_system_section_is_refused(tmp_path: Path) -> None:
    (tmp_path / "nosys.md").write_text("### user\n{text}\n", encoding="utf-8")
    with pytest.raises(PromptError, match=r"nosys\.md: missing '### system' section"):
        prompts.render("nosys", tmp_path, text="x")


def test_duplicate_section_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dup.md").write_text("### system\na\n### user\nb\n### user\nc\n", encoding="utf-8")
    with pytest.raises(PromptError, match=r"dup\.md: section '### user' appears twice"):
        prompts.variables("dup", tmp_path)


def test_missing_prompt_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match=r"nothere\.md: prompt file not found"):
        prompts.render("nothere", tmp_path)
