"""How many commitment requests the move model hears as such, on a closes or proposals file (lines
with a "proposal" field; "move" defaults to commitment, as proposals-test has none).

    .venv/bin/python scripts/commitments_as_moves.py evals/data/moves/proposals-test.jsonl

The move model alone (`OfflineReader.read_move`), without a card: the reader's guards need a card's
topics, and `spinbot eval reading` gives the figure through them for files with ids and moves.
"""

import json
import sys
from collections import Counter
from pathlib import Path

from bot import scenarios
from bot.config import Settings
from bot.runtime import Runtime


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: commitments_as_moves.py FILE.jsonl")
    path = Path(sys.argv[1])
    # read_move uses the move model and the lexical net only: any card's reader gives the same moves.
    reader = Runtime(Settings()).reader(scenarios.builtin()[0], "offline")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    heard: Counter[str] = Counter()
    for row in rows:
        gold = row.get("move") or "commitment"
        read = reader.read_move(row["utterance"])
        heard[f"{gold}->{read}"] += 1
    closes = sum(n for key, n in heard.items() if key.startswith("commitment->"))
    print(f"{path.name}: commitment requests heard as such {heard['commitment->commitment']} / {closes}")
    print("others read as commitment", sum(n for k, n in heard.items() if k.endswith("->commitment")
                                          and not k.startswith("commitment->")))
    print("read as attacks", sum(n for k, n in heard.items() if k.endswith("->injection")
                                 and not k.startswith("injection->")))
    for key, n in heard.most_common():
        print(f"  {key:28} {n}")


if __name__ == "__main__":
    main()
