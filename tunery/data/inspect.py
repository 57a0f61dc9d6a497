"""`tunery data inspect`: what a data file holds and whether training on it would go wrong."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from tunery.data.dataset import load_file, split_indices
from tunery.data.formats import Example, detect_format, normalise
from tunery.data.load import load_rows
from tunery.data.tokenize import IGNORE, Tokenized


@dataclass
class Inspection:
    path: str
    format: str
    rows: int
    rejected: dict[str, list[int]]  # reason -> 1-based row numbers
    duplicates: int  # rows that are exact copies of an earlier row
    lengths: list[int]  # tokens per usable row (characters when no tokenizer)
    length_unit: str
    too_long: int
    no_trainable: int
    overlap: int  # eval rows equal to a training row up to `normalise_text` (case, whitespace, end punctuation)
    overlap_against: str  # the eval file, or the seeded split of this file
    preview: list[tuple[str, bool]] = field(default_factory=list)  # (text piece, trained?) of the first usable row
    previews: list[tuple[int, list[tuple[str, bool]]]] = field(default_factory=list)  # (1-based row, its pieces)
    too_long_rows: list[int] = field(default_factory=list)  # 1-based row numbers cut at max_seq_len
    template_notes: dict[str, int] = field(default_factory=dict)  # reshaped to fit the chat template -> rows
    added_tokens: dict[str, int] = field(default_factory=dict)  # tokens added to the vocabulary -> rows using them
    new_tokens: list[str] = field(default_factory=list)  # of those, the ones the model has no embedding row for
    duplicate_rows: list[list[int]] = field(default_factory=list)  # exact copies: [first row, its copies...]
    near_duplicates: int = 0  # rows equal to an earlier row up to `normalise_text`, not exact copies of it
    near_duplicate_rows: list[list[int]] = field(default_factory=list)  # [first row, rows of each other spelling]
    conflicts: int = 0  # prompts (conversation before the last answer, normalised) with different answers
    conflicting_rows: list[list[int]] = field(default_factory=list)  # per such prompt: every row holding it
    overlap_exact: int = 0  # of the `overlap` rows, those that match a training row character for character
    held_out: int = 0  # usable held-out rows the overlap was counted over (eval file or seeded split)
    overlap_rows: list[int] = field(default_factory=list)  # the `overlap` rows, 1-based (this file's for a split)
    labels: dict[str, int] = field(default_factory=dict)  # classification-like last answers: label -> rows
    labels_other: int = 0  # rows whose last answer is none of `labels`
    eval_rows: int = 0  # rows of the --eval-data file (0 without one)
    eval_rejected: dict[str, list[int]] = field(default_factory=dict)  # its reason -> 1-based row numbers
    eval_lengths: list[int] = field(default_factory=list)  # its usable rows' lengths, in `length_unit`
    eval_too_long_rows: list[int] = field(default_factory=list)  # its rows cut at max_seq_len (with a tokenizer)
    problems: list[str] = field(default_factory=list)  # fatal: training would fail or train on nothing
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("preview", "previews")}
        out["preview"] = [{"text": piece, "trained": trained} for piece, trained in self.preview]
        out["previews"] = [{"row": row, "pieces": [{"text": p, "trained": t} for p, t in pieces]}
                           for row, pieces in self.previews]
        return out


# Classification-like answers: few short values, each repeated, answer nearly every row.
LABEL_MAX_VALUES = 20  # labels reported at most
LABEL_COVER = 0.9  # share of the answered rows that repeated short values must cover
LABEL_MIN_ROWS = 10  # fewer answered rows say nothing about a distribution
LABEL_MAX_CHARS = 40  # a longer answer is free text, not a label
LABEL_SKEW = 0.8  # past this share one label can be learned as the answer to everything


def _key(example: dict) -> str:
    return json.dumps(example, sort_keys=True)


# cut from the ends of a text before comparing: whitespace, sentence punctuation, quotes and brackets; not the
# signs that change a value ("-5", "50%", "$5", "#1")
_EDGE = " .,;:!?¿¡…'\"`«»‹›“”‘’„‚()[]{}「」『』【】（）。、，．！？；：・"


def normalise_text(text: str) -> str:
    """Text as a reader compares it: case folded, each run of whitespace one space, `_EDGE` punctuation and
    whitespace cut from both ends ("What is 2+2?" and "what is 2+2 ?  " are equal; "-5" and "5" are not)."""
    return " ".join(text.casefold().split()).strip(_EDGE)


def _last_answer(example: Example) -> int | None:
    """Index of the last assistant message; None for raw text (or a conversation without one)."""
    messages = example.get("messages") or []
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), None)


class _RowKey(NamedTuple):
    """What rows are compared by, hashed once per row, so each check is one pass of set and dict lookups
    (linear in the rows) and keeps no second copy of the text. Python's 64-bit string hash, keyed per process:
    two different rows among 100,000 share one with odds of about 1 in 3 billion."""

    exact: int  # the example as written
    normal: int  # the example with every text run through `normalise_text`
    prompt: int | None  # the normalised conversation before the last assistant reply (None: raw text)
    answer: int | None  # that reply, normalised
    label: str | None  # the normalised reply when it is short enough to be a label


def _row_key(example: Example) -> _RowKey:
    """The row's hashes; a text row is compared as one part, a conversation message by message."""
    kind = "messages" if "messages" in example else "text"
    parts = example["messages"] if kind == "messages" else [example]
    normal_parts = [{k: normalise_text(v) if k != "role" and isinstance(v, str) else v for k, v in part.items()}
                    for part in parts]
    exact, normal = hash((kind, *map(_part_hash, parts))), tuple(map(_part_hash, normal_parts))
    last = _last_answer(example)
    if last is None:
        return _RowKey(exact, hash((kind, *normal)), None, None, None)
    answer = normal_parts[last]["content"]
    return _RowKey(exact, hash((kind, *normal)), hash(normal[:last]), hash(answer),
                   answer if len(answer) <= LABEL_MAX_CHARS else None)


