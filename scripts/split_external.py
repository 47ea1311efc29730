"""Split the collected external SPIN set into a training half and a held-out half, by source.

Whole sources go to one side, so the held-out half measures phrasing from authors the model never
saw. Sources are taken in the order of a hash of their URL (fixed, not chosen by hand); the held-out
side takes sources until it holds at least half of the items of that language.

    python scripts/split_external.py evals/data/external/spin-external-en.jsonl
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from pathlib import Path


def split(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lang = rows[0]["lang"]
    by_source: dict[str, list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        by_source[str(row["source"])].append(row)
    order = sorted(by_source, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    test: list[dict[str, object]] = []
    train: list[dict[str, object]] = []
    for source in order:
        (test if len(test) < len(rows) / 2 else train).extend(by_source[source])
    for name, part in (("test", test), ("train", train)):
        out = path.parent / f"{name}-{lang}.jsonl"
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        labels = {label: sum(r["label"] == label for r in part) for label in "SPINO"}
        sources = len({r["source"] for r in part})
        print(f"{out}: {len(part)} items from {sources} sources, {labels}")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        split(Path(arg))
