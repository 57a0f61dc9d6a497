"""Detect the layout of training rows and normalise each row to chat messages (or raw text).

Formats are data: each has the columns that identify it and a converter to `{"messages": [...]}` or
`{"text": ...}`. A row that cannot be converted yields `None` plus a reason, so callers can count and
report instead of crashing half-way through a file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunery.errors import DataError

Example = dict[str, Any]  # {"messages": [{"role", "content"}, ...]} or {"text": str}

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system", "bot": "assistant"}
_ROLES = {"system", "user", "assistant"}


class RowError(ValueError):
    """One row cannot be converted; the message says which field is wrong."""


@dataclass(frozen=True)
class Format:
    name: str
    columns: tuple[str, ...]
    convert: Callable[[dict], Example]
    example: str


def _text(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowError(f"empty '{key}'")
        return ""
    if not isinstance(value, str):
        value = str(value)
    return value


def _checked(messages: list[dict]) -> Example:
    if not messages:
        raise RowError("no messages")
    for m in messages:
        if m["role"] not in _ROLES:
            raise RowError(f"unknown role {m['role']!r} (use system, user or assistant)")
        if not isinstance(m["content"], str) or (m["role"] != "system" and not m["content"].strip()):
            raise RowError(f"empty {m['role']} message")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no assistant message to learn from")
    return {"messages": messages}


def _from_openai(row: dict) -> Example:
    raw = row.get("messages")
    if not isinstance(raw, list):
        raise RowError("'messages' is not a list")
    try:
        return _checked([{"role": m["role"], "content": m["content"]} for m in raw])
    except (KeyError, TypeError):
        raise RowError("each message needs 'role' and 'content'") from None


def _from_sharegpt(row: dict) -> Example:
    raw = row.get("conversations")
    if not isinstance(raw, list):
        raise RowError("'conversations' is not a list")
    messages = []
    for turn in raw:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError("each turn needs 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise RowError(f"unknown speaker {turn['from']!r} (known: {', '.join(sorted(_SHAREGPT_ROLES))})")
        messages.append({"role": role, "content": turn["value"]})
    return _checked(messages)


def _from_alpaca(row: dict) -> Example:
    instruction, extra = _text(row, "instruction"), _text(row, "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
    system = _text(row, "system", required=False)
    return _checked(([{"role": "system", "content": system}] if system.strip() else []) + messages)


def _from_prompt_completion(row: dict) -> Example:
    return _checked([{"role": "user", "content": _text(row, "prompt")},
                     {"role": "assistant", "content": _text(row, "completion")}])


def _from_text(row: dict) -> Example:
    return {"text": _text(row, "text")}


FORMATS: tuple[Format, ...] = (
    Format("openai", ("messages",), _from_openai, '{"messages": [{"role": "user", "content": ...}, ...]}'),
    Format("sharegpt", ("conversations",), _from_sharegpt, '{"conversations": [{"from": "human", "value": ...}]}'),
    Format("alpaca", ("instruction", "output"), _from_alpaca, '{"instruction": ..., "input": ..., "output": ...}'),
    Format("prompt_completion", ("prompt", "completion"), _from_prompt_completion,
           '{"prompt": ..., "completion": ...}'),
    Format("text", ("text",), _from_text, '{"text": ...}'),
)


def detect_format(rows: list[dict], source: str = "data") -> Format:
    """The first format whose identifying columns all appear in the rows' columns."""
    if not rows:
        raise DataError(f"{source} has no rows")
    columns: set[str] = set()
    for row in rows[:100]:
        columns.update(k for k, v in row.items() if v is not None)
    for fmt in FORMATS:
        if set(fmt.columns) <= columns:
            return fmt
    known = "\n".join(f"  {f.name:<18} {f.example}" for f in FORMATS)
    raise DataError(f"{source}: columns {sorted(columns)} match no known format. Known formats:\n{known}")


def normalise(rows: list[dict], fmt: Format, system_prompt: str | None = None
              ) -> tuple[list[Example | None], list[str | None]]:
    """Each row as an Example (or None) with the reason it was rejected (or None)."""
    examples: list[Example | None] = []
    reasons: list[str | None] = []
    for row in rows:
        try:
            example = fmt.convert(row)
        except RowError as e:
            examples.append(None)
            reasons.append(str(e))
            continue
        if system_prompt and "messages" in example and example["messages"][0]["role"] != "system":
            example["messages"].insert(0, {"role": "system", "content": system_prompt})
        examples.append(example)
        reasons.append(None)
    return examples, reasons
