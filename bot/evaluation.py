"""Offline evals over labelled sets: retrieval hit rate (grader metrics live beside the grader)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bot.coach import Retriever
from bot.datasets import DataError, ImplicationSample, RepLine, read_jsonl
from bot.grader import LABELS, Grade, Grader, Label, LabelledUtterance, grade_many
from bot.reading import MOVES, Move, Reading


class RetrievalSample(BaseModel):
    """One line of a coach-dev style file."""

    model_config = ConfigDict(extra="ignore")
    id: str
    lang: str = ""
    question: str = Field(min_length=1)
    all_of: list[list[str]] = Field(min_length=1)


def is_hit(all_of: list[list[str]], text: str) -> bool:
    """Every group has at least one string occurring (case-insensitive) in text."""
    haystack = text.casefold()
    return all(any(s.casefold() in haystack for s in group) for group in all_of)


def eval_retrieval(
    retriever: Retriever,
    data: Path,
    k: int = 4,
    progress: Callable[[Iterable[RetrievalSample]], Iterable[RetrievalSample]] = lambda x: x,
) -> dict[str, Any]:
    samples = read_jsonl(data, RetrievalSample)
    rows: list[dict[str, Any]] = []
    for sample in progress(samples):
        passages = retriever.search(sample.question, k=k)
        joined = "\n".join(p.text for p in passages)
        rows.append(
            {
                "id": sample.id,
                "lang": sample.lang,
                "question": sample.question,
                "hit": is_hit(sample.all_of, joined),
                "sources": [p.source for p in passages],
            }
        )
    hits = sum(r["hit"] for r in rows)
    by_lang: dict[str, dict[str, float]] = {}
    for lang in sorted({r["lang"] for r in rows}):
        group = [r for r in rows if r["lang"] == lang]
        by_lang[lang] = {"n": len(group), "hit_rate": sum(r["hit"] for r in group) / len(group)}
    return {"n": len(rows), "k": k, "hit_rate": hits / len(rows), "by_language": by_lang, "samples": rows}


# --- grader -------------------------------------------------------------------------------------

UNGRADED = "-"


def grader_metrics(gold: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, Cohen's kappa, per-label P/R/F1 and the confusion matrix (scikit-learn).

    Ungraded predictions count as wrong; they are outside the S..O label set.
    """
    return classification_metrics(gold, predicted, LABELS)


def classification_metrics(gold: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """The same figures for any vocabulary (labels, moves, topic ids).

    Macro-F1 averages over the classes the gold set has (a set without O, say, is not given a free
    zero for O); a wrong prediction of an absent class still costs the recall of the true one.
    """
    from sklearn.metrics import (
        accuracy_score,
        cohen_kappa_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    labels = list(classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=labels, zero_division=0
    )
    return {
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, labels=[c for c in labels if c in set(gold)] or labels,
                                   average="macro", zero_division=0)),
        "kappa": float(cohen_kappa_score(gold, predicted)),
        "ungraded": sum(p == UNGRADED for p in predicted),
        "per_label": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "labels": labels,
        "confusion": confusion_matrix(gold, predicted, labels=labels).tolist(),
    }


