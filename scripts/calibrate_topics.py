"""Choose the topic gate's C and threshold on the tune files only (evals/data/topics/topics-tune*.jsonl).

The gate is trained on one tune file and the whole offline reader is scored on the other (two authors,
so each figure is on lines the gate never saw), both ways; the test file is never read.

    .venv/bin/python scripts/calibrate_topics.py
"""

from pathlib import Path

from bot import scenarios
from bot.config import Settings
from bot.datasets import read_jsonl
from bot.evaluation import NO_TOPIC, ReadingSample
from bot.reading import train_topic_gate
from bot.runtime import Runtime

TOPICS = Path(__file__).resolve().parents[1] / "evals" / "data" / "topics"
CS = (0.1, 1.0, 10.0, 100.0)
THRESHOLDS = (0.4, 0.5, 0.6)


def figures(pairs: list[tuple[str, str]]) -> tuple[float, float, float]:
    said = sum(p == NO_TOPIC for _, p in pairs)
    real = sum(g == NO_TOPIC for g, _ in pairs)
    hits = sum(g == p == NO_TOPIC for g, p in pairs)
    accuracy = sum(g == p for g, p in pairs) / len(pairs)
    return (hits / said if said else 1.0), (hits / real if real else 1.0), accuracy


def main() -> None:
    runtime = Runtime(Settings())
    files = sorted(TOPICS.glob("topics-tune*.jsonl"))
    if len(files) < 2:
        raise SystemExit(f"{TOPICS}: two tune files are needed, found {len(files)}")
    for c in CS:
        # The threshold does not change training: one gate per C and held-out file.
        gates = {held_out: train_topic_gate(runtime.reading_embeddings, [f for f in files if f != held_out], c)
                 for held_out in files}
        for threshold in THRESHOLDS:
            row = []
            for held_out, gate in gates.items():
                gate.threshold = threshold
                pairs = []
                for sample in read_jsonl(held_out, ReadingSample):
                    reader = runtime.offline_reader(scenarios.get(str(sample.card)))
                    reader.topics.gate = gate
                    read = reader.read(sample.utterance, sample.context, sample.focus)
                    pairs.append((str(sample.topic), read.topic or NO_TOPIC))
                p, r, a = figures(pairs)
                row.append(f"{held_out.name}: none P {p:.3f} R {r:.3f} acc {a:.3f}")
            print(f"C {c:g} threshold {threshold}: " + "; ".join(row), flush=True)


if __name__ == "__main__":
    main()
