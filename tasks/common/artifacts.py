"""Atomic writes and content hashes.

Every stage writes its outputs through these helpers: files are written beside their final place
and renamed into it, directories are built under a temporary name and swapped in whole, so a
crash or a bad input never leaves a half-written artifact where the last good one was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson


# Temporary files and folders are named here and made like any file, 0666/0777 less the umask (so the
# ordinary 0644/0755), not by tempfile: it makes them private (0600/0700), and renamed into place they stayed
# so, leaving a published adapter unreadable to other users and to file servers.
def _tmp_name(final: Path) -> Path:
    return final.parent / f".{final.name}.{secrets.token_hex(8)}.tmp"


def write_bytes(path: Path | str, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "xb") as f:  # x: a new file (O_EXCL), never another writer's
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path | str, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, obj: object) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


class HashingWriter:
    """A binary file that keeps the sha256 of what went into it, so a large output is not read back to hash it."""

    def __init__(self, f):
        self._f, self._h = f, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._h.update(data)
        self._f.write(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@contextlib.contextmanager
def atomic_writer(path: Path | str) -> Iterator[HashingWriter]:
    """Stream into a file that appears at `path` only when the block ends without error (else the old one stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "xb", buffering=1 << 20) as f:
            yield HashingWriter(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def jsonl_line(row: dict) -> bytes:
    """One row as the pipeline writes it in every .jsonl file: compact-ish JSON, UTF-8 kept, one line."""
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def write_jsonl(path: Path | str, rows: Iterable[dict]) -> Path:
    with atomic_writer(path) as out:
        for r in rows:
            out.write(jsonl_line(r))
    return Path(path)


def read_jsonl(path: Path | str) -> list[dict]:
    return list(iter_jsonl(path))


def iter_jsonl(path: Path | str, hasher=None) -> Iterator[dict]:
    """The rows of a .jsonl file the pipeline wrote, one at a time; `hasher` (a hashlib object) sees every byte.

    orjson parses about three times faster than json, to the same values for what the pipeline writes (strings,
    ints, floats, bools); files from outside the pipeline are read with json (download, scan), which also takes
    what orjson refuses (NaN, integers past 64 bits).
    """
    with open(path, "rb", buffering=1 << 20) as f:
        for line in f:
            if hasher is not None:
                hasher.update(line)
            if line.strip():
                yield orjson.loads(line)


def read_json(path: Path | str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def staged_dir(final: Path | str) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `final` whole, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    tmp.mkdir()
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: Path | str, include_hidden: bool = False) -> dict[str, str]:
    """sha256 of every file under `path` (relative posix path -> hash); a file gives {name: hash}. Dotfiles are left
    out unless include_hidden (a release counts every file: a `.gitattributes` added to it is a change)."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {
        p.relative_to(path).as_posix(): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if (p.is_file() or p.is_symlink())
        and (include_hidden or not any(part.startswith(".") for part in p.relative_to(path).parts))
    }


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
