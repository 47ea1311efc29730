"""Scenario cards: the built-in set loads and covers the course; malformed cards fail naming file and field."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from bot import scenarios
from bot.cli import app
from bot.scenarios import LINE_KEYS, SCENARIOS_DIR, ScenarioError

CARD = "warehouse-extrinsic-01"


def test_all_builtin_cards_load() -> None:
    cards = scenarios.load_all()
    assert len(cards) == len(list(SCENARIOS_DIR.glob("*.yaml"))) >= 12
    assert [c.id for c in cards] == sorted(p.stem for p in SCENARIOS_DIR.glob("*.yaml"))
    assert {c.id for c in scenarios.builtin()} == {c.id for c in cards}
    assert scenarios.get(CARD).id == CARD


def test_builtin_cards_cover_value_types_sales_types_need_states_and_difficulties() -> None:
    cards = scenarios.builtin()
    by_value: dict[str, int] = {}
    for card in cards:
        by_value[card.value_type] = by_value.get(card.value_type, 0) + 1
    assert by_value == {"intrinsic": 4, "extrinsic": 4, "strategic": 4}
    assert {c.sales_type for c in cards} == {"transactional", "consultative", "enterprise"}
    assert {c.need_state for c in cards} == {"must_meet", "not_urgent", "not_discovered", "no_need"}
    assert {c.difficulty for c in cards} == {"easy", "normal", "hard"}
    assert {c.advance.requires_explicit_needs for c in cards} >= {1, 2, 3}
    assert len({c.industry.en for c in cards}) >= 8
    assert {c.buyer.decision_role for c in cards} >= {"economic_buyer", "decision_maker", "influencer"}


def test_every_builtin_card_fits_its_types() -> None:
    misfits = {card.id: card.coherence() for card in scenarios.builtin() if card.coherence()}
    assert misfits == {}


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        ({"value_type": "intrinsic"}, "pairs a intrinsic-value buyer with transactional selling, not consultative"),
        ({"need_state": "no_need", "difficulty": "easy"}, "a buyer with no need is not an easy call"),
    ],
)
def test_coherence_names_what_does_not_fit(edit: dict[str, str], problem: str) -> None:
    card = scenarios.get(CARD).model_copy(update=edit)
    assert any(problem in p for p in card.coherence())


def test_validate_reports_a_misfit_card(write_card: Callable[..., Path], runner: CliRunner) -> None:
    path = write_card(lambda d: d.update(value_type="strategic"))
    result = runner.invoke(app, ["scenarios", "validate", str(path.parent)])
    assert result.exit_code == 2 and "pairs a strategic-value buyer with enterprise selling" in result.stderr


def test_a_transactional_card_needs_an_order(write_card: Callable[..., Path]) -> None:
    path = write_card(lambda d: d.update(sales_type="transactional"))
    with pytest.raises(ScenarioError, match=r"advance\.order is for transactional sales"):
        scenarios.load_card(path)


@pytest.mark.parametrize("card", scenarios.builtin(), ids=lambda c: c.id)
def test_builtin_card_is_playable(card: scenarios.Scenario) -> None:
    # Every stock line has variants, so the offline buyer never repeats itself twice in a row.
    assert all(len(card.lines[key]) >= 2 for key in LINE_KEYS)
    assert card.advance.requires_explicit_needs <= len(card.problems)
    for problem in card.problems:
        assert problem.implications and problem.need_payoff.zh and problem.need_payoff.en
    # Bilingual throughout: the two languages differ (nothing left untranslated).
    assert card.title.zh != card.title.en and card.opening.zh != card.opening.en


# Any close asked too early draws a pushback line, a site visit as much as an order: none names one.
_NAMED_COMMITMENT = re.compile(
    r"\bsign|contract|\border|\bquote|pilot|trial|board|签|合同|下单|报价|试点|试运行|董事会", re.IGNORECASE
)


@pytest.mark.parametrize("card", scenarios.builtin(), ids=lambda c: c.id)
def test_pushback_lines_fit_any_early_close(card: scenarios.Scenario) -> None:
    named = [t for line in card.lines["pushback"] for t in (line.zh, line.en) if _NAMED_COMMITMENT.search(t)]
    assert named == []


def test_unknown_scenario_lists_the_ids() -> None:
    with pytest.raises(ScenarioError, match=r"unknown scenario 'nope'.*warehouse-extrinsic-01"):
        scenarios.get("nope")


# --- CLI -----------------------------------------------------------------------------------------


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_cli_scenarios_validate_builtin(runner: CliRunner) -> None:
    result = runner.invoke(app, ["scenarios", "validate"])
    assert result.exit_code == 0, result.output
    count = len(list(SCENARIOS_DIR.glob("*.yaml")))
    assert result.stdout.startswith(f"{count} card(s) valid: ") and CARD in result.stdout


def test_cli_scenarios_list_json(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["scenarios", "list", "--json", "-"])
    assert result.exit_code == 0, result.output
    cards = json.loads(result.stdout)
    assert len(cards) == len(list(SCENARIOS_DIR.glob("*.yaml")))
    for item in cards:
        assert {"id", "title", "value_type", "sales_type", "difficulty"} <= set(item)
        card = scenarios.get(item["id"])
        assert (item["title"], item["value_type"], item["sales_type"], item["difficulty"]) == (
            card.title.en, card.value_type, card.sales_type, card.difficulty)
    out = tmp_path / "cards.json"
    result = runner.invoke(app, ["scenarios", "list", "--json", str(out)])
    assert result.exit_code == 0 and json.loads(out.read_text(encoding="utf-8")) == cards
    assert "value type" in result.stdout  # the table still goes to the terminal


# --- malformed cards -----------------------------------------------------------------------------


def _card_data() -> dict[str, Any]:
    data = yaml.safe_load((SCENARIOS_DIR / f"{CARD}.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture
def write_card(tmp_path: Path) -> Callable[..., Path]:
    """Write a card (edited by `edit`) as tmp/cards/<name>.yaml; the file name defaults to the card id."""

    def write(edit: Callable[[dict[str, Any]], None] = lambda d: None, name: str | None = None) -> Path:
        data = _card_data()
        edit(data)
        folder = tmp_path / "cards"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name or data.get('id', CARD)}.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
        return path

    return write


def test_a_valid_copy_loads(write_card: Callable[..., Path]) -> None:
    path = write_card()
    assert scenarios.load_card(path) == scenarios.get(CARD)
    assert [c.id for c in scenarios.load_all(path)] == [CARD]  # a single file works as well as a folder


def test_bare_yes_key_still_loads(tmp_path: Path) -> None:
    # YAML 1.1 reads a bare `yes:` as the boolean True; the card must load all the same.
    text = (SCENARIOS_DIR / f"{CARD}.yaml").read_text(encoding="utf-8")
    assert '  "yes":' in text
    path = tmp_path / f"{CARD}.yaml"
    path.write_text(text.replace('  "yes":', "  yes:"), encoding="utf-8")
    assert True in yaml.safe_load(path.read_text(encoding="utf-8"))["advance"]
    card = scenarios.load_card(path)
    assert card.advance.yes == scenarios.get(CARD).advance.yes


def _drop_title(d: dict[str, Any]) -> None:
    del d["title"]


def _drop_problem_payoff(d: dict[str, Any]) -> None:
    del d["problems"][1]["need_payoff"]


def _too_many_needs(d: dict[str, Any]) -> None:
    d["advance"]["requires_explicit_needs"] = 4


def _missing_line(d: dict[str, Any]) -> None:
    del d["lines"]["deflect"]


@pytest.mark.parametrize(
    ("edit", "field", "detail"),
    [
        (_drop_title, "title", "Field required"),
        (lambda d: d.update(value_type="emotional"), "value_type", "intrinsic"),
        (lambda d: d.update(need_state="desperate"), "need_state", "must_meet"),
        (_drop_problem_payoff, "problems.1.need_payoff", "Field required"),
        (_too_many_needs, "advance.requires_explicit_needs", "number of problems"),
        (_missing_line, "lines", "deflect"),
        (lambda d: d.update(colour="blue"), "colour", "Extra inputs"),
    ],
    ids=["missing-field", "unknown-value-type", "unknown-need-state", "nested-missing", "needs-over-problems",
         "missing-line", "unknown-key"],
)
def test_malformed_card_names_file_and_field(
    write_card: Callable[..., Path], runner: CliRunner, edit: Callable[[dict[str, Any]], None], field: str,
    detail: str,
) -> None:
    path = write_card(edit)
    with pytest.raises(ScenarioError) as caught:
        scenarios.load_card(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and field in message and detail in message, message
    result = runner.invoke(app, ["scenarios", "validate", str(path.parent)])
    assert result.exit_code == 2
    stderr = result.stderr.strip()
    assert stderr.startswith("error:") and "\n" not in stderr and "Traceback" not in stderr
    assert path.name in stderr and field in stderr


def test_id_must_match_the_file_name(write_card: Callable[..., Path], runner: CliRunner) -> None:
    path = write_card(name="warehouse-copy")
    with pytest.raises(ScenarioError, match=r"warehouse-copy\.yaml: id: 'warehouse-extrinsic-01' must match"):
        scenarios.load_card(path)
    result = runner.invoke(app, ["scenarios", "validate", str(path)])
    assert result.exit_code == 2 and "warehouse-copy.yaml: id:" in result.stderr


def test_bad_yaml_names_file_and_line(tmp_path: Path, runner: CliRunner) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("id: broken\ntitle: {zh: 坏, en: [unclosed\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"broken\.yaml: line \d+: invalid YAML"):
        scenarios.load_card(path)
    result = runner.invoke(app, ["scenarios", "validate", str(path)])
    assert result.exit_code == 2 and "broken.yaml: line" in result.stderr


@pytest.mark.parametrize("text", ["- just\n- a list\n", "plain text\n", ""])
def test_a_card_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"odd\.yaml: a card must be a YAML mapping"):
        scenarios.load_card(path)


def test_empty_folder_and_missing_file(tmp_path: Path, runner: CliRunner) -> None:
    with pytest.raises(ScenarioError, match="no scenario cards"):
        scenarios.load_all(tmp_path)
    with pytest.raises(ScenarioError, match=r"ghost\.yaml: cannot read"):
        scenarios.load_card(tmp_path / "ghost.yaml")
    result = runner.invoke(app, ["scenarios", "validate", str(tmp_path / "ghost.yaml")])
    assert result.exit_code == 2 and "ghost.yaml" in result.stderr
