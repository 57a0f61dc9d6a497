"""`inspect_file` on files the tests write: counts, problems that stop training, and the preview."""

from __future__ import annotations

import json

import pytest

from tunery.data.inspect import histogram, inspect_file

pytestmark = pytest.mark.usefixtures("tunery_home")


def _chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def _write(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [_chat("What is the capital of France?", "Paris is the capital of France."),
        _chat("Name a colour.", "Blue."),
        _chat("Name a colour.", "Blue."),  # duplicate of row 2
        _chat("Name a colour.", "Green, like grass."),
        _chat("Another one?", "")]  # rejected: empty reply


def test_counts_rows_rejections_and_duplicates(tmp_path, tiny_tokenizer):
    insp = inspect_file(_write(tmp_path / "d.jsonl", ROWS), tiny_tokenizer, max_seq_len=256, eval_split=0)
    assert (insp.format, insp.rows, insp.duplicates) == ("openai", 5, 1)
    assert insp.rejected == {"empty assistant message": [5]}
    assert insp.too_long == 0 and insp.no_trainable == 0
    assert len(insp.lengths) == 4 and insp.length_unit == "tokens"
    assert insp.problems == []
    assert any("1 exact duplicate" in w for w in insp.warnings)
    assert any("1 rows rejected" in w for w in insp.warnings)


def test_rows_longer_than_max_seq_len_are_counted(tmp_path, tiny_tokenizer):
    short = _chat("Name a colour.", "Blue.")
    long = _chat("Name a colour.", "Green, like grass. " * 20)
    insp = inspect_file(_write(tmp_path / "d.jsonl", [short, long, long | {"id": 1}]), tiny_tokenizer,
                        max_seq_len=32, eval_split=0)
    assert insp.too_long == 2
    assert insp.no_trainable == 0  # the long replies start inside the window
    assert any("2 rows longer than max_seq_len" in w for w in insp.warnings)
    assert insp.problems == ["2 of 3 rows are cut by max_seq_len: training refuses this unless --allow-data-issues; "
                             "raise --max-seq-len"]  # training's gate, said before training


def test_overlap_with_eval_file_is_counted(tmp_path, tiny_tokenizer):
    train = _write(tmp_path / "train.jsonl", ROWS[:4])
    held = _write(tmp_path / "held.jsonl", [ROWS[0], ROWS[3], _chat("Another one?", "Red.")])
    insp = inspect_file(train, tiny_tokenizer, eval_data=held)
    assert insp.overlap == 2 and insp.overlap_against == held
    assert any("2 eval rows also appear" in w for w in insp.warnings)
    clean = inspect_file(train, tiny_tokenizer, eval_data=_write(tmp_path / "clean.jsonl", [ROWS[4], _chat("x?", "y")]))
    assert clean.overlap == 0


def test_every_row_rejected_is_a_problem(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    insp = inspect_file(_write(tmp_path / "d.jsonl", rows), tiny_tokenizer)
    assert insp.rejected == {"no assistant message to learn from": [1, 2, 3]}
    assert insp.problems and "all 3 were rejected" in insp.problems[0]
    assert insp.preview == []


def test_answers_cut_by_max_seq_len_are_a_problem(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "d.jsonl", ROWS[:4])
    insp = inspect_file(path, tiny_tokenizer, max_seq_len=6)
    assert insp.no_trainable == 4 and insp.too_long == 4
    assert insp.problems and "max-seq-len" in insp.problems[0]
    assert inspect_file(path, tiny_tokenizer, max_seq_len=256, eval_split=0).problems == []


def test_preview_marks_trained_pieces(tmp_path, tiny_tokenizer):
    insp = inspect_file(_write(tmp_path / "d.jsonl", ROWS[:2]), tiny_tokenizer)
    trained = [text for text, on in insp.preview if on]
    untrained = "".join(text for text, on in insp.preview if not on)
    assert trained == ["Paris is the capital of France.<|im_end|>\n"]
    assert untrained == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert [on for _, on in insp.preview] == [False, True]
    assert insp.to_dict()["preview"] == [{"text": t, "trained": on} for t, on in insp.preview]  # in --json too


def test_several_rows_are_previewed_by_row_number(tmp_path, tiny_tokenizer):
    insp = inspect_file(_write(tmp_path / "d.jsonl", ROWS), tiny_tokenizer, preview_rows=3)
    assert [row for row, _ in insp.previews] == [1, 2, 3]
    assert insp.previews[0][1] == insp.preview
    assert [t for t, on in insp.previews[1][1] if on] == ["Blue.<|im_end|>\n"]
    assert insp.to_dict()["previews"][2]["row"] == 3


def test_the_printed_preview_marks_trained_tokens_without_colour(tmp_path, tiny_tokenizer, capsys):
    from tunery.cli.data import _show

    _show(inspect_file(_write(tmp_path / "d.jsonl", ROWS[:2]), tiny_tokenizer))
    out = capsys.readouterr().out
    assert "assistant\n⟦Paris is the capital of France.<|im_end|>\n⟧" in out and "\x1b[" not in out


def test_without_tokenizer_lengths_are_characters(tmp_path):
    insp = inspect_file(_write(tmp_path / "d.jsonl", ROWS), None, eval_split=0)
    assert insp.length_unit == "characters" and len(insp.lengths) == 4
    assert insp.duplicates == 1 and insp.preview == [] and insp.problems == []


def test_histogram_buckets_cover_every_length():
    lengths = [1, 2, 2, 9, 17]
    buckets = histogram(lengths, bins=4)
    assert sum(c for _, _, c in buckets) == len(lengths)
    assert buckets[0][0] == 1 and buckets[-1][1] >= 17
    assert histogram([]) == []
