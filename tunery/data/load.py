"""Read a data file (or a saved `datasets` folder) into a list of plain dict rows.

Errors name the file and, for JSON Lines, the line. Cells of CSV/Excel that hold JSON lists or objects
(conversations, messages) are decoded, so every file type carries every format.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.errors import DataError
from tunery.hashing import sha256_files

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".xlsx", ".parquet")


def load_rows(path: str | Path, sheet: str | None = None, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of `path` as dicts; a folder is read as a saved `datasets` dataset, and a Hub dataset id
    (`org/name[@revision][:subset]:split`, see `hub_dataset`) as that dataset's split. `sheet`: the Excel sheet
    to read (needed when a workbook has several). `columns`: FIELD=COLUMN pairs naming the file's columns that
    hold tunery's fields (the config's `columns`)."""
    hub = hub_dataset(str(path))
    if hub is not None:
        return map_columns(hub.rows(), columns or [], hub.spec)
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    try:
        rows = _load(path, sheet)
    except PermissionError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check its permissions") from None
    return map_columns(rows, columns or [], str(path))


def name_columns(reason: str | None, columns: list[str] | None) -> str | None:
    """A row's reason with each mapped field also named by the file's own column ('completion' (column
    'Answer')), so the user finds it in their file."""
    if not reason or not columns:
        return reason
    from tunery.config import column_pairs

    for field, column in column_pairs(columns):
        reason = reason.replace(f"'{field}'", f"'{field}' (column '{column}')")
    return reason


def map_columns(rows: list[dict], columns: list[str], source: str) -> list[dict]:
    """Each row with its mapped columns renamed to tunery's fields (a field the file also has is replaced);
    a mapped column the file does not have is an error naming the columns it does have."""
    from tunery.config import column_pairs

    if not columns:
        return rows
    pairs = column_pairs(columns)
    present = {k for row in rows if BAD_ROW not in row for k in row}
    missing = [column for _, column in pairs if column not in present]
    if missing:
        raise DataError(f"{source}: columns {', '.join(repr(m) for m in missing)} (from the `columns` setting) are "
                        f"not in the file; its columns: {', '.join(sorted(present)) or 'none'}")
    moved = {column for _, column in pairs}
    out = []
    for row in rows:
        if BAD_ROW in row:
            out.append(row)
            continue
        kept = {k: v for k, v in row.items() if k not in moved}
        out.append({**kept, **{field: row.get(column) for field, column in pairs}})
    return out


def _load(path: Path, sheet: str | None) -> list[dict[str, Any]]:
    if path.is_dir():
        rows = _load_datasets_folder(path)
    else:
        suffix = path.suffix.lower()
        readers = {".json": _load_json, ".jsonl": _load_jsonl, ".csv": _load_csv,
                   ".xlsx": functools.partial(_load_xlsx, sheet=sheet), ".parquet": _load_parquet}
        if suffix not in readers:
            raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use one of "
                            f"{', '.join(SUPPORTED_SUFFIXES)} or a folder saved with datasets' save_to_disk")
        rows = readers[suffix](path)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i + 1} is a {type(row).__name__}, expected an object with fields")
    return rows


def content_hash(path: str | Path) -> str:
    """sha256 of the file's bytes (of every file, in name order, for a folder); for a Hub dataset, its commit,
    subset and split (`hub:org/name@COMMIT:subset:split`: the manifest pins the revision that was read)."""
    hub = hub_dataset(str(path))
    if hub is not None:
        return hub.identity()
    path = Path(path)
    if not path.is_dir():
        return sha256_files([("", path)])
    return sha256_files((p.relative_to(path).as_posix(), p) for p in sorted(path.rglob("*")) if p.is_file())


_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+?))?"
                     r"(?::(?P<first>[\w.-]+))?(?::(?P<second>[\w.-]+))?")


@dataclass(frozen=True)
class HubDataset:
    """A dataset on the Hugging Face Hub: `org/name` (split train), `org/name:split`, `org/name:subset:split`,
    each with an optional `@revision` after the name (a branch, tag or commit)."""

    spec: str
    repo: str
    revision: str | None
    subset: str | None
    split: str

    def snapshot(self) -> Path:
        """The dataset's files at its revision (the folder's name is the commit): see `_hub_snapshot`."""
        return _hub_snapshot(self.repo, self.revision)

    def rows(self) -> list[dict[str, Any]]:
        """The split's rows, read by `datasets` from the snapshot (its subsets and splits as the Hub shows them)."""
        import datasets

        folder = self.snapshot()
        try:
            data = datasets.load_dataset(str(folder), self.subset, split=self.split)
        except ValueError as e:  # an unknown subset or split: datasets' message lists the ones there are
            raise DataError(f"dataset {self.repo}: {e}") from None
        except datasets.exceptions.DataFilesNotFoundError:
            raise DataError(f"dataset {self.repo} has no data files tunery can read (json, jsonl, csv, parquet)") \
                from None
        return data.to_list()

    def identity(self) -> str:
        return f"hub:{self.repo}@{self.snapshot().name}:{self.subset or ''}:{self.split}"


