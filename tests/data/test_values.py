"""Cells as users really have them: values that are not text, content parts, Excel sheets, dates and merged
cells. Nothing is silently turned into Python's spelling of a value."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tunery.data.formats import detect_format, normalise
from tunery.data.load import load_rows
from tunery.errors import DataError


def _normalised(tmp_path, rows, **kw):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_rows(path)
    return normalise(loaded, detect_format(loaded), **kw)


@pytest.mark.parametrize("value, kind", [({"value": 0}, "an object"), ([0, 1], "a list"), (True, "true/false"),
                                         (42, "a number"), (0.5, "a number")])
def test_a_value_that_is_not_text_is_named_not_stringified(tmp_path, value, kind):
    rows = [{"prompt": "p", "completion": value}, {"prompt": "p", "completion": "ok"}]
    examples, reasons = _normalised(tmp_path, rows)
    assert examples[0] is None and reasons[0] == (f"'completion' holds {kind}, not text: store it as a string, or "
                                                  "pass --json-values to train on its JSON text")
    assert examples[1]["messages"][1]["content"] == "ok"
    examples, _ = _normalised(tmp_path, [{"prompt": "p", "completion": value}], json_values=True)
    assert examples[0]["messages"][1]["content"] == json.dumps(value)  # JSON text: {"value": 0}, true, [0, 1]


def test_nan_is_never_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "i", "output": NaN}\n')
    rows = load_rows(path)
    for json_values in (False, True):
        _, reasons = normalise(rows, detect_format(rows), json_values=json_values)
        assert reasons == ["'output' is NaN (not a number), not text"]


def test_content_parts_are_joined_and_other_parts_refused(tmp_path):
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    rows = [{"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "hi"}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}]
    examples, reasons = _normalised(tmp_path, rows)
    assert examples[0]["messages"][0]["content"] == "Hello, world"
    assert reasons[1] == "message 1's 'content' has image_url parts; only text parts can be trained"
    assert reasons[2].startswith("tool-calling messages")


def _workbook(path, sheets: dict[str, list[list]], merge: str | None = None):
    from openpyxl import Workbook

    book = Workbook()
    book.remove(book.active)
    for name, table in sheets.items():
        ws = book.create_sheet(name)
        for row in table:
            ws.append(row)
        if merge:
            ws.merge_cells(merge)
    book.save(path)
    return path


def test_a_workbook_of_several_sheets_needs_a_name(tmp_path):
    path = _workbook(tmp_path / "d.xlsx", {"notes": [["a"], ["x"]],
                                           "train": [["prompt", "completion"], ["p1", "c1"], ["p2", "c2"]]})
    with pytest.raises(DataError, match=r"has 2 sheets \(notes, train\); name the one to train on with --sheet"):
        load_rows(path)
    assert [r["completion"] for r in load_rows(path, sheet="train")] == ["c1", "c2"]
    with pytest.raises(DataError, match="no sheet 'Train'; its sheets: notes, train"):
        load_rows(path, sheet="Train")


def test_excel_cells_read_as_the_user_typed_them(tmp_path):
    table = [["prompt", "completion"], [dt.datetime(2015, 3, 1), 42.0], ["at", dt.datetime(2015, 3, 1, 9, 30)],
             ["flag", True], ["half", 0.5]]
    path = _workbook(tmp_path / "d.xlsx", {"s": table})
    rows = load_rows(path)
    assert [(r["prompt"], r["completion"]) for r in rows] == [("2015-03-01", "42"), ("at", "2015-03-01 09:30:00"),
                                                               ("flag", "TRUE"), ("half", "0.5")]


def test_merged_cells_are_explained_not_read_as_empty(tmp_path):
    rows = [["instruction", "output"]] + [["Rewrite the date" if i == 0 else None, f"2020-01-0{i + 1}"]
                                           for i in range(5)]
    path = _workbook(tmp_path / "d.xlsx", {"s": rows}, merge="A2:A6")
    with pytest.raises(DataError, match=r"merged cells A2:A6 keep their value in the first row only.*Unmerge"):
        load_rows(path)
