"""HashingWriter.copy_range: ranges of a file appended by the kernel (os.copy_file_range), as validate cuts excluded
rows out of its candidates file. The bytes are exact with the kernel's copy and without it, interleaved with ordinary
writes; a short source or a file-size limit stops the write and leaves no output."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from tasks.common.artifacts import atomic_writer

SOURCE = bytes(range(256)) * 4096  # 1 MiB, every byte value


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.bin"
    path.write_bytes(SOURCE)
    return path


def _write(source, out, ranges):
    with open(source, "rb") as src, atomic_writer(out) as w:
        w.write(b"head")
        for start, stop in ranges:
            w.copy_range(src, start, stop - start)
            w.write(b"|")  # an ordinary write after each copy lands after it, not over it


RANGES = [(0, 10), (300_000, 700_000), (1_048_570, 1_048_576)]
EXPECTED = b"head" + b"".join(SOURCE[a:b] + b"|" for a, b in RANGES)


def test_ranges_are_copied_exactly_by_the_kernel(source, tmp_path, monkeypatch):
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a, **k: calls.append(a) or real(*a, **k))
    _write(source, tmp_path / "out.bin", RANGES)
    assert (tmp_path / "out.bin").read_bytes() == EXPECTED
    assert calls, "the kernel's copy was not used"


def test_without_the_kernels_copy_the_bytes_are_the_same(source, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSYS, "no copy_file_range here")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    _write(source, tmp_path / "out.bin", RANGES)
    assert (tmp_path / "out.bin").read_bytes() == EXPECTED


def test_a_source_shorter_than_the_range_stops_and_leaves_no_output(source, tmp_path):
    out = tmp_path / "out.bin"
    with pytest.raises(OSError, match="source.bin"):
        _write(source, out, [(len(SOURCE) - 10, len(SOURCE) + 10)])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.bin"]  # no temporary file left


def test_the_digest_is_refused_once_a_range_was_copied(source, tmp_path):
    with open(source, "rb") as src, atomic_writer(tmp_path / "out.bin") as w:
        w.copy_range(src, 0, 100)
        with pytest.raises(RuntimeError):
            w.hexdigest()


def test_a_file_size_limit_during_the_copy_is_a_full_disk(source, tmp_path):
    """A real limit (RLIMIT_FSIZE, as `ulimit -f`): the kernel's copy fails with EFBIG as a full disk would, and the
    writer raises DiskFull, the error a stage reports as one line (runner.run_main)."""
    script = textwrap.dedent(
        f"""
        import signal
        from pathlib import Path
        from tasks.common.artifacts import atomic_writer
        from tasks.common.errors import DiskFull
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            with open({str(source)!r}, "rb") as src, atomic_writer(Path({str(tmp_path / "out.bin")!r})) as w:
                w.copy_range(src, 0, {len(SOURCE)})
        except DiskFull:
            print("disk full")
        """
    )

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, preexec_fn=limit)
    assert done.stdout.strip() == "disk full", done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.bin"]  # no partial output, no temporary file
