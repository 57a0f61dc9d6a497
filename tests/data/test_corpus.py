"""A corpus of malformed and tricky data files, each run through `tunery data inspect --json` and `tunery train
--max-steps 2` on one tiny model: every case ends in exit 0 with the rows it should train, or in one paragraph
that names the file (and, where one is at fault, the row and field). Never a traceback, never Python's spelling
of a value (`{'a': 1}`, `True`, `nan`, `None`, `42.0`) in the text the model sees.

    PYTHONPATH=. .venv/bin/python -m pytest -q -p no:cacheprovider tests/data/test_corpus.py --durations=5
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import datetime as dt
import json
import os
import re
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunery.cli.app import app
from tunery.errors import TuneryError
from tunery.models.tiny import TinySpec, build_tiny_model

SPEC = TinySpec(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
MAX_SEQ_LEN = 128
TRAIN = ["--max-steps", "2", "--batch-size", "2", "--max-seq-len", str(MAX_SEQ_LEN), "--eval-samples", "0"]

Writer = Callable[[Path], Path]  # writes a case's input into its folder; returns what --data names


def _pc(i: int) -> dict:
    return {"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."}


def _chat(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def _sharegpt(user: object, reply: object, speaker: str = "human") -> dict:
    return {"conversations": [{"from": speaker, "value": user}, {"from": "gpt", "value": reply}]}


END = "<|im_end|>"  # ends each turn in the tiny model's ChatML: "42" + END is a whole reply
GOOD = [_pc(i) for i in range(1, 4)]  # three distinct rows that train
CHATS = [_chat(("user", f"Q{i}?"), ("assistant", f"A{i}.")) for i in range(3)]


# -- writers ---------------------------------------------------------------------------------------------------

def jsonl(rows: list, name: str = "data.jsonl") -> Writer:
    return raw("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), name)


def raw(content: str | bytes, name: str) -> Writer:
    def write(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path
    return write


def json_file(data: object, name: str = "data.json") -> Writer:
    return raw(json.dumps(data, ensure_ascii=False, indent=1), name)


def csv_file(table: list[list[str]], name: str = "data.csv", newline: str = "\n", encoding: str = "utf-8"
             ) -> Writer:
    def write(folder: Path) -> Path:
        path = folder / name
        with open(path, "w", newline="", encoding=encoding) as fh:
            csv.writer(fh, lineterminator=newline).writerows(table)
        return path
    return write


def xlsx(sheets: dict[str, list[list]], merge: str | None = None, name: str = "data.xlsx") -> Writer:
    def write(folder: Path) -> Path:
        from openpyxl import Workbook

        book = Workbook()
        book.remove(book.active)
        for title, table in sheets.items():
            ws = book.create_sheet(title)
            for row in table:
                ws.append(row)
            if merge:
                ws.merge_cells(merge)
        book.save(folder / name)
        return folder / name
    return write


def parquet(columns: dict[str, list], name: str = "data.parquet") -> Writer:
    def write(folder: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), folder / name)
        return folder / name
    return write


def saved_dataset(splits: dict[str, list[dict]] | list[dict], name: str = "saved") -> Writer:
    def write(folder: Path) -> Path:
        import datasets

        if isinstance(splits, list):
            datasets.Dataset.from_list(splits).save_to_disk(str(folder / name))
        else:
            datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
                str(folder / name))
        return folder / name
    return write


def both(main: Writer, other: Writer) -> Writer:
    """Writes `other` (an eval file, a file in the way) beside the data file `main`."""
    def write(folder: Path) -> Path:
        other(folder)
        return main(folder)
    return write


def folder_of(files: dict[str, str], name: str = "notes") -> Writer:
    def write(folder: Path) -> Path:
        (folder / name).mkdir()
        for file, text in files.items():
            (folder / name / file).write_text(text)
        return folder / name
    return write


def nothing(name: str) -> Writer:
    return lambda folder: folder / name


@contextlib.contextmanager
def as_plain_owner() -> Iterator[None]:
    """Root reads any file whatever its mode; for the length of the block this thread drops the capabilities that
    let it (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a mode-000 file is unreadable as it is to its owner."""
    if os.geteuid() != 0:
        yield
        return

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, saved = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), saved) != 0:
        pytest.skip("cannot read this thread's capabilities to drop root's read-anything override")
    dropped = (Data * 2)(*saved)
    dropped[0].effective &= ~0b110  # bits 1 and 2
    if libc.capset(ctypes.byref(header), dropped) != 0:
        pytest.skip("cannot drop root's read-anything capabilities")
    try:
        yield
    finally:
        libc.capset(ctypes.byref(header), saved)


def unreadable(writer: Writer) -> Writer:
    def write(folder: Path) -> Path:
        path = writer(folder)
        path.chmod(0)
        return path
    return write


# -- the cases -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    write: Writer
    flags: tuple[str, ...] = ()  # for inspect and train; "{dir}" is the case's folder, "{data}" the data path
    trains: int | None = None  # rows that train or are held out (train + eval examples)
    error: str | None = None  # what both commands stop with (a regex), naming `names`
    rejected: dict[int, str] = field(default_factory=dict)  # row -> regex of why it is skipped (names the field)
    seen: tuple[str, ...] = ()  # text the model must see (a value's JSON spelling, a cell as Excel shows it)
    never: tuple[str, ...] = ()  # text it must never see (Python's spelling)
    truncated: tuple[int, ...] = ()  # rows inspect reports cut at max_seq_len
    warns: str | None = None  # a regex one of inspect's warnings matches
    inspect: str = "error"  # how inspect ends an error case: the same "error", a "problem" (exit 1), "ok" (exit 0)
    train_flags: tuple[str, ...] = ()
    output_dir: str = "runs"  # under the case's folder
    names: str | None = "{data}"  # what the error must name (a file's name)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def case(name: str, write: Writer, bug: str | None = None, **kw) -> pytest.param:
    """A case; `bug`: what tunery does wrong today (the case is then a strict xfail, fixed when it passes)."""
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(Case(write, **kw), id=name, marks=marks)


def _with(row: dict, **changes) -> list[dict]:
    """The good rows and then `row` changed: row 4 is the one under test."""
    return [*GOOD, {**row, **changes}]


NOT_TEXT = r"'completion' holds {} not text: store it as a string, or pass --json-values"
TOOL_CALL = {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
SHAREGPT = _sharegpt("Name a colour.", "Blue.")
ALPACA = {"instruction": "Rewrite this date as YYYY-MM-DD:", "input": "June 3, 1985", "output": "1985-06-03"}
QA = [["Question", "Response"], ["What is 1 plus 1?", "2"], ["What is 2 plus 2?", "4"], ["Name a colour.", "Blue."]]
SHEET = [["prompt", "completion"], ["Name a colour.", "Blue."], ["Another one?", "Green, like grass."]]
BINARY = bytes(range(256)) * 8  # every byte value: invalid UTF-8, no JSON, no workbook, no Parquet
DEEP = "[" * 100_000 + "]" * 100_000

CASES = [
    # values that are not text: rejected with the field named, or trained as JSON text with --json-values
    case("object value rejected", jsonl(_with(GOOD[0], completion={"a": 1})), trains=3,
         rejected={4: NOT_TEXT.format("an object,")}),
    case("object value as json", jsonl(_with(GOOD[0], completion={"name": "Zoë", "n": 1})), flags=("--json-values",),
         trains=4, seen=('{"name": "Zoë", "n": 1}',), never=("{'name'",)),
    case("list value rejected", jsonl(_with(GOOD[0], completion=["x", "y"])), trains=3,
         rejected={4: NOT_TEXT.format("a list,")}),
    case("list value as json", jsonl(_with(GOOD[0], completion=["x", "y"])), flags=("--json-values",), trains=4,
         seen=('["x", "y"]',), never=("['x', 'y']",)),
    case("bool value rejected", jsonl(_with(GOOD[0], completion=True)), trains=3,
         rejected={4: NOT_TEXT.format("true/false,")}),
    case("bool value as json", jsonl(_with(GOOD[0], completion=False)), flags=("--json-values",), trains=4,
         seen=("assistant\nfalse",), never=("False",)),
    case("int value rejected", jsonl(_with(GOOD[0], completion=42)), trains=3,
         rejected={4: NOT_TEXT.format("a number,")}),
    case("int value as json", jsonl(_with(GOOD[0], completion=42)), flags=("--json-values",), trains=4,
         seen=("assistant\n42" + END,), never=("42.0",)),
    case("float value rejected", jsonl(_with(GOOD[0], prompt=0.5)), trains=3,
         rejected={4: r"'prompt' holds a number, not text"}),
    case("nan value rejected even as json", raw("".join(json.dumps(r) + "\n" for r in GOOD)
                                                + '{"prompt": "p", "completion": NaN}\n', "data.jsonl"),
         flags=("--json-values",), trains=3, rejected={4: r"'completion' is NaN"}, never=("nan", "NaN")),
    case("null answer rejected", jsonl(_with(GOOD[0], completion=None)), trains=3,
         rejected={4: r"empty 'completion'"}, never=("None",)),
    case("message content object rejected", jsonl([*GOOD, _chat(("user", "Who?"), ("assistant", {"who": "Ada"}))]),
         trains=3, rejected={4: r"message 2's 'content' holds an object"}),
    case("message content object as json", jsonl([_chat(("user", "Who?"), ("assistant", {"who": "Ada"})), *CHATS]),
         flags=("--json-values",), trains=4, seen=('{"who": "Ada"}',), never=("{'who'",)),
    case("sharegpt value not text names 'value'", jsonl([*[_sharegpt(f"Q{i}?", f"A{i}.") for i in range(3)],
                                                         _sharegpt("How many?", 7)]),
         trains=3, rejected={4: r"turn 2's 'value' holds a number"}),
    case("mapped column not text names the file's column", jsonl(
        [{"Question": f"Q{i}?", "Answer": f"A{i}."} for i in range(3)] + [{"Question": "How many?", "Answer": 7}]),
         flags=("--columns", "prompt=Question,completion=Answer"), trains=3,
         rejected={4: r"'completion' \(column 'Answer'\) holds a number"}),
    case("content part text not text, as json", jsonl([*CHATS, _chat(("user", [{"type": "text", "text": 5}]),
                                                                       ("assistant", "Five."))]),
         flags=("--json-values",), trains=4, seen=("user\n5" + END,)),
    case("content part without a type", jsonl([*CHATS, _chat(("user", [{"text": "Hi"}]), ("assistant", "Hello."))]),
         trains=3, rejected={4: r"a part of message 1's 'content' has no 'type'"}),
    case("parquet date column rejected even as json", parquet({"prompt": ["When?", "And then?"],
                                                               "completion": [dt.datetime(2020, 1, 1),
                                                                              dt.datetime(2021, 6, 30)]}),
         flags=("--json-values",), error=r"no example left to train on.*'completion' holds a datetime",
         inspect="problem", rejected={1: "'completion' holds a datetime", 2: "'completion' holds a datetime"}),
    case("parquet int column rejected", parquet({"prompt": ["a?", "b?", "c?"], "completion": [1, 2, 42]}),
         error=r"no example left to train on.*'completion' holds a number", inspect="problem",
         rejected={1: "'completion' holds a number", 2: "'completion' holds a number",
                   3: "'completion' holds a number"}),
    case("parquet int column as json", parquet({"prompt": ["a?", "b?", "c?"], "completion": [1, 2, 42]}),
         flags=("--json-values",), trains=3, seen=("assistant\n42" + END,), never=("42.0",)),
    case("parquet struct column as json", parquet({"prompt": ["Who?", "Who else?", "And?"],
                                                   "completion": [{"name": "Ada", "age": 36},
                                                                  {"name": "Bob", "age": 7},
                                                                  {"name": "Cy", "age": None}]}),
         flags=("--json-values",), trains=3, seen=('{"name": "Ada", "age": 36}', '"age": null'),
         never=("{'name'", "None")),
    case("parquet list column rejected", parquet({"prompt": ["a?", "b?", "c?", "d?"],
                                                  "completion": [["x"], ["y", "z"], ["w"], ["v"]]}),
         error=r"no example left to train on.*'completion' holds a list", inspect="problem",
         rejected={i: "holds a list" for i in range(1, 5)}),
    case("parquet float with nan as json", parquet({"prompt": ["a?", "b?", "c?", "d?"],
                                                    "completion": [0.5, 1.25, 2.0, float("nan")]}),
         flags=("--json-values",), trains=3, rejected={4: r"'completion' is NaN"}, seen=("0.5", "1.25", "2.0"),
         never=("nan",)),
    case("parquet null cell rejected", parquet({"prompt": ["a?", "b?", "c?", "d?"],
                                                "completion": ["A.", "B.", "C.", None]}),
         trains=3, rejected={4: r"empty 'completion'"}, never=("None",)),

    # Excel
    case("excel cells as shown", xlsx({"s": [["prompt", "completion"], ["When did it open?", dt.datetime(2015, 3, 1)],
                                             ["How many?", 42.0], ["How many now?", 42], ["Is it on?", True],
                                             ["At what time?", dt.datetime(2015, 3, 1, 9, 30)]]}),
         trains=5, seen=("2015-03-01" + END, "assistant\n42" + END, "TRUE", "2015-03-01 09:30:00"),
         never=("42.0", "00:00:00" + END, "True", "datetime")),
    case("excel several sheets need --sheet", xlsx({"notes": [["a"], ["x"]], "train": SHEET}),
         error=r"has 2 sheets \(notes, train\); name the one to train on with --sheet"),
    case("excel several sheets with --sheet", xlsx({"notes": [["a"], ["x"]], "train": SHEET}),
         flags=("--sheet", "train"), trains=2),
    case("excel unknown sheet", xlsx({"notes": [["a"], ["x"]], "train": SHEET}), flags=("--sheet", "Train"),
         error=r"has no sheet 'Train'; its sheets: notes, train"),
    case("excel merged cells", xlsx({"s": [["instruction", "output"], ["Rewrite the date", "2020-01-01"],
                                           [None, "2020-01-02"], [None, "2020-01-03"]]}, merge="A2:A4"),
         error=r"merged cells A2:A4 keep their value in the first row only.*Unmerge"),
    case("excel empty sheet", xlsx({"Sheet1": []}), error=r"has no rows"),
    case("excel chosen sheet empty", xlsx({"train": SHEET, "empty": []}), flags=("--sheet", "empty"),
         error=r"has no rows"),
    case("excel header only", xlsx({"s": [["prompt", "completion"]]}), error=r"has no rows"),
    case("excel messages as json text", xlsx({"s": [["messages"], *[[json.dumps(_chat(("user", f"Q{i}?"),
                                                                                        ("assistant", f"A{i}."))[
                                                                                 "messages"])] for i in range(3)]]}),
         trains=3, seen=("A2.",)),
    case("excel file that is no workbook", raw(BINARY, "data.xlsx"), error=r"cannot read as an Excel workbook"),

    # layouts
    case("mixed layouts in one file", jsonl([GOOD[0], ALPACA, _chat(("user", "Q?"), ("assistant", "A.")), SHAREGPT,
                                             {"text": "The quick brown fox jumps over the lazy dog."}]),
         trains=5, warns=r"in the (alpaca|openai|sharegpt|text) layout"),
    case("openai tool calls rejected", jsonl([*GOOD, {"messages": [{"role": "user", "content": "Call f."}, TOOL_CALL,
                                                                   {"role": "tool", "content": "ok"}]}]),
         trains=3, rejected={4: r"tool-calling messages"}),
    case("openai content parts joined", jsonl([*GOOD, _chat(("user", [{"type": "text", "text": "Hello, "},
                                                                      {"type": "text", "text": "world"}]),
                                                            ("assistant", "Hi."))]),
         trains=4, seen=("Hello, world",), never=("'type'", '"type"')),
    case("openai image part rejected", jsonl([*GOOD, _chat(("user", [{"type": "image_url", "image_url": {"url": "x"}}]),
                                                           ("assistant", "A cat."))]),
         trains=3, rejected={4: r"image_url parts; only text parts can be trained"}),
    case("openai message without content", jsonl([*GOOD, {"messages": [{"role": "user"},
                                                                        {"role": "assistant", "content": "A."}]}]),
         trains=3, rejected={4: r"'role' and 'content'"}),
    case("openai unknown role", jsonl([*GOOD, _chat(("user", "Q?"), ("bot", "A."))]), trains=3,
         rejected={4: r"unknown role 'bot'"}),
    case("openai messages not a list", jsonl([*GOOD, {"messages": "user: hi"}]), trains=3,
         rejected={4: r"'messages' is not a list"}),
    case("conversation ends with a user turn", jsonl([*GOOD, _chat(("user", "Q?"), ("assistant", "A."),
                                                                   ("user", "Thanks!"))]), trains=4),
    case("system only", jsonl([*GOOD, _chat(("system", "You are terse."))]), trains=3,
         rejected={4: r"no assistant message"}),
    case("opening assistant turn dropped", jsonl([*GOOD, _chat(("assistant", "Hello!"), ("user", "Q?"),
                                                               ("assistant", "A."))]),
         trains=4, warns=r"opening assistant turn dropped"),
    case("sharegpt unknown speaker", jsonl([SHAREGPT, _sharegpt("Once.", "Yes.", speaker="narrator"),
                                            _sharegpt("Q?", "A.")]),
         trains=2, rejected={2: r"unknown speaker 'narrator'"}),
    case("sharegpt conversations not a list", jsonl([SHAREGPT, {"conversations": "human: hi"}, _sharegpt("Q?", "A.")]),
         trains=2, rejected={2: r"'conversations' is not a list"}),
    case("empty answer", jsonl(_with(GOOD[0], completion="")), trains=3, rejected={4: r"empty 'completion'"}),
    case("whitespace answer", jsonl(_with(GOOD[0], completion=" \n\t ")), trains=3,
         rejected={4: r"empty 'completion'"}),
    case("whitespace assistant message", jsonl([*GOOD, _chat(("user", "Q?"), ("assistant", "   "))]), trains=3,
         rejected={4: r"empty assistant message"}),
    case("raw text rows", jsonl([{"text": "The quick brown fox."}, {"text": "Jumps over the lazy dog."},
                                 {"text": 12}]), trains=2, rejected={3: r"'text' holds a number"}),
    case("alpaca with and without input", jsonl([ALPACA, {"instruction": "Name a colour.", "output": "Blue."},
                                                 {"instruction": "Say hi.", "input": None, "output": "Hi."},
                                                 {"instruction": "Say bye.", "input": "", "output": "Bye."}]),
         trains=4, seen=("June 3, 1985",), never=("None",)),
    case("alpaca null output", jsonl([ALPACA, {"instruction": "Name a colour.", "output": "Blue."},
                                      {"instruction": "Say hi.", "output": "Hi."},
                                      {"instruction": "Say bye.", "output": None}]),
         trains=3, rejected={4: r"empty 'output'"}),
    case("alpaca missing output", jsonl([ALPACA, {"instruction": "Name a colour.", "output": "Blue."},
                                         {"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Say bye."}]),
         trains=3, rejected={4: r"no 'output' field"}),
    case("unknown columns", jsonl([{"question": "Q?", "answer": "A."}] * 2),
         error=r"columns \['answer', 'question'\] match no known format"),
    case("a row in no layout", jsonl([*GOOD, {"question": "Q?", "answer": "A."}]), trains=3,
         rejected={4: r"columns answer, question are no known layout"}),
    case("reasoning column", csv_file([["Question", "Response", "CoT"], ["What is 1 plus 1?", "2", "One and one."],
                                       ["What is 2 plus 2?", "4", "Two and two."]]),
         flags=("--columns", "prompt=Question,completion=Response,reasoning=CoT"), trains=2,
         seen=("<think>\nOne and one.\n</think>\n\n2",)),
    case("columns mapping", csv_file(QA), flags=("--columns", "prompt=Question,completion=Response"), trains=3),
    case("columns mapping a missing column", csv_file(QA), flags=("--columns", "prompt=Question,completion=Reply"),
         error=r"columns 'Reply' \(from the `columns` setting\) are not in the file; its columns: Question, Response"),
    case("columns mapping without =", csv_file(QA), flags=("--columns", "prompt"),
         error=r"entries are FIELD=COLUMN", names=None),
    case("columns mapping an unknown field", csv_file(QA), flags=("--columns", "question=Question,answer=Response"),
         error=r"FIELD one of prompt, completion", names=None),

    # text: encodings, line ends, spreadsheets' JSON cells
    case("unicode and emoji", jsonl([{"prompt": "Zoë’s 🦊?", "completion": "Ça va 🦊 — 你好"}, *GOOD]), trains=4,
         seen=("Zoë’s 🦊?", "Ça va 🦊 — 你好")),
    case("utf-8 bom jsonl", raw("\ufeff" + "".join(json.dumps(r) + "\n" for r in GOOD), "data.jsonl"), trains=3),
    case("utf-8 bom csv", raw("\ufeffprompt,completion\nQ1?,A1.\nQ2?,A2.\n", "data.csv"), trains=2,
         never=("\ufeff",)),
    case("crlf jsonl", raw("".join(json.dumps(r) + "\r\n" for r in GOOD), "data.jsonl"), trains=3, never=("\r",)),
    case("crlf csv", csv_file([["prompt", "completion"], ["Q1?", "A1."], ["Q2?", "A2."]], newline="\r\n"), trains=2,
         never=("\r",)),
    case("blank lines in jsonl", raw("\n" + json.dumps(GOOD[0]) + "\n\n   \n" + json.dumps(GOOD[1]) + "\n\n",
                                     "data.jsonl"), trains=2),
    case("csv quoted newlines", csv_file([["prompt", "completion"], ['Say "hi",\nthen stop.', "line one\nline two"],
                                          ["Q2?", "A2."]]), trains=2, seen=("line one\nline two", 'Say "hi",\nthen')),
    case("csv numbers stay as written", csv_file([["prompt", "completion"], ["Code?", "007"], ["Big?", "1e3"],
                                                  ["Missing?", "NA"]]), trains=3, seen=("007", "1e3", "\nNA" + END)),
    case("csv answer that looks like json", csv_file([["prompt", "completion"], ["As JSON?", '{"a": 1, "b": [true]}'],
                                                      ["Q2?", "A2."]]), trains=2, seen=('{"a": 1, "b": [true]}',),
         never=("{'a'", "True")),
    case("csv messages as json text", csv_file([["messages"], *[[json.dumps(_chat(("user", f"Q{i}?"), (
        "assistant", f"A{i}."))["messages"])] for i in range(3)]]), trains=3, seen=("A1.",), never=("'role'",)),
    case("csv messages as broken json text", csv_file([["messages"], *[[json.dumps(_chat(("user", f"Q{i}?"), (
        "assistant", f"A{i}."))["messages"])] for i in range(3)], ['[{"role": "user", "content": "Q?"']]),
         trains=3, rejected={4: r"'messages'"}),
    case("non-utf-8 jsonl", raw(json.dumps(GOOD[0]).encode() + b"\n" + '{"prompt": "café", "completion": "ok"}\n'
                                .encode("latin-1"), "data.jsonl"), error=r"not UTF-8 text"),
    case("non-utf-8 line far into a jsonl", raw("".join(json.dumps(_pc(i)) + "\n" for i in range(400)).encode()
                                                + '{"prompt": "café", "completion": "ok"}\n'.encode("latin-1"),
                                                "data.jsonl"),
         error=r"not UTF-8 text.*line 401, byte 2534\d of the file"),
    case("utf-16 csv", csv_file([["prompt", "completion"], ["Q1?", "A1."]], encoding="utf-16"),
         error=r"cannot read as CSV"),

    # files that are not what their names say, or not there
    case("malformed jsonl line among good ones", raw(json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1]) + "\n"
                                                     + '{"prompt": "Q?", "completion": "A.}\n' + json.dumps(GOOD[2])
                                                     + "\n", "data.jsonl"),
         trains=3, rejected={3: r"line 3: malformed JSON"}),
    case("deep nesting in a jsonl line", raw("".join(json.dumps(r) + "\n" for r in GOOD) + DEEP + "\n", "data.jsonl"),
         trains=3, rejected={4: r"line 4: JSON nested too deeply"}),
    case("deep nesting in a json file", raw(DEEP, "data.json"), error=r"JSON nested too deeply"),
    case("jsonl line that is no object", raw(json.dumps(GOOD[0]) + "\n\n" + json.dumps(GOOD[1]) + "\n42\n",
                                             "data.jsonl"),
         trains=2, rejected={3: r"line 4: a number, expected an object"}),
    case("a json list named .jsonl", raw(json.dumps(GOOD, indent=2), "data.jsonl"),
         error=r"no row could be read \(line 1: malformed JSON"),
    case("empty jsonl", raw("", "data.jsonl"), error=r"has no rows"),
    case("empty json list", raw("[]", "data.json"), error=r"has no rows"),
    case("empty csv", raw("", "data.csv"), error=r"cannot read as CSV"),
    case("header-only csv", raw("prompt,completion\n", "data.csv"), error=r"has no rows"),
    case("json object holding one list", json_file({"data": GOOD}), trains=3),
    case("json object instead of a list", json_file(GOOD[0]), error=r"expected a JSON list of examples"),
    case("json object holding two lists", json_file({"train": GOOD, "test": GOOD}),
         error=r"expected a JSON list of examples"),
    case("json single openai example", json_file(_chat(("user", "Q?"), ("assistant", "A."))),
         error=r"expected a JSON list of examples|match no known format"),
    case("json list of non-objects", json_file(["Q?", "A."]), error=r"row 1 is a str, expected an object"),
    case("json top-level number", raw("42", "data.json"), error=r"expected a JSON list of examples"),
    case("json lines named .json", raw("".join(json.dumps(r) + "\n" for r in GOOD), "data.json"),
         error=r"invalid JSON at line 2.*name it \.jsonl"),
    case("binary junk named .jsonl", raw(BINARY, "data.jsonl"), error=r"not UTF-8 text"),
    case("binary junk named .parquet", raw(BINARY, "data.parquet"), error=r"cannot read as Parquet"),
    case("unsupported suffix", raw(json.dumps(GOOD), "data.txt"), error=r"unsupported file type \.txt"),
    case("no suffix", raw(json.dumps(GOOD), "data"), error=r"unsupported file type \(none\)"),
    case("missing file", nothing("missing.jsonl"), error=r"does not exist"),
    case("unreadable file", unreadable(jsonl(GOOD)), error=r"cannot read .*Permission denied; check its permissions",
         context=as_plain_owner),
    case("folder that is not a dataset", folder_of({"readme.txt": "notes"}),
         error=r"a folder must be saved with datasets' save_to_disk"),
    case("saved datasets folder", saved_dataset(GOOD), trains=3),
    case("saved dataset dict with a train split", saved_dataset({"train": GOOD, "test": GOOD[:1]}), trains=3),
    case("saved dataset dict without a train split", saved_dataset({"test": GOOD}),
         error=r"needs a 'train' split; it has test"),
    case("output dir is a file", both(jsonl(GOOD), raw("x", "runs-file")), output_dir="runs-file", inspect="ok",
         trains=3, error=r"output_dir .*runs-file is a file, not a folder", names="runs-file"),

    # what the data gate refuses, and --allow-data-issues
    case("most rows rejected", jsonl([*GOOD[:2], *[{"prompt": f"Q{i}?", "completion": ""} for i in range(3)]]),
         error=r"3 of 5 rows were rejected \(empty 'completion': rows 3, 4, 5\).*--allow-data-issues",
         inspect="problem",
         rejected={3: "empty 'completion'", 4: "empty 'completion'", 5: "empty 'completion'"}),
    case("most rows rejected allowed", jsonl([*GOOD[:2], *[{"prompt": f"Q{i}?", "completion": ""} for i in range(3)]]),
         train_flags=("--allow-data-issues",), trains=2, inspect="problem",
         rejected={3: "empty 'completion'", 4: "empty 'completion'", 5: "empty 'completion'"}),
    case("every row rejected", jsonl([_chat(("user", f"Q{i}?")) for i in range(3)]),
         error=r"no example left to train on", inspect="problem",
         rejected={1: "no assistant message", 2: "no assistant message", 3: "no assistant message"}),
    case("giant row truncated", jsonl([GOOD[0], {"prompt": "Say it long.", "completion": "word " * 50_000}, *GOOD[1:]]),
         trains=4, truncated=(2,), warns=r"1 rows longer than max_seq_len are truncated \(rows 2\)"),
    case("duplicates", jsonl([*GOOD, GOOD[0], *[_pc(i) for i in range(4, 12)]]), trains=12,
         warns=r"1 exact duplicate rows: rows 1, 4"),
    case("eval data is the data", jsonl(GOOD), flags=("--eval-data", "{data}"), inspect="problem", trains=6,
         error=r"eval_data is the training file itself"),
    case("eval data overlapping", both(jsonl(GOOD), jsonl([GOOD[0], GOOD[1], _pc(7)], "held.jsonl")),
         flags=("--eval-data", "{dir}/held.jsonl"), inspect="problem", trains=6, warns=r"2 eval rows also appear",
         error=r"2 of 3 held-out rows are also training rows.*--allow-data-issues"),
    case("eval data overlapping allowed", both(jsonl(GOOD), jsonl([GOOD[0], GOOD[1], _pc(7)], "held.jsonl")),
         flags=("--eval-data", "{dir}/held.jsonl"), train_flags=("--allow-data-issues",), trains=6,
         inspect="problem"),
    case("eval data with a bad row", both(jsonl(GOOD), jsonl([_pc(7), _pc(8), {"prompt": "Q?", "completion": 3}],
                                                             "held.jsonl")),
         flags=("--eval-data", "{dir}/held.jsonl"), trains=5, warns=r"1 rows of the eval file rejected"),
]


# -- running them ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Iterator[str]:
    import torch

    texts = ["What is 1 plus 1?", "It is 2.", "Name a colour.", "Blue.", "assistant\n", "user\n"]
    folder = build_tiny_model(tmp_path_factory.mktemp("corpus-model") / "model", texts, SPEC)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model: a second thread only waits, and on a busy CPU waits long (20x)
    yield str(folder)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(model):
    from tunery.data.templates import ensure_chat_template
    from tunery.models.load import load_tokenizer

    tok = load_tokenizer(model)
    ensure_chat_template(tok)
    return tok


def _invoke(args: list[str], env: dict[str, str]):
    """The CLI in-process; anything but a TuneryError (or a clean exit) escaping it is tunery's bug."""
    result = CliRunner().invoke(app, args, env=env)
    error = result.exception
    if error is not None and not isinstance(error, (TuneryError, SystemExit)):
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        pytest.fail(f"`tunery {' '.join(args[:2])}` raised {type(error).__name__}, not a TuneryError:\n{trace}")
    assert "Traceback" not in result.output, result.output
    return result


def _stopped(result, case: Case, named: str | None, command: str) -> None:
    """The command stopped with one TuneryError paragraph that matches the case and names the file."""
    assert result.exit_code != 0, f"{command} succeeded:\n{result.output[-3000:]}"
    assert isinstance(result.exception, TuneryError), f"{command}: {result.exception!r}\n{result.output[-3000:]}"
    message = str(result.exception)
    assert re.search(case.error, message, re.S), f"{command}: {message}"
    assert "\n\n" not in message.strip(), f"{command}: more than one paragraph: {message}"
    if named:
        assert named in message, f"{command}: the message does not name {named}: {message}"


def _trained_text(data: Path, flags: list[str], tokenizer) -> str:
    """Every row the model sees, decoded from the tokens training reads (the same loader, options and cache)."""
    from tunery.data.dataset import load_file

    options = {flag: value for flag, value in zip(flags, flags[1:]) if flag in ("--sheet", "--columns")}
    data_file = load_file(str(data), tokenizer, MAX_SEQ_LEN, sheet=options.get("--sheet"),
                          json_values="--json-values" in flags,
                          columns=options["--columns"].split(",") if "--columns" in options else None)
    return "\n".join(tokenizer.decode(data_file.tokens[i].input_ids) for i in data_file.usable())


def _check_inspection(result, case: Case) -> None:
    """`data inspect --json` ran to its report: exit 1 only for a "problem" case; the rows it counts as training
    (with the --eval-data file's), the rows it rejects and why, the rows it cuts, the warning the case expects."""
    assert result.exit_code == (1 if case.inspect == "problem" else 0), result.output[-3000:]
    report = json.loads(result.stdout)
    if case.inspect == "problem":
        assert report["problems"], report
    if case.trains is not None:
        usable = len(report["lengths"]) - report["no_trainable"] + len(report["eval_lengths"])
        assert usable == case.trains, report
    found = {row: reason for reason, rows in report["rejected"].items() for row in rows}
    assert sorted(found) == sorted(case.rejected), f"rejected rows: {report['rejected']}"
    for row, pattern in case.rejected.items():
        assert re.search(pattern, found[row]), f"row {row}: {found[row]}"
    assert report["too_long_rows"] == list(case.truncated)
    if case.warns:
        assert any(re.search(case.warns, w) for w in report["warnings"]), report["warnings"]


@pytest.mark.parametrize("case", CASES)
def test_corpus_case(case: Case, model: str, tokenizer, tmp_path: Path, tunery_home: Path):
    data = case.write(tmp_path)
    flags = [f.format(dir=tmp_path, data=data) for f in case.flags]
    env = {"COLUMNS": "200"}  # TUNERY_HOME: the fixture's, for the CLI and for `_trained_text` alike
    with case.context():
        inspected = _invoke(["data", "inspect", str(data), "--model", model, "--json", "--max-seq-len",
                             str(MAX_SEQ_LEN), *flags], env)
        trained = _invoke(["train", "--model", model, "--data", str(data), *TRAIN, "--output-dir",
                           str(tmp_path / case.output_dir), *case.train_flags, *flags], env)
    named = case.names.format(data=data.name) if case.names else None
    if case.error and case.inspect == "error":
        _stopped(inspected, case, named, "inspect")
    else:
        _check_inspection(inspected, case)
    if case.error:
        _stopped(trained, case, named, "train")
        return
    assert trained.exit_code == 0, trained.output[-3000:]
    (run,) = (tmp_path / case.output_dir).iterdir()
    counts = json.loads((run / "manifest.json").read_text())["data_report"]
    assert counts["train_examples"] + counts["eval_examples"] == case.trains, counts
    if case.seen or case.never:
        text = _trained_text(data, flags, tokenizer)
        for piece in case.seen:
            assert piece in text, (piece, text)
        for piece in case.never:
            assert piece not in text, (piece, text)


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 60
