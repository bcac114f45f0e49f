"""Stage 1: rows come through unchanged with a source record; every unreadable input is one clear error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.download import download
from tasks.errors import PipelineError
from tests.conftest import with_params

SAMPLE = Path("data/sample/guanaco_sample.jsonl")
ROWS = [
    {"text": "### Human: What is 2+2?### Assistant: It is 4."},
    {"text": "### Human: Name a color.### Assistant: Blue."},
    {"text": "### Human: Say hi.### Assistant: Hi!"},
]


def _dl(params, path: Path | str, tmp: Path, **changes) -> tuple[dict, Path, Path]:
    p = with_params(params, **{"download.source": "local", "download.path": str(path)},
                    **{f"download.{k}": v for k, v in changes.items()})
    out_rows, out_source = tmp / "out" / "rows.jsonl", tmp / "out" / "source.json"
    return download(p.download, out_rows, out_source), out_rows, out_source


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_local_jsonl_rows_unchanged(params, workdir):
    record, out_rows, out_source = _dl(params, SAMPLE, workdir)
    assert _read_jsonl(out_rows) == _read_jsonl(SAMPLE)
    source = json.loads(out_source.read_text())
    assert source == record
    assert source["source"] == "local"
    assert source["path"] == str(SAMPLE)
    assert source["file_sha256"] == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    assert source["row_count"] == 64
    assert source["columns"] == ["text"]
    assert source["rows_sha256"] == hashlib.sha256(out_rows.read_bytes()).hexdigest()


def test_parquet_input(params, workdir):
    path = workdir / "in.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    record, out_rows, _ = _dl(params, path, workdir)
    assert _read_jsonl(out_rows) == ROWS
    assert record["row_count"] == 3 and record["columns"] == ["text"]


def test_parquet_list_column_becomes_plain_json(params, workdir):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    path = workdir / "msgs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    _, out_rows, _ = _dl(params, path, workdir)
    assert _read_jsonl(out_rows) == rows


def test_csv_input(params, workdir):
    path = workdir / "in.csv"
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "Add 1 and 2", "input": "1, 2", "output": "3"}]
    pd.DataFrame(rows).to_csv(path, index=False)
    record, out_rows, _ = _dl(params, path, workdir)
    # empty cells stay empty strings (not NaN/None); numbers-looking text stays as pandas reads it
    got = _read_jsonl(out_rows)
    assert got[0] == rows[0]
    assert got[1]["instruction"] == "Add 1 and 2" and got[1]["input"] == "1, 2"
    assert record["columns"] == ["input", "instruction", "output"]


def test_json_list_input(params, workdir):
    path = workdir / "in.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    _, out_rows, _ = _dl(params, path, workdir)
    assert _read_jsonl(out_rows) == ROWS


def test_json_object_with_one_list(params, workdir):
    path = workdir / "wrapped.json"
    path.write_text(json.dumps({"data": ROWS, "version": 1}), encoding="utf-8")
    _, out_rows, _ = _dl(params, path, workdir)
    assert _read_jsonl(out_rows) == ROWS


# --- bad inputs: a clear error naming the file, and the previous outputs left intact ------------


def _broken_line_jsonl(tmp: Path) -> tuple[Path, str]:
    path = tmp / "broken.jsonl"
    lines = [json.dumps(r) for r in ROWS[:2]] + ['{"text": "### Human: q### Assist'] + [json.dumps(ROWS[2])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, r"line 3: not valid JSON"


def _list_line_jsonl(tmp: Path) -> tuple[Path, str]:
    path = tmp / "list.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(["not", "an", "object"]) + "\n", encoding="utf-8")
    return path, r"line 2: a JSON list, expected an object"


def _truncated_parquet(tmp: Path) -> tuple[Path, str]:
    path = tmp / "truncated.parquet"
    pd.DataFrame(ROWS * 50).to_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, r"could not be read as parquet"


def _empty_jsonl(tmp: Path) -> tuple[Path, str]:
    path = tmp / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    return path, r"holds no rows"


def _missing(tmp: Path) -> tuple[Path, str]:
    return tmp / "nope.jsonl", r"does not exist"


def _directory(tmp: Path) -> tuple[Path, str]:
    path = tmp / "a_dir.jsonl"
    path.mkdir()
    return path, r"is a directory"


def _txt(tmp: Path) -> tuple[Path, str]:
    path = tmp / "rows.txt"
    path.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    return path, r"suffix '\.txt'; supported: \.jsonl"


def _not_utf8(tmp: Path) -> tuple[Path, str]:
    path = tmp / "latin1.jsonl"
    path.write_bytes(json.dumps({"text": "x"}).encode() + b"\n" + '{"text": "caf\u00e9"}'.encode("latin-1") + b"\n")
    return path, r"not UTF-8"


def _json_scalar(tmp: Path) -> tuple[Path, str]:
    path = tmp / "scalar.json"
    path.write_text("42", encoding="utf-8")
    return path, r"expected a JSON list of objects"


@pytest.mark.parametrize("make", [_missing, _directory, _txt, _broken_line_jsonl, _list_line_jsonl,
                                  _truncated_parquet, _empty_jsonl, _not_utf8, _json_scalar],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_named_and_outputs_kept(params, workdir, make):
    _, out_rows, out_source = _dl(params, SAMPLE, workdir)  # a good previous run
    before = out_rows.read_bytes(), out_source.read_bytes()
    path, pattern = make(workdir)
    with pytest.raises(PipelineError, match=pattern) as err:
        _dl(params, path, workdir)
    assert str(path) in str(err.value)
    assert (out_rows.read_bytes(), out_source.read_bytes()) == before
    assert sorted(p.name for p in out_rows.parent.iterdir()) == ["rows.jsonl", "source.json"]  # no temp files left


# --- the Hub branch, on a local dataset directory (works offline) -------------------------------


def test_hub_source_from_local_dataset_dir(params, workdir):
    repo = workdir / "hub_repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    p = with_params(params, **{"download.source": "hub", "download.hub_id": str(repo), "download.split": "train"})
    out_rows, out_source = workdir / "hub" / "rows.jsonl", workdir / "hub" / "source.json"
    record = download(p.download, out_rows, out_source)
    assert _read_jsonl(out_rows) == ROWS
    source = json.loads(out_source.read_text())
    assert source["source"] == "hub"
    assert source["hub_id"] == str(repo)
    assert source["split"] == "train"
    assert source["revision"] is None  # HF_HUB_OFFLINE: the commit cannot be resolved, and says so
    assert source["row_count"] == 3 and record == source


def test_hub_unknown_split_is_a_pipeline_error(params, workdir):
    repo = workdir / "hub_repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    p = with_params(params, **{"download.source": "hub", "download.hub_id": str(repo), "download.split": "validation"})
    with pytest.raises(PipelineError, match=r"could not load Hub dataset .*split 'validation'"):
        download(p.download, workdir / "h" / "rows.jsonl", workdir / "h" / "source.json")
    assert not (workdir / "h" / "rows.jsonl").exists()