@functools.cache
def _hub_snapshot(repo: str, revision: str | None) -> Path:
    """Downloaded once into the Hugging Face cache (offline: read from it); resolved once per process."""
    from huggingface_hub import errors, snapshot_download

    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision))
    except errors.GatedRepoError:
        raise DataError(f"{repo} is a gated dataset: accept its terms on huggingface.co and log in "
                        "(`hf auth login`)") from None
    except errors.RepositoryNotFoundError:
        raise DataError(f"no dataset {repo} on the Hub (or it is private: log in with `hf auth login`); for a "
                        "local file, check the path") from None
    except errors.RevisionNotFoundError:
        raise DataError(f"dataset {repo} has no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError:
        raise DataError(f"dataset {repo} is not in the local Hugging Face cache and the Hub cannot be reached "
                        "(offline, or HF_HUB_OFFLINE=1): download it once where there is network (`hf download "
                        f"{repo} --repo-type dataset`), or save it as a .jsonl/.parquet file and pass that path") \
            from None
    except OSError as e:  # httpx/requests connection errors
        raise DataError(f"could not download dataset {repo} ({type(e).__name__}: {e})") from None


def hub_dataset(spec: str) -> HubDataset | None:
    """The Hub dataset `spec` names, or None for a local path (one that exists, or that ends in a data file
    suffix: a missing file is reported as missing, not looked up on the Hub)."""
    match = _HUB_ID.fullmatch(spec.strip())
    if match is None or Path(spec).expanduser().exists() or spec.lower().endswith(SUPPORTED_SUFFIXES):
        return None
    first, second = match["first"], match["second"]
    return HubDataset(spec, match["repo"], match["revision"], first if second else None, second or first or "train")


BAD_ROW = "_tunery_unreadable"  # a row that could not be read: its key holds why (reported, then skipped)


def _load_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
                        "If the file has one object per line, name it .jsonl") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of examples (or an object holding one list)")
    return data


def _load_jsonl(path: Path) -> list[dict]:
    """One row per line; a line that is not a JSON object is a row reported with its line number."""
    rows, offset = [], 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e.reason} at line {lineno}, byte {offset + e.start} of "
                                "the file); save it as UTF-8") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:  # reported with the rest, not the end of the file
                rows.append({BAD_ROW: f"line {lineno}: malformed JSON ({e.msg} at column {e.colno})"})
                continue
            except RecursionError:
                rows.append({BAD_ROW: f"line {lineno}: JSON nested too deeply"})
                continue
            rows.append(value if isinstance(value, dict) else
                        {BAD_ROW: f"line {lineno}: {_kind(value)}, expected an object with fields"})
    return rows


def _kind(value: Any) -> str:
    return {bool: "true/false", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else f"a {type(value).__name__}")


# Only the columns whose value is a list of turns; other cells stay text, so a reply that is JSON
# ('{"name": "Ada"}') is trained on as written, not as the Python repr of a decoded dict.
_JSON_COLUMNS = ("messages", "conversations")


def _decode_cells(rows: list[dict]) -> list[dict]:
    """Turn JSON arrays/objects in the turn-list columns back into lists/dicts; empty cells become None."""
    for row in rows:
        for key, value in row.items():
            if isinstance(value, str):
                text = value.strip()
                if key in _JSON_COLUMNS and text[:1] in "[{" and text[-1:] in "]}":
                    try:
                        row[key] = json.loads(text)
                    except json.JSONDecodeError:
                        pass
                elif text == "":
                    row[key] = None
            elif value != value:  # NaN from an empty spreadsheet cell
                row[key] = None
    return rows


def _load_csv(path: Path) -> list[dict]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: cannot read as CSV: {e}") from None
    return _decode_cells(frame.to_dict("records"))


def _load_xlsx(path: Path, sheet: str | None = None) -> list[dict]:
    """The named sheet (or the only one) as rows under its first row's headers; cells as the user sees them:
    dates as ISO dates, whole numbers without '.0', TRUE/FALSE. Merged cells are refused with the fix."""
    from openpyxl import load_workbook

    try:
        book = load_workbook(path, data_only=True)  # not read-only: merged ranges are only known then
    except Exception as e:  # openpyxl raises many types for broken workbooks
        raise DataError(f"{path}: cannot read as an Excel workbook: {e}") from None
    names = book.sheetnames
    if sheet is None and len(names) > 1:
        raise DataError(f"{path} has {len(names)} sheets ({', '.join(names)}); name the one to train on with "
                        "--sheet NAME (or `sheet:` in the config)")
    if sheet is not None and sheet not in names:
        raise DataError(f"{path} has no sheet {sheet!r}; its sheets: {', '.join(names)}")
    ws = book[sheet or names[0]]
    merged = [str(r) for r in ws.merged_cells.ranges if r.max_row > 1 and r.max_row > r.min_row]
    if merged:
        raise DataError(f"{path}, sheet {ws.title!r}: merged cells {', '.join(merged[:5])}"
                        f"{' ...' if len(merged) > 5 else ''} keep their value in the first row only, so the rows "
                        "below would read as empty. Unmerge them and fill every row (Excel: Merge & Center > "
                        "Unmerge Cells, then fill down), and save the file again")
    table = [row for row in ws.iter_rows(values_only=True) if any(c is not None for c in row)]
    if not table:
        return []
    header = [str(h).strip() if h is not None else f"Unnamed: {i}" for i, h in enumerate(table[0])]
    return _decode_cells([{h: _excel_cell(v) for h, v in zip(header, row)} for row in table[1:]])


def _excel_cell(value: Any) -> Any:
    import datetime as dt

    if isinstance(value, dt.datetime):
        return value.date().isoformat() if value.time() == dt.time() else value.isoformat(sep=" ")
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _load_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's errors are varied (ArrowInvalid, OSError)
        raise DataError(f"{path}: cannot read as Parquet: {e}") from None


def _load_datasets_folder(path: Path) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: a folder must be saved with datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict needs a 'train' split; it has {', '.join(ds)}")
        ds = ds["train"]
    return ds.to_list()
