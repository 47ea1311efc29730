"""Saved calls: JSON Lines, a header line then one line per turn, each flushed to disk when written."""

from __future__ import annotations

import json
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT = "spinbot-transcript/1"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class TranscriptError(ValueError):
    """A transcript is unreadable or malformed; the message names the file and line."""


class Header(BaseModel):
    model_config = ConfigDict(extra="allow")
    kind: Literal["header"] = "header"
    format: str = FORMAT
    scenario: str
    engine: str
    model: str
    language: Literal["zh", "en"]
    started: str


class Turn(BaseModel):
    model_config = ConfigDict(extra="allow")
    kind: Literal["turn"] = "turn"
    turn: int = Field(ge=1)
    rep: str
    label: str | None
    reason: str = ""
    better_question: str | None = None
    buyer: str
    state: dict[str, Any]
    reaction: dict[str, Any] = Field(default_factory=dict)
    notice: str | None = None
    move: str | None = None
    topic: str | None = None
    reader: str | None = None


class Transcript(BaseModel):
    header: Header
    turns: list[Turn]
    path: str | None = None


def new_path(directory: Path, scenario_id: str) -> Path:
    """A fresh file name in directory that no earlier call uses."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    # A random tail: calls starting in the same microsecond (threads, processes) never share a name.
    name = _SAFE_NAME.sub("-", f"{stamp}-{uuid.uuid4().hex[:6]}-{scenario_id}")[:120]
    path, number = directory / f"{name}.jsonl", 1
    # The clock may repeat (or step back): never hand out a name a saved call already has.
    while path.exists():
        number += 1
        path = directory / f"{name}-{number}.jsonl"
    return path


class TranscriptWriter:
    """Appends one line per turn and makes it durable (flush + fsync) before returning."""

    def __init__(self, path: Path, header: Header) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # "x": never overwrite a saved call.
        self._file = path.open("x", encoding="utf-8")
        self.path = path
        self._write(header.model_dump())

    def append(self, turn: Turn) -> None:
        self._write(turn.model_dump())

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def header_now(scenario: str, engine: str, model: str, language: Literal["zh", "en"]) -> Header:
    return Header(
        scenario=scenario, engine=engine, model=model, language=language,
        started=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def load(path: Path) -> Transcript:
    """A saved call; a torn last line (the process died mid-write) is ignored, any other error named."""
    try:
        # Split on "\n" only: the writer ends lines with it, and str.splitlines() would also split
        # inside a text holding U+2028, U+2029 or U+0085 (json.dumps leaves them unescaped).
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise TranscriptError(f"{path}: cannot read ({exc})") from None
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].strip():
        raise TranscriptError(f"{path}:1: empty transcript (no header line)")
    records: list[tuple[int, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            if number == len(lines) and number > 1:
                break
            raise TranscriptError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
    try:
        header = Header.model_validate(records[0][1])
    except ValidationError as exc:
        raise TranscriptError(f"{path}:1: header: {_first(exc)}") from None
    turns = []
    for number, record in records[1:]:
        try:
            turns.append(Turn.model_validate(record))
        except ValidationError as exc:
            raise TranscriptError(f"{path}:{number}: {_first(exc)}") from None
    return Transcript(header=header, turns=turns, path=str(path))


def load_many(target: Path) -> list[Transcript]:
    """One file, or every *.jsonl in a folder (sorted)."""
    if target.is_dir():
        paths = sorted(target.glob("*.jsonl"))
        if not paths:
            raise TranscriptError(f"{target}: no transcripts (*.jsonl)")
        return [load(p) for p in paths]
    if not target.exists():
        raise TranscriptError(f"{target}: no such file or folder")
    return [load(target)]


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])
