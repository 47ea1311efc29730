"""Can e5 similarity hear a question asked again? Precision and recall of "asked again" when the
cosine of the two focus questions passes a threshold, per language, on one repeat-pair file.

    .venv/bin/python scripts/calibrate_repeats.py evals/data/repeats/repeats-tune.jsonl

The answer so far is no (evals/README.md, "Repeats"): nothing in the product uses it yet.
"""

import sys
from pathlib import Path

import numpy as np

from bot.config import Settings
from bot.datasets import RepeatPair, read_jsonl
from bot.grader import focus_question
from bot.runtime import Runtime

THRESHOLDS = [round(0.86 + 0.01 * i, 2) for i in range(11)]


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: calibrate_repeats.py PAIRS.jsonl")
    path = Path(sys.argv[1])
    embeddings = Runtime(Settings()).reading_embeddings
    pairs = read_jsonl(path, RepeatPair)
    scored = []
    for pair in pairs:
        first, later = np.asarray(embeddings.embed_documents([focus_question(pair.first), focus_question(pair.later)]))
        scored.append((pair, float(first @ later)))
    print(f"{len(pairs)} pairs from {path.name}")
    print("threshold  lang  precision  recall  F1")
    for threshold in THRESHOLDS:
        for lang in ("zh", "en", "all"):
            rows = [(p.same, s >= threshold) for p, s in scored if lang in ("all", p.lang)]
            hits = sum(gold and said for gold, said in rows)
            said = sum(said for _, said in rows)
            real = sum(gold for gold, _ in rows)
            precision = hits / said if said else 1.0
            recall = hits / real if real else 1.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            print(f"{threshold:9.2f}  {lang:4}  {precision:9.3f}  {recall:6.3f}  {f1:.3f}")


if __name__ == "__main__":
    main()
