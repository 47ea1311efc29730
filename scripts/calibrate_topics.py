"""Per-language topic margins from the tune files (evals/data/topics/topics-tune*.jsonl), never the test file.

For each language, every line is read once (label, move, topic scores); then each margin of a grid is tried
and the one with the best balance of "none" precision and recall (their minimum, then accuracy) wins.

    .venv/bin/python scripts/calibrate_topics.py
"""

from collections import defaultdict
from pathlib import Path

from bot import scenarios
from bot.config import Settings
from bot.datasets import read_jsonl
from bot.evaluation import NO_TOPIC, ReadingSample
from bot.runtime import Runtime

TOPICS = Path(__file__).resolve().parents[1] / "evals" / "data" / "topics"
GRID = (-0.01, -0.005, 0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03)


def figures(pairs: list[tuple[str, str]]) -> tuple[float, float, float]:
    said = sum(p == NO_TOPIC for _, p in pairs)
    real = sum(g == NO_TOPIC for g, _ in pairs)
    hits = sum(g == p == NO_TOPIC for g, p in pairs)
    accuracy = sum(g == p for g, p in pairs) / len(pairs)
    return (hits / said if said else 1.0), (hits / real if real else 1.0), accuracy


def main() -> None:
    runtime = Runtime(Settings())
    samples = [s for path in sorted(TOPICS.glob("topics-tune*.jsonl")) for s in read_jsonl(path, ReadingSample)]
    by_language: dict[str, list[ReadingSample]] = defaultdict(list)
    for sample in samples:
        by_language[sample.lang].append(sample)
    chosen: dict[str, float] = {}
    for lang, group in sorted(by_language.items()):
        results: dict[float, tuple[float, float, float]] = {}
        for margin in GRID:
            pairs = []
            for sample in group:
                reader = runtime.offline_reader(scenarios.get(str(sample.card)))
                reader.topics.margin = margin  # each group is one language
                pairs.append((str(sample.topic), reader.read(sample.utterance, sample.context, sample.focus).topic
                              or NO_TOPIC))
            results[margin] = figures(pairs)
        for margin, (p, r, a) in results.items():
            print(f"  {lang} margin {margin:+.3f}: none P {p:.3f} R {r:.3f}, accuracy {a:.3f}")
        best = max(GRID, key=lambda m: (min(results[m][:2]), results[m][2]))
        chosen[lang] = best
        p, r, a = results[best]
        print(f"{lang}: n {len(group)}, margin {best:+.3f}: none P {p:.3f} R {r:.3f}, accuracy {a:.3f}")
    print("best margin per language:", chosen)


if __name__ == "__main__":
    main()
