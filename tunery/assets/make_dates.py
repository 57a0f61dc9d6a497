"""Regenerate the bundled demo task: free-form dates -> ISO 8601 (YYYY-MM-DD).

    python -m tunery.assets.make_dates > tunery/assets/dates.jsonl

The task is real and checkable (one right answer per row), small enough for a tiny model on a CPU,
and a random-init model scores zero on it, so the demo's before/after is honest.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sys

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_PROMPT = "Rewrite this date as YYYY-MM-DD: "


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _render(date: dt.date, style: int) -> str:
    month, short = _MONTHS[date.month - 1], _MONTHS[date.month - 1][:3]
    d, m, y = date.day, date.month, date.year
    styles = [
        f"{month} {d}, {y}",
        f"{short} {d} {y}",
        f"{d} {month} {y}",
        f"the {_ordinal(d)} of {month}, {y}",
        f"{y}/{m:02d}/{d:02d}",
        f"{d:02d}.{m:02d}.{y}",
        f"{_WEEKDAYS[date.weekday()]}, {month} {_ordinal(d)} {y}",
        f"{short}. {_ordinal(d)}, {y}",
    ]
    return styles[style % len(styles)]


def make_examples(n: int = 480, seed: int = 7) -> list[dict]:
    """`n` rows in OpenAI-messages format; dates drawn uniformly from 1950-2035, styles round-robin."""
    rng = random.Random(seed)
    start, span = dt.date(1950, 1, 1).toordinal(), 365 * 86
    rows = []
    for _ in range(n):
        date = dt.date.fromordinal(start + rng.randrange(span))
        rows.append({"messages": [
            {"role": "user", "content": _PROMPT + _render(date, rng.randrange(8))},
            {"role": "assistant", "content": date.isoformat()},
        ]})
    return rows


if __name__ == "__main__":
    for row in make_examples():
        sys.stdout.write(json.dumps(row) + "\n")
