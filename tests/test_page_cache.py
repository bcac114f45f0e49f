"""Streamed files hand their pages back as they go (tasks/common/page_cache.py): what a stage writes through
atomic_writer and reads through iter_jsonl does not stay in the page cache, and the bytes are the same either way.

Measured with util-linux's fincore (the kernel's own count of a file's cached pages), with a 1 MiB chunk so a few
MiB show it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tasks.common import page_cache
from tasks.common.artifacts import atomic_writer, iter_jsonl

MIB = 1 << 20
ROWS = 40_000  # about 8 MiB of JSON lines
LINE = b'{"text": "' + b"x" * 190 + b'"}\n'

pytestmark = pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux's fincore")


def _cached(path) -> int:
    """Bytes of `path` in the page cache now."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True)
    return int(out.stdout.split()[0])


@pytest.fixture()
def small_chunks(monkeypatch):
    monkeypatch.setattr(page_cache, "CHUNK", MIB)
    monkeypatch.setattr(page_cache, "LINES_A_CHECK", 256)


def _plain_copy(path):
    """The same rows written without advice: the control that shows this file system keeps written pages cached."""
    with open(path, "wb") as f:
        for _ in range(ROWS):
            f.write(LINE)
        f.flush()
        os.fsync(f.fileno())
    return path


def test_written_file_leaves_the_page_cache(tmp_path, small_chunks):
    control = _plain_copy(tmp_path / "control.jsonl")
    if _cached(control) < control.stat().st_size // 2:
        pytest.skip(f"{tmp_path}'s file system does not keep written pages cached: nothing to hand back")
    written = tmp_path / "rows.jsonl"
    with atomic_writer(written) as out:
        for _ in range(ROWS):
            out.write(LINE)
    size = written.stat().st_size
    assert size > 6 * MIB
    # the last two chunks and the write buffer may stay; everything before them went back
    assert _cached(written) <= 4 * MIB, f"{_cached(written)} of {size} bytes still cached"
    assert written.read_bytes() == control.read_bytes()


def test_read_file_leaves_the_page_cache(tmp_path, small_chunks):
    path = _plain_copy(tmp_path / "rows.jsonl")
    if _cached(path) < path.stat().st_size // 2:
        pytest.skip(f"{tmp_path}'s file system does not keep written pages cached: nothing to hand back")
    rows = sum(1 for _ in iter_jsonl(path))
    assert rows == ROWS
    assert _cached(path) <= 4 * MIB, f"{_cached(path)} of {path.stat().st_size} bytes still cached after reading"


def test_a_named_pipe_is_read_whole(tmp_path, small_chunks):
    """A source may be a named pipe (`mkfifo`, a decompressor writing into it): it has no offset to advise behind,
    and every line still comes through."""
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"yes '{LINE.decode().strip()}' | head -n {ROWS} > {fifo}"])
    try:
        with open(fifo, "rb") as f:
            lines = list(page_cache.lines_dropping_behind(f))
    finally:
        writer.wait(timeout=30)
    assert len(lines) == ROWS and lines[0] == LINE


def test_a_pipe_streams_unadvised():
    read, write = os.pipe()
    try:
        behind = page_cache.DropBehind(write)
        behind.passed(page_cache.CHUNK * 2)  # posix_fadvise refuses a pipe: no error, and no further tries
        assert behind._fd is None
    finally:
        os.close(read)
        os.close(write)
