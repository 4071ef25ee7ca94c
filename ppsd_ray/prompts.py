"""Prompts files: one JSON object per line with a non-empty string 'prompt' (and,
optionally, a 'category'). Every command that takes a prompts file reads it here,
so a bad file fails the same way everywhere: one message naming the file, the
line and the field, before anything starts."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator

from .config import describe


class Prompt(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)  # other keys (e.g. 'source') are notes

    prompt: StrictStr
    category: StrictStr = "all"
    line: int | None = Field(None, description="its line in the prompts file (1-based), for messages")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty; a prompt needs some text")
        return v


_JSON_KINDS = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


class PromptsFileError(ValueError):
    """A prompts file that cannot be used; the message names the file, the line and the field."""


def read_prompts(path: Path | str) -> list[Prompt]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptsFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PromptsFileError(f"{path}: a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise PromptsFileError(f"{path}: not UTF-8 text ({e})") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptsFileError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            kind = _JSON_KINDS.get(type(obj), "a number")
            raise PromptsFileError(f"{path}:{n}: {kind}, not an object with key 'prompt'")
        try:
            prompts.append(Prompt.model_validate({**obj, "line": n}))
        except ValidationError as e:
            raise PromptsFileError(f"{path}:{n}: {describe(e)}") from None
    if not prompts:
        raise PromptsFileError(f"{path}: empty; no prompts in it")
    return prompts
