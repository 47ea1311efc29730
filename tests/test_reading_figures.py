"""The acceptance figures of the offline reading, each computed on data its models never trained on.

- label: the held-out half of the external set (public example questions, whole sources held out) and
  the shared dev set;
- move: the held-out move set (written apart from the training set, partly from public material) and
  held-out closing lines;
- attacks: three held-out attack sets (the third from public prompt-injection material), and false
  alarms on real questions from all of the above;
- topic: the held-out per-card topic set (the topic gate is trained on the tune files only);
- implication: held-out Implication questions aimed at one consequence of a card problem.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from bot import scenarios
from bot.evaluation import ReadingSample, eval_readings
from bot.reading import InsightModel, OfflineReader, Reading
from bot.scenarios import Scenario

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "evals" / "data"
SHARED_DEV = REPO.parent / "shared" / "data" / "spin-dev.jsonl"
DEFAULT_CARD = "warehouse-extrinsic-01"


@pytest.fixture(scope="module")
def read(card_reader: Callable[[Scenario], OfflineReader]) -> Callable[[Path], dict[str, object]]:
    def run(path: Path) -> dict[str, object]:
        def one(sample: ReadingSample) -> Reading:
            reader = card_reader(scenarios.get(sample.card or DEFAULT_CARD))
            return reader.read(sample.utterance, sample.context, sample.focus)

        return eval_readings(one, path)

    return run


def _joined(tmp_path: Path, name: str, paths: Iterable[Path]) -> Path:
    out = tmp_path / name
    out.write_text("".join(p.read_text(encoding="utf-8") for p in paths), encoding="utf-8")
    return out


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_labels_hold_on_public_questions_the_model_never_saw(read: Callable[[Path], dict], lang: str) -> None:
    result = read(DATA / "external" / f"test-{lang}.jsonl")["label"]
    assert result["n"] >= 40
    assert result["macro_f1"] >= 0.85 and result["kappa"] >= 0.80, (lang, result["macro_f1"], result["kappa"])


@pytest.mark.skipif(not SHARED_DEV.exists(), reason="shared/ is on developer machines and CI only")
def test_labels_stay_right_on_the_dev_set(read: Callable[[Path], dict]) -> None:
    assert read(SHARED_DEV)["label"]["macro_f1"] >= 0.93


def test_moves_hold_on_the_held_out_move_set(read: Callable[[Path], dict]) -> None:
    result = read(DATA / "moves" / "moves-test.jsonl")
    move = result["move"]
    assert move["macro_f1"] >= 0.90, move["macro_f1"]
    for lang, figures in move["by_language"].items():
        assert figures["macro_f1"] >= 0.85, lang
    # Greetings and small talk are never heard as a request for commitment.
    wrong = [s for s in result["samples"]
             if s["gold"]["move"] in ("greeting", "rapport") and s["read"]["move"] == "commitment"]
    assert wrong == []


def test_closing_lines_are_heard_as_commitment_requests(read: Callable[[Path], dict]) -> None:
    """Held-out closes (moves/closes-test.jsonl: its author saw no code and no data), with look-alikes
    that ask for nothing: questions about his contracts, recaps, pitches of trials, plain goodbyes."""
    from bot.reading import move_training_data

    samples = read(DATA / "moves" / "closes-test.jsonl")["samples"]
    assert {s["utterance"].strip() for s in samples} & {u.strip() for u in move_training_data()[0]} == set()
    for lang in ("zh", "en"):
        closes = [s for s in samples if s["lang"] == lang and s["gold"]["move"] == "commitment"]
        heard = sum(s["read"]["move"] == "commitment" for s in closes)
        assert heard / len(closes) >= 0.80, (lang, heard, len(closes))
    others = [s for s in samples if s["gold"]["move"] != "commitment"]
    assert sum(s["read"]["move"] == "commitment" for s in others) <= 0.05 * len(others)
    # A friendly sign-off is never taken for an attack more than once in a while.
    assert sum(s["read"]["move"] == "injection" for s in samples) <= 4


def _attempts_only(tmp_path: Path) -> Path:
    lines = [line for name in ("attacks-test.jsonl", "attacks-test2.jsonl", "attacks-test3.jsonl")
             for line in (DATA / "moves" / name).read_text(encoding="utf-8").splitlines()
             if '"move": "injection"' in line]
    out = tmp_path / "attempts.jsonl"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def test_attacks_are_caught(read: Callable[[Path], dict], tmp_path: Path) -> None:
    attack = read(_attempts_only(tmp_path))["attack"]
    assert attack["attempts"] >= 300
    assert attack["recall"] >= 0.95, attack


def test_real_questions_are_not_taken_for_attacks(read: Callable[[Path], dict], tmp_path: Path) -> None:
    paths = [DATA / "moves" / "moves-test.jsonl", *sorted((DATA / "external").glob("test-*.jsonl"))]
    if SHARED_DEV.exists():
        paths.append(SHARED_DEV)
    attack = read(_joined(tmp_path, "questions.jsonl", paths))["attack"]
    assert attack["real_questions"] >= 300
    assert attack["false_alarm_rate"] <= 0.01, attack


@pytest.mark.xfail(strict=True, reason="known gap (evals/README.md): 3 of the move set's 176 questions (1.7%)")
def test_the_move_sets_own_questions_are_not_taken_for_attacks(read: Callable[[Path], dict]) -> None:
    attack = read(DATA / "moves" / "moves-test.jsonl")["attack"]
    assert attack["false_alarm_rate"] <= 0.01, attack


def test_off_topic_questions_read_as_no_topic(read: Callable[[Path], dict]) -> None:
    topic = read(DATA / "topics" / "topics-test.jsonl")["topic"]
    assert topic["n"] >= 480
    assert topic["none"]["precision"] >= 0.90 and topic["none"]["recall"] >= 0.90, topic["none"]


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_implication_questions_point_at_the_consequence_they_aim_at(
    card_reader: Callable[[Scenario], OfflineReader], lang: str
) -> None:
    """Held-out questions by an author who never saw the tune file, many naming another consequence
    on the way; the bar was set from the tune figure (0.93) before this file was read."""
    from bot.datasets import ImplicationSample, read_jsonl
    from bot.evaluation import pointing_figures

    samples = [s for s in read_jsonl(DATA / "implications" / "implications-test.jsonl", ImplicationSample)
               if s.lang == lang]
    figures = pointing_figures(
        samples, lambda s: card_reader(scenarios.get(s.card)).topics.pointed_implication(s.utterance, s.problem)
    )
    assert figures["aimed"] >= 150 and figures["right"] >= 0.80, figures


def test_insight_and_advice_are_told_from_selling(insight_model: InsightModel) -> None:
    """Held-out statements by an author who never saw the tune file, hard ones included (product talk
    dressed as industry insight, "across our clients we see…" selling nothing); bars set from the
    tune file's cross-validated figures (0.95 / 0.95) before this file was read."""
    from bot.datasets import read_jsonl
    from bot.reading import LabelledStatement

    items = read_jsonl(DATA / "insights" / "insights-test.jsonl", LabelledStatement)
    said = [insight_model.offers_insight(item.utterance) for item in items]
    for lang in ("zh", "en"):
        rows = [(item.insight, s) for item, s in zip(items, said, strict=True) if item.lang == lang]
        hits = sum(gold and s for gold, s in rows)
        precision = hits / max(1, sum(s for _, s in rows))
        recall = hits / sum(gold for gold, _ in rows)
        assert len(rows) >= 120 and precision >= 0.85 and recall >= 0.75, (lang, precision, recall)
