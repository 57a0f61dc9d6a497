"""A file whose layout changes part way (as concatenated exports do) is read row by row in each row's own
layout, and says so; a row in no layout is rejected with what it lacks, not a misleading reason."""

from __future__ import annotations

import json

import pytest

from tunery.data.dataset import load_file
from tunery.data.formats import detect_format, layouts, normalise
from tunery.data.load import load_rows

pytestmark = pytest.mark.usefixtures("tunery_home")

ALPACA = [{"instruction": f"Spell {w}.", "output": " ".join(w)} for w in ("cat", "dog", "owl")]
SHAREGPT = [{"conversations": [{"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": w}]}
            for w in ("red", "tan")]
NEITHER = {"question": "What?", "answer": "That."}


def test_each_row_is_read_in_its_own_layout(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*ALPACA, *SHAREGPT, NEITHER]))
    rows = load_rows(path)
    assert layouts(rows) == {"alpaca": 3, "sharegpt": 2, "unknown": 1}
    examples, reasons = normalise(rows, detect_format(rows))
    assert [e["messages"][-1]["content"] for e in examples[:5]] == ["c a t", "d o g", "o w l", "red", "tan"]
    assert reasons[:5] == [None] * 5 and examples[5] is None and "answer, question are no known" in reasons[5]


def test_the_file_report_says_the_layouts_are_mixed(tmp_path, tiny_tokenizer):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*SHAREGPT, *ALPACA]))
    data = load_file(str(path), tiny_tokenizer, 128)
    assert data.reasons == [None] * 5
    assert data.notes == {"in the alpaca layout, not the file's sharegpt: read in their own layout": 3}