def _part_hash(part: dict) -> int:
    """A message's hash (or a text row's): its fields in name order; a value that is not text by its JSON."""
    return hash(tuple((k, v) if isinstance(v, str) else (k, json.dumps(v, sort_keys=True), "json")
                      for k, v in sorted(part.items())))


def rows_text(numbers: list[int], shown: int = 5) -> str:
    """"3, 17, 20, 41, 52 and 2 more": row numbers for a person, capped."""
    text = ", ".join(map(str, numbers[:shown]))
    return text + (f" and {len(numbers) - shown} more" if len(numbers) > shown else "")


def groups_text(groups: list[list[int]], shown: int = 3) -> str:
    """"rows 3, 17; rows 5, 9, 12 and 1 more group": groups of row numbers, capped."""
    text = "; ".join(f"rows {rows_text(g)}" for g in groups[:shown])
    more = len(groups) - shown
    return text + (f" and {more} more group{'s' if more > 1 else ''}" if more > 0 else "")


def histogram(lengths: list[int], bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets of equal width over the lengths."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    counts = Counter((n - low) // width for n in lengths)
    return [(low + b * width, low + (b + 1) * width - 1, counts.get(b, 0)) for b in range(bins)
            if low + b * width <= high]


def inspect_file(path: str, tokenizer=None, max_seq_len: int = 2048, train_on: str = "assistant",
                 eval_data: str | None = None, eval_split: float = 0.1, seed: int = 42, sheet: str | None = None,
                 json_values: bool = False, columns: list[str] | None = None,
                 embedding_rows: int | None = None, preview_rows: int = 1) -> Inspection:
    """What training would make of the file. `embedding_rows`: the model's vocabulary size, when known, to
    name the added tokens it has no embedding rows for. `preview_rows`: how many usable rows to render, marked
    trained or not (with a tokenizer)."""
    fmt, examples, reasons, tokens, template_notes = _read(path, tokenizer, max_seq_len, train_on, sheet,
                                                           json_values, columns)
    kept = [i for i, e in enumerate(examples) if e is not None]
    insp = Inspection(path=str(path), format=fmt, rows=len(examples), rejected=_rejected(reasons),
                      duplicates=0, lengths=[], length_unit="tokens", too_long=0, no_trainable=0, overlap=0,
                      overlap_against="")
    if tokenizer is not None:
        _token_stats(insp, [tokens[i] for i in kept])
        insp.too_long_rows = [i + 1 for i in kept if tokens[i] is not None and tokens[i].truncated]
        _added_tokens(insp, tokenizer, [tokens[i] for i in kept if tokens[i] is not None], embedding_rows)
        shown = [i for i in kept if tokens[i] is not None][:preview_rows]
        insp.previews = [(i + 1, _preview(tokenizer, tokens[i])) for i in shown]
        if insp.previews:
            insp.preview = insp.previews[0][1]
    else:
        insp.length_unit = "characters"
    insp.lengths = _lengths(examples, tokens, kept, tokenizer)
    insp.template_notes = dict(template_notes)
    keys = {i: _row_key(examples[i]) for i in kept}
    _repeats(insp, keys)
    _conflicts(insp, keys)
    _labels(insp, keys, examples)
    if eval_data:
        held = _eval_file(insp, eval_data, tokenizer, max_seq_len, train_on, sheet, json_values, columns)
        _overlap_with_file(insp, keys, eval_data, held)
    else:
        _overlap_with_split(insp, keys, eval_split, seed)
    _judge(insp, len(kept))
    if eval_data and os.path.realpath(eval_data) == os.path.realpath(path):
        insp.problems.append("--eval-data is the training file itself: training refuses it (its held-out loss would "
                             "score rows the model trained on)")
    return insp


def _read(path: str, tokenizer, max_seq_len: int, train_on: str, sheet: str | None, json_values: bool,
          columns: list[str] | None) -> tuple[str, list, list, list, dict[str, int]]:
    """(format, examples, reasons, tokens, template notes) of a file; tokens are None without a tokenizer."""
    if tokenizer is not None:
        data = load_file(path, tokenizer, max_seq_len, train_on, sheet=sheet, json_values=json_values,
                         columns=columns)
        return data.format, data.examples, data.reasons, data.tokens, data.notes
    rows = load_rows(path, sheet, columns)
    fmt = detect_format(rows, source=str(path))
    examples, reasons = normalise(rows, fmt, json_values=json_values)
    return fmt.name, examples, reasons, [None] * len(examples), {}


def _rejected(reasons: list[str | None]) -> dict[str, list[int]]:
    rejected: dict[str, list[int]] = {}
    for i, reason in enumerate(reasons):
        if reason:
            rejected.setdefault(reason, []).append(i + 1)
    return rejected


def _lengths(examples: list, tokens: list, kept: list[int], tokenizer) -> list[int]:
    """Tokens per kept row, or characters (of its JSON) without a tokenizer. A truncated row counts as
    max_seq_len + 1: over the limit, by an amount not counted (a giant row is cut before it is tokenized: no
    memory is spent measuring what is thrown away)."""
    if tokenizer is None:
        return [len(_key(examples[i])) for i in kept]
    return [len(tokens[i].input_ids) + (1 if tokens[i].truncated else 0) for i in kept if tokens[i] is not None]


def _repeats(insp: Inspection, keys: dict[int, _RowKey]) -> None:
    """Exact duplicates, then near-duplicates among the rows left once those are removed."""
    exact: dict[int, list[int]] = {}
    for i, key in keys.items():
        exact.setdefault(key.exact, []).append(i + 1)
    insp.duplicate_rows = [rows for rows in exact.values() if len(rows) > 1]
    insp.duplicates = sum(len(rows) - 1 for rows in insp.duplicate_rows)
    spellings: dict[int, list[int]] = {}  # normal form -> first row of each exact spelling
    for first, *_ in exact.values():
        spellings.setdefault(keys[first - 1].normal, []).append(first)
    insp.near_duplicate_rows = [rows for rows in spellings.values() if len(rows) > 1]
    insp.near_duplicates = sum(len(rows) - 1 for rows in insp.near_duplicate_rows)


def _conflicts(insp: Inspection, keys: dict[int, _RowKey]) -> None:
    """Rows whose prompt (the conversation before the last assistant reply) is the same once normalised but
    whose last replies differ once normalised: the model is taught two answers to one question."""
    rows: dict[int, list[int]] = {}
    answers: dict[int, set[int]] = {}
    for i, key in keys.items():
        if key.prompt is not None:
            rows.setdefault(key.prompt, []).append(i + 1)
            answers.setdefault(key.prompt, set()).add(key.answer)
    insp.conflicting_rows = [rows[p] for p in rows if len(answers[p]) > 1]
    insp.conflicts = len(insp.conflicting_rows)


def _labels(insp: Inspection, keys: dict[int, _RowKey], examples: list) -> None:
    """Counts per label when the last replies look like classification: at least LABEL_MIN_ROWS of them, and
    short values seen more than once (at most LABEL_MAX_VALUES) answer LABEL_COVER of them. A label is shown
    in its first spelling; spellings that differ only by case, spaces or end punctuation count as one."""
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    answered = 0
    for i, key in keys.items():
        answered += key.prompt is not None
        if key.label is not None:
            counts[key.label] += 1
            if key.label not in spelling:
                spelling[key.label] = examples[i]["messages"][_last_answer(examples[i])]["content"].strip()
    top = counts.most_common(LABEL_MAX_VALUES)
    if answered < LABEL_MIN_ROWS or sum(n for _, n in top if n > 1) < LABEL_COVER * answered:
        return
    insp.labels = {spelling[label]: n for label, n in top}
    insp.labels_other = answered - sum(insp.labels.values())


def _added_tokens(insp: Inspection, tokenizer, kept: list[Tokenized], embedding_rows: int | None) -> None:
    """Tokens added to the vocabulary (not the template's own markers or bos/eos/pad) that the data uses."""
    template = tokenizer.chat_template or ""
    own = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token}
    added = {i: t for t, i in tokenizer.get_added_vocab().items() if t not in own and t not in template}
    if not added:
        return
    rows = Counter(i for t in kept for i in set(t.input_ids) if i in added)
    insp.added_tokens = {added[i]: n for i, n in sorted(rows.items())}
    if embedding_rows is not None:
        insp.new_tokens = [added[i] for i in sorted(rows) if i >= embedding_rows]


