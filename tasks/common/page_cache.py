"""Streamed files hand their pages back to the kernel as they go, so gigabytes read or written once do not fill memory.

A data stage reads its input once and writes its output once. Left alone, the kernel keeps every page of both cached
until memory is full, then reclaims them while the stage runs: at ten million rows (17 GB in, 17 GB out) the
download stage's kernel time grew from 2 s a million rows to about 5, and its wall time 12x for 10x the rows. Handing
the pages back behind the stream (posix_fadvise DONTNEED) takes a fifth off that kernel time and leaves memory free
(docs/performance.md, "Page cache"); the rest of the growth is not the page cache's.

Read pages are clean and go at once. Written pages are dirty: the first advice on them starts their write-back, the
next one, a chunk later, drops them. So each advice covers the last two chunks, and no page is advised more than
twice however long the file. Small files (under a chunk) are never advised. Where the call does not exist (macOS,
Windows) or the file cannot take it (a pipe), nothing happens: this is about speed, never about what is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

CHUNK = 64 << 20  # bytes between two advices: large enough that the calls cost nothing, small against memory
LINES_A_CHECK = 4096  # lines read between two looks at the position (a system call each)
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


class DropBehind:
    """Follows a file descriptor's position through a stream (`passed`) and hands back the pages behind it."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd if _DONTNEED is not None else None
        self._from = self._mark = 0  # advise [_from, position): the chunk advised last time and the new one

    def passed(self, position: int) -> None:
        """The stream is done with every byte before `position`."""
        if self._fd is not None and position - self._mark >= CHUNK and self._advise(self._from, position):
            self._from, self._mark = self._mark, position

    def finished(self, position: int) -> None:
        """The stream is over at `position` (for a writer, once its data is synced, so every page is clean): a stream
        long enough to have been advised hands back all its pages in one last advice, those still dirty at the
        earlier ones (a writer faster than the disk) included."""
        if self._fd is not None and self._mark:
            self._advise(0, position)
        self._fd = None

    def _advise(self, start: int, end: int) -> bool:
        try:
            os.posix_fadvise(self._fd, start, end - start, _DONTNEED)
            return True
        except OSError:  # a pipe or a file system without page cache: keep streaming, unadvised
            self._fd = None
            return False

    def passed_read(self) -> None:
        """For a reader: everything up to the descriptor's offset has been read (a buffered reader's buffer
        included; the offset is where the next read starts)."""
        if (position := self._offset()) is not None:
            self.passed(position)

    def finished_read(self) -> None:
        if (position := self._offset()) is not None:
            self.finished(position)

    def _offset(self) -> int | None:
        if self._fd is None:
            return None
        try:
            return os.lseek(self._fd, 0, os.SEEK_CUR)
        except OSError:  # a pipe (a named pipe given as the source) has no offset: stream it unadvised
            self._fd = None
            return None


def drop_behind(f) -> DropBehind:
    """A DropBehind for an open file (text, binary or compressed: the descriptor is the file on disk's)."""
    try:
        return DropBehind(f.fileno())
    except (AttributeError, OSError, ValueError):  # an in-memory stream: nothing to hand back
        return DropBehind(None)


def lines_dropping_behind(f) -> Iterator:
    """The lines of an open file (as iterating it gives them), its pages handed back every LINES_A_CHECK lines."""
    behind = drop_behind(f)
    for k, line in enumerate(f, 1):
        yield line
        if k % LINES_A_CHECK == 0:
            behind.passed_read()
    behind.finished_read()
