"""Every format in every file type loads to the same messages; bad files and rows fail with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunery.data.formats import FORMATS, detect_format, normalise
from tunery.data.load import BAD_ROW, load_rows
from tunery.errors import DataError

# (instruction, input, output): the alpaca spelling; the other chat formats carry the joined user text.
# Commas, quotes and newlines make the CSV/XLSX writers quote cells.
PAIRS = [
    ("Rewrite this date as YYYY-MM-DD:", "June 3, 1985", "1985-06-03"),
    ("Say hello, politely.", "", 'Hello, "friend"!\nHow are you?'),
]
TEXTS = ["The quick brown fox, jumps.", 'A second "row"\nwith a newline.']


def _user(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra else instruction


EXPECTED_CHAT = [{"messages": [{"role": "user", "content": _user(i, x)}, {"role": "assistant", "content": out}]}
                 for i, x, out in PAIRS]
EXPECTED_TEXT = [{"text": t} for t in TEXTS]


def _rows(fmt: str) -> list[dict]:
    if fmt == "text":
        return [{"text": t} for t in TEXTS]
    rows = []
    for instruction, extra, out in PAIRS:
        user = _user(instruction, extra)
        rows.append({
            "openai": {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": out}]},
            "sharegpt": {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": out}]},
            "alpaca": {"instruction": instruction, "input": extra, "output": out},
            "prompt_completion": {"prompt": user, "completion": out},
        }[fmt])
    return rows


def _flat(rows: list[dict]) -> list[dict]:
    """Spreadsheet rows: nested list columns as JSON text in the cell."""
    return [{k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows]


def _write(rows: list[dict], folder: Path, kind: str) -> Path:
    import pandas as pd

    path = folder / ("data" if kind == "datasets" else f"data.{kind}")
    if kind == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        pd.DataFrame(_flat(rows)).to_csv(path, index=False)
    elif kind == "xlsx":
        pd.DataFrame(_flat(rows)).to_excel(path, index=False)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


FORMAT_NAMES = ["openai", "sharegpt", "alpaca", "prompt_completion", "text"]
FILE_TYPES = ["json", "jsonl", "csv", "xlsx", "parquet", "datasets"]


def test_format_list_matches_the_package():
    assert [f.name for f in FORMATS] == FORMAT_NAMES


@pytest.mark.parametrize("kind", FILE_TYPES)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_every_format_loads_from_every_file_type(tmp_path, fmt, kind):
    path = _write(_rows(fmt), tmp_path, kind)
    rows = load_rows(path)
    detected = detect_format(rows, source=str(path))
    examples, reasons = normalise(rows, detected)
    assert detected.name == fmt
    assert reasons == [None, None]
    assert examples == (EXPECTED_TEXT if fmt == "text" else EXPECTED_CHAT)


@pytest.mark.parametrize("kind", ["csv", "xlsx"])
def test_spreadsheet_reply_that_is_json_stays_text(tmp_path, kind):
    """A JSON answer in a plain column is trained on as written, not decoded and re-printed as a dict."""
    replies = ['{"name":"Ada", "born": 1815}', '["a", "b"]']
    rows = [{"prompt": "Give JSON", "completion": r} for r in replies]
    path = _write(rows, tmp_path, kind)
    examples, reasons = normalise(load_rows(path), detect_format(load_rows(path)))
    assert reasons == [None, None]
    assert [e["messages"][1]["content"] for e in examples] == replies


def test_system_prompt_is_added_only_where_missing():
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]}]
    examples, _ = normalise(rows, detect_format(rows), system_prompt="Be brief.")
    assert examples[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert examples[1]["messages"][0] == {"role": "system", "content": "own"}
    assert len(examples[1]["messages"]) == 3


def test_a_malformed_jsonl_line_is_reported_with_the_rest_by_its_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps({"text": "fine"})
    path.write_text(f"{good}\n\n{{\"text\": \"no closing brace\"\n{good}\n")  # blank line 2 still counts
    rows = load_rows(path)
    examples, reasons = normalise(rows, detect_format(rows, source=str(path)))
    assert [e is not None for e in examples] == [True, False, True]
    assert reasons[1].startswith("line 3: malformed JSON")
    path.write_text("{broken\n[also broken\n")
    with pytest.raises(DataError, match=r"no row could be read \(line 1: malformed JSON"):
        detect_format(load_rows(path), source=str(path))


def test_unreadable_inputs_are_data_errors_not_tracebacks(tmp_path, monkeypatch):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DataError, match="nested too deeply"):
        load_rows(deep)
    lines = tmp_path / "deep.jsonl"
    lines.write_text(json.dumps({"text": "ok"}) + "\n" + "[" * 100000 + "]" * 100000 + "\n")
    assert load_rows(lines)[1] == {BAD_ROW: "line 2: JSON nested too deeply"}
    locked = tmp_path / "locked.jsonl"
    locked.write_text("{}\n")

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(DataError, match="cannot read .*locked.jsonl: Permission denied; check its permissions"):
        load_rows(locked)


def test_invalid_json_file_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match="line 3") as err:
        load_rows(path)
    assert str(path) in str(err.value)


def test_unknown_columns_list_known_formats_and_columns_seen(tmp_path):
    path = _write([{"question": "q", "answer": "a"}], tmp_path, "jsonl")
    rows = load_rows(path)
    with pytest.raises(DataError) as err:
        detect_format(rows, source=str(path))
    message = str(err.value)
    assert str(path) in message
    assert "'answer'" in message and "'question'" in message
    for name in FORMAT_NAMES:
        assert name in message


def test_unsupported_suffix_is_rejected_with_the_supported_list(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported file type \.txt") as err:
        load_rows(path)
    assert ".jsonl" in str(err.value) and ".parquet" in str(err.value)


def test_missing_file_is_a_data_error(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match="does not exist") as err:
        load_rows(path)
    assert str(path) in str(err.value)


def test_empty_file_has_no_rows(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        detect_format(load_rows(path), source=str(path))


def test_row_that_is_not_an_object_is_rejected(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "a"}\n["not", "an", "object"]\n')
    assert load_rows(path)[1] == {BAD_ROW: "line 2: a list, expected an object with fields"}  # reported, not fatal
    path = tmp_path / "list.json"
    path.write_text('[{"text": "a"}, ["not", "an", "object"]]')
    with pytest.raises(DataError, match="row 2 is a list"):
        load_rows(path)


GOOD_OPENAI = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("row, reason", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     "empty assistant message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  \n"}]},
     "empty assistant message"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message to learn from"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "text": "q"}]}, "each message needs 'role' and 'content'"),
])
def test_bad_openai_rows_are_rejected_with_a_reason(row, reason):
    examples, reasons = normalise([GOOD_OPENAI, row, GOOD_OPENAI], detect_format([GOOD_OPENAI]))
    assert examples[0] == examples[2] == GOOD_OPENAI
    assert examples[1] is None
    assert reason in reasons[1]
    assert reasons[0] is None and reasons[2] is None


@pytest.mark.parametrize("row, reason", [
    ({"instruction": "q", "input": "", "output": ""}, "empty 'output'"),
    ({"prompt": "q", "completion": "   "}, "empty 'completion'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}, "empty assistant"),
])
def test_empty_assistant_reply_is_rejected_in_every_chat_format(row, reason):
    examples, reasons = normalise([row], detect_format([row]))
    assert examples == [None]
    assert reason in reasons[0]


def test_sharegpt_unknown_speaker_is_rejected_with_the_known_ones():
    row = {"conversations": [{"from": "narrator", "value": "Once"}, {"from": "gpt", "value": "upon"}]}
    examples, reasons = normalise([row], detect_format([row]))
    assert examples == [None]
    assert "unknown speaker 'narrator'" in reasons[0]
    assert "human" in reasons[0] and "gpt" in reasons[0]
