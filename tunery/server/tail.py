"""Follow a growing file from a byte offset: each read returns only what was appended since the last one.

The live pages stream metrics.jsonl and job.log through this, so a tick costs the new bytes, not the whole file.
A file replaced under the same name (a resumed run rewrites metrics.jsonl under a new inode) starts over from
its beginning, and says so, so the page can clear what it drew.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_CHUNK = 1 << 20  # at most this much per read: a huge log arrives over several ticks, never all at once


class Tail:
    def __init__(self, path: Path, offset: int = 0, inode: int | None = None, lines: bool = True):
        """`lines`: hand out complete lines only (a line still being written waits for its newline)."""
        self.path, self.offset, self.inode, self.lines = Path(path), offset, inode, lines
        self.bytes_read = 0  # in total, for the tests that check only new bytes are read

    @property
    def cursor(self) -> str:
        """Where the next read starts, as `inode:offset` (an SSE event id: a reconnect resumes there)."""
        return f"{self.inode or 0}:{self.offset}"

    @classmethod
    def from_cursor(cls, path: Path, cursor: str | None, lines: bool = True) -> Tail:
        inode, _, offset = (cursor or "").partition(":")
        if inode.isdigit() and offset.isdigit():
            return cls(path, int(offset), int(inode), lines)
        return cls(path, lines=lines)

    def read(self) -> tuple[bytes, bool]:
        """(the bytes appended since the last read, whether the file was replaced and read from its start)."""
        try:
            with open(self.path, "rb") as fh:
                inode = os.fstat(fh.fileno()).st_ino
                reset = self.inode is not None and inode != self.inode
                if reset:
                    self.offset = 0
                self.inode = inode
                if os.fstat(fh.fileno()).st_size < self.offset:  # truncated in place: start over too
                    self.offset, reset = 0, True
                fh.seek(self.offset)
                data = fh.read(_CHUNK)
        except FileNotFoundError:
            return b"", False
        self.bytes_read += len(data)
        if self.lines:
            data = data[: data.rfind(b"\n") + 1]
        self.offset += len(data)
        return data, reset

    def skip_to_last(self, keep: int) -> None:
        """Start at most `keep` bytes before the end, at a line start (a long log shows its tail first)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size <= keep:
            return
        with open(self.path, "rb") as fh:
            self.inode = os.fstat(fh.fileno()).st_ino
            fh.seek(size - keep)
            head = fh.read(keep)
        self.offset = size - keep + head.find(b"\n") + 1


def records(data: bytes) -> list[dict]:
    """The JSON objects of complete metrics.jsonl lines; an odd line is skipped, as the job worker skips it."""
    out = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            out.append(record)
    return out


def last_record(path: Path, window: int = 16384) -> dict | None:
    """The last metrics record of a run, read from the file's end only."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - window))
            data = fh.read()
    except FileNotFoundError:
        return None
    found = records(data)
    return found[-1] if found else None
