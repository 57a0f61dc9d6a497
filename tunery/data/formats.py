"""Detect the layout of training rows and normalise each row to chat messages (or raw text).

Formats are data: each has the columns that identify it and a converter to `{"messages": [...]}` or
`{"text": ...}`. A row that cannot be converted yields `None` plus a reason, so callers can count and
report instead of crashing half-way through a file.
"""

from __future__ import annotations

import json
import math
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
    convert: Callable[[dict, bool], Example]  # (row, json_values) -> Example
    example: str


def as_text(value: Any, field: str, json_values: bool = False) -> str:
    """A cell's text. A value that is not text (a number, true/false, a list or an object, NaN) is never
    turned into Python's spelling of it (`{'a': 1}`, `True`, `nan`): it is an error naming the field, or, with
    `json_values`, its JSON text (`{"a": 1}`, `true`)."""
    if isinstance(value, str):
        return value
    name = field if "'" in field else f"'{field}'"  # "turn 2's 'value'" comes quoted already
    if isinstance(value, float) and math.isnan(value):
        raise RowError(f"{name} is NaN (not a number), not text")
    if not json_values:
        kind = {bool: "true/false", dict: "an object", list: "a list", int: "a number", float: "a number"}.get(
            type(value), f"a {type(value).__name__}")
        raise RowError(f"{name} holds {kind}, not text: store it as a string, or pass --json-values to train "
                       "on its JSON text")
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        raise RowError(f"{name} holds a {type(value).__name__}, which has no JSON text") from None


def _text(row: dict, key: str, required: bool = True, json_values: bool = False) -> str:
    if required and key not in row:
        raise RowError(f"no '{key}' field")
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowError(f"empty '{key}'")
        return ""
    return as_text(value, key, json_values)


def _content(value: Any, json_values: bool, field: str = "content") -> Any:
    """A message's content: text, or OpenAI content parts whose text parts are joined (other parts refused).
    `field`: how the row names it, for errors (a ShareGPT turn's is "turn 2's 'value'")."""
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if any("type" not in p for p in value):
            raise RowError(f"a part of {field} has no 'type' (text parts are {{\"type\": \"text\", \"text\": ...}})")
        kinds = {p["type"] for p in value}
        if kinds - {"text"}:
            raise RowError(f"{field} has {', '.join(sorted(str(k) for k in kinds - {'text'}))} parts; "
                           "only text parts can be trained")
        return "".join(as_text(p.get("text", ""), f"{field}[].text", json_values) for p in value)
    if value is None or isinstance(value, str):
        return value
    return as_text(value, field, json_values)


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


def _from_openai(row: dict, json_values: bool = False) -> Example:
    raw = row.get("messages")
    if not isinstance(raw, list):
        raise RowError("'messages' is not a list")
    if any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in raw):
        raise RowError("tool-calling messages (tool_calls, role 'tool') are not trained yet")
    try:
        return _checked([{"role": m["role"], "content": _content(m["content"], json_values, f"message {i}'s 'content'")}
                         for i, m in enumerate(raw, 1)])
    except (KeyError, TypeError):
        raise RowError("each message needs 'role' and 'content'") from None


def _from_sharegpt(row: dict, json_values: bool = False) -> Example:
    raw = row.get("conversations")
    if not isinstance(raw, list):
        raise RowError("'conversations' is not a list")
    messages = []
    for number, turn in enumerate(raw, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError("each turn needs 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise RowError(f"unknown speaker {turn['from']!r} (known: {', '.join(sorted(_SHAREGPT_ROLES))})")
        messages.append({"role": role, "content": _content(turn["value"], json_values, f"turn {number}'s 'value'")})
    return _checked(messages)


def _answer(row: dict, key: str, json_values: bool) -> dict:
    """The assistant message from column `key`, with the row's `reasoning` trace when it has one (rendered as
    the chat template expects it: data/templates.py)."""
    message = {"role": "assistant", "content": _text(row, key, json_values=json_values)}
    reasoning = _text(row, "reasoning", required=False, json_values=json_values)
    if reasoning.strip():
        message["reasoning"] = reasoning
    return message


def _from_alpaca(row: dict, json_values: bool = False) -> Example:
    instruction = _text(row, "instruction", json_values=json_values)
    extra = _text(row, "input", required=False, json_values=json_values)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, _answer(row, "output", json_values)]
    system = _text(row, "system", required=False, json_values=json_values)
    return _checked(([{"role": "system", "content": system}] if system.strip() else []) + messages)


def _from_prompt_completion(row: dict, json_values: bool = False) -> Example:
    return _checked([{"role": "user", "content": _text(row, "prompt", json_values=json_values)},
                     _answer(row, "completion", json_values)])


def _from_text(row: dict, json_values: bool = False) -> Example:
    return {"text": _text(row, "text", json_values=json_values)}


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
    from tunery.data.load import BAD_ROW

    readable = [r for r in rows if BAD_ROW not in r]
    if not readable:
        raise DataError(f"{source}: no row could be read ({rows[0][BAD_ROW]}, ...)")
    columns: set[str] = set()
    for row in readable[:100]:
        columns.update(k for k, v in row.items() if v is not None)
    for fmt in FORMATS:
        if set(fmt.columns) <= columns:
            return fmt
    known = "\n".join(f"  {f.name:<18} {f.example}" for f in FORMATS)
    raise DataError(f"{source}: columns {sorted(columns)} match no known format. Known formats:\n{known}")


def row_format(row: dict) -> Format | None:
    """The layout of one row: the first format whose identifying columns it fills (None: none does)."""
    present = {k for k, v in row.items() if v is not None and v != ""}
    return next((f for f in FORMATS if set(f.columns) <= present), None)


def layouts(rows: list[dict]) -> dict[str, int]:
    """How many rows are in each layout ("unknown" for rows in none): a file mixing layouts says so."""
    from tunery.data.load import BAD_ROW

    counts: dict[str, int] = {}
    for row in rows:
        if BAD_ROW not in row:
            name = getattr(row_format(row), "name", "unknown")
            counts[name] = counts.get(name, 0) + 1
    return counts


def normalise(rows: list[dict], fmt: Format, system_prompt: str | None = None, json_values: bool = False
              ) -> tuple[list[Example | None], list[str | None]]:
    """Each row as an Example (or None) with the reason it was rejected (or None). Each row is read in its own
    layout (a file whose layout changes part way is read whole); a row in none is read as `fmt`, the file's,
    whose reason then names what is missing. `json_values`: cells that are not text train as their JSON text
    instead of being rejected."""
    examples: list[Example | None] = []
    reasons: list[str | None] = []
    from tunery.data.load import BAD_ROW

    for row in rows:
        if BAD_ROW in row:
            examples.append(None)
            reasons.append(row[BAD_ROW])
            continue
        # a row in no layout is read in the one it shares most columns with, whose error names what is missing
        own = row_format(row) or max((f for f in (fmt, *FORMATS) if set(f.columns) & set(row)),
                                     key=lambda f: len(set(f.columns) & set(row)), default=None)
        if own is None:
            examples.append(None)
            reasons.append(f"columns {', '.join(sorted(row))} are no known layout (map yours with --columns, "
                           "e.g. prompt=question,completion=answer)")
            continue
        try:
            example = own.convert(row, json_values)
        except RowError as e:
            examples.append(None)
            reasons.append(str(e))
            continue
        if system_prompt and "messages" in example and example["messages"][0]["role"] != "system":
            example["messages"].insert(0, {"role": "system", "content": system_prompt})
        examples.append(example)
        reasons.append(None)
    return examples, reasons