def _token_stats(insp: Inspection, kept: list[Tokenized]) -> None:
    insp.too_long = sum(t.truncated for t in kept)
    insp.no_trainable = sum(all(x == IGNORE for x in t.labels) for t in kept)


def _eval_file(insp: Inspection, eval_data: str, tokenizer, max_seq_len: int, train_on: str, sheet: str | None,
               json_values: bool, columns: list[str] | None) -> list:
    """The --eval-data file's rows, rejections and lengths into `insp`; its examples (None where rejected)."""
    _, examples, reasons, tokens, _ = _read(eval_data, tokenizer, max_seq_len, train_on, sheet, json_values,
                                            columns)
    kept = [i for i, e in enumerate(examples) if e is not None]
    insp.eval_rows = len(examples)
    insp.eval_rejected = _rejected(reasons)
    insp.eval_lengths = _lengths(examples, tokens, kept, tokenizer)
    insp.eval_too_long_rows = [i + 1 for i in kept if tokens[i] is not None and tokens[i].truncated]
    return examples


def _overlap_with_file(insp: Inspection, keys: dict[int, _RowKey], eval_data: str, held: list) -> None:
    """Eval rows equal to a training row up to `normalise_text` (and, of those, character for character)."""
    held_keys = {j: _row_key(e) for j, e in enumerate(held) if e is not None}
    _overlap(insp, list(keys.values()), held_keys)
    insp.overlap_against = eval_data


