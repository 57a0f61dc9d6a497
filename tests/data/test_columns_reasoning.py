"""Any column names by mapping, and reasoning traces rendered as each chat template expects them, trained as
part of the answer (and only the answer)."""

from __future__ import annotations

import csv

import pytest

from tests.export.test_ollama import FAMILIES, _tokenizer
from tunery.config import ConfigError, RunConfig
from tunery.data.formats import detect_format, normalise
from tunery.data.load import load_rows
from tunery.data.tokenize import IGNORE, tokenize_example
from tunery.errors import DataError

MAPPING = ["prompt=Question", "completion=Response", "reasoning=Complex_CoT"]
ROW = {"Question": "A 45-year-old has chest pain. Next step?", "Complex_CoT": "Rule out ACS first: get an ECG.",
       "Response": "Obtain a 12-lead ECG.", "Source": "medical-o1"}


def _medical_csv(path):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ROW))
        writer.writeheader()
        writer.writerow(ROW)
    return path


def _example(tmp_path):
    rows = load_rows(_medical_csv(tmp_path / "medical.csv"), columns=MAPPING)
    assert rows == [{"Source": "medical-o1", "prompt": ROW["Question"], "completion": ROW["Response"],
                     "reasoning": ROW["Complex_CoT"]}]
    examples, reasons = normalise(rows, detect_format(rows))
    assert reasons == [None]
    return examples[0]


def _trained_text(tokenizer, example) -> str:
    tokens = tokenize_example(tokenizer, example, 512)
    return tokenizer.decode([t for t in tokens.labels if t != IGNORE])


def test_a_reasoning_trace_without_a_template_field_is_a_think_block_in_the_answer(tmp_path, tiny_tokenizer):
    trained = _trained_text(tiny_tokenizer, _example(tmp_path))
    assert trained == f"<think>\n{ROW['Complex_CoT']}\n</think>\n\n{ROW['Response']}<|im_end|>\n"


# Qwen3's own template reads a message's reasoning_content field before looking for <think> in its content
_FIELD_BRANCH = """{%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}"""


@pytest.mark.parametrize("reads_field", [True, False])
def test_qwen3_trains_the_trace_whether_it_reads_the_field_or_parses_think(tmp_path, reads_field):
    tok = _tokenizer(FAMILIES["qwen3"])
    if reads_field:
        tok.chat_template = tok.chat_template.replace("{%- if '</think>' in content %}", _FIELD_BRANCH, 1)
        assert "message.reasoning_content" in tok.chat_template
    trained = _trained_text(tok, _example(tmp_path))
    assert trained == f"<think>\n{ROW['Complex_CoT']}\n</think>\n\n{ROW['Response']}<|im_end|>\n"


def test_column_mapping_errors_name_what_is_wrong(tmp_path):
    path = _medical_csv(tmp_path / "medical.csv")
    with pytest.raises(DataError, match=r"columns 'Answer' .* not in the file; its columns: Complex_CoT, Question"):
        load_rows(path, columns=["prompt=Question", "completion=Answer"])
    with pytest.raises(ConfigError, match="columns entries are FIELD=COLUMN"):
        RunConfig.from_dict({"columns": ["question=Question"]})
    assert RunConfig.from_dict({"columns": {"prompt": "Question", "completion": "Response"}}).columns == [
        "prompt=Question", "completion=Response"]  # YAML's mapping spelling
