"""Rows that break a row rule are left out and reported while they stay under validate.max_bad_row_share."""

import json

from tasks.common import paths
from tasks.common.artifacts import read_json, read_jsonl, write_jsonl
from tasks.common.config import with_overrides
from tasks.validate.stage import validate
from tests.conftest import ROOT


def _validate(params, workdir):
    """validate() over workdir/rows.jsonl, every output in workdir (metrics m.json, report report/)."""
    return validate(
        params,
        raw_rows=workdir / "rows.jsonl",
        out_conversations=workdir / "conv.jsonl",
        report_dir=workdir / "report",
        metrics_path=workdir / "m.json",
        histogram_path=workdir / "h.png",
    )


def test_a_few_bad_rows_are_left_out_and_reported(workdir, params):
    sample = read_jsonl(ROOT / paths.SAMPLE_DATA)
    bad = {"text": "### Human: What is 2+2?### Assistant: "}  # empty answer, as in 3 rows of guanaco-llama2-1k
    rows = sample[:30] + [bad] + sample[30:]
    write_jsonl(workdir / "rows.jsonl", rows)
    p = with_overrides(params, **{"validate.max_bad_row_share": 0.05})
    summary = _validate(p, workdir)
    assert summary["success"] and summary["rows_excluded"] == 1
    kept = [r["row_index"] for r in read_jsonl(workdir / "conv.jsonl")]
    assert 30 not in kept and len(kept) == len(rows) - 1
    result = read_json(workdir / "report" / "result.json")
    assert result["excluded_rows"] == {"30": ["non_empty_turns"]}
    rule = next(r for r in result["rules"] if r["rule"] == "non_empty_turns")
    assert rule["success"] and rule["rows"] == [30]
    assert json.loads((workdir / "m.json").read_text()) == {"ok": True, "excluded": 1}


def test_the_share_bounds_all_row_rules_together(workdir, params):
    """Three rows each breaking a different row rule: each rule alone is within a 2% share (1 row of 68), all three
    together are not (3 of 68), so the run stops, naming the union; the last good conversations stay."""
    import pytest

    from tasks.common.errors import ValidationFailed

    sample = read_jsonl(ROOT / paths.SAMPLE_DATA)
    bad = [
        {"text": "### Human: What is 2+2?### Assistant: "},  # non_empty_turns
        {"text": "### Human: What is 2+2?### Assistant: four\u0007 of them"},  # no_control_chars
        {"text": "### Human: What is 2+2?### Assistant: it is \ufffd four"},  # no_replacement_chars
    ]
    rows = sample[:10] + bad + sample[10:] + sample[:1]
    write_jsonl(workdir / "rows.jsonl", rows)
    (workdir / "conv.jsonl").write_text("last good\n")
    p = with_overrides(params, **{"validate.max_bad_row_share": 0.02, "validate.max_duplicate_share": 0.05})
    with pytest.raises(ValidationFailed) as err:
        _validate(p, workdir)
    assert "- row_rules_together:" in str(err.value) and "rows [10, 11, 12]" in str(err.value)
    result = read_json(workdir / "report" / "result.json")
    each = {r["rule"]: r for r in result["rules"]}
    assert each["non_empty_turns"]["success"] and each["no_control_chars"]["success"]
    assert each["row_rules_together"]["status"] == "failed" and each["row_rules_together"]["rows"] == [10, 11, 12]
    assert (workdir / "conv.jsonl").read_text() == "last good\n"


def test_rows_too_long_for_a_tiny_bases_tokenizer_say_the_tokenizer_may_be_the_cause(workdir, params):
    """A newcomer's real rows against the tiny base: when rows do not fit model.max_length, the message says the
    tiny tokenizer (learned from the sample) cuts real text finer than the real one, and what to change."""
    import pytest

    from tasks.common.errors import ValidationFailed

    write_jsonl(workdir / "rows.jsonl", read_jsonl(ROOT / paths.SAMPLE_DATA))
    p = with_overrides(params, **{"model.max_length": 64})
    with pytest.raises(ValidationFailed) as err:
        _validate(p, workdir)
    assert "within_max_length" in str(err.value)
    assert "tiny-llama's tokenizer was learned from the 64-row sample" in str(err.value)
    assert "point model.tokenizer at the real base's tokenizer" in str(err.value)


def test_the_cpu_default_accepts_the_real_rows_its_sample_stands_for(workdir, params):
    """A newcomer's first own file after `make run`: 200 real guanaco rows validate with the shipped params (the
    tiny tokenizer cuts them into ~1.7x Llama-2's tokens; model.max_length 2048 holds them as 1024 does Llama-2's)."""
    from tests.conftest import needs_shared

    raw = needs_shared("guanaco-raw-1k") / "train.jsonl"
    write_jsonl(workdir / "rows.jsonl", read_jsonl(raw)[:200])
    summary = _validate(params, workdir)
    assert summary["success"] and summary["rows"] == 200
    assert summary["share_over_max_length"] < 0.1