def eval_grader(
    grader: Grader,
    data: Path,
    *,
    concurrency: int = 1,
    on_done: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Grade every item of a labelled set and score it against the gold labels."""
    items = read_jsonl(data, LabelledUtterance)
    grades = grade_many(grader, [(i.utterance, i.context) for i in items], concurrency=concurrency, on_done=on_done)
    return score_grades(items, grades, grader.name)


def score_grades(items: Sequence[LabelledUtterance], grades: Sequence[Grade], grader_name: str) -> dict[str, Any]:
    predicted = [g.label or UNGRADED for g in grades]
    gold = [i.label for i in items]
    result = {"grader": grader_name, **grader_metrics(gold, predicted)}
    result["by_language"] = {
        lang: grader_metrics([gold[k] for k in idx], [predicted[k] for k in idx])
        for lang in sorted({i.lang for i in items})
        for idx in [[k for k, i in enumerate(items) if i.lang == lang]]
    }
    result["samples"] = [
        {
            "id": item.id,
            "lang": item.lang,
            "gold": item.label,
            "predicted": grade.label,
            "reason": grade.reason,
            "utterance": item.utterance,
        }
        for item, grade in zip(items, grades, strict=True)
    ]
    return result


def agreement(first: Sequence[Grade], second: Sequence[Grade]) -> dict[str, Any]:
    """How often two graders agree, and Cohen's kappa between them."""
    from sklearn.metrics import cohen_kappa_score

    a = [g.label or UNGRADED for g in first]
    b = [g.label or UNGRADED for g in second]
    same = sum(x == y for x, y in zip(a, b, strict=True))
    return {"n": len(a), "agreement": same / len(a) if a else 0.0, "kappa": float(cohen_kappa_score(a, b))}


def grader_report_markdown(result: dict[str, Any], data: Path) -> str:
    """A human-readable report of an eval_grader result."""
    lines = [
        f"# Grader eval: {result['grader']} on `{data.name}`",
        "",
        "| set | n | accuracy | macro-F1 | kappa | ungraded |",
        "|---|---|---|---|---|---|",
    ]
    groups = [("all", result), *result["by_language"].items()]
    for name, metrics in groups:
        lines.append(
            f"| {name} | {metrics['n']} | {metrics['accuracy']:.3f} | {metrics['macro_f1']:.3f} "
            f"| {metrics['kappa']:.3f} | {metrics['ungraded']} |"
        )
    lines += ["", "## Per label", "", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label, m in result["per_label"].items():
        lines.append(f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    lines += ["", "## Confusion matrix (rows = gold, columns = predicted)", ""]
    lines.append("| gold \\ predicted | " + " | ".join(result["labels"]) + " |")
    lines.append("|---" * (len(result["labels"]) + 1) + "|")
    for label, row in zip(result["labels"], result["confusion"], strict=True):
        lines.append(f"| **{label}** | " + " | ".join(str(v) for v in row) + " |")
    errors = [s for s in result["samples"] if s["gold"] != s["predicted"]]
    lines += ["", f"## Disagreements ({len(errors)})", ""]
    for s in errors:
        lines.append(f"- `{s['id']}` gold {s['gold']} → {s['predicted'] or 'ungraded'}: {s['utterance']}")
    if "compare" in result:
        c = result["compare"]
        lines += ["", f"## Agreement with {c['other']}: {c['agreement']:.3f} (kappa {c['kappa']:.3f})"]
    return "\n".join(lines) + "\n"


def confusion_png(result: dict[str, Any], path: Path, title: str) -> Path:
    """Write the confusion matrix as a PNG heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bot.charts import use_cjk_font

    use_cjk_font()
    labels = result["labels"]
    matrix = result["confusion"]
    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=120)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted / 预测")
    ax.set_ylabel("gold / 标注")
    ax.set_title(title, fontsize=9)
    peak = max(max(row) for row in matrix) or 1
    for r, row in enumerate(matrix):
        for c, value in enumerate(row):
            ax.text(c, r, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --- readings (label, move, topic) ----------------------------------------------------------------


class ReadingSample(RepLine):
    """One line of a reading set: any of label, move and card+topic may be given, and each is scored."""

    model_config = ConfigDict(extra="ignore")
    label: Label | None = None
    move: Move | None = None
    card: str | None = None
    topic: str | None = None
    focus: str | None = None


NO_TOPIC = "none"


def _by_language(
    samples: Sequence[ReadingSample], gold: Sequence[str], predicted: Sequence[str], classes: Sequence[str]
) -> dict[str, Any]:
    return {
        lang: classification_metrics([gold[k] for k in idx], [predicted[k] for k in idx], classes)
        for lang in sorted({s.lang for s in samples})
        for idx in [[k for k, s in enumerate(samples) if s.lang == lang]]
        if idx
    }


def _binary(gold: Sequence[bool], predicted: Sequence[bool]) -> dict[str, Any]:
    hits = sum(g and p for g, p in zip(gold, predicted, strict=True))
    said = sum(predicted)
    real = sum(gold)
    precision = hits / said if said else 1.0
    recall = hits / real if real else 1.0
    return {"n": len(gold), "positives": real, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


def eval_readings(
    read: Callable[[ReadingSample], Reading],
    data: Path,
    progress: Callable[[Iterable[ReadingSample]], Iterable[ReadingSample]] = lambda x: x,
) -> dict[str, Any]:
    """Read every line of a reading set and score label, move, attacks and topic where the set gives them."""
    samples = read_jsonl(data, ReadingSample)
    for number, sample in enumerate(samples, start=1):
        if (sample.card is None) != (sample.topic is None):
            raise DataError(f"{data}:{number}: card and topic go together (id {sample.id})")
    readings = [read(s) for s in progress(samples)]
    rows = [
        {"id": s.id, "lang": s.lang, "utterance": s.utterance, "gold": {"label": s.label, "move": s.move,
         "topic": s.topic}, "read": {"label": r.label, "move": r.move, "topic": r.topic or NO_TOPIC}}
        for s, r in zip(samples, readings, strict=True)
    ]
    result: dict[str, Any] = {"n": len(samples), "reader": readings[0].reader if readings else ""}
    labelled = [k for k, s in enumerate(samples) if s.label is not None]
    if labelled:
        group = [samples[k] for k in labelled]
        gold = [str(samples[k].label) for k in labelled]
        predicted = [readings[k].label or UNGRADED for k in labelled]
        result["label"] = {**classification_metrics(gold, predicted, LABELS),
                           "by_language": _by_language(group, gold, predicted, LABELS)}
    moved = [k for k, s in enumerate(samples) if s.move is not None]
    if moved:
        group = [samples[k] for k in moved]
        gold = [str(samples[k].move) for k in moved]
        predicted = [readings[k].move for k in moved]
        result["move"] = {**classification_metrics(gold, predicted, MOVES),
                          "by_language": _by_language(group, gold, predicted, MOVES)}
    # Attacks: recall on attempts, and false alarms on real questions (labelled S/P/I/N or moved "question").
    attempts = [k for k, s in enumerate(samples) if s.move == "injection"]
    questions = [k for k, s in enumerate(samples)
                 if s.move == "question" or (s.move is None and s.label in ("S", "P", "I", "N"))]
    if attempts or questions:
        caught = sum(readings[k].injection for k in attempts)
        alarms = sum(readings[k].injection for k in questions)
        result["attack"] = {
            "attempts": len(attempts), "caught": caught, "recall": caught / len(attempts) if attempts else None,
            "real_questions": len(questions), "false_alarms": alarms,
            "false_alarm_rate": alarms / len(questions) if questions else None,
        }
    topical = [k for k, s in enumerate(samples) if s.topic is not None]
    if topical:
        gold = [str(samples[k].topic) for k in topical]
        predicted = [readings[k].topic or NO_TOPIC for k in topical]
        group = [samples[k] for k in topical]
        topic: dict[str, Any] = {
            "n": len(topical),
            "accuracy": sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(topical),
            "none": _binary([g == NO_TOPIC for g in gold], [p == NO_TOPIC for p in predicted]),
            "by_language": {},
        }
        for lang in sorted({s.lang for s in group}):
            idx = [i for i, s in enumerate(group) if s.lang == lang]
            g, p = [gold[i] for i in idx], [predicted[i] for i in idx]
            topic["by_language"][lang] = {
                "n": len(idx), "accuracy": sum(a == b for a, b in zip(g, p, strict=True)) / len(idx),
                "none": _binary([a == NO_TOPIC for a in g], [b == NO_TOPIC for b in p]),
            }
        result["topic"] = topic
    result["samples"] = rows
    return result


# --- transcripts ----------------------------------------------------------------------------------


def eval_transcripts(target: Path) -> dict[str, Any]:
    """Per-call SPIN mix, needs uncovered and outcome, with totals, for one file or a folder."""
    from bot import debrief, scenarios
    from bot.transcripts import TranscriptError, load_many

    calls = []
    totals: dict[str, int] = dict.fromkeys(LABELS, 0)
    outcomes: dict[str, int] = {}
    for transcript in load_many(target):
        try:
            card = scenarios.get(transcript.header.scenario)
        except scenarios.ScenarioError as exc:
            raise TranscriptError(f"{transcript.path}:1: header: {exc}") from None
        d = debrief.build(card, transcript.turns, transcript.header.language)
        for label, count in d.counts.items():
            totals[label] += count
        outcomes[d.outcome] = outcomes.get(d.outcome, 0) + 1
        calls.append(
            {
                "path": transcript.path,
                "scenario": card.id,
                "engine": transcript.header.engine,
                "language": transcript.header.language,
                "turns": d.turns,
                "counts": d.counts,
                "mix": d.mix,
                "implied_needs": len(d.implied),
                "explicit_needs": len(d.explicit),
                "premature_pitches": d.premature_pitches,
                "outcome": d.outcome,
            }
        )
    asked = sum(totals.values()) or 1
    return {
        "n": len(calls),
        "calls": calls,
        "totals": {
            "turns": sum(c["turns"] for c in calls),
            "counts": totals,
            "mix": {k: round(v / asked, 3) for k, v in totals.items()},
            "implied_needs": sum(c["implied_needs"] for c in calls),
            "explicit_needs": sum(c["explicit_needs"] for c in calls),
            "outcomes": outcomes,
        },
    }


def pointing_figures(
    samples: Sequence[ImplicationSample], point: Callable[[ImplicationSample], int | None]
) -> dict[str, float]:
    """Of the questions aimed at one consequence: the share pointed at it, at another, at none; of the
    general ones: the share pointed at some consequence anyway."""
    aimed = [(s.implication, point(s)) for s in samples if s.implication is not None]
    general = [point(s) for s in samples if s.implication is None]
    n = max(1, len(aimed))
    return {
        "aimed": len(aimed),
        "general": len(general),
        "right": sum(gold == said for gold, said in aimed) / n,
        "wrong": sum(said is not None and gold != said for gold, said in aimed) / n,
        "unpointed": sum(said is None for _, said in aimed) / n,
        "general_pointed": sum(said is not None for said in general) / max(1, len(general)),
    }
