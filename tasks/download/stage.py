"""Stage 1, download: fetch the raw rows exactly as published, and record where they came from.

Sources: a Hub dataset (`datasets.load_dataset`, revision pinnable) or a local .jsonl/.json/.parquet/.csv/.tsv
file (the shipped sample is one), the text formats also compressed (.gz, .bz2, .xz). Output: data/raw/rows.jsonl
(one JSON object a row, values unchanged, columns renamed only where download.columns says) and
data/raw/source.json (origin, revision or sha256, row count, time). Data with no column the parser can read
stops here.

Rows stream through in blocks (jsonl lines, parquet row groups, csv chunks, the Hub's Arrow batches), so a
million-row file needs no more memory than a small one; only a .json document is parsed whole.
"""

from __future__ import annotations

import bz2
import csv
import datetime as dt
import functools
import gzip
import hashlib
import itertools
import json
import logging
import lzma
import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from tasks.common import paths
from tasks.common.artifacts import atomic_writer, jsonl_line, sha256_file, write_json
from tasks.common.config import ColumnsParams, DownloadParams, load_params
from tasks.common.conversation import has_readable_column, no_column_message
from tasks.common.errors import PipelineError
from tasks.common.page_cache import lines_dropping_behind

log = logging.getLogger(__name__)

LOCAL_FORMATS = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
# Text formats may come compressed, as Hub exports and data dumps often do (rows.jsonl.gz); read as they stream.
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_FORMATS_TEXT = f"{'/'.join(LOCAL_FORMATS)} (text formats also {'/'.join(COMPRESSIONS)})"
BLOCK_ROWS = 10_000  # rows held at a time while streaming a source into data/raw/rows.jsonl
# Text files are read as utf-8-sig: plain UTF-8, and a leading byte-order mark (Windows tools and spreadsheet
# exports write one) is dropped instead of breaking line 1.
TEXT_ENCODING = "utf-8-sig"


def _plain(value):
    """JSON-safe copy of a cell: numpy/pyarrow scalars and arrays to Python, NaN to None, bytes to text."""
    if isinstance(value, (bytes, bytearray)):
        # Parquet writers without the string type store text as binary; str() would train on "b'...'" literals.
        # Not UTF-8: UnicodeDecodeError, which the reader turns into a message naming the row.
        return bytes(value).decode("utf-8")
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _is_control(char: str) -> bool:
    return bool(char) and (ord(char) < 0x20 or ord(char) == 0x7F) and char not in "\t\n\r"


def _json_problem(e: json.JSONDecodeError, line: bool = True) -> str:
    # Some of json's messages end in "at" ("Unterminated string starting at"): the position completes them.
    where = f"line {e.lineno}, column {e.colno}" if line else f"column {e.colno}"
    found = e.doc[e.pos] if e.pos < len(e.doc) else ""
    if _is_control(found):
        # json names a raw control byte only as "Expecting value" or "Invalid control character": name the byte
        why = " (a NUL often means a file saved as UTF-16)" if found == "\0" else ""
        return (
            f"a raw control byte 0x{ord(found):02X} at {where}, which JSON text cannot hold{why}: remove it, or "
            f"write it escaped as \\u{ord(found):04x}"
        )
    return f"{e.msg.removesuffix(' at')} at {where}"


def _open_text(path: Path):
    """The file as text, decompressed on the fly when its last suffix names a compression."""
    opener = COMPRESSIONS.get(path.suffix.lower())
    return opener(path, "rt", encoding=TEXT_ENCODING) if opener else open(path, encoding=TEXT_ENCODING)


# A \uXXXX escape in the UTF-16 surrogate range: paired, it spells one character above U+FFFF (an emoji); alone (an
# emoji cut in half by a truncating exporter) json decodes it to a str that is not text and that no tokenizer takes.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(row: dict, where: str) -> None:
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end].encode("unicode_escape").decode()
        raise PipelineError(
            f"{where}: holds {bad}, half of a UTF-16 surrogate pair (often an emoji cut off when the text was "
            "truncated), which is not text. Remove that escape or fix the row, then run again."
        ) from None


