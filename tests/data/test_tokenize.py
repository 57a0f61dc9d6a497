"""Label masks, truncation, the default chat template, and prepare_data's split and token cache."""

from __future__ import annotations

import copy
import json

import pytest

import tunery.data.dataset as dataset_module
from tunery.config import RunConfig
from tunery.data.dataset import prepare_data
from tunery.data.templates import DEFAULT_TEMPLATE, ensure_chat_template, render
from tunery.data.tokenize import IGNORE, assistant_spans, tokenize_example, tokenize_examples
from tunery.errors import DataError

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, like grass."},
]


def labelled_runs(tokenizer, tokens) -> list[str]:
    """Decoded text of each maximal run of consecutive labelled tokens."""
    runs: list[list[int]] = []
    previous = IGNORE
    for tok, lab in zip(tokens.input_ids, tokens.labels, strict=True):
        if lab != IGNORE:
            if previous == IGNORE:
                runs.append([])
            runs[-1].append(tok)
        previous = lab
    return [tokenizer.decode(run) for run in runs]


def test_a_batch_is_tokenized_as_each_example_alone_with_refusals_in_their_places(tiny_tokenizer):
    """tokenize_examples encodes many texts in one tokenizer call: each result is the example's own (text and
    chat rows, one cut by max_seq_len), and a conversation the template refuses gets its error in its place."""
    from jinja2.exceptions import TemplateError

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['content'] == 'refuse me' %}{{ raise_exception('no') }}"
                         "{% endif %}{% endfor %}" + tiny_tokenizer.chat_template)
    refused = [{"role": "user", "content": "refuse me"}, {"role": "assistant", "content": "ok"}]
    examples = [{"messages": CONVERSATION}, {"text": "a plain line of text"}, {"messages": refused},
                {"text": "word " * 200}, {"messages": CONVERSATION[1:3]}]
    got = tokenize_examples(tok, examples, max_seq_len=64)
    assert isinstance(got[2], TemplateError)
    with pytest.raises(TemplateError):
        tokenize_example(tok, examples[2], max_seq_len=64)
    for i in (0, 1, 3, 4):
        alone = tokenize_example(tok, examples[i], max_seq_len=64)
        assert (got[i].input_ids, got[i].labels, got[i].truncated) == (alone.input_ids, alone.labels, alone.truncated)
    assert got[3].truncated and len(got[3].input_ids) == 64 and not got[1].truncated
    assert got[0].input_ids != got[4].input_ids and IGNORE in got[0].labels


def test_labels_by_bisection_equal_the_token_by_token_rule():
    """A token is trained where it starts inside an assistant span; spans are found as slices by bisection over
    the token starts (in order for every fast tokenizer), token by token where the starts are not in order."""
    import random

    from tunery.data.tokenize import _labels

    rng = random.Random(0)
    for case in range(300):
        n = rng.randint(0, 40)
        widths = [rng.randint(0, 4) for _ in range(n)]  # zero-width tokens too
        starts = [sum(widths[:i]) for i in range(n)]
        if case % 5 == 0 and n > 2:  # out of order: the fallback
            starts[1], starts[2] = starts[2] + 1, starts[1]
        offsets = [(s, s + w) for s, w in zip(starts, widths)]
        end = (starts[-1] + 5) if n else 5
        cuts = sorted(rng.sample(range(end + 2), 4))
        spans = [(cuts[0], cuts[1]), (cuts[2], cuts[3])]
        ids = [100 + i for i in range(n)]
        want = [t if any(a <= st < b for a, b in spans) else IGNORE for t, (st, _) in zip(ids, offsets)]
        assert _labels(ids, offsets, spans) == want, (offsets, spans)


