"""Stage 1: rows come through unchanged with a source record; every unreadable input is one clear error."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
from pathlib import Path

import pandas as pd
import pytest

from tasks.common import paths
from tasks.common.config import with_overrides
from tasks.common.errors import PipelineError
from tasks.download.stage import download, source_fingerprint

SAMPLE = paths.SAMPLE_DATA
ROWS = [
    {"text": "### Human: What is 2+2?### Assistant: It is 4."},
    {"text": "### Human: Name a color.### Assistant: Blue."},
    {"text": "### Human: Say hi.### Assistant: Hi!"},
]


def _dl(params, path: Path | str, tmp: Path, **changes) -> tuple[dict, Path, Path]:
    p = with_overrides(
        params,
        **{"download.source": "local", "download.path": str(path)},
        **{f"download.{k}": v for k, v in changes.items()},
    )
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


@pytest.mark.parametrize("name", ["rows.jsonl.gz", "rows.jsonl.bz2", "rows.JSONL.XZ", "rows.json.gz", "rows.csv.gz"])
def test_compressed_text_files_are_read_as_they_stream(params, workdir, name):
    fmt = name.lower().split(".")[1]
    text = {"jsonl": "".join(json.dumps(r) + "\n" for r in ROWS), "json": json.dumps(ROWS)}.get(fmt)
    text = text if text is not None else pd.DataFrame(ROWS).to_csv(index=False)
    pack = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[Path(name.lower()).suffix]
    path = workdir / name
    path.write_bytes(pack(text.encode("utf-8")))
    record, out_rows, _ = _dl(params, path, workdir)
    assert _read_jsonl(out_rows) == ROWS
    assert record["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()  # the file as given, compressed


def test_tsv_input_keeps_commas_and_quotes(params, workdir):
    rows = [{"text": '### Human: a, b and "c"?### Assistant: yes, all three.'}, *ROWS]
    path = workdir / "rows.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    record, out_rows, _ = _dl(params, path, workdir)
    assert _read_jsonl(out_rows) == rows
    assert record["columns"] == ["text"]


@pytest.mark.parametrize("sep", [";", "|", "\t"])
def test_csv_separator_is_read_off_the_header(params, workdir, sep):
    # A spreadsheet in a comma-decimal locale writes semicolons; the rows' commas must not split the text.
    rows = [{"id": i, "text": r["text"].replace("?", ", then?")} for i, r in enumerate(ROWS)]
    path = workdir / "export.csv"
    pd.DataFrame(rows).to_csv(path, sep=sep, index=False)
    _, out_rows, _ = _dl(params, path, workdir)
    assert _read_jsonl(out_rows) == [{**r, "id": str(r["id"])} for r in rows]  # a CSV cell is text


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
    rows = [
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Add 1 and 2", "input": "1, 2", "output": "3"},
    ]
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
    path.write_text(json.dumps({"data": ROWS, "version": 1, "tags": ["chat", "en"]}), encoding="utf-8")
    _, out_rows, _ = _dl(params, path, workdir)
    assert _read_jsonl(out_rows) == ROWS  # the one list of objects; a list of tags is not rows


def test_csv_cells_stay_text_as_written(params, workdir):
    """Inferred dtypes turned "003" into 3 and an Alpaca input "0" into a falsy 0 that the parser dropped."""
    path = workdir / "codes.csv"
    path.write_text("instruction,input,output\nPad 3 to three digits,0,003\nAnd 12?,1.50,012\n", encoding="utf-8")
    _, out_rows, _ = _dl(params, path, workdir)
    assert _read_jsonl(out_rows) == [
        {"instruction": "Pad 3 to three digits", "input": "0", "output": "003"},
        {"instruction": "And 12?", "input": "1.50", "output": "012"},
    ]


def test_parquet_binary_text_columns_are_read_as_text(params, workdir):
    """Parquet written without the string type keeps text as binary: str() of it trained on "b'...'" literals."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "Caf\u00e9?", "output": "Oui, un caf\u00e9."}, {"instruction": "Hi", "output": "Hello."}]
    table = pa.table({k: pa.array([r[k].encode() for r in rows], pa.binary()) for k in ("instruction", "output")})
    path = workdir / "binary.parquet"
    pq.write_table(table, path)
    _, out_rows, _ = _dl(params, path, workdir)
    assert _read_jsonl(out_rows) == rows

    table = pa.table({"text": pa.array([b"### Human: hi### Assistant: ok", b"\xff\xfe not text"], pa.binary())})
    pq.write_table(table, path)
    with pytest.raises(
        PipelineError, match=r"binary\.parquet, row 1 \(from 0\): column 'text' is binary and not UTF-8"
    ):
        _dl(params, path, workdir)


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


