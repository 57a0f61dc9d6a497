"""From a data path and a tokenizer to train/eval token sequences, with a report of what was dropped.

    load rows -> detect format -> normalise -> tokenize (cached) -> seeded train/eval split
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from jinja2.exceptions import TemplateError

from tunery.data.formats import Example, RowError, detect_format, layouts, normalise
from tunery.data.load import content_hash, load_rows, name_columns
from tunery.data.templates import fit_messages
from tunery.data.tokenize import IGNORE, Tokenized, tokenize_examples
from tunery.errors import DataError
from tunery.paths import cache_dir
from tunery.progress import progress_bar


@dataclass
class FileData:
    """One file, normalised and tokenized; `examples[i]` is None for rows that were rejected."""

    path: str
    format: str
    data_hash: str
    examples: list[Example | None]
    reasons: list[str | None]
    tokens: list[Tokenized | None]
    notes: dict[str, int] = field(default_factory=dict)  # what was reshaped to fit the chat template -> rows
    def usable(self) -> list[int]:
        """Row indices that train on at least one token."""
        return [i for i, t in enumerate(self.tokens) if t is not None and t.labels.count(IGNORE) < len(t.labels)]

    def summary(self) -> dict:
        rejected = Counter(r for r in self.reasons if r)
        kept = [t for t in self.tokens if t is not None]
        return {"path": self.path, "format": self.format, "rows": len(self.examples),
                "rejected": sum(rejected.values()), "rejected_reasons": dict(rejected),
                "truncated": sum(t.truncated for t in kept), "template_notes": dict(self.notes),
                "no_trainable_tokens": len(kept) - len(self.usable())}


@dataclass
class PreparedData:
    train: list[Tokenized]
    eval: list[Tokenized]
    eval_examples: list[Example]
    files: list[FileData] = field(default_factory=list)

    def report(self) -> dict:
        return {"train_examples": len(self.train), "eval_examples": len(self.eval),
                "train_tokens": sum(len(t.input_ids) for t in self.train),
                "files": [f.summary() for f in self.files]}


@functools.cache
def _CODE() -> str:  # noqa: N802 - a constant, computed once
    """A hash of the code that turns rows into tokens: a cache made by other code is never read back."""
    here = Path(__file__).parent
    parts = [(here / f"{name}.py").read_bytes() for name in ("formats", "templates", "tokenize", "dataset", "load")]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((body + (tokenizer.chat_template or "")).encode()).hexdigest()


def load_file(path: str, tokenizer, max_seq_len: int, train_on: str = "assistant",
              system_prompt: str | None = None, sheet: str | None = None, json_values: bool = False,
              columns: list[str] | None = None) -> FileData:
    """Read, normalise and tokenize one data file; tokens come from the cache when nothing changed."""
    rows = load_rows(path, sheet, columns)
    fmt = detect_format(rows, source=str(path))
    examples, reasons = normalise(rows, fmt, system_prompt, json_values)
    reasons = [name_columns(r, columns) for r in reasons]
    examples, reasons, notes = _fit_template(tokenizer, examples, reasons)
    for name, n in layouts(rows).items():  # a file whose layout changes part way: each row read in its own
        if name not in (fmt.name, "unknown"):
            notes[f"in the {name} layout, not the file's {fmt.name}: read in their own layout"] = n
    data_hash = content_hash(path)
    key = hashlib.sha256("|".join([_CODE(), data_hash, tokenizer_fingerprint(tokenizer), str(max_seq_len), train_on,
                                   system_prompt or "", sheet or "", str(json_values),
                                   ",".join(columns or [])]).encode()).hexdigest()[:32]
    tokens = _cached_tokens(key, examples, tokenizer, max_seq_len, train_on, reasons)
    return FileData(str(path), fmt.name, data_hash, examples, reasons, tokens, dict(notes))


def _fit_template(tokenizer, examples: list, reasons: list) -> tuple[list, list, Counter]:
    """Conversations reshaped into what the chat template accepts (templates.fit_messages), counted by note."""
    notes: Counter = Counter()
    examples, reasons = list(examples), list(reasons)
    for i, example in enumerate(examples):
        if example is None or "messages" not in example:
            continue
        messages, changed = fit_messages(tokenizer, example["messages"])
        notes.update(changed)
        if not any(m["role"] == "assistant" for m in messages):
            examples[i], reasons[i] = None, "no assistant turn left once fitted to the chat template"
        elif changed:
            examples[i] = {**example, "messages": messages}
    return examples, reasons, notes


TOKENIZE_CHUNK = 512  # examples a call to the tokenizer encodes at once (on all cores), between progress updates
TOKENS_FILE = "tokens.arrow"  # the cache's tokens: an Arrow IPC file (pyarrow alone reads it, without datasets)


def _cached_tokens(key: str, examples: list[Example | None], tokenizer, max_seq_len: int,
                   train_on: str, reasons: list[str | None]) -> list[Tokenized | None]:
    """Tokens per example (None where rejected); a row the chat template refuses gets its reason in `reasons`
    and no tokens, and the cache keeps those reasons (as rows without tokens) too."""
    import pyarrow as pa

    folder = cache_dir("tokenized") / key
    cached = _read_cache(folder, len(examples), reasons)
    if cached is not None:
        return cached
    tokens: list[Tokenized | None] = [None] * len(examples)
    refused = {}
    todo = [r for r, example in enumerate(examples) if example is not None]
    with progress_bar("tokenizing", total=len(examples)) as advance:
        advance(len(examples) - len(todo))
        for at in range(0, len(todo), TOKENIZE_CHUNK):
            rows = todo[at:at + TOKENIZE_CHUNK]
            for r, got in zip(rows, tokenize_examples(tokenizer, [examples[r] for r in rows], max_seq_len, train_on)):
                if isinstance(got, TemplateError):  # the template refused this conversation: a row's problem, named
                    reasons[r] = refused[r] = f"the chat template refused it: {got}"
                elif isinstance(got, RowError):
                    reasons[r] = refused[r] = str(got)
                else:
                    tokens[r] = got
            advance(len(rows))
    kept = [(r, t) for r, t in enumerate(tokens) if t is not None]
    ids = pa.list_(pa.int32())
    table = pa.table({"row": pa.array([r for r, _ in kept], pa.int64()),
                      "input_ids": pa.array([t.input_ids for _, t in kept], ids),
                      "labels": pa.array([t.labels for _, t in kept], ids),
                      "truncated": pa.array([t.truncated for _, t in kept], pa.bool_())})
    # a name of its own per writer: two threads of one process (the web console inspecting and estimating the same
    # file at once) must not write into one folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    with pa.OSFile(str(tmp / TOKENS_FILE), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    (tmp / "refused.json").write_text(json.dumps(refused))
    if folder.exists() and not (folder / TOKENS_FILE).exists():  # a damaged entry (files removed): replaced
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process (a torchrun rank, a second run of the same file) wrote the same tokens
        shutil.rmtree(tmp, ignore_errors=True)  # meanwhile: theirs stay, since others may be reading them
    return tokens


def _read_cache(folder: Path, n: int, reasons: list[str | None]) -> list[Tokenized | None] | None:
    """The cached tokens of `n` examples (refusals' reasons into `reasons`), or None when there are none."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(folder / TOKENS_FILE)) as f:
            cached = pa.ipc.open_file(f).read_all().to_pydict()
        refused = json.loads((folder / "refused.json").read_text())
    except FileNotFoundError:
        return None
    by_row = {r: Tokenized(i, lab, t) for r, i, lab, t in
              zip(cached["row"], cached["input_ids"], cached["labels"], cached["truncated"])}
    for r, why in refused.items():
        reasons[int(r)] = why
    return [by_row.get(r) for r in range(n)]


def split_indices(n: int, eval_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded shuffle of range(n) cut into (train, eval); each side keeps at least one row when n >= 2."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_split <= 0 or n < 2 else min(n - 1, max(1, round(n * eval_split)))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def prepare_data(cfg, tokenizer) -> PreparedData:
    """Train and eval sequences for a RunConfig; stops with a DataError when nothing would train."""
    if cfg.eval_data and os.path.realpath(cfg.eval_data) == os.path.realpath(cfg.data):
        raise DataError(f"eval_data is the training file itself ({cfg.data}): its held-out loss would score rows the "
                        "model trained on. Drop --eval-data to hold out eval_split of the file, or pass another file")
    main = load_file(cfg.data, tokenizer, cfg.max_seq_len, cfg.train_on, cfg.system_prompt, cfg.sheet,
                     cfg.json_values, cfg.columns)
    usable = main.usable()
    files = [main]
    if cfg.eval_data:
        held = load_file(cfg.eval_data, tokenizer, cfg.max_seq_len, cfg.train_on, cfg.system_prompt, cfg.sheet,
                         cfg.json_values, cfg.columns)
        files.append(held)
        train_rows, eval_file, eval_rows = usable, held, held.usable()
    else:
        pos_train, pos_eval = split_indices(len(usable), cfg.eval_split, cfg.seed)
        train_rows, eval_file, eval_rows = [usable[i] for i in pos_train], main, [usable[i] for i in pos_eval]
    if not train_rows:
        summary = main.summary()
        raise DataError(f"{cfg.data}: no example left to train on ({summary['rows']} rows, "
                        f"{summary['rejected']} rejected: {summary['rejected_reasons'] or 'none'}, "
                        f"{summary['no_trainable_tokens']} with no trainable token after truncation to "
                        f"max_seq_len={cfg.max_seq_len}). Run `tunery data inspect {cfg.data}` for details")
    data = PreparedData(train=[main.tokens[i] for i in train_rows],
                        eval=[eval_file.tokens[i] for i in eval_rows],
                        eval_examples=[eval_file.examples[i] for i in eval_rows], files=files)
    problems = data_issues(main, data, cfg.data)
    if problems and not cfg.allow_data_issues:
        raise DataError("; ".join(problems) + f". Look with `tunery data inspect {cfg.data}`, fix the data, or "
                        "pass --allow-data-issues to train anyway")
    return data


# the gate: past these shares, training would mostly not learn what the user meant
MAX_REJECTED = 0.5  # of the file's rows
MAX_TRUNCATED = 0.5  # of the rows that train
MAX_OVERLAP = 0.1  # of the held-out rows that are also training rows


def data_issues(main: FileData, data: PreparedData, path: str) -> list[str]:
    """What makes training on this data a mistake, in words (empty when nothing does)."""
    summary, problems = main.summary(), []
    if summary["rows"] and summary["rejected"] > MAX_REJECTED * summary["rows"]:
        rows: dict[str, list[int]] = {}
        for number, reason in enumerate(main.reasons, 1):
            if reason:
                rows.setdefault(reason, []).append(number)
        top = "; ".join(f"{reason}: rows {', '.join(map(str, numbers[:5]))}{' ...' if len(numbers) > 5 else ''}"
                        for reason, numbers in sorted(rows.items(), key=lambda kv: -len(kv[1]))[:3])
        problems.append(f"{path}: {summary['rejected']} of {summary['rows']} rows were rejected ({top})")
    if data.train and sum(t.truncated for t in data.train) > MAX_TRUNCATED * len(data.train):
        problems.append(f"{path}: {sum(t.truncated for t in data.train)} of {len(data.train)} training rows are "
                        "cut by max_seq_len; raise --max-seq-len")
    train_keys = {tuple(t.input_ids) for t in data.train}
    overlap = sum(tuple(t.input_ids) in train_keys for t in data.eval)
    if data.eval and overlap > MAX_OVERLAP * len(data.eval):
        problems.append(f"{overlap} of {len(data.eval)} held-out rows are also training rows (duplicates in the "
                        "data): held-out scores would be optimistic")
    return problems