def test_only_assistant_replies_and_their_end_of_turn_are_labelled(tiny_tokenizer):
    tokens = tokenize_example(tiny_tokenizer, {"messages": CONVERSATION}, max_seq_len=1024)
    assert tiny_tokenizer.decode(tokens.input_ids) == render(tiny_tokenizer, CONVERSATION)
    assert labelled_runs(tiny_tokenizer, tokens) == ["Blue.<|im_end|>\n", "Green, like grass.<|im_end|>\n"]
    assert all(lab in (IGNORE, tok) for tok, lab in zip(tokens.input_ids, tokens.labels, strict=True))
    assert not tokens.truncated


def test_non_ascii_reply_is_masked_on_character_boundaries(tiny_tokenizer):
    messages = [{"role": "user", "content": "Sag hallo auf 日本語"},
                {"role": "assistant", "content": "Grüße 🌿 — café"}]
    tokens = tokenize_example(tiny_tokenizer, {"messages": messages}, max_seq_len=1024)
    assert labelled_runs(tiny_tokenizer, tokens) == ["Grüße 🌿 — café<|im_end|>\n"]


def test_train_on_all_labels_every_token(tiny_tokenizer):
    tokens = tokenize_example(tiny_tokenizer, {"messages": CONVERSATION}, max_seq_len=1024, train_on="all")
    assert tokens.labels == tokens.input_ids
    assert tiny_tokenizer.decode(tokens.input_ids).startswith("<|im_start|>system\nYou are terse.")


def test_truncation_keeps_a_prefix_and_is_flagged(tiny_tokenizer):
    full = tokenize_example(tiny_tokenizer, {"messages": CONVERSATION}, max_seq_len=1024)
    n = len(full.input_ids)
    cut = tokenize_example(tiny_tokenizer, {"messages": CONVERSATION}, max_seq_len=n - 5)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[: n - 5] and cut.labels == full.labels[: n - 5]
    exact = tokenize_example(tiny_tokenizer, {"messages": CONVERSATION}, max_seq_len=n)
    assert not exact.truncated and exact.input_ids == full.input_ids


