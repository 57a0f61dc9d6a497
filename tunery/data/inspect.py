"""`tunery data inspect`: what a data file holds and whether training on it would go wrong."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from tunery.data.dataset import load_file, split_indices
from tunery.data.formats import detect_format, normalise
from tunery.data.load import load_rows
from tunery.data.tokenize import IGNORE, Tokenized


@dataclass
class Inspection:
    path: str
    format: str
    rows: int
    rejected: dict[str, list[int]]  # reason -> 1-based row numbers
    duplicates: int
    lengths: list[int]  # tokens per usable row (characters when no tokenizer)
    length_unit: str
    too_long: int
    no_trainable: int
    overlap: int
    overlap_against: str
    preview: list[tuple[str, bool]] = field(default_factory=list)  # (text piece, trained?) of the first usable row
    previews: list[tuple[int, list[tuple[str, bool]]]] = field(default_factory=list)  # (1-based row, its pieces)
    too_long_rows: list[int] = field(default_factory=list)  # 1-based row numbers cut at max_seq_len
    template_notes: dict[str, int] = field(default_factory=dict)  # reshaped to fit the chat template -> rows
    added_tokens: dict[str, int] = field(default_factory=dict)  # tokens added to the vocabulary -> rows using them
    new_tokens: list[str] = field(default_factory=list)  # of those, the ones the model has no embedding row for
    problems: list[str] = field(default_factory=list)  # fatal: training would fail or train on nothing
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("preview", "previews")}
        out["preview"] = [{"text": piece, "trained": trained} for piece, trained in self.preview]
        out["previews"] = [{"row": row, "pieces": [{"text": p, "trained": t} for p, t in pieces]}
                           for row, pieces in self.previews]
        return out


def _key(example: dict) -> str:
    return json.dumps(example, sort_keys=True)


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
    if tokenizer is not None:
        data = load_file(path, tokenizer, max_seq_len, train_on, sheet=sheet, json_values=json_values,
                         columns=columns)
        fmt, examples, reasons, tokens = data.format, data.examples, data.reasons, data.tokens
        template_notes = data.notes
    else:
        rows = load_rows(path, sheet, columns)
        fmt_obj = detect_format(rows, source=str(path))
        examples, reasons = normalise(rows, fmt_obj, json_values=json_values)
        fmt, tokens = fmt_obj.name, [None] * len(examples)
        template_notes = {}
    rejected: dict[str, list[int]] = {}
    for i, reason in enumerate(reasons):
        if reason:
            rejected.setdefault(reason, []).append(i + 1)
    kept = [i for i, e in enumerate(examples) if e is not None]
    keys = Counter(_key(examples[i]) for i in kept)
    insp = Inspection(path=str(path), format=fmt, rows=len(examples), rejected=rejected,
                      duplicates=sum(c - 1 for c in keys.values()), lengths=[], length_unit="tokens",
                      too_long=0, no_trainable=0, overlap=0, overlap_against="")
    if tokenizer is not None:
        _token_stats(insp, [tokens[i] for i in kept], max_seq_len)
        insp.too_long_rows = [i + 1 for i in kept if tokens[i] is not None and tokens[i].truncated]
        _added_tokens(insp, tokenizer, [tokens[i] for i in kept if tokens[i] is not None], embedding_rows)
        shown = [i for i in kept if tokens[i] is not None][:preview_rows]
        insp.previews = [(i + 1, _preview(tokenizer, tokens[i])) for i in shown]
        if insp.previews:
            insp.preview = insp.previews[0][1]
    else:
        insp.length_unit = "characters"
        insp.lengths = [len(_key(examples[i])) for i in kept]
    insp.template_notes = dict(template_notes)
    _overlap(insp, examples, kept, eval_data, eval_split, seed, sheet, json_values, columns)
    _judge(insp, len(kept))
    return insp


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


def _token_stats(insp: Inspection, kept: list[Tokenized], max_seq_len: int) -> None:
    # a truncated row counts as max_seq_len + 1 in the histogram: over the limit, by an amount not counted (a
    # giant row is cut before it is tokenized: no memory is spent measuring what is thrown away)
    insp.lengths = [len(t.input_ids) + (1 if t.truncated else 0) for t in kept]
    insp.too_long = sum(t.truncated for t in kept)
    insp.no_trainable = sum(all(x == IGNORE for x in t.labels) for t in kept)


def _overlap(insp: Inspection, examples: list, kept: list[int], eval_data: str | None, eval_split: float,
             seed: int, sheet: str | None = None, json_values: bool = False, columns: list[str] | None = None
             ) -> None:
    if eval_data:
        rows = load_rows(eval_data, sheet, columns)
        held, _ = normalise(rows, detect_format(rows, source=eval_data), json_values=json_values)
        train_keys = {_key(examples[i]) for i in kept}
        insp.overlap = sum(1 for e in held if e is not None and _key(e) in train_keys)
        insp.overlap_against = eval_data
    else:
        train_pos, eval_pos = split_indices(len(kept), eval_split, seed)
        train_keys = {_key(examples[kept[p]]) for p in train_pos}
        insp.overlap = sum(1 for p in eval_pos if _key(examples[kept[p]]) in train_keys)
        insp.overlap_against = f"the seeded {eval_split:.0%} eval split"


def _judge(insp: Inspection, n_kept: int) -> None:
    n_rejected = sum(len(v) for v in insp.rejected.values())
    if n_kept == 0:
        insp.problems.append(f"no usable rows: all {insp.rows} were rejected")
    elif insp.no_trainable == n_kept:
        insp.problems.append("no row has a trained token left (answers cut by max_seq_len?): training "
                             "would learn nothing; raise --max-seq-len")
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
    if insp.duplicates:
        insp.warnings.append(f"{insp.duplicates} exact duplicate rows")
    if insp.overlap:
        insp.warnings.append(f"{insp.overlap} eval rows also appear in training data ({insp.overlap_against}): "
                             "held-out scores will be optimistic")


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