def _bare_gz(tmp: Path) -> tuple[Path, str]:
    path = tmp / "rows.gz"
    path.write_bytes(gzip.compress(json.dumps(ROWS[0]).encode() + b"\n"))
    return path, r"must say its format before \.gz \(rows\.jsonl\.gz\)"


def _parquet_gz(tmp: Path) -> tuple[Path, str]:
    path = tmp / "rows.parquet.gz"
    path.write_bytes(gzip.compress(b"PAR1"))
    return path, r"parquet compresses inside the file"


def _corrupt_gz(tmp: Path) -> tuple[Path, str]:
    path = tmp / "cut.jsonl.gz"
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS * 50).encode())
    path.write_bytes(whole[: len(whole) // 2])  # a download cut short
    return path, r"could not be read as jsonl \(gz\) \(EOFError"


def _text_file(case: str, name: str, text: str, pattern: str):
    """A bad-input case that is one text file: the builder the parametrized test below takes."""

    def make(tmp: Path) -> tuple[Path, str]:
        path = tmp / name
        path.write_text(text, encoding="utf-8")
        return path, pattern

    make.__name__ = f"_{case}"
    return make


_json_scalar = _text_file("json_scalar", "scalar.json", "42", r"expected a JSON list of objects")
_jsonl_named_json = _text_file(
    "jsonl_named_json",
    "rows.json",
    "".join(json.dumps(r) + "\n" for r in ROWS),
    r"one JSON object a line, which is JSON Lines\. Name it \.jsonl",
)
_json_list_named_jsonl = _text_file(
    "json_list_named_jsonl", "rows.jsonl", json.dumps(ROWS, indent=2), r"line 1: not valid JSON .* name it \.json"
)
_one_line_list_named_jsonl = _text_file(
    "one_line_list_named_jsonl",
    "rows.jsonl",
    json.dumps(ROWS),
    r"line 1: a JSON list, expected an object .* name it \.json",
)
_json_object_with_two_lists = _text_file(
    "json_object_with_two_lists",
    "splits.json",
    json.dumps({"train": ROWS, "test": ROWS[:1]}),
    r"a JSON object holding 2 lists of objects \('train', 'test'\)",
)
# pandas would read the second `text` as `text.1` and the parser the first, dropping the other without a word.
_duplicate_column_csv = _text_file(
    "duplicate_column_csv",
    "dup.csv",
    "text,id,text\n,1,### Human: hi### Assistant: hello\n",
    r"header names column 'text' twice \(columns 1 and 3\)",
)


def _latin1_deep(tmp: Path) -> tuple[Path, str]:
    # Far past the decoder's first read buffer: the line and offset must still be the file's, not the buffer's.
    path = tmp / "latin1_deep.jsonl"
    good = (json.dumps({"text": "x" * 50}) + "\n").encode()
    bad = '{"text": "caf\u00e9"}'.encode("latin-1") + b"\n"
    path.write_bytes(good * 4999 + bad)
    offset = len(good) * 4999 + bad.index(0xE9)
    return path, rf"line 5000, byte {offset} of the file: bytes e9"


def _gzip_named_jsonl(tmp: Path) -> tuple[Path, str]:
    path = tmp / "rows.jsonl"
    path.write_bytes(gzip.compress(json.dumps(ROWS[0]).encode() + b"\n"))
    return path, r"is gz-compressed but named as plain jsonl: rename it to rows\.jsonl\.gz"


def _parquet_named_csv(tmp: Path) -> tuple[Path, str]:
    path = tmp / "rows.csv"
    pd.DataFrame(ROWS).to_parquet(path)
    return path, r"is a Parquet file .* rename it to rows\.parquet"


def _utf16_tsv(tmp: Path) -> tuple[Path, str]:
    path = tmp / "rows.tsv"
    path.write_bytes("text\nhello\n".encode("utf-16"))  # with its byte-order mark, as Excel's Unicode Text saves
    return path, r"is UTF-16 text .* re-save it as UTF-8"


def _capitalised_text_column(tmp: Path) -> tuple[Path, str]:
    path = tmp / "sheet.csv"
    pd.DataFrame([{"Text": r["text"]} for r in ROWS]).to_csv(path, index=False)
    return path, r"column 'Text' is `text` but for case or spaces: .* -S \"download\.columns\.text='Text'\""


@pytest.mark.parametrize(
    "make",
    [
        _missing,
        _directory,
        _txt,
        _broken_line_jsonl,
        _list_line_jsonl,
        _truncated_parquet,
        _empty_jsonl,
        _not_utf8,
        _json_scalar,
        _bare_gz,
        _parquet_gz,
        _corrupt_gz,
        _latin1_deep,
        _gzip_named_jsonl,
        _parquet_named_csv,
        _utf16_tsv,
        _jsonl_named_json,
        _json_list_named_jsonl,
        _one_line_list_named_jsonl,
        _duplicate_column_csv,
        _capitalised_text_column,
        _json_object_with_two_lists,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
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
    p = with_overrides(params, **{"download.source": "hub", "download.hub_id": str(repo), "download.split": "train"})
    out_rows, out_source = workdir / "hub" / "rows.jsonl", workdir / "hub" / "source.json"
    record = download(p.download, out_rows, out_source)
    assert _read_jsonl(out_rows) == ROWS
    source = json.loads(out_source.read_text())
    assert source["source"] == "hub"
    assert source["hub_id"] == str(repo)
    assert source["split"] == "train"
    # A local folder has no commit: its files' sha256 stands in, and changes when a file does.
    assert source["revision"].startswith("folder-sha256:")
    assert source["row_count"] == 3 and record == source
    assert source_fingerprint(p.download) == source["revision"]
    (repo / "train.jsonl").write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    assert source_fingerprint(p.download) != source["revision"]


def test_hub_source_from_a_save_to_disk_folder(params, workdir):
    import datasets

    folder = workdir / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    p = with_overrides(params, **{"download.source": "hub", "download.hub_id": str(folder), "download.split": "train"})
    out_rows, out_source = workdir / "hub" / "rows.jsonl", workdir / "hub" / "source.json"
    download(p.download, out_rows, out_source)
    assert _read_jsonl(out_rows) == ROWS


def test_hub_binary_columns_are_text_or_a_named_error(params, workdir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = workdir / "hub_binary"
    repo.mkdir()
    texts = [r["text"].encode() for r in ROWS]
    pq.write_table(pa.table({"text": pa.array(texts, pa.binary())}), repo / "train.parquet")
    p = with_overrides(params, **{"download.source": "hub", "download.hub_id": str(repo), "download.split": "train"})
    out_rows, out_source = workdir / "hub" / "rows.jsonl", workdir / "hub" / "source.json"
    download(p.download, out_rows, out_source)
    assert _read_jsonl(out_rows) == ROWS

    pq.write_table(pa.table({"text": pa.array([*texts, b"\xff not text"], pa.binary())}), repo / "train.parquet")
    with pytest.raises(PipelineError, match=r"row 3 \(from 0\): column 'text' is binary and not UTF-8 text"):
        download(p.download, workdir / "hub2" / "rows.jsonl", workdir / "hub2" / "source.json")


def test_hub_unknown_split_is_a_pipeline_error(params, workdir):
    repo = workdir / "hub_repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    p = with_overrides(
        params, **{"download.source": "hub", "download.hub_id": str(repo), "download.split": "validation"}
    )
    with pytest.raises(PipelineError, match=r"could not load Hub dataset .*split 'validation'"):
        download(p.download, workdir / "h" / "rows.jsonl", workdir / "h" / "source.json")
    assert not (workdir / "h" / "rows.jsonl").exists()


# --- a byte-order mark (Windows tools, spreadsheet exports) is read past, in every text format ------------


def _write_with_bom(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif path.suffix == ".json":
        text = json.dumps(rows)
    else:
        text = pd.DataFrame(rows).to_csv(index=False)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_utf8_bom_is_accepted(params, workdir, suffix):
    path = workdir / f"bom{suffix}"
    _write_with_bom(path, ROWS)
    record, out_rows, _ = _dl(params, path, workdir)
    assert _read_jsonl(out_rows) == ROWS
    assert record["columns"] == ["text"]  # not "\ufefftext"


# --- JSON errors read as sentences ------------------------------------------------------------------------


def test_broken_json_message_reads_plainly(params, workdir):
    # json's message for the newline inside the string is "Invalid control character at", then the position
    path, _ = _broken_line_jsonl(workdir)
    with pytest.raises(PipelineError) as err:
        _dl(params, path, workdir)
    assert "line 3: not valid JSON (Invalid control character at column 33)" in str(err.value)
    assert "at at" not in str(err.value)
    whole = workdir / "broken.json"
    whole.write_text('[\n  {"text": "### Human: q### Assist', encoding="utf-8")
    with pytest.raises(PipelineError, match=r"Unterminated string starting at line 2, column 12\)") as err:
        _dl(params, whole, workdir)
    assert "at at" not in str(err.value)


# --- a column under another name: one clear stop naming the columns, or a mapping param ---------------------


def _content_rows(tmp: Path, n: int = 200) -> Path:
    path = tmp / "content.jsonl"
    path.write_text(
        "".join(json.dumps({"content": ROWS[i % 3]["text"], "id": i}) + "\n" for i in range(n)), encoding="utf-8"
    )
    return path


def test_no_readable_column_stops_naming_found_and_expected(params, workdir):
    _, out_rows, out_source = _dl(params, SAMPLE, workdir)  # a good previous run
    before = out_rows.read_bytes(), out_source.read_bytes()
    path = _content_rows(workdir)
    with pytest.raises(PipelineError) as err:
        _dl(params, path, workdir)
    message = str(err.value)
    assert message.startswith(f"{path}: no column to read: found ['content', 'id']; expected `text`")
    assert "-S download.columns.text=<column>" in message  # what to do
    assert (out_rows.read_bytes(), out_source.read_bytes()) == before


def test_columns_param_maps_a_column_onto_text(params, workdir):
    path = _content_rows(workdir, n=3)
    columns = {"text": "content", "messages": None, "instruction": None, "input": None, "output": None}
    record, out_rows, _ = _dl(params, path, workdir, columns=columns)
    assert _read_jsonl(out_rows) == [{"text": r["text"], "id": i} for i, r in enumerate(ROWS)]
    assert record["columns"] == ["id", "text"]


def test_columns_param_maps_alpaca_fields(params, workdir):
    path = workdir / "qa.csv"
    pd.DataFrame([{"prompt": "Say hi.", "response": "Hi!"}]).to_csv(path, index=False)
    columns = {"text": None, "messages": None, "instruction": "prompt", "input": None, "output": "response"}
    _, out_rows, _ = _dl(params, path, workdir, columns=columns)
    assert _read_jsonl(out_rows) == [{"instruction": "Say hi.", "output": "Hi!"}]


@pytest.mark.parametrize(
    "rows, mapping, pattern",
    [
        (
            [{"content": "x"}],
            {"text": "body"},
            r"download.columns.text is 'body', but no row has that column \(found \['content'\]\)",
        ),
        (
            [{"text": "x"}, {"content": "y", "text": "z"}],
            {"text": "content"},
            r"row 1 \(from 0\): has both `content` and `text`",
        ),
    ],
    ids=["absent", "clash"],
)
def test_columns_param_errors_are_named(params, workdir, rows, mapping, pattern):
    path = workdir / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    columns = {"text": None, "messages": None, "instruction": None, "input": None, "output": None, **mapping}
    with pytest.raises(PipelineError, match=pattern):
        _dl(params, path, workdir, columns=columns)


def test_columns_param_is_typed(params):
    from tasks.common.config import Params

    data = params.as_dict()
    data["download"]["columns"] = {**data["download"]["columns"], "txt": "content"}
    with pytest.raises(Exception, match="txt"):
        Params.model_validate(data)
    data["download"]["columns"] = {**params.as_dict()["download"]["columns"], "instruction": "q", "output": "q"}
    with pytest.raises(Exception, match="one field only"):
        Params.model_validate(data)


# --- outputs are readable by others (not tempfile's private 0600) ------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_get_ordinary_permissions(params, workdir, umask_022):
    from tasks.common.artifacts import staged_dir, write_text

    _, out_rows, out_source = _dl(params, SAMPLE, workdir)
    assert {oct(p.stat().st_mode & 0o777) for p in (out_rows, out_source)} == {"0o644"}
    with staged_dir(workdir / "folder") as tmp:
        write_text(tmp / "a.txt", "a")
    assert oct((workdir / "folder").stat().st_mode & 0o777) == "0o755"
    assert oct((workdir / "folder" / "a.txt").stat().st_mode & 0o777) == "0o644"


def test_unquoted_tsv_quote_that_would_merge_rows_stops_with_the_row(params, workdir):
    """A tab-separated file without CSV quoting whose answer opens with a quote: read as quoting, the next lines
    would be swallowed into that answer. It stops, naming the row and column; nothing is written."""
    path = workdir / "alpaca.tsv"
    path.write_text('instruction\toutput\nsay yes\t"Yes, really.\nnext one\tHere is "ok" text\nthird\tfine\n')
    with pytest.raises(PipelineError) as err:
        _dl(params, path, workdir)
    assert "data row 1: column 'output' holds a tab" in str(err.value) and ".jsonl" in str(err.value)
    assert not (workdir / "out" / "rows.jsonl").exists()


def test_unquoted_tsv_keeps_quotes_inside_fields(params, workdir):
    """The same dialect without an unclosed quote: read with CSV quoting, `"Bonjour" means hello` used to lose its
    quotes silently. A field that opens and closes a quote before it ends marks the file as unquoted TSV."""
    path = workdir / "alpaca.tsv"
    path.write_text('instruction\toutput\nTranslate\t"Bonjour" means hello\nQuote it\t"ok"\nplain\tsay "hi"\n')
    _, out_rows, _ = _dl(params, path, workdir)
    assert [r["output"] for r in _read_jsonl(out_rows)] == ['"Bonjour" means hello', '"ok"', 'say "hi"']


def test_csv_field_with_a_stray_quote_stops_with_the_line(params, workdir):
    """In a comma-separated file the same field cannot be read without quoting (commas inside text need it): it
    stops, naming the line and the fix, instead of dropping the quotes."""
    path = workdir / "rows.csv"
    path.write_text('instruction,output\nTranslate,"Bonjour" means hello\n"a, b",fine\n')
    with pytest.raises(PipelineError) as err:
        _dl(params, path, workdir)
    assert "rows.csv, line 2: a field opens and closes a double quote" in str(err.value)
    assert not (workdir / "out" / "rows.jsonl").exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_lone_surrogate_escape_stops_with_the_row(params, workdir, suffix):
    """An emoji cut in half (a lone \\ud83d escape) is valid JSON but not text; the tokenizer would fail on it
    without naming the row. Download names it; a whole emoji (a surrogate pair) is fine."""
    # JSON escapes as they stand in the file: a pair (one emoji), then a lone half
    good = '{"text": "### Human: hi there### Assistant: \\ud83d\\ude00 all fine"}'
    bad = '{"text": "### Human: hi there### Assistant: \\ud83d cut off"}'
    lines = [*(json.dumps(r) for r in ROWS), good]
    path = workdir / f"rows{suffix}"
    path.write_text("\n".join(lines) + "\n" if suffix == ".jsonl" else "[" + ",".join(lines) + "]")
    _, out_rows, _ = _dl(params, path, workdir)
    assert _read_jsonl(out_rows)[-1]["text"].endswith("\U0001f600 all fine")
    bad_lines = [*lines, bad]
    path.write_text("\n".join(bad_lines) + "\n" if suffix == ".jsonl" else "[" + ",".join(bad_lines) + "]")
    with pytest.raises(PipelineError) as err:
        _dl(params, path, workdir)
    where = f"line {len(bad_lines)}" if suffix == ".jsonl" else f"object {len(bad_lines)} of the list"
    assert f"{where}: holds \\ud83d, half of a UTF-16 surrogate pair" in str(err.value)


def test_a_file_written_while_it_is_read_stops_and_keeps_the_last_good_outputs(params, workdir, monkeypatch):
    """The source's sha256 is taken before its rows are read; a file appended to meanwhile gave a lineage hash that
    did not match the rows written (found by a messy-input probe: 256,000 rows hashed, 256,500 written)."""
    import tasks.download.stage as dl

    _, out_rows, out_source = _dl(params, SAMPLE, workdir)  # a good previous run
    before = out_rows.read_bytes(), out_source.read_bytes()
    path = workdir / "growing.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    read = dl.read_local

    def read_while_an_exporter_appends(p):
        for k, block in enumerate(read(p)):
            if k == 0:
                with open(p, "a", encoding="utf-8") as f:
                    f.write(json.dumps(ROWS[0]) + "\n")
            yield block

    monkeypatch.setattr(dl, "read_local", read_while_an_exporter_appends)
    with pytest.raises(PipelineError, match=r"growing\.jsonl changed while it was read"):
        _dl(params, path, workdir)
    assert (out_rows.read_bytes(), out_source.read_bytes()) == before
    assert sorted(p.name for p in out_rows.parent.iterdir()) == ["rows.jsonl", "source.json"]


def test_a_one_column_csv_saved_with_semicolons_is_refused_not_trimmed(params, workdir):
    """A one-column CSV saved with `;` whose text holds commas: read with the header's comma, each row splits into
    more fields than the header names. pandas took the extras as an index and kept only the text after the last
    comma; now the download stops, naming the line and the separator, and writes nothing."""
    path = workdir / "export.csv"
    path.write_text(
        "text\n### Human: Hi there### Assistant: Hello, how can I help?\n### Human: And?### Assistant: Blue.\n"
    )
    with pytest.raises(PipelineError) as err:
        _dl(params, path, workdir)
    message = str(err.value)
    assert "export.csv, line 2: the row splits into more fields than the header's 1 column(s)" in message
    assert "separator ','" in message and "Nothing was cut" in message
    assert not (workdir / "out" / "rows.jsonl").exists()


@pytest.mark.parametrize(("byte", "column"), [("\x00", 1), ("\x01", 38)])
def test_a_raw_control_byte_in_a_jsonl_line_is_named_with_its_column(params, workdir, byte, column):
    path = workdir / "rows.jsonl"
    bad = byte + json.dumps(ROWS[1]) if byte == "\x00" else json.dumps(ROWS[1])[:37] + byte + json.dumps(ROWS[1])[37:]
    path.write_text(json.dumps(ROWS[0]) + "\n" + bad + "\n")
    with pytest.raises(PipelineError) as err:
        _dl(params, path, workdir)
    assert f"rows.jsonl, line 2: not valid JSON (a raw control byte 0x{ord(byte):02X} at column {column}" in str(
        err.value
    )
