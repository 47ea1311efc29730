"""Prompt files in prompts/, rendered into chat messages by one strict function.

A prompt file has a `### system` section and a `### user` section; both are
f-string templates (`{name}`; literal braces doubled). Rendering rejects
missing and unknown variables so a prompt never goes out half-filled.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.prompts import PromptTemplate

from bot.config import PROMPTS_DIR

_SECTION = re.compile(r"^### (system|user)\s*$", re.MULTILINE)


class PromptError(ValueError):
    """A prompt file is malformed or was rendered with the wrong variables."""


@cache
def _load(name: str, prompts_dir: Path) -> dict[str, PromptTemplate]:
    path = prompts_dir / f"{name}.md"
    if not path.is_file():
        raise PromptError(f"{path}: prompt file not found")
    parts = _SECTION.split(path.read_text(encoding="utf-8"))
    sections: dict[str, PromptTemplate] = {}
    for role, body in zip(parts[1::2], parts[2::2], strict=True):
        if role in sections:
            raise PromptError(f"{path}: section '### {role}' appears twice")
        sections[role] = PromptTemplate.from_template(body.strip())
    if "system" not in sections:
        raise PromptError(f"{path}: missing '### system' section")
    return sections


def variables(name: str, prompts_dir: Path = PROMPTS_DIR) -> set[str]:
    """The variables a prompt needs."""
    return {v for t in _load(name, prompts_dir).values() for v in t.input_variables}


def render(name: str, prompts_dir: Path = PROMPTS_DIR, **values: object) -> list[BaseMessage]:
    """Render prompts/NAME.md into [system, user] messages; exact variables or PromptError."""
    needed = variables(name, prompts_dir)
    missing = sorted(needed - values.keys())
    unknown = sorted(values.keys() - needed)
    if missing or unknown:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown {', '.join(unknown)}" if unknown else "",
            )
            if part
        )
        raise PromptError(f"prompts/{name}.md: {detail}")
    sections = _load(name, prompts_dir)
    messages: list[BaseMessage] = []
    for role, template in sections.items():
        text = template.format(**{k: str(values[k]) for k in template.input_variables})
        messages.append(SystemMessage(text) if role == "system" else HumanMessage(text))
    return messages


def names(prompts_dir: Path = PROMPTS_DIR) -> list[str]:
    """Every prompt in the folder."""
    return sorted(p.stem for p in prompts_dir.glob("*.md"))
