"""`tunery data inspect` on data as users have it: row numbers of duplicates, near-duplicates, prompts with
different answers, overlap with the eval rows up to case and whitespace, label balance, the eval file's stats."""

from __future__ import annotations

import csv
import json

import pytest

from tunery.data.dataset import split_indices
from tunery.data.inspect import groups_text, inspect_file, normalise_text, rows_text
from tunery.data.tokenize import tokenize_example

pytestmark = pytest.mark.usefixtures("tunery_home")


def _chat(user: str, reply: str, system: str | None = None) -> dict:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


def _jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _csv(path, rows: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "completion"])
        writer.writerows(rows)
    return str(path)


@pytest.fixture(params=["characters", "tokens"])
def tokenizer(request):
    """Each report is the same without a tokenizer (lengths in characters) and with one (in tokens)."""
    return request.getfixturevalue("tiny_tokenizer") if request.param == "tokens" else None


def test_normalised_text_ignores_case_whitespace_and_punctuation_at_the_ends():
    assert normalise_text("What is 2+2?") == normalise_text("what is 2+2 ?  ") == "what is 2+2"
    assert normalise_text("  Hello,\n\n  WORLD!!") == "hello, world"  # inside: one space, the comma stays
    assert normalise_text("¿Qué es?") == "qué es" and normalise_text("「答案」。") == "答案"
    assert [normalise_text(t) for t in ("-5", "50%", "$5", "#1")] == ["-5", "50%", "$5", "#1"]  # signs stay
    assert normalise_text("(Yes.)") == "yes" and normalise_text("...") == ""


def test_row_numbers_are_capped_for_a_person():
    assert rows_text([3, 17]) == "3, 17"
    assert rows_text([3, 17, 20, 21, 22, 23, 24]) == "3, 17, 20, 21, 22 and 2 more"
    groups = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    assert groups_text(groups) == "rows 1, 2; rows 3, 4; rows 5, 6 and 2 more groups"
    assert groups_text(groups[:4]) == "rows 1, 2; rows 3, 4; rows 5, 6 and 1 more group"


