"""Choose IMPLICATION_MARGIN on the tune file only (evals/data/implications/implications-tune.jsonl).

For each margin: of the questions aimed at one consequence, how many are pointed at it, at another,
or at none (the buyer then tells the next one); of the questions aimed at none, how many are pointed
anyway (a general "what else does it affect?" wrongly heard as asking for what he already said).

    .venv/bin/python scripts/calibrate_implications.py [FILE]
"""

import sys
from pathlib import Path

from bot import reading, scenarios
from bot.config import Settings
from bot.datasets import ImplicationSample, read_jsonl
from bot.evaluation import pointing_figures
from bot.runtime import Runtime

TUNE = Path(__file__).resolve().parents[1] / "evals" / "data" / "implications" / "implications-tune.jsonl"
MARGINS = (0.0, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else TUNE
    runtime = Runtime(Settings())
    samples = read_jsonl(path, ImplicationSample)
    print(f"{len(samples)} questions from {path.name}")
    print("margin  lang  aimed: right  wrong  none | general: pointed")
    for margin in MARGINS:
        reading.IMPLICATION_MARGIN = margin
        for lang in ("zh", "en", "all"):
            chosen = [s for s in samples if lang in ("all", s.lang)]
            f = pointing_figures(chosen, lambda s: runtime.topic_matcher(scenarios.get(s.card)).pointed_implication(
                s.utterance, s.problem))
            print(f"{margin:6.3f}  {lang:4}  {f['right']:11.3f}  {f['wrong']:5.3f}  {f['unpointed']:4.3f} |"
                  f" {f['general_pointed']:.3f}")


if __name__ == "__main__":
    main()
