"""JSON Lines files that cross the boundary: read with validation, errors name file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError

T = TypeVar("T", bound=BaseModel)


class RepLine(BaseModel):
    """What every labelled set shares: one rep line, its language and the buyer's line before it."""

    id: str = Field(min_length=1)
    lang: Literal["zh", "en"]
    context: str = ""
    utterance: str = Field(min_length=1)


class ImplicationSample(BaseModel):
    """An Implication question about a card's problem, and the consequence it is aimed at (None: none)."""

    id: str = Field(min_length=1)
    lang: Literal["zh", "en"]
    card: str = Field(min_length=1)
    problem: str = Field(min_length=1)
    utterance: str = Field(min_length=1)
    implication: int | None
    source: str = ""


class RepeatPair(BaseModel):
    """An earlier rep question the buyer answered, a later line, and whether the later one asks it again."""

    id: str = Field(min_length=1)
    lang: Literal["zh", "en"]
    card: str = ""
    first: str = Field(min_length=1)
    later: str = Field(min_length=1)
    same: bool
    source: str = ""


class DataError(ValueError):
    """A data file is unreadable or malformed; the message names the file and line."""


def read_jsonl(path: Path, schema: type[T]) -> list[T]:
    """Every non-blank line of path validated as schema."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    items: list[T] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            items.append(schema.model_validate(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "line"
            raise DataError(f"{path}:{number}: {where}: {err['msg']}") from None
    if not items:
        raise DataError(f"{path}: no records")
    return items