def test_raw_text_gets_eos_and_is_labelled_everywhere(tiny_tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    tokens = tokenize_example(tiny_tokenizer, {"text": text}, max_seq_len=1024)
    assert tokens.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(tokens.input_ids) == text + tiny_tokenizer.eos_token
    assert tokens.labels == tokens.input_ids


@pytest.fixture
def untemplated_tokenizer(tiny_tokenizer):
    """The tiny tokenizer as a base model would ship it: no chat template, an eos other than <|im_end|>."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    tok.eos_token = "<|endoftext|>"
    return tok


def test_default_template_is_added_once_to_a_tokenizer_without_one(untemplated_tokenizer, tiny_tokenizer):
    assert ensure_chat_template(untemplated_tokenizer) is True
    assert untemplated_tokenizer.chat_template == DEFAULT_TEMPLATE
    assert ensure_chat_template(untemplated_tokenizer) is False
    own = tiny_tokenizer.chat_template
    assert ensure_chat_template(copy.deepcopy(tiny_tokenizer)) is False
    assert tiny_tokenizer.chat_template == own != DEFAULT_TEMPLATE


def test_default_template_renders_prefix_consistently(untemplated_tokenizer):
    ensure_chat_template(untemplated_tokenizer)
    full = render(untemplated_tokenizer, CONVERSATION)
    for i in range(1, len(CONVERSATION)):
        head = render(untemplated_tokenizer, CONVERSATION[:i])
        prompt = render(untemplated_tokenizer, CONVERSATION[:i], add_generation_prompt=True)
        assert full.startswith(head) and prompt.startswith(head)
        if CONVERSATION[i]["role"] == "assistant":
            assert full.startswith(prompt)
    # eos closes each assistant turn (and only those) because this eos is not <|im_end|>
    assert full.count("<|im_end|><|endoftext|>\n") == 2
    _, spans = assistant_spans(untemplated_tokenizer, CONVERSATION)
    assert [full[s:e] for s, e in spans] == ["Blue.<|im_end|><|endoftext|>\n",
                                             "Green, like grass.<|im_end|><|endoftext|>\n"]


def test_default_template_labels_include_the_eos(untemplated_tokenizer):
    ensure_chat_template(untemplated_tokenizer)
    tokens = tokenize_example(untemplated_tokenizer, {"messages": CONVERSATION}, max_seq_len=1024)
    assert labelled_runs(untemplated_tokenizer, tokens) == ["Blue.<|im_end|><|endoftext|>\n",
                                                            "Green, like grass.<|im_end|><|endoftext|>\n"]


def test_a_template_that_is_not_prefix_consistent_has_its_replies_located_by_their_text(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    # numbers each turn from the end, so a prefix renders differently from the whole conversation
    tok.chat_template = ("{% for m in messages %}{{ (messages|length - loop.index)|string + m['content'] + "
                         "'<|im_end|>' }}{% endfor %}")
    tokens = tokenize_example(tok, {"messages": CONVERSATION}, max_seq_len=1024)
    assert labelled_runs(tok, tokens) == ["Blue.<|im_end|>", "Green, like grass.<|im_end|>"]


def test_a_template_that_rewrites_a_reply_is_a_row_error(tiny_tokenizer):
    from tunery.data.formats import RowError

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ (messages|length - loop.index)|string + m['content']|upper }}"
                         "{% endfor %}")
    with pytest.raises(RowError, match="--train-on all"):
        tokenize_example(tok, {"messages": CONVERSATION}, max_seq_len=1024)


# ---------------------------------------------------------------- prepare_data


def _write_chat(path, n: int, reply=lambda i: f"Answer number {i}.") -> None:
    rows = [{"messages": [{"role": "user", "content": f"Question number {i}?"},
                          {"role": "assistant", "content": reply(i)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _config(path, **kw) -> RunConfig:
    return RunConfig(model="tiny", data=str(path), **{"eval_split": 0.2, "seed": 1, **kw})


def _replies(tokenizer, seqs) -> set[str]:
    return {tokenizer.decode([t for t, lab in zip(s.input_ids, s.labels, strict=True) if lab != IGNORE]) for s in seqs}


def test_split_is_seeded_disjoint_and_sized(tmp_path, tunery_home, tiny_tokenizer):
    data = tmp_path / "chat.jsonl"
    _write_chat(data, 10)
    first = prepare_data(_config(data), tiny_tokenizer)
    again = prepare_data(_config(data), tiny_tokenizer)
    other = prepare_data(_config(data, seed=2), tiny_tokenizer)

    assert (len(first.train), len(first.eval), len(first.eval_examples)) == (8, 2, 2)
    train, held = _replies(tiny_tokenizer, first.train), _replies(tiny_tokenizer, first.eval)
    assert not train & held
    assert train | held == {f"Answer number {i}.<|im_end|>\n" for i in range(10)}
    assert again.train == first.train and again.eval == first.eval
    assert _replies(tiny_tokenizer, other.eval) != held
    # eval_examples line up with the eval token sequences
    assert {e["messages"][1]["content"] + "<|im_end|>\n" for e in first.eval_examples} == held
    assert first.report()["train_examples"] == 8


def test_separate_eval_file_is_used_whole(tmp_path, tunery_home, tiny_tokenizer):
    data, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    _write_chat(data, 6)
    _write_chat(held, 3, reply=lambda i: f"Held answer {i}.")
    prepared = prepare_data(_config(data, eval_data=str(held)), tiny_tokenizer)
    assert len(prepared.train) == 6
    assert _replies(tiny_tokenizer, prepared.eval) == {f"Held answer {i}.<|im_end|>\n" for i in range(3)}


def test_rejected_rows_are_dropped_and_counted(tmp_path, tunery_home, tiny_tokenizer):
    data = tmp_path / "chat.jsonl"
    _write_chat(data, 5, reply=lambda i: "" if i % 2 else f"Answer number {i}.")
    prepared = prepare_data(_config(data, eval_split=0.0), tiny_tokenizer)
    assert len(prepared.train) == 3 and prepared.eval == []
    summary = prepared.report()["files"][0]
    assert summary["rejected"] == 2 and summary["rejected_reasons"] == {"empty assistant message": 2}


def test_file_with_every_row_rejected_raises(tmp_path, tunery_home, tiny_tokenizer):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                            for i in range(3)))
    for _ in range(2):  # the second call reads the (empty) token cache
        with pytest.raises(DataError) as err:
            prepare_data(_config(data), tiny_tokenizer)
        assert str(data) in str(err.value)
        assert "3 rejected" in str(err.value) and "no assistant message to learn from" in str(err.value)


def test_answers_truncated_away_leave_nothing_to_train(tmp_path, tunery_home, tiny_tokenizer):
    data = tmp_path / "chat.jsonl"
    _write_chat(data, 4)
    with pytest.raises(DataError, match="max_seq_len=4"):
        prepare_data(_config(data, max_seq_len=4), tiny_tokenizer)


class _Retokenized(Exception):
    pass


def _refuse(*args, **kwargs):
    raise _Retokenized


def test_token_cache_is_reused_and_keyed_on_settings_and_content(tmp_path, tunery_home, tiny_tokenizer,
                                                                 monkeypatch):
    data = tmp_path / "chat.jsonl"
    _write_chat(data, 10)
    first = prepare_data(_config(data), tiny_tokenizer)
    assert len(list((tunery_home / "cache" / "tokenized").iterdir())) == 1

    monkeypatch.setattr(dataset_module, "tokenize_examples", _refuse)
    cached = prepare_data(_config(data), tiny_tokenizer)
    assert (cached.train, cached.eval, cached.eval_examples) == (first.train, first.eval, first.eval_examples)
    assert cached.files[0].tokens == first.files[0].tokens

    with pytest.raises(_Retokenized):
        prepare_data(_config(data, max_seq_len=64), tiny_tokenizer)
    with pytest.raises(_Retokenized):
        prepare_data(_config(data, train_on="all"), tiny_tokenizer)
    with pytest.raises(_Retokenized):
        prepare_data(_config(data, system_prompt="Be brief."), tiny_tokenizer)
    _write_chat(data, 11)
    with pytest.raises(_Retokenized):
        prepare_data(_config(data), tiny_tokenizer)


def test_threads_of_one_process_fill_the_token_cache_at_once(tmp_path, tunery_home, tiny_tokenizer):
    """The web console inspects and estimates the same file in two threads: neither may break the other's write."""
    from concurrent.futures import ThreadPoolExecutor

    data = tmp_path / "chat.jsonl"
    _write_chat(data, 200)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: prepare_data(_config(data), tiny_tokenizer), range(4)))
    assert all(r.train == results[0].train for r in results)
    assert [p.name for p in (tunery_home / "cache" / "tokenized").iterdir()] == [p.name for p in (
        tunery_home / "cache" / "tokenized").iterdir() if ".tmp" not in p.name]  # no folder left half-written


def test_a_writer_that_finishes_second_leaves_the_first_writers_tokens_in_place(tmp_path, tunery_home,
                                                                                tiny_tokenizer, monkeypatch):
    """Two runs of one file tokenize it at once (say a terminal and the console): the one that finds the entry
    written when it is done must not delete it, since a third may be reading it at that moment."""
    data = tmp_path / "chat.jsonl"
    _write_chat(data, 10)
    first = prepare_data(_config(data), tiny_tokenizer)
    (entry,) = (tunery_home / "cache" / "tokenized").iterdir()
    before = (entry / dataset_module.TOKENS_FILE).stat().st_ino
    monkeypatch.setattr(dataset_module, "_read_cache", lambda *a: None)  # it looked before the first had written
    second = prepare_data(_config(data), tiny_tokenizer)
    assert second.train == first.train
    assert (entry / dataset_module.TOKENS_FILE).stat().st_ino == before  # the same file, never removed
    assert [p.name for p in (tunery_home / "cache" / "tokenized").iterdir()] == [entry.name]  # its copy cleaned up

