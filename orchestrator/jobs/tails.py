"""What the reconciler has already read of the files running jobs keep appending to (the trainer's log.jsonl).

A pass reads only the bytes appended since the last one, and only complete lines. The offset moves on when
the transaction that acted on those lines commits, so lines whose effect was rolled back are read again.
Offsets live in memory: they are a cache, not state. A restarted or newly elected reconciler starts from
byte 0 and reads each file once in full, which is safe because what is ingested from it is idempotent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.orm import Session

#: Files are read at most this much per pass (a huge log is caught up over several passes).
READ_LIMIT = 16 << 20


@dataclass(frozen=True)
class Mark:
    """A position in one incarnation of a file: its inode and device, and a byte offset."""

    inode: int
    device: int
    offset: int


@dataclass(frozen=True)
class Tail:
    """Complete lines appended after `start`, and where reading them leaves the file."""

    path: str
    lines: list[str]
    end: Mark | None

    def any(self, *markers: str) -> bool:
        return any(marker in line for line in self.lines for marker in markers)


class LogTails:
    def __init__(self) -> None:
        self._marks: dict[str, Mark] = {}
        self._stats: dict[str, tuple[int, int, int]] = {}
        self._touched: set[str] = set()

    def read(self, path: Path | str) -> Tail:
        """The complete lines after the last committed offset (all of them if the file was replaced or cut).
        Plain os calls: a pass reads one log per running job, so per-file overhead is the cost that scales."""
        key = os.fspath(path)
        self._touched.add(key)
        try:
            fd = os.open(key, os.O_RDONLY)
        except FileNotFoundError:
            return Tail(key, [], None)
        try:
            info = os.fstat(fd)
            mark = self._marks.get(key)
            same_file = mark is not None and (mark.inode, mark.device) == (info.st_ino, info.st_dev)
            start = mark.offset if mark is not None and same_file and mark.offset <= info.st_size else 0
            if start == info.st_size:
                return Tail(key, [], Mark(info.st_ino, info.st_dev, start))
            data = os.pread(fd, min(READ_LIMIT, info.st_size - start), start)
        finally:
            os.close(fd)
        complete = data.rfind(b"\n") + 1  # a line being written right now waits for the next pass
        text = data[:complete].decode("utf-8", errors="replace")
        return Tail(key, text.splitlines(), Mark(info.st_ino, info.st_dev, start + complete))

    def advance(self, tail: Tail) -> None:
        """Lines that need no action: never read them again."""
        if tail.end is not None:
            self._marks[tail.path] = tail.end

    def advance_on_commit(self, session: Session, tail: Tail) -> None:
        """Lines acted on inside `session`'s transaction: moved past once (and only if) it commits."""
        event.listen(session, "after_commit", lambda _session: self.advance(tail), once=True)

    # whole files a hook re-reads (small ones, such as a search trial's metrics): changed since last read?

    @staticmethod
    def _stat(path: str) -> tuple[int, int, int]:
        try:
            info = os.stat(path)  # noqa: PTH116 (str paths: no pathlib objects per job per pass)
        except FileNotFoundError:
            return (0, 0, -1)
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def changed(self, path: Path | str) -> bool:
        key = os.fspath(path)
        self._touched.add(key)
        return self._stats.get(key) != self._stat(key)

    def seen_on_commit(self, session: Session, path: Path | str) -> None:
        """The hook read `path` in this transaction: unchanged from now on, once it commits."""
        key = os.fspath(path)
        stat = self._stat(key)
        event.listen(session, "after_commit", lambda _session: self._stats.__setitem__(key, stat), once=True)

    def sweep(self) -> None:
        """Once per pass: forget the files nobody asked about since the last sweep (their jobs ended), so
        memory follows active work."""
        for table in (self._marks, self._stats):
            for path in [p for p in table if p not in self._touched]:
                del table[path]
        self._touched = set()
