"""Conversations that real chat templates refuse (a system turn, turns that do not alternate, an opening
assistant turn) are reshaped and reported, or named as a row's problem: never a Jinja traceback."""

from __future__ import annotations

import json

import pytest

from tests.export.test_ollama import FAMILIES, _tokenizer
from tunery.data.dataset import load_file
from tunery.data.inspect import inspect_file
from tunery.data.templates import fit_messages, template_fit
from tunery.data.tokenize import IGNORE

pytestmark = pytest.mark.usefixtures("tunery_home")

CONVERSATION = {"conversations": [
    {"from": "gpt", "value": "Hello! How can I help?"},
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "Name a colour."},
    {"from": "human", "value": "Just one."},
    {"from": "gpt", "value": "Blue."}]}
WITH_SYSTEM_FIRST = {"conversations": [{"from": "system", "value": "Answer briefly."},
                                       {"from": "human", "value": "Name a colour."},
                                       {"from": "gpt", "value": "Blue."}]}


def _file(tmp_path, rows):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_what_each_template_accepts_is_probed():
    gemma2, llama3 = template_fit(_tokenizer(FAMILIES["gemma2"])), template_fit(_tokenizer(FAMILIES["llama3"]))
    assert not gemma2.system and llama3.system and llama3.alternation_free


def test_gemma2_gets_the_system_text_in_the_first_user_turn_and_says_so(tmp_path):
    tok = _tokenizer(FAMILIES["gemma2"])
    messages, notes = fit_messages(tok, [{"role": "system", "content": "Answer briefly."},
                                         {"role": "user", "content": "Name a colour."},
                                         {"role": "assistant", "content": "Blue."}])
    assert messages[0] == {"role": "user", "content": "Answer briefly.\n\nName a colour."}
    assert notes == ["system turn merged into the next user turn (the template has no system role)"]
    data = load_file(_file(tmp_path, [WITH_SYSTEM_FIRST] * 3), tok, 256)
    assert data.reasons == [None] * 3 and data.notes == {notes[0]: 3}
    trained = tok.decode([t for t in data.tokens[0].labels if t != IGNORE])
    assert trained == "Blue.<end_of_turn>\n"  # the reply and its end-of-turn token, nothing else


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_template_takes_the_same_awkward_file_without_a_traceback(tmp_path, name):
    tok = _tokenizer(FAMILIES[name])
    insp = inspect_file(_file(tmp_path, [CONVERSATION, WITH_SYSTEM_FIRST]), tok, 256)
    assert insp.problems == [], insp.problems
    # every row either trains or is named with the reason the template gave
    assert all("chat template refused it" in r or "system" in r or "user" in r for r in insp.rejected), insp.rejected
    kept = insp.rows - sum(len(v) for v in insp.rejected.values())
    assert kept >= 1 and insp.preview
    assert any("Blue." in piece for piece, trained in insp.preview if trained)


@pytest.mark.parametrize("name", sorted(n for n, f in FAMILIES.items() if f.bos))
def test_no_template_gets_a_doubled_bos(name):
    from tunery.data.tokenize import tokenize_example

    tok = _tokenizer(FAMILIES[name])
    tokens = tokenize_example(tok, {"messages": [{"role": "user", "content": "Name a colour."},
                                                 {"role": "assistant", "content": "Blue."}]}, 256)
    bos = tok.convert_tokens_to_ids(FAMILIES[name].bos)
    assert tokens.input_ids.count(bos) == 1 and tokens.input_ids[0] == bos
