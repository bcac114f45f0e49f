"""Stage 1, download: fetch the raw rows exactly as published, and record where they came from.

Sources: a Hub dataset (`datasets.load_dataset`, revision pinnable) or a local .jsonl/.json/
.parquet/.csv file (the shipped sample is one). Output: data/raw/rows.jsonl (one JSON object a row,
values unchanged, columns renamed only where download.columns says) and data/raw/source.json (origin,
revision or sha256, row count, time). Data with no column the parser can read stops here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from pathlib import Path

from tasks import paths
from tasks.artifacts import sha256_file, write_json, write_jsonl
from tasks.config import ColumnsParams, DownloadParams, load_params
from tasks.conversation import has_readable_column, no_column_message
from tasks.errors import PipelineError, run_main

log = logging.getLogger(__name__)

LOCAL_FORMATS = (".jsonl", ".json", ".parquet", ".csv")
# Text files are read as utf-8-sig: plain UTF-8, and a leading byte-order mark (Windows tools and spreadsheet
# exports write one) is dropped instead of breaking line 1.
TEXT_ENCODING = "utf-8-sig"


def _plain(value):
    """JSON-safe copy of a cell: numpy/pyarrow scalars and arrays to Python, NaN to None."""
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


def _json_problem(e: json.JSONDecodeError, line: bool = True) -> str:
    # Some of json's messages end in "at" ("Unterminated string starting at"): the position completes them.
    where = f"line {e.lineno}, column {e.colno}" if line else f"column {e.colno}"
    return f"{e.msg.removesuffix(' at')} at {where}"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding=TEXT_ENCODING) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(
                    f"{path}, line {lineno}: not valid JSON ({_json_problem(e, line=False)}). "
                    "Fix or remove that line; every line must be one JSON object."
                ) from None
            if not isinstance(row, dict):
                raise PipelineError(
                    f'{path}, line {lineno}: a JSON {type(row).__name__}, expected an object like {{"text": ...}}.'
                )
            rows.append(row)
    return rows


def read_local(path: Path) -> list[dict]:
    """Rows of a local file; every way it can be unreadable becomes one clear PipelineError."""
    if not path.exists():
        raise PipelineError(f"input file {path} does not exist. Set download.path in params.yaml to your data file.")
    if path.is_dir():
        raise PipelineError(
            f"input {path} is a directory; download.path must name one .jsonl/.json/.parquet/.csv file."
        )
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise PipelineError(f"input file {path} has suffix {suffix!r}; supported: {', '.join(LOCAL_FORMATS)}.")
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding=TEXT_ENCODING))
            if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: take the only list
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else data
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise PipelineError(f"{path}: expected a JSON list of objects (or use .jsonl, one object a line).")
            return data
        import pandas as pd

        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, keep_default_na=False, encoding=TEXT_ENCODING)
        return [{str(k): _plain(v) for k, v in rec.items()} for rec in frame.to_dict(orient="records")]
    except PipelineError:
        raise
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}). Re-save it as UTF-8.") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({_json_problem(e)}).") from None
    except Exception as e:  # pyarrow/pandas raise many types for a truncated or foreign file
        raise PipelineError(
            f"{path}: could not be read as {suffix[1:]} ({type(e).__name__}: {e}). "
            "The file may be truncated or not of that format; re-export it."
        ) from None


def map_columns(rows: list[dict], columns: ColumnsParams, where: str) -> list[dict]:
    """Rename the columns download.columns maps onto the fields the parser reads ({"content": ...} -> {"text": ...})."""
    renames = {column: field for field, column in columns.model_dump().items() if column not in (None, field)}
    found = sorted({k for r in rows for k in r})
    for column, field in renames.items():
        if column not in found:
            raise PipelineError(
                f"{where}: download.columns.{field} is {column!r}, but no row has that column "
                f"(found {found}). Set it to one of those, or to null."
            )
    for i, row in enumerate(rows):
        for column, field in renames.items():
            if column in row and field in row:
                raise PipelineError(
                    f"{where}, row {i} (from 0): has both `{column}` and `{field}`, so "
                    f"download.columns.{field}={column!r} would overwrite `{field}`. Drop one of the "
                    "two columns, or set the param back to null."
                )
    return [{renames.get(k, k): v for k, v in row.items()} for row in rows]


def require_readable_column(rows: list[dict], where: str) -> None:
    """Stop here, naming the columns, when no row has a column the parser reads: every row would fail validation."""
    if not any(has_readable_column(r) for r in rows):
        raise PipelineError(
            f"{where}: {no_column_message({k for r in rows for k in r})}. Rename the column in the data, or map it "
            "with the download.columns param: `dvc exp run -S download.columns.text=<column>` (or .messages, or "
            ".instruction and .output)."
        )


def read_hub(params: DownloadParams) -> tuple[list[dict], str | None]:
    """Rows of a Hub dataset split and the commit sha they came from."""
    import datasets

    try:
        ds = datasets.load_dataset(params.hub_id, revision=params.revision, split=params.split)
    except Exception as e:  # network, auth, unknown repo or split: all user-fixable
        raise PipelineError(
            f"could not load Hub dataset {params.hub_id!r} (revision {params.revision or 'latest'}, split "
            f"{params.split!r}): {type(e).__name__}: {e}. Check the id and your network/HF_TOKEN, or download "
            "the file and set download.source=local with download.path pointing at it."
        ) from None
    return [{k: _plain(v) for k, v in row.items()} for row in ds], resolve_hub_revision(params)


def resolve_hub_revision(params: DownloadParams) -> str | None:
    """The commit sha the Hub serves for the configured revision (None when the Hub is unreachable)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(params.hub_id, revision=params.revision).sha
    except Exception as e:
        log.warning("could not resolve the Hub revision of %s: %s", params.hub_id, e)
        return None


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


def download(params: DownloadParams, out_rows: Path = paths.RAW_ROWS, out_source: Path = paths.SOURCE_RECORD) -> dict:
    """Fetch the rows, write them and their source record; returns the source record."""
    if params.source == "local":
        path = Path(params.path)
        rows = read_local(path)
        origin = {"source": "local", "path": str(path), "file_sha256": sha256_file(path)}
    else:
        rows, revision = read_hub(params)
        origin = {
            "source": "hub",
            "hub_id": params.hub_id,
            "requested_revision": params.revision,
            "revision": revision,
            "split": params.split,
        }
    where = params.path if params.source == "local" else params.hub_id
    if not rows:
        raise PipelineError(f"{where} holds no rows. Point download.path/hub_id at a dataset with data.")
    rows = map_columns(rows, params.columns, where)
    require_readable_column(rows, where)
    columns = sorted({k for r in rows for k in r})
    write_jsonl(out_rows, rows)
    record = {
        **origin,
        "row_count": len(rows),
        "columns": columns,
        "rows_file": str(out_rows),
        "rows_sha256": sha256_file(out_rows),
        "downloaded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_json(out_source, record)
    log.info(
        "downloaded %d rows (%s) from %s", len(rows), ", ".join(columns), origin.get("path") or origin.get("hub_id")
    )
    return record


def main() -> None:
    download(load_params().download)


if __name__ == "__main__":
    run_main("download", main)
