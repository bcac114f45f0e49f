"""The suite run in batches of rows (expectations.BATCH_ROWS) gives exactly the result of one run over all rows.

Each set of rows is validated twice, in one batch and in batches of 37 rows, and every output is compared:
result.json (great-expectations' own result included, its run ids and times aside), the summary, the metrics, the
length report, the validated conversations, the histogram, the report page and the Data Docs. The rows put failing
rows and duplicates (exact and near) in several batches, a row that does not parse in one batch only, and the row
count, the duplicate share and a row rule's share right at their thresholds: a batch alone would decide otherwise.
A short model.max_length puts most rows over it, more than great-expectations lists the values of (200).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.common import paths
from tasks.common.artifacts import read_json, read_jsonl, write_jsonl
from tasks.common.config import with_overrides
from tasks.common.conversation import parse_text
from tasks.common.errors import ValidationFailed
from tasks.validate import expectations
from tasks.validate.stage import validate
from tests.conftest import ROOT

BATCH = 37
ROWS = 300  # 9 batches of 37, the last of 4
RUN_ID_OR_TIME = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # great-expectations' ids
    r"|\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(\+00:00|Z| UTC)?|\d{8}T\d{6}(\.\d+)?Z"  # its run times
    r"|(?<=._run_time_sort.: )\d+\.\d+"
)


def _rows() -> list[dict]:
    """300 rows: the sample's conversations in variants, with failing rows, duplicates and a row that does not parse
    in chosen batches (row k is in batch k // 37)."""
    sample = read_jsonl(ROOT / paths.SAMPLE_DATA)
    rows = [
        {"text": row["text"].replace("### Human: ", f"### Human: (variant {k}) ", 1) if k else row["text"]}
        for k in range(5)
        for row in sample
    ][:ROWS]
    rows[40] = {"text": "### Human: What is 2+2?### Assistant: "}  # an empty turn, batch 1
    rows[150] = {"text": "### Human: What is 2+2?### Assistant: four\u0007 of them"}  # a control character, batch 4
    rows[270] = {"text": "no markers at all, prose the parser cannot read"}  # batch 7 only: counts become float
    rows[298] = {"text": "### Human: What is 2+2?### Assistant: it is \ufffd four"}  # batch 8
    for k in range(5):  # exact duplicates of batch 0's rows, all in batch 5
        rows[190 + k] = dict(rows[k])
    # a near duplicate of row 10, batch 5: the same turns as messages, in capitals, with an exclamation mark
    turns = parse_text(rows[10]["text"]).turns
    rows[200] = {"messages": [{"role": role, "content": text.upper() + "!"} for role, text in turns]}
    return rows


# 6 duplicates of 300 rows, 2%; 4 rows breaking row rules (1.3%), the one that does not parse 1 of batch 7's 37.
SHORT = {"model.max_length": 64, "validate.min_share_within_max_length": 0.0}
AT_THRESHOLDS = {
    **SHORT,
    "validate.min_rows": ROWS,
    "validate.max_duplicate_share": 0.02,
    "validate.max_bad_row_share": 0.02,
}
PAST_THRESHOLDS = {
    **SHORT,
    "validate.min_rows": ROWS + 1,
    "validate.max_duplicate_share": 0.0199,
    "validate.max_bad_row_share": 0.0034,  # 1 row of 300 is 0.33%: each row rule passes, all four together fail
}
CASES = {
    "at the thresholds": (_rows, AT_THRESHOLDS),
    "just past them": (_rows, PAST_THRESHOLDS),
    "no row parses": (lambda: [{"text": f"Question {k}? Answer {k}."} for k in range(100)], {}),
}


MERGED = expectations._merged


def _run(params, rows: list[dict], out: Path, batch_rows: int, monkeypatch) -> list:
    """validate() over `rows` (rows.jsonl in the working directory, the path result.json names) with every output in
    `out`, great-expectations given batch_rows rows at a time; returns the batches' results as merged
    (expectations._merged's input)."""
    merged = []

    def spy(parts, *args):
        merged.extend(parts)
        return MERGED(parts, *args)

    monkeypatch.setattr(expectations, "BATCH_ROWS", batch_rows)
    monkeypatch.setattr(expectations, "_merged", spy)
    write_jsonl(Path("rows.jsonl"), rows)
    try:
        validate(
            params,
            raw_rows=Path("rows.jsonl"),
            out_conversations=out / "conv.jsonl",
            report_dir=out / "report",
            metrics_path=out / "m.json",
            histogram_path=out / "h.png",
        )
    except ValidationFailed:
        pass
    return merged


def _outputs(out: Path) -> dict[str, bytes]:
    """Every output file, its name and text with great-expectations' run ids and times blanked; the keys of a rule's
    per-metric exception_info sorted (great-expectations lists them in no fixed order, run to run)."""
    found = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = RUN_ID_OR_TIME.sub("_", str(path.relative_to(out)))
        data = path.read_bytes()
        if path.suffix in (".json", ".html", ".jsonl"):
            data = RUN_ID_OR_TIME.sub("_", data.decode("utf-8")).encode("utf-8")
        if path.name == "result.json":
            result = json.loads(data)
            for rule in result["ge_result"]["results"]:
                rule["exception_info"] = dict(sorted(rule["exception_info"].items()))
            data = json.dumps(result).encode("utf-8")
        found[name] = data
    return found


@pytest.mark.parametrize("case", CASES)
def test_batches_give_the_one_run_result(params, workdir, monkeypatch, case):
    make_rows, overrides = CASES[case]
    p = with_overrides(params, **overrides)
    rows = make_rows()
    whole = _run(p, rows, workdir / "whole", len(rows), monkeypatch)
    batched = _run(p, rows, workdir / "batched", BATCH, monkeypatch)
    assert len(whole) == 1 and len(batched) == -(-len(rows) // BATCH)
    one, many = _outputs(workdir / "whole"), _outputs(workdir / "batched")
    assert sorted(one) == sorted(many)
    for name in one:
        assert one[name] == many[name], name
    assert any("data_docs/validations/" in name for name in one)


def test_the_rows_put_rules_at_their_thresholds(params, workdir, monkeypatch):
    """What the comparison above relies on: over all rows the row count, the duplicate share and the parse share sit
    exactly at their thresholds and pass, while some batch alone fails each of them; failing rows lie in several
    batches."""
    batched = _run(with_overrides(params, **AT_THRESHOLDS), _rows(), workdir / "out", BATCH, monkeypatch)
    rules = {r["rule"]: r for r in read_json(workdir / "out" / "report" / "result.json")["rules"]}
    assert rules["enough_rows"]["observed_value"] == ROWS
    assert rules["duplicates"]["rows"] == [190, 191, 192, 193, 194, 200]
    assert rules["row_rules_together"]["rows"] == [40, 150, 270, 298]
    assert rules["within_max_length"]["unexpected_count"] > 200  # more failing values than great-expectations lists
    assert all(rules[name]["status"] == "passed" for name in ("enough_rows", "duplicates", "parseable"))
    alone = {r.expectation_config.meta["rule"] for part in batched for r in part.results if not r.success}
    assert {"enough_rows", "duplicates", "parseable"} <= alone


# Rows with a control character, in six batches (none a row _rows duplicates or changes): with row 150, 13 rows break
# no_control_chars, more than the listing below keeps.
CONTROL_ROWS = [5, 38, 39, 75, 111, 112, 113, 148, 185, 222, 259, 296]
LISTED = 3  # expectations.LISTED_ROWS for the test: duplicates (6 rows), no_control_chars (13) and within_max_length
# (most rows) are cut; every other row rule (1 row each) is listed whole


def _many_failing_rows() -> list[dict]:
    rows = _rows()
    for k in CONTROL_ROWS:
        rows[k] = {"text": f"### Human: What is {k}+2?### Assistant: {k + 2}\u0007 of them"}
    return rows


def test_a_cut_listing_keeps_every_failing_row(params, workdir, monkeypatch):
    """Past LISTED_ROWS failing rows great-expectations' result lists only the first (its unexpected_index_list and
    unexpected_index_query, and says so), while result.json's `rows` stay complete and exact, and the rows left out of
    the validated conversations are exactly those that broke a row rule: every other output as with the whole
    listing. In one batch and in batches alike."""
    p = with_overrides(params, **(AT_THRESHOLDS | {"validate.max_bad_row_share": 0.06}))
    rows = _many_failing_rows()
    monkeypatch.setattr(expectations, "LISTED_ROWS", len(rows))  # nothing cut: the reference
    _run(p, rows, workdir / "whole_listing", BATCH, monkeypatch)
    monkeypatch.setattr(expectations, "LISTED_ROWS", LISTED)
    _run(p, rows, workdir / "cut", len(rows), monkeypatch)
    _run(p, rows, workdir / "cut_batched", BATCH, monkeypatch)

    whole = _outputs(workdir / "whole_listing")
    cut, cut_batched = _outputs(workdir / "cut"), _outputs(workdir / "cut_batched")
    assert cut == cut_batched
    # nothing but great-expectations' listing differs: the verdict, the rows left out, the conversations, the metrics
    for name in whole:
        if "data_docs" not in name and not name.endswith("result.json"):
            assert whole[name] == cut[name], name

    full = read_json(workdir / "whole_listing" / "report" / "result.json")
    record = read_json(workdir / "cut" / "report" / "result.json")
    assert record["success"] is True
    by_rule = {r["rule"]: r for r in record["rules"]}
    assert by_rule["no_control_chars"]["rows"] == sorted([*CONTROL_ROWS, 150])
    assert by_rule["duplicates"]["rows"] == [190, 191, 192, 193, 194, 200]
    assert by_rule["row_rules_together"]["rows"] == sorted([*CONTROL_ROWS, 40, 150, 270, 298])
    assert record["excluded_rows"] == full["excluded_rows"]
    assert sorted(map(int, record["excluded_rows"])) == sorted([*CONTROL_ROWS, 40, 150, 270, 298])
    for mine, theirs in zip(record["rules"], full["rules"], strict=True):
        assert {k: v for k, v in mine.items() if k != "ge_rows_listed"} == theirs
        assert ("ge_rows_listed" in mine) == (len(mine["rows"]) > LISTED and mine["rule"] != "row_rules_together")

    # great-expectations lists the first LISTED rows of a rule and counts them all
    ge = {r["expectation_config"]["meta"]["rule"]: r for r in record["ge_result"]["results"]}
    for name, rule in by_rule.items():
        if name == "row_rules_together":
            continue
        result, listed = ge[name]["result"], rule["rows"][:LISTED]
        if "unexpected_index_list" in result:
            assert [d["row_index"] for d in result["unexpected_index_list"]] == listed, name  # with its value
            assert result["unexpected_index_query"] == f"df.filter(items={listed}, axis=0)", name
            assert result["unexpected_count"] == len(rule["rows"]), name
        if len(rule["rows"]) > LISTED:
            assert f"first {LISTED} of {len(rule['rows'])} failing rows" in ge[name]["meta"]["rows_listed"]
            assert rule["ge_rows_listed"] == ge[name]["meta"]["rows_listed"]
        else:
            assert "rows_listed" not in ge[name]["meta"]
    assert {n for n, r in by_rule.items() if "ge_rows_listed" in r} == {
        "no_control_chars",
        "duplicates",
        "within_max_length",
    }

    # the validated conversations: every renderable row but those that broke a row rule
    kept = {row["row_index"] for row in read_jsonl(workdir / "cut" / "conv.jsonl")}
    assert not kept & {*CONTROL_ROWS, 40, 150, 270, 298}
    assert kept == {row["row_index"] for row in read_jsonl(workdir / "whole_listing" / "conv.jsonl")}
    assert {k - 1 for k in CONTROL_ROWS if k - 1 not in CONTROL_ROWS} <= kept  # their neighbours stay


def test_the_listing_is_as_long_as_great_expectations_lists_values():
    from great_expectations.constants import MAX_RESULT_RECORDS

    assert expectations.LISTED_ROWS == MAX_RESULT_RECORDS