def _overlap_with_split(insp: Inspection, keys: dict[int, _RowKey], eval_split: float, seed: int) -> None:
    """Rows of the seeded eval split equal to a row of the train split, as in `_overlap_with_file`."""
    kept = list(keys)
    train_pos, eval_pos = split_indices(len(kept), eval_split, seed)
    _overlap(insp, [keys[kept[p]] for p in train_pos], {kept[p]: keys[kept[p]] for p in eval_pos})
    insp.overlap_against = f"the seeded {eval_split:.0%} eval split"


def _overlap(insp: Inspection, train: list[_RowKey], held: dict[int, _RowKey]) -> None:
    """`held`: row index -> key of the eval rows."""
    insp.held_out = len(held)
    exact, normal = {k.exact for k in train}, {k.normal for k in train}
    insp.overlap_rows = [j + 1 for j, k in held.items() if k.normal in normal]
    insp.overlap = len(insp.overlap_rows)
    insp.overlap_exact = sum(held[j - 1].exact in exact for j in insp.overlap_rows)


def _judge(insp: Inspection, n_kept: int) -> None:
    n_rejected = sum(len(v) for v in insp.rejected.values())
    if n_kept == 0:
        insp.problems.append(f"no usable rows: all {insp.rows} were rejected")
    elif insp.no_trainable == n_kept:
        insp.problems.append("no row has a trained token left (answers cut by max_seq_len?): training "
                             "would learn nothing; raise --max-seq-len")
    # training's data gate (tunery.data.dataset.data_issues), so "ok to train" means train will accept it
    from tunery.data.dataset import MAX_OVERLAP, MAX_REJECTED, MAX_TRUNCATED

    if n_kept and n_rejected > MAX_REJECTED * insp.rows:
        insp.problems.append(f"{n_rejected} of {insp.rows} rows are rejected: training refuses this file unless "
                             "--allow-data-issues")
    if n_kept and insp.too_long > MAX_TRUNCATED * n_kept:
        insp.problems.append(f"{insp.too_long} of {n_kept} rows are cut by max_seq_len: training refuses this unless "
                             "--allow-data-issues; raise --max-seq-len")
    if insp.held_out and insp.overlap_exact > MAX_OVERLAP * insp.held_out:
        insp.problems.append(f"{insp.overlap_exact} of {insp.held_out} held-out rows are also training rows: "
                             "training refuses this unless --allow-data-issues")
    if n_rejected:
        insp.warnings.append(f"{n_rejected} rows rejected and skipped in training")
    for note, n in insp.template_notes.items():
        insp.warnings.append(f"{n} rows: {note}")
    if insp.too_long:
        rows = ", ".join(map(str, insp.too_long_rows[:10])) + (" ..." if len(insp.too_long_rows) > 10 else "")
        insp.warnings.append(f"{insp.too_long} rows longer than max_seq_len are truncated"
                             + (f" (rows {rows})" if rows else ""))
    if insp.no_trainable and insp.no_trainable < n_kept:
        insp.warnings.append(f"{insp.no_trainable} rows have no trained token after truncation and are skipped")
    if insp.new_tokens:
        insp.warnings.append(f"{len(insp.new_tokens)} added tokens in the data have no embedding row in the model "
                             f"({', '.join(insp.new_tokens[:5])}): training grows the embeddings and trains these "
                             "rows from the mean of the others, so they need enough examples")
    _repeat_warnings(insp)
    n_eval_rejected = sum(len(v) for v in insp.eval_rejected.values())
    if n_eval_rejected:
        insp.warnings.append(f"{n_eval_rejected} rows of the eval file rejected and skipped in evaluation")


