"""Rows that break a row rule are left out and reported while they stay under validate.max_bad_row_share."""

import json

from tasks.artifacts import read_json, read_jsonl, write_jsonl
from tasks.config import with_overrides
from tasks.validate import validate
from tests.conftest import ROOT


def test_a_few_bad_rows_are_left_out_and_reported(workdir, params):
    sample = read_jsonl(ROOT / "data/sample/guanaco_sample.jsonl")
    bad = {"text": "### Human: What is 2+2?### Assistant: "}  # empty answer, as in 3 rows of guanaco-llama2-1k
    rows = sample[:30] + [bad] + sample[30:]
    write_jsonl(workdir / "rows.jsonl", rows)
    p = with_overrides(params, **{"validate.max_bad_row_share": 0.05})
    summary = validate(
        p,
        raw_rows=workdir / "rows.jsonl",
        out_conversations=workdir / "conv.jsonl",
        report_dir=workdir / "report",
        metrics_path=workdir / "m.json",
        histogram_path=workdir / "h.png",
    )
    assert summary["success"] and summary["rows_excluded"] == 1
    kept = [r["row_index"] for r in read_jsonl(workdir / "conv.jsonl")]
    assert 30 not in kept and len(kept) == len(rows) - 1
    result = read_json(workdir / "report" / "result.json")
    assert result["excluded_rows"] == {"30": ["non_empty_turns"]}
    rule = next(r for r in result["rules"] if r["rule"] == "non_empty_turns")
    assert rule["success"] and rule["rows"] == [30]
    assert json.loads((workdir / "m.json").read_text())["rows_excluded"] == 1
