"""Examples -> token ids with labels on the trained tokens only.

Assistant spans are found by rendering the conversation's prefixes with the chat template (text up to
the reply, text including it) and mapping those character spans onto the tokens through the fast
tokenizer's offsets, so the mask is right for any template that renders a conversation as a prefix of
its continuation (every common one does; the others are rejected by name).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from tunery.data.formats import Example
from tunery.data.templates import render

IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end-of-turn included).

    Found by rendering prefixes (text up to the reply, text through it). A template that renders a turn
    differently once more follows (Mistral v0.3 moves the system text to the last user turn) has no such
    prefixes: its replies are then located by their text, in order, each with the end-of-turn marker after it."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            return text, _spans_by_content(tokenizer, text, messages)
        spans.append((len(before), len(through)))
    return text, spans


def _spans_by_content(tokenizer, text: str, messages: list[dict]) -> list[tuple[int, int]]:
    from tunery.data.formats import RowError
    from tunery.data.templates import END_OF_TURN_MARKERS, with_reasoning

    markers = [m for m in (*END_OF_TURN_MARKERS, tokenizer.eos_token) if m and m in text]
    spans, pos = [], 0
    for message in messages:
        content = with_reasoning(message, False)["content"].strip()
        start = text.find(content, pos) if content else pos
        if start < 0:
            raise RowError(f"the chat template does not show the {message['role']} turn's text as written, so its "
                           "tokens cannot be located; use --train-on all")
        end = start + len(content)
        rest = text[end:]
        gap = len(rest) - len(rest.lstrip(" \n"))
        marker = next((m for m in markers if rest[gap:].startswith(m)), None)
        if message["role"] == "assistant":
            spans.append((start, end + (gap + len(marker) if marker else 0)))
        pos = end
    return spans


def tokenize_example(tokenizer, example: Example, max_seq_len: int, train_on: str = "assistant") -> Tokenized:
    """Token ids and labels (IGNORE where no loss) of one normalised example, truncated to max_seq_len."""
    out = tokenize_examples(tokenizer, [example], max_seq_len, train_on)[0]
    if isinstance(out, Exception):
        raise out
    return out


def tokenize_examples(tokenizer, examples: list[Example], max_seq_len: int,
                      train_on: str = "assistant") -> list[Tokenized | Exception]:
    """`tokenize_example` of each example, the texts encoded in one call to the tokenizer (its Rust core encodes
    a batch on all cores). An example whose chat template or layout refuses it gets that error (a TemplateError
    or RowError) in its place; any other error is raised."""
    from jinja2.exceptions import TemplateError

    from tunery.data.formats import RowError

    # no token covers more characters than the vocabulary's longest, so the first max_seq_len + 1 tokens lie in
    # this many characters: a giant row is cut before it is tokenized, not after (memory bounded by max_seq_len)
    bound = (max_seq_len + 1) * _longest_token(tokenizer)
    rendered: list[tuple[str, list | None] | Exception] = []
    for example in examples:
        try:
            if "text" in example:
                rendered.append((example["text"] + (tokenizer.eos_token or ""), None))
            else:
                rendered.append(assistant_spans(tokenizer, example["messages"]))
        except (TemplateError, RowError) as e:
            rendered.append(e)
    texts = [r[0][:bound] for r in rendered if not isinstance(r, Exception)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
    out: list[Tokenized | Exception] = []
    k = 0
    for r in rendered:
        if isinstance(r, Exception):
            out.append(r)
            continue
        (text, spans), ids, offsets = r, enc["input_ids"][k], enc["offset_mapping"][k]
        k += 1
        labels = list(ids) if spans is None or train_on == "all" else _labels(ids, offsets, spans)
        truncated = len(text) > bound or len(ids) > max_seq_len
        out.append(Tokenized(ids[:max_seq_len], labels[:max_seq_len], truncated))
    return out


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where it starts inside one of `spans` (character ranges), else IGNORE. Token starts only
    grow along a text, so each span is one slice of the tokens, found by bisection."""
    starts = [start for start, _ in offsets]
    if starts != sorted(starts):  # not in order (no fast tokenizer does this): token by token
        return [tok if any(s <= start < e for s, e in spans) else IGNORE for tok, start in zip(ids, starts)]
    labels = [IGNORE] * len(ids)
    for s, e in spans:
        lo, hi = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
        labels[lo:hi] = ids[lo:hi]
    return labels


def _longest_token(tokenizer) -> int:
    """Characters in the vocabulary's longest token (added tokens included), computed once per tokenizer."""
    longest = getattr(tokenizer, "_tunery_longest_token", None)
    if longest is None:
        longest = max(8, *(len(t) for t in tokenizer.get_vocab()))
        tokenizer._tunery_longest_token = longest
    return longest


def prompt_and_reference(example: Example) -> tuple[list[dict], str] | None:
    """For generation eval: the conversation up to its last assistant turn, and that turn's text."""
    messages = example.get("messages")
    if not messages:
        return None
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