def _jsonl_blocks(path: Path) -> Iterator[list[tuple[dict, str]]]:
    block = []
    with _open_text(path) as f:
        for lineno, line in enumerate(lines_dropping_behind(f), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                swapped = (
                    " If the file is one JSON document (a list of objects), name it .json."
                    if (lineno == 1 and line.lstrip()[:1] in ("[", "{") and not _is_control(e.doc[e.pos : e.pos + 1]))
                    else ""
                )
                raise PipelineError(
                    f"{path}, line {lineno}: not valid JSON ({_json_problem(e, line=False)}). "
                    f"Fix or remove that line; every line must be one JSON object.{swapped}"
                ) from None
            if not isinstance(row, dict):
                swapped = " If the file is one JSON list of objects, name it .json." if lineno == 1 else ""
                raise PipelineError(
                    f"{path}, line {lineno}: a JSON {type(row).__name__}, expected an object like "
                    f'{{"text": ...}}.{swapped}'
                )
            if _SURROGATE_ESCAPE.search(line):
                _check_unicode(row, f"{path}, line {lineno}")
            block.append((row, line.strip()))
            if len(block) == BLOCK_ROWS:
                yield block
                block = []
    if block:
        yield block


def _json_blocks(path: Path) -> Iterator[list[tuple[dict, None]]]:
    # A JSON document is parsed whole (the format has no rows to stream); large data belongs in .jsonl or .parquet.
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip()[:1] == "{":  # one object a line: JSON Lines named .json
            raise PipelineError(
                f"{path}: not one JSON document ({_json_problem(e)}): it holds one JSON object a line, which is "
                "JSON Lines. Name it .jsonl (or wrap the objects in one list)."
            ) from None
        raise
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: take the only list of objects
        rows = {k: v for k, v in data.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
        if len(rows) > 1:
            raise PipelineError(
                f"{path}: a JSON object holding {len(rows)} lists of objects ({', '.join(map(repr, rows))}), so "
                "which one holds the rows is not clear. Save the one to train on as a list of objects (or as "
                ".jsonl), and run again."
            )
        lists = [v for v in data.values() if isinstance(v, list)]
        data = next(iter(rows.values())) if rows else lists[0] if len(lists) == 1 else data
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise PipelineError(f"{path}: expected a JSON list of objects (or use .jsonl, one object a line).")
    if _SURROGATE_ESCAPE.search(text):
        for index, row in enumerate(data):
            _check_unicode(row, f"{path}, object {index + 1} of the list")
    for k in range(0, len(data), BLOCK_ROWS):
        yield [(row, None) for row in data[k : k + BLOCK_ROWS]]


def _plain_row(record: dict, where: str, index: int) -> dict:
    """A JSON-safe copy of one row (see _plain); a binary cell that is not UTF-8 stops, naming row and column."""
    row = {}
    for column, value in record.items():
        try:
            row[str(column)] = _plain(value)
        except UnicodeDecodeError as e:
            raise PipelineError(
                f"{where}, row {index} (from 0): column {column!r} is binary and not UTF-8 text ({e.reason}). "
                "This recipe reads text columns only: store them as strings (UTF-8), and run again."
            ) from None
    return row


def _parquet_blocks(path: Path) -> Iterator[list[tuple[dict, None]]]:
    import pyarrow.parquet as pq

    start = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BLOCK_ROWS):
        yield [(_plain_row(rec, str(path), i), None) for i, rec in enumerate(batch.to_pylist(), start)]
        start += batch.num_rows


def csv_separator(header: str) -> str:
    """The separator of a .csv, read off its header line: a comma, unless the header has none and has a semicolon
    (what spreadsheets write in locales where the comma is the decimal mark), a tab or a pipe. The header, not the
    rows: column names rarely hold punctuation, while conversation text is full of commas."""
    if "," in header:
        return ","
    return next((sep for sep in (";", "\t", "|") if sep in header), ",")


def _stray_quote(f, sep: str) -> tuple[int, str] | None:
    """(line number, field start) of the first field that opens with a double quote and closes it before the field
    ends (`"Bonjour" means hello`): never valid CSV quoting, where a quoted field ends at its closing quote and a
    quote inside is doubled. Read with quoting, such a field silently loses its quotes."""
    stray = re.compile(rf'(?:^|{re.escape(sep)})("[^"\n]+"(?![{re.escape(sep)}"\r\n]|$).{{0,30}})')
    for lineno, line in enumerate(f, 1):
        if '"' in line and (m := stray.search(line)):
            return lineno, m.group(1)
    return None


def _csv_blocks(path: Path, sep: str | None = None) -> Iterator[list[tuple[dict, None]]]:
    import pandas as pd

    with _open_text(path) as f:
        header = f.readline()
        f.seek(0)
        if sep is None:
            sep = csv_separator(header)
            if sep != ",":
                log.info("%s: columns separated by %r (from its header line)", path, sep)
        _check_unique_columns(path, header, sep)
        quoting = csv.QUOTE_MINIMAL
        # A pass of its own over the text (regex on lines holding a quote) before pandas parses it: the quoting
        # dialect must be chosen before the first row is read.
        stray = _stray_quote(f, sep)
        f.seek(0)
        if stray and sep == "\t":
            # Tab-separated files often use no quoting at all (a quote is just a character): read them that way.
            quoting = csv.QUOTE_NONE
            log.info("%s: read without CSV quoting (line %d holds %r)", path, *stray)
        elif stray:
            raise PipelineError(
                f"{path}, line {stray[0]}: a field opens and closes a double quote before it ends ({stray[1]!r}), "
                "which CSV reads as quoting and drops. Quote the whole field and double the quotes inside "
                '("""Bonjour"" means hello"), or save the data as .jsonl, and run again.'
            )
        start = 1
        # dtype=str: every cell as written. Inferred types turned "003" into 3 and an Alpaca input "0" into a
        # falsy 0 the parser dropped; conversation data is text. index_col=False: a row with more fields than the
        # header would otherwise turn its first fields into an index, silently (a one-column file saved with ";"
        # lost the text before each comma); pandas warns instead, and the warning stops the read here.
        frames = pd.read_csv(
            f, sep=sep, keep_default_na=False, chunksize=BLOCK_ROWS, quoting=quoting, dtype=str, index_col=False
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            try:
                for frame in frames:
                    rows = [{str(k): _plain(v) for k, v in rec.items()} for rec in frame.to_dict(orient="records")]
                    if sep == "\t":
                        _check_no_merged_rows(path, rows, start)
                    start += len(rows)
                    yield [(row, None) for row in rows]
            except pd.errors.ParserWarning:
                raise PipelineError(_field_count_problem(path, sep, quoting)) from None


def _field_count_problem(path: Path, sep: str, quoting: int) -> str:
    """Which record splits into more fields than the header names, and the separator its lines look written with."""
    with _open_text(path) as f:
        records = csv.reader(f, delimiter=sep, quoting=quoting)
        width = len(next(records, []))
        for record in records:
            if len(record) > width:
                line = records.line_num
                break
        else:
            line = None
        f.seek(0)
        sample = "".join(itertools.islice(f, 20))
    try:
        sniffed = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        sniffed = None
    found = f"its lines look separated by {sniffed!r}" if sniffed and sniffed != sep else "no other separator found"
    return (
        f"{path}, line {line}: the row splits into more fields than the header's {width} column(s) when read with "
        f"the separator {sep!r} (taken from the header line; {found}). Text that holds the separator must be quoted "
        '("a, b"): save the file with quoting, with one separator throughout, or as .jsonl. Nothing was cut.'
    )


def _check_unique_columns(path: Path, header: str, sep: str) -> None:
    """pandas reads a repeated column name as `text`, `text.1`, ...: the parser would then read the first and drop
    the second without a word, whichever held the data. Stop instead."""
    names = next(csv.reader([header.rstrip("\r\n")], delimiter=sep), [])
    seen: dict[str, int] = {}
    for position, name in enumerate(names, 1):
        if name in seen:
            raise PipelineError(
                f"{path}: the header names column {name!r} twice (columns {seen[name]} and {position}). Rename "
                "one of them, or drop the one that does not hold the data, and run again."
            )
        seen[name] = position


def _check_no_merged_rows(path: Path, rows: list[dict], start: int) -> None:
    """Tab-separated files come in two dialects: with CSV's double quotes around fields (what pandas and spreadsheets
    write, so a field can hold newlines) and without (a quote is just a character). Read as the first, a file of the
    second whose field starts with an unclosed quote swallows the following lines, separators and all, into that
    field. A tab inside a field is that trace: stop rather than train on merged rows."""
    for offset, row in enumerate(rows):
        column = next((k for k, v in row.items() if isinstance(v, str) and "\t" in v), None)
        if column is not None:
            raise PipelineError(
                f"{path}, data row {start + offset}: column {column!r} holds a tab, so a double quote that opens a "
                "field there (or on an earlier line) was read as quoting and merged the lines after it into one row. "
                "Quote fields CSV-style (a literal quote doubled inside quotes), or save the data as .jsonl, and run "
                "again."
            )


# What a file's first bytes say it is, whatever its name: a compressed or Parquet file under a text name otherwise
# fails as "not UTF-8" or "not valid JSON", which sends the user looking for a bad character.
_MAGIC = {
    b"\x1f\x8b": ".gz",
    **{b"BZh" + str(level).encode(): ".bz2" for level in range(1, 10)},
    b"\xfd7zXZ\x00": ".xz",
    b"PAR1": ".parquet",
    b"\xff\xfe": "utf-16",
    b"\xfe\xff": "utf-16",
}


def _sniffed_kind(path: Path) -> str | None:
    """.gz/.bz2/.xz/.parquet/utf-16 when the file's first bytes are that format's signature, else None."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def _misnamed(path: Path, fmt: str, compression: str | None) -> str | None:
    """Why the file's content does not match its name, with the name it needs; None when it does (or is unknown)."""
    kind = _sniffed_kind(path)
    if kind is None or kind == (compression or fmt):
        return None
    if kind == "utf-16":
        return (
            "is UTF-16 text (it starts with a UTF-16 byte-order mark, as Excel's 'Unicode Text' and Windows tools "
            "write): re-save it as UTF-8"
        )
    if fmt == ".parquet" and kind in COMPRESSIONS:
        return f"is {kind[1:]}-compressed: decompress it to a plain .parquet (parquet compresses inside the file)"
    base = path.name[: -len("".join(path.suffixes))] if path.suffixes else path.name
    if kind == ".parquet":
        return f"is a Parquet file (it starts with PAR1) but is named as {fmt[1:]}: rename it to {base}.parquet"
    if compression:
        return f"is {kind[1:]}-compressed but named {compression}: rename it to {base}{fmt}{kind}"
    return f"is {kind[1:]}-compressed but named as plain {fmt[1:]}: rename it to {path.name}{kind}"


def _first_bad_utf8(path: Path, compression: str | None) -> str:
    """Where the first byte that is not UTF-8 sits, as line and byte offset in the (decompressed) file: the decode
    error itself only knows its offset inside the read buffer."""
    opener = COMPRESSIONS.get(compression or "", open)
    offset = 0
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = line[e.start : e.end].hex(" ")
                return f"line {lineno}, byte {offset + e.start} of the file: bytes {bad}"
            offset += len(line)
    return "position unknown"


def local_format(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None) of a file name: rows.jsonl.gz -> (".jsonl", ".gz")."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def read_local(path: Path) -> Iterator[list[tuple[dict, str | None]]]:
    """The rows of a local file in blocks of (row, its JSON line as read: .jsonl only, else None); every way the
    file can be unreadable becomes one clear PipelineError."""
    if not path.exists():
        raise PipelineError(f"input file {path} does not exist. Set download.path in params.yaml to your data file.")
    if path.is_dir():
        raise PipelineError(f"input {path} is a directory; download.path must name one {_FORMATS_TEXT} file.")
    fmt, compression = local_format(path)
    why = None
    if compression and fmt == ".parquet":
        why = "parquet compresses inside the file; decompress it to a plain .parquet"
    elif fmt not in LOCAL_FORMATS:
        why = f"supported: {_FORMATS_TEXT}"
        if compression:
            why = f"a {compression} file must say its format before {compression} (rows.jsonl{compression})"
    if why:
        shown = "".join(path.suffixes[-2:]) if compression else path.suffix
        raise PipelineError(f"input file {path} has suffix {shown!r}; {why}.")
    misnamed = _misnamed(path, fmt, compression)
    if misnamed:
        raise PipelineError(f"input file {path} {misnamed}.")
    reader = {
        ".jsonl": _jsonl_blocks,
        ".json": _json_blocks,
        ".parquet": _parquet_blocks,
        ".csv": _csv_blocks,
        ".tsv": functools.partial(_csv_blocks, sep="\t"),
    }
    unpacked = f" (after {compression} decompression)" if compression else ""
    try:
        yield from reader[fmt](path)
    except PipelineError:
        raise
    except UnicodeDecodeError:
        raise PipelineError(
            f"{path}: not UTF-8 text ({_first_bad_utf8(path, compression)}{unpacked}). Re-save it as UTF-8 (a byte "
            "like e9 alone is Latin-1 or Windows-1252: open it with that encoding and save as UTF-8)."
        ) from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({_json_problem(e)}{unpacked}).") from None
    except Exception as e:  # pyarrow/pandas/gzip raise many types for a truncated or foreign file
        raise PipelineError(
            f"{path}: could not be read as {fmt[1:]}{f' ({compression[1:]})' if compression else ''} "
            f"({type(e).__name__}: {e}). The file may be truncated or not of that format; re-export it."
        ) from None


class ColumnMapper:
    """Renames the columns download.columns maps onto the fields the parser reads ({"content": ...} -> {"text":
    ...}), row by row, and keeps what the whole-file checks need: the columns found, whether any row is readable."""

    def __init__(self, columns: ColumnsParams, where: str):
        self.renames = {column: f for f, column in columns.model_dump().items() if column not in (None, f)}
        self.where = where
        self.found: set[str] = set()  # columns as in the source
        self.columns: set[str] = set()  # columns as written, after the renames
        self.readable = False
        self.rows = 0

    def map(self, row: dict) -> dict:
        self.found.update(row)
        for column, field in self.renames.items():
            if column in row and field in row:
                raise PipelineError(
                    f"{self.where}, row {self.rows} (from 0): has both `{column}` and `{field}`, so "
                    f"download.columns.{field}={column!r} would overwrite `{field}`. Drop one of the "
                    "two columns, or set the param back to null."
                )
        if self.renames:
            row = {self.renames.get(k, k): v for k, v in row.items()}
        self.columns.update(row)
        self.readable = self.readable or has_readable_column(row)
        self.rows += 1
        return row

    def check(self) -> None:
        """After the last row: stop on a mapped column no row has, on no rows, or on no readable column."""
        if not self.rows:
            raise PipelineError(f"{self.where} holds no rows. Point download.path/hub_id at a dataset with data.")
        found = sorted(self.found)
        for column, field in self.renames.items():
            if column not in self.found:
                raise PipelineError(
                    f"{self.where}: download.columns.{field} is {column!r}, but no row has that column "
                    f"(found {found}). Set it to one of those, or to null."
                )
        if not self.readable:
            raise PipelineError(
                f"{self.where}: {no_column_message(self.found)}. Rename the column in the data, or map it "
                "with the download.columns param: `dvc exp run -S download.columns.text=<column>` (or .messages, or "
                ".instruction and .output)."
            )


def read_hub(params: DownloadParams) -> tuple[Iterator[list[tuple[dict, None]]], str | None]:
    """Rows of a Hub dataset split, in blocks read from its Arrow files (never all in Python at once), and the
    commit sha they came from."""
    import datasets

    saved = Path(params.hub_id) / "state.json"  # a folder written by Dataset.save_to_disk: load_dataset refuses it
    # Offline, datasets never reads the Hugging Face hub cache (what `hf download` or an earlier online run left):
    # it only falls back to its own Arrow cache, whichever revision that was made from. So the snapshot folder of
    # the configured revision is found here and read as the local folder it is; its name is the commit.
    from_cache = _offline() and not Path(params.hub_id).is_dir()
    snapshot = hub_snapshot(params) if from_cache else None
    if from_cache and snapshot is None and params.revision:
        # datasets' own offline fallback, its Arrow cache, cannot tell revisions apart: a pinned one stops here
        raise PipelineError(_not_cached(params))
    try:
        if saved.is_file():
            ds = datasets.load_from_disk(str(saved.parent))
        elif snapshot is not None:
            ds = datasets.load_dataset(str(snapshot), split=params.split)
        else:
            ds = datasets.load_dataset(params.hub_id, revision=params.revision, split=params.split)
    except Exception as e:  # network, auth, unknown repo or split: all user-fixable
        if from_cache and snapshot is None:  # in neither cache
            raise PipelineError(_not_cached(params)) from None
        raise PipelineError(
            f"could not load Hub dataset {params.hub_id!r} (revision {params.revision or 'latest'}, split "
            f"{params.split!r}): {type(e).__name__}: {e}. Check the id and your network/HF_TOKEN, or download "
            "the file and set download.source=local with download.path pointing at it."
        ) from None

    def blocks() -> Iterator[list[tuple[dict, None]]]:
        start, where = 0, f"Hub dataset {params.hub_id!r}"
        for batch in ds.iter(batch_size=BLOCK_ROWS):
            records = (dict(zip(batch, values)) for values in zip(*batch.values()))
            block = [(_plain_row(rec, where, i), None) for i, rec in enumerate(records, start)]
            start += len(block)
            yield block

    return blocks(), snapshot.name if snapshot is not None else resolve_hub_revision(params)


def resolve_hub_revision(params: DownloadParams) -> str | None:
    """The commit sha the Hub serves for the configured revision (None when the Hub is unreachable); offline, the
    commit the hub cache holds for it (None when it holds none). For a local
    folder given as hub_id (a Hub repo's files copied here, or a `save_to_disk` folder) there is no commit: the
    sha256 of its files stands in, so a changed folder reads as a new revision (the flow then downloads again)."""
    local = Path(params.hub_id)
    if local.is_dir():
        digest = hashlib.sha256()
        # .cache: what `hf download --local-dir` keeps beside the files (its own bookkeeping, not the data)
        for file in sorted(p for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts):
            digest.update(f"{file.relative_to(local).as_posix()}\0{sha256_file(file)}\n".encode())
        return f"folder-sha256:{digest.hexdigest()}"
    if _offline():  # the commit the hub cache holds for the revision (refs/<branch or tag>, or the sha itself)
        snapshot = hub_snapshot(params)
        return snapshot.name if snapshot is not None else None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(params.hub_id, revision=params.revision).sha
    except Exception as e:
        log.warning("could not resolve the Hub revision of %s: %s", params.hub_id, e)
        return None


def _offline() -> bool:
    """HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1): nothing may be fetched, the hub cache is all there is."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def hub_snapshot(params: DownloadParams) -> Path | None:
    """The hub cache's snapshot folder of the dataset at download.revision (None: main), as huggingface_hub
    resolves it offline: a branch or tag through refs/, a commit sha directly. None when the cache has none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(params.hub_id, repo_type="dataset", revision=params.revision, local_files_only=True)
    except IncompleteSnapshotError as e:  # an interrupted download: its listing names files that are not there
        raise PipelineError(f"{_not_cached(params)} The cached snapshot is incomplete: {e}") from None
    except (LocalEntryNotFoundError, ValueError):  # not cached, or not a repo id at all (load_dataset then says so)
        return None
    return Path(folder)


def _not_cached(params: DownloadParams) -> str:
    from huggingface_hub import constants

    revision = f" --revision {params.revision}" if params.revision else ""
    return (
        f"Hub dataset {params.hub_id!r} at revision {params.revision or 'main'} is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), and offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) fetches nothing. "
        f"Download it once online (`hf download --repo-type dataset {params.hub_id}{revision}`), point HF_HOME or "
        "HF_HUB_CACHE at the cache holding it, or set download.revision to a revision the cache holds."
    )


def source_fingerprint(params: DownloadParams) -> str | None:
    """What identifies the source's current content: a local file's sha256, or the Hub revision it serves now.

    None when it cannot be told (the Hub unreachable): callers then keep what they have.
    """
    if params.source == "local":
        path = Path(params.path)
        return sha256_file(path) if path.is_file() else None
    return resolve_hub_revision(params)


def recorded_fingerprint(record_path: Path = paths.SOURCE_RECORD) -> str | None:
    """The fingerprint the last download recorded (see `download`)."""
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    return record.get("file_sha256") or record.get("revision")


def _stamp(path: Path) -> tuple[int, int] | None:
    """(size, modification time in ns) of a file: what moves when anything writes it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def download(params: DownloadParams, out_rows: Path = paths.RAW_ROWS, out_source: Path = paths.SOURCE_RECORD) -> dict:
    """Fetch the rows, write them and their source record; returns the source record.

    Rows stream from the source to data/raw/rows.jsonl a block at a time; the file appears only once every row
    has been read and the whole-file checks passed, so a bad input leaves the last good download in place.
    """
    if params.source == "local":
        path = Path(params.path)
        blocks = read_local(path)
        before = _stamp(path)
        origin = {"source": "local", "path": str(path), "file_sha256": sha256_file(path) if path.is_file() else None}
    else:
        blocks, revision = read_hub(params)
        origin = {
            "source": "hub",
            "hub_id": params.hub_id,
            "requested_revision": params.revision,
            "revision": revision,
            "split": params.split,
        }
    mapper = ColumnMapper(params.columns, params.path if params.source == "local" else params.hub_id)
    with atomic_writer(out_rows) as out:
        for block in blocks:
            for row, line in block:
                mapped = mapper.map(row)
                # A .jsonl line with no column renamed is written as read (whitespace around it dropped): the same
                # values, and no time spent serializing them again.
                out.write((line + "\n").encode("utf-8") if line is not None and mapped is row else jsonl_line(mapped))
        mapper.check()
        if params.source == "local" and _stamp(path) != before:
            # The sha256 above was taken before the rows were read: a file written meanwhile (still being
            # exported, appended to) would leave rows that do not match the hash the lineage records.
            raise PipelineError(
                f"{path} changed while it was read (its size or modification time moved). Wait until whatever "
                "writes it has finished, and run again."
            )
    record = {
        **origin,
        "row_count": mapper.rows,
        "columns": sorted(mapper.columns),
        "rows_file": str(out_rows),
        "rows_sha256": out.hexdigest(),
        "downloaded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_json(out_source, record)
    log.info(
        "downloaded %d rows (%s) from %s",
        mapper.rows,
        ", ".join(record["columns"]),
        origin.get("path") or origin.get("hub_id"),
    )
    return record


def main() -> None:
    download(load_params().download)