def test_exact_duplicates_are_listed_by_row(tmp_path, tokenizer):
    a, b = _chat("Name a colour.", "Blue."), _chat("What is the capital of France?", "Paris.")
    rows = [a, b, a, _chat("Another one?", "Green."), b, a, _chat("Another one?", "")]
    insp = inspect_file(_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
    assert insp.duplicate_rows == [[1, 3, 6], [2, 5]] and insp.duplicates == 3
    assert insp.rejected == {"empty assistant message": [7]}  # a rejected row is no one's duplicate
    assert "3 exact duplicate rows: rows 1, 3, 6; rows 2, 5" in insp.warnings
    assert insp.near_duplicates == 0 and insp.conflicts == 0


def test_near_duplicates_are_counted_apart_from_exact_ones(tmp_path, tokenizer):
    rows = [_chat("What is 2+2?", "4"), _chat("what is 2+2 ?  ", "4"), _chat("WHAT IS 2+2", "4."),
            _chat("What is 2+2?", "4"),  # an exact copy of row 1: a duplicate, not a near-duplicate
            _chat("What is 3+3?", "6"), _chat("Name a colour.", "Blue."), _chat("name a  colour", "blue")]
    insp = inspect_file(_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
    assert insp.duplicate_rows == [[1, 4]] and insp.duplicates == 1
    assert insp.near_duplicate_rows == [[1, 2, 3], [6, 7]] and insp.near_duplicates == 3
    assert ("3 near-duplicate rows (equal up to case, whitespace and punctuation at the ends): rows 1, 2, 3; "
            "rows 6, 7") in insp.warnings


def test_near_duplicates_in_a_csv_file(tmp_path, tokenizer):
    path = _csv(tmp_path / "d.csv", [("Name a colour.", "Blue."), ("Name a colour", "Blue"),
                                     ("Another one?", "Green."), (" another ONE? ", "green.")])
    insp = inspect_file(path, tokenizer)
    assert insp.format == "prompt_completion"
    assert insp.near_duplicate_rows == [[1, 2], [3, 4]] and insp.near_duplicates == 2 and insp.duplicates == 0


def test_prompts_with_different_answers_are_conflicts(tmp_path, tokenizer):
    rows = [_chat("What is 2+2?", "4"),
            _chat("Name a colour.", "Blue."),
            _chat("what is 2+2", "5"),  # the same prompt once normalised, another answer
            _chat("What is 2+2?", "4."),  # the first answer again, spelled differently
            _chat("Name a colour.", "blue"),  # the same answer up to case and punctuation: no conflict
            _chat("What is 2+2?", "5", system="You are terse."),  # another conversation: a system prompt
            _chat("Capital of France?", "Paris"), _chat("Capital of France?", "Lyon"),
            {"text": "What is 2+2?"}]  # raw text has no prompt
    insp = inspect_file(_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
    assert insp.conflicting_rows == [[1, 3, 4], [7, 8]] and insp.conflicts == 2
    assert "2 prompts have different answers in different rows: rows 1, 3, 4; rows 7, 8" in insp.warnings


def test_a_multi_turn_prompt_is_the_whole_conversation_before_the_last_answer(tmp_path):
    def turns(first_reply: str, last_reply: str) -> dict:
        return {"messages": [{"role": "user", "content": "Name a colour."},
                             {"role": "assistant", "content": first_reply},
                             {"role": "user", "content": "Another one?"},
                             {"role": "assistant", "content": last_reply}]}

    rows = [turns("Blue.", "Green."), turns("Red.", "Green."), turns("Blue.", "Yellow."), turns("Red.", "Red.")]
    insp = inspect_file(_jsonl(tmp_path / "d.jsonl", rows), None)
    assert insp.conflicting_rows == [[1, 3], [2, 4]]


def test_overlap_with_the_eval_file_is_up_to_case_and_whitespace(tmp_path, tokenizer):
    train = _jsonl(tmp_path / "train.jsonl", [_chat("Name a colour.", "Blue."),
                                              _chat("What is the capital of France?", "Paris is the capital.")])
    held = _jsonl(tmp_path / "held.jsonl", [_chat("Another one?", "Green."),
                                            _chat("Name a colour.", "Blue."),  # exact
                                            _chat("  what is the CAPITAL of France?", "paris is the capital"),
                                            _chat("Name a colour.", "")])  # rejected
    insp = inspect_file(train, tokenizer, eval_data=held)
    assert (insp.overlap, insp.overlap_exact, insp.overlap_rows) == (2, 1, [2, 3])
    assert insp.overlap_against == held
    assert (f"2 eval rows also appear in training data up to case, whitespace and punctuation at the ends (1 exactly; "
            f"rows 2, 3 of {held}): held-out scores will be optimistic") in insp.warnings


def test_overlap_within_the_seeded_split_names_rows_of_the_file(tmp_path):
    rows = [_chat("Name a colour." + " " * i, "Blue.") for i in range(10)]  # equal once whitespace is ignored
    insp = inspect_file(_jsonl(tmp_path / "d.jsonl", rows), None, eval_split=0.2, seed=7)
    _, eval_pos = split_indices(10, 0.2, 7)
    assert insp.overlap_rows == [p + 1 for p in eval_pos] and insp.overlap == 2 and insp.overlap_exact == 0
    assert insp.near_duplicates == 9 and insp.duplicates == 0
    rows_shown = ", ".join(str(p + 1) for p in eval_pos)
    assert any(f"(0 exactly; rows {rows_shown} of this file, in the seeded 20% eval split)" in w for w in insp.warnings)


def test_labels_are_counted_and_a_dominant_label_is_a_warning(tmp_path, tokenizer):
    free_text = "It is hard to say, honestly: a bit of both, really."  # over 40 characters: not a label
    answers = ["positive"] * 17 + ["Negative", "negative.", " NEGATIVE"] + [free_text]
    path = _csv(tmp_path / "d.csv", [(f"Review {i}: is it good?", a) for i, a in enumerate(answers)])
    insp = inspect_file(path, tokenizer)
    assert insp.labels == {"positive": 17, "Negative": 3} and insp.labels_other == 1
    assert ("17 of 21 rows (81%) answer 'positive': the model may learn to always answer 'positive'"
            in insp.warnings)
    assert insp.conflicts == 0


def test_balanced_labels_are_counted_without_a_warning(tmp_path):
    answers = ["positive"] * 8 + ["negative"] * 4 + ["neutral"] * 2
    insp = inspect_file(_csv(tmp_path / "d.csv", [(f"Review {i}", a) for i, a in enumerate(answers)]), None)
    assert insp.labels == {"positive": 8, "negative": 4, "neutral": 2} and insp.labels_other == 0
    assert not any("always answer" in w for w in insp.warnings)


@pytest.mark.parametrize("answers", [
    [f"1985-06-{d:02d}" for d in range(1, 13)],  # short but all different: not classes
    ["yes"] * 9,  # too few rows to speak of a distribution
    [f"A long free-form answer, the same every time, to question {i % 2}." for i in range(12)],  # not short
], ids=["distinct", "few-rows", "long"])
def test_answers_that_are_not_classes_have_no_labels(tmp_path, answers):
    insp = inspect_file(_csv(tmp_path / "d.csv", [(f"Question {i}", a) for i, a in enumerate(answers)]), None)
    assert insp.labels == {} and insp.labels_other == 0
    assert not any("always answer" in w for w in insp.warnings)


def test_eval_file_rows_rejections_and_lengths_in_characters(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [_chat("Name a colour.", "Blue.")])
    held_rows = [_chat("Another one?", "Green."), {"messages": [{"role": "user", "content": "x"}]},
                 _chat("What is the capital of France?", "Paris.")]
    insp = inspect_file(train, None, eval_data=_jsonl(tmp_path / "held.jsonl", held_rows))
    assert insp.eval_rows == 3 and insp.eval_rejected == {"no assistant message to learn from": [2]}
    assert insp.eval_lengths == [len(json.dumps(held_rows[i], sort_keys=True)) for i in (0, 2)]
    assert insp.eval_too_long_rows == [] and insp.length_unit == "characters"
    assert "1 rows of the eval file rejected and skipped in evaluation" in insp.warnings
    assert insp.problems == []  # a bad eval row warns; it does not stop training


def test_eval_file_lengths_in_tokens(tmp_path, tiny_tokenizer):
    train = _jsonl(tmp_path / "train.jsonl", [_chat("Name a colour.", "Blue.")])
    held_rows = [_chat("Another one?", "Green."), _chat("Name a colour.", "Green, like grass. " * 20), _chat("", "x")]
    insp = inspect_file(train, tiny_tokenizer, max_seq_len=32, eval_data=_jsonl(tmp_path / "held.jsonl", held_rows))
    short = tokenize_example(tiny_tokenizer, held_rows[0], 32)
    assert insp.eval_rows == 3 and insp.eval_rejected == {"empty user message": [3]}
    assert insp.eval_lengths == [len(short.input_ids), 33]  # a cut row counts as max_seq_len + 1
    assert insp.eval_too_long_rows == [2] and insp.length_unit == "tokens"


def test_without_eval_file_its_fields_are_empty(tmp_path):
    insp = inspect_file(_jsonl(tmp_path / "d.jsonl", [_chat("Name a colour.", "Blue.")]), None)
    assert (insp.eval_rows, insp.eval_rejected, insp.eval_lengths, insp.eval_too_long_rows) == (0, {}, [], [])


REPORT_TRAIN = [_chat("What is 2+2?", "4"), _chat("What is 2+2?", "4"), _chat("what is 2+2 ?  ", "4"),
                _chat("What is 2+2?", "5")] + [_chat(f"Is review {i} good?", "[yes]") for i in range(12)]
REPORT_HELD = [_chat("WHAT is 2+2?", "4"), _chat("Another one?", "")]


def _invoke(tmp_path, *extra: str):
    from typer.testing import CliRunner

    from tunery import progress
    from tunery.cli.app import app

    train, held = _jsonl(tmp_path / "train.jsonl", REPORT_TRAIN), _jsonl(tmp_path / "held.jsonl", REPORT_HELD)
    width = progress.report._width
    progress.report._width = 250  # whatever runs the test: a pytest worker has no terminal, and rich draws 80
    try:
        return CliRunner().invoke(app, ["data", "inspect", train, "--eval-data", held, *extra],
                                  env={"COLUMNS": "250", "NO_COLOR": "1"})
    finally:
        progress.report._width = width


def test_the_printed_report_shows_rows_conflicts_labels_and_the_eval_file(tmp_path):
    result = _invoke(tmp_path)
    out = result.stdout
    assert result.exit_code == 0, out
    assert "\x1b[" not in out
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines()
             if line.count("│") == 3}
    assert lines["exact duplicates"] == "1 (rows 1, 2)"
    assert lines["near duplicates (case, spaces, end punctuation)"] == "1 (rows 1, 3)"
    assert lines["prompts with different answers"] == "1 (rows 1, 2, 3, 4)"
    assert lines["train/eval overlap"].startswith("1 up to case, spaces, end punctuation (0 exact; ")
    assert lines["labels (last answers)"] == "'[yes]': 12, '4': 3, '5': 1"  # "[yes]" is text, not markup
    assert lines["eval rows"] == "2" and lines["eval rejected"] == "empty assistant message: rows 2"
    assert "eval file length in characters (min" in out
    assert "warning: 1 prompts have different answers in different rows: rows 1, 2, 3, 4" in out
    assert "always answer" not in out  # 12 of 16 rows: under the 80% line
    assert "warning: 1 rows of the eval file rejected and skipped in evaluation" in out


def test_the_json_report_has_every_new_field(tmp_path):
    result = _invoke(tmp_path, "--json")
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["duplicate_rows"] == [[1, 2]] and report["near_duplicate_rows"] == [[1, 3]]
    assert report["conflicting_rows"] == [[1, 2, 3, 4]] and report["conflicts"] == 1
    assert (report["overlap"], report["overlap_exact"], report["overlap_rows"]) == (1, 0, [1])
    assert report["labels"] == {"[yes]": 12, "4": 3, "5": 1} and report["labels_other"] == 0
    assert report["eval_rows"] == 2 and report["eval_rejected"] == {"empty assistant message": [2]}
    assert len(report["eval_lengths"]) == 1 and report["eval_too_long_rows"] == []
