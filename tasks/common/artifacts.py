"""Atomic writes and content hashes.

Every stage writes its outputs through these helpers: files are written beside their final place
and renamed into it, directories are built under a temporary name and swapped in whole, so a
crash or a bad input never leaves a half-written artifact where the last good one was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from tasks.common.errors import DiskFull
from tasks.common.page_cache import drop_behind, lines_dropping_behind

# The errors a full disk, a quota or a file-size limit give a write.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB" if n >= 2**10 else f"{n} bytes"


def disk_full(final: Path, partial: Path, error: BaseException) -> DiskFull:
    """The one line a stage stops with when `final` could not be written: where, how much was free, how much the
    unfinished copy held and the last good one holds (left in place), so the user knows what to free."""
    why = space_reason(final.parent if final.parent.exists() else Path.cwd(), error)
    last = f"the last good copy ({_mib(_size(final))}) is left in place" if final.exists() else "nothing was there"
    return DiskFull(
        f"no space to write {final}: {why} after {_mib(_size(partial))} of it were written; {last}. Free at least "
        f"{_mib(max(_size(final), _size(partial)) * 2)} (or raise the limit) and run it again."
    )


def space_reason(where: Path, error: BaseException) -> str:
    """Why a write failed for want of space, in words: a file-size limit, or how much its filesystem has free."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY or any(getattr(e, "errno", None) == errno.EFBIG for e in chain(error)):
        return f"a file-size limit (ulimit -f, {_mib(soft)}) was reached"
    return f"its filesystem has {_mib(shutil.disk_usage(where).free)} free"


def chain(error: BaseException | None) -> Iterator[BaseException]:
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def no_space(error: BaseException) -> bool:
    """A write failed for want of space: the OSError itself, or one a library wrapped; or an error of a writer that
    drops the errno (SQLite's, under DVC's and dvclive's caches; torch.save's zip writer, a RuntimeError) while
    space is measurably short."""
    import sqlite3

    for e in chain(error):
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        if isinstance(e, (sqlite3.OperationalError, RuntimeError)) and _space_short():
            return True
    return False


def _space_short() -> bool:
    """This process runs under a file-size limit, or the working directory's filesystem is (nearly) full."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return soft != resource.RLIM_INFINITY or shutil.disk_usage(Path.cwd()).free < 16 << 20


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
    except OSError as e:
        if e.errno in NO_SPACE:
            raise disk_full(path, tmp, e) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path | str, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, obj: object) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


# copy_file_range's refusals that mean "not here" (no such call, another file system, a file it cannot take), not a
# failed write: the bytes are then copied through Python instead.
_NO_KERNEL_COPY = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


class HashingWriter:
    """A binary file that keeps the sha256 of what went into it, so a large output is not read back to hash it.
    Its pages go back to the kernel as it grows (page_cache.py)."""

    def __init__(self, f):
        self._f, self._h = f, hashlib.sha256()
        self._written, self._behind = 0, drop_behind(f)

    def write(self, data: bytes) -> None:
        if self._h is not None:  # None once a range was copied by the kernel (copy_range)
            self._h.update(data)
        self._f.write(data)
        self._written += len(data)
        self._behind.passed(self._written)

    def copy_range(self, src, offset: int, count: int) -> None:
        """Append `count` bytes of the open file `src` from `offset`, copied by the kernel (os.copy_file_range) with
        no byte passing through Python: for cutting a few lines out of gigabytes. The sha256 is then not kept
        (hexdigest refuses). Where the kernel cannot (another system, another file system), the bytes are read and
        written here. A file shorter than offset + count stops with an OSError naming it."""
        self._f.flush()
        self._h = None
        out, end, kernel = self._f.fileno(), offset + count, hasattr(os, "copy_file_range")
        while offset < end:
            copied = None
            if kernel:
                try:
                    copied = os.copy_file_range(src.fileno(), out, end - offset, offset_src=offset)
                except OSError as e:
                    if e.errno not in _NO_KERNEL_COPY:
                        raise
                    kernel = False  # refused once, refused for this file: the rest goes through Python
            if copied is None:
                copied = os.write(out, os.pread(src.fileno(), min(end - offset, 1 << 20), offset))
            if not copied:
                raise OSError(f"{src.name} ends before byte {end}")
            offset += copied
            self._written += copied
            self._behind.passed(self._written)
        self._f.seek(0, os.SEEK_END)  # the buffered writer's position, after writes that went around it

    def hexdigest(self) -> str:
        if self._h is None:
            raise RuntimeError("a file with ranges copied by the kernel has no sha256 kept")
        return self._h.hexdigest()

    def synced(self) -> None:
        """Every byte is on disk: the pages still cached can go."""
        self._behind.finished(self._written)


@contextlib.contextmanager
def atomic_writer(path: Path | str, reported_as: Path | None = None) -> Iterator[HashingWriter]:
    """Stream into a file that appears at `path` only when the block ends without error (else the old one stays).
    reported_as: the output a full disk is reported for, when `path` is a hidden step towards it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "xb", buffering=1 << 20) as f:
            yield (writer := HashingWriter(f))
            f.flush()
            os.fsync(f.fileno())
            writer.synced()
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise disk_full(reported_as or path, tmp, e) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


# json.dumps(row, ensure_ascii=False) with the encoder made once: dumps builds a new one a call for any non-default
# option, about 1 us of a row's 10 (the data stages write tens of millions of lines). Stateless, so shared.
_JSONL_ENCODER = json.JSONEncoder(ensure_ascii=False)


def jsonl_line(row: dict) -> bytes:
    """One row as the pipeline writes it in every .jsonl file: compact-ish JSON, UTF-8 kept, one line."""
    return (_JSONL_ENCODER.encode(row) + "\n").encode("utf-8")


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
        for line in lines_dropping_behind(f):
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
        try:
            yield tmp
        except Exception as e:  # whoever wrote into tmp (this module, a library saving a model, Data Docs)
            if no_space(e):  # reported for the folder being replaced, not for its temporary name
                raise disk_full(final, tmp, e) from e
            raise
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


# What a stage killed mid-write (SIGKILL: no clean-up runs) leaves: a temporary file or folder of _tmp_name, the last
# good folder staged_dir had moved aside, validate's candidates file. .dvcignore hides the same names from DVC.
_TMP = r"[0-9a-f]{16}\.tmp"
_LEFTOVER_INSIDE = re.compile(rf"\..+\.(?:{_TMP}|old|candidates)")


def sweep_leftovers(outputs: Iterable[Path | str]) -> list[Path]:
    """Remove what killed runs left beside `outputs` (and inside those that are folders); return what was removed.

    Only for a caller that knows no writer of these outputs is alive (the workspace lock: tasks/common/runner.py):
    a live writer's temporary file has the same name. An output missing beside its `.old` copy was cut between
    staged_dir's two renames: the last good copy is put back, never the unfinished new one."""
    removed = []
    for out in map(Path, outputs):
        old = out.with_name(f".{out.name}.old")
        if old.exists() and not out.exists():
            os.replace(old, out)
        beside = re.compile(rf"\.{re.escape(out.name)}\.(?:{_TMP}|old)")
        found = [p for p in _entries(out.parent) if beside.fullmatch(p.name)]
        found += [p for p in _entries(out) if _LEFTOVER_INSIDE.fullmatch(p.name)] if out.is_dir() else []
        for p in found:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def _entries(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder)]
    except (FileNotFoundError, NotADirectoryError):
        return []


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