def _repeat_warnings(insp: Inspection) -> None:
    """Warnings about rows that repeat, contradict, leak into the eval rows, or all say the same."""
    if insp.duplicates:
        insp.warnings.append(f"{insp.duplicates} exact duplicate rows: {groups_text(insp.duplicate_rows)}")
    if insp.near_duplicates:
        insp.warnings.append(f"{insp.near_duplicates} near-duplicate rows (equal up to case, whitespace and "
                             f"punctuation at the ends): {groups_text(insp.near_duplicate_rows)}")
    if insp.conflicts:
        insp.warnings.append(f"{insp.conflicts} prompts have different answers in different rows: "
                             f"{groups_text(insp.conflicting_rows)}")
    if insp.overlap:
        where = insp.overlap_against if insp.eval_rows else f"this file, in {insp.overlap_against}"
        insp.warnings.append(f"{insp.overlap} eval rows also appear in training data up to case, whitespace and "
                             f"punctuation at the ends ({insp.overlap_exact} exactly; rows "
                             f"{rows_text(insp.overlap_rows)} of {where}): held-out scores will be optimistic")
    answered = sum(insp.labels.values()) + insp.labels_other
    label, top = next(iter(insp.labels.items()), ("", 0))
    if answered and top > LABEL_SKEW * answered:
        insp.warnings.append(f"{top} of {answered} rows ({top / answered:.0%}) answer {label!r}: the model may learn "
                             f"to always answer {label!r}")


def _preview(tokenizer, tokens: Tokenized) -> list[tuple[str, bool]]:
    """The rendered example as runs of text, each marked trained or not."""
    pieces: list[tuple[str, bool]] = []
    for tok, lab in zip(tokens.input_ids, tokens.labels):
        text, trained = tokenizer.decode([tok]), lab != IGNORE
        if pieces and pieces[-1][1] == trained:
            pieces[-1] = (pieces[-1][0] + text, trained)
        else:
            pieces.append((text, trained))
    return pieces
