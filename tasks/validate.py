"""Stage 2, validate: parse every raw row, run the great-expectations suite, and report token lengths.

Writes reports/validation/ (result.json, index.html: the report readable offline, Data Docs HTML, lengths.json),
reports/lengths.png and
metrics/validate.json whatever the verdict, so a failed run can be read. Only on success does it write
data/validated/conversations.jsonl;
on failure it exits non-zero, nothing downstream runs, and the last good conversations stay in place.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from tasks import paths
from tasks.artifacts import read_jsonl, sha256_file, staged_dir, write_json, write_jsonl
from tasks.base_model import load_tokenizer
from tasks.config import Params, load_params
from tasks.conversation import ParseError, detect_form, parse_row, render_llama2
from tasks.errors import PipelineError, ValidationFailed, run_main
from tasks.expectations import conversation_features, excluded_rows, mark_duplicates, run_suite
from tasks.lengths import length_report, row_lengths, save_histogram
from tasks.tokens import tokenize_rendered
from tasks.validation_page import write_validation_page

log = logging.getLogger(__name__)
MAX_ROWS_LISTED = 20
MAX_REASONS_LISTED = 3


def _failure_message(result: dict, report_dir: Path, parse_errors: dict[int, str]) -> str:
    lines, unevaluated = [], []
    for r in result["rules"]:
        if r["status"] == "not evaluated":
            unevaluated.append(f"  - {r['rule']}: {r['reason']}")
        if r["status"] != "failed":
            continue
        rows = r["rows"][:MAX_ROWS_LISTED]
        more = f" (+{len(r['rows']) - len(rows)} more)" if len(r["rows"]) > len(rows) else ""
        where = f"; rows {rows}{more}" if rows else f"; observed {r['observed_value']}"
        lines.append(f"  - {r['rule']}: {r['description']}: {r['unexpected_count'] or 0} row(s) break it{where}")
        if r["rule"] == "parseable":  # why they do not parse: the parser's own words, first row of each reason
            first = {}
            for i in r["rows"]:
                first.setdefault(parse_errors.get(i), i)
            lines += [f"      row {i}: {why}" for why, i in list(first.items())[:MAX_REASONS_LISTED]]
    if unevaluated:
        lines += ["rules that could not be checked:", *unevaluated]
    return (
        "the data failed validation, so nothing was trained:\n"
        + "\n".join(lines)
        + f"\nRow numbers count from 0 in {paths.RAW_ROWS}. Details: {report_dir / 'result.json'} and "
        f"{report_dir / 'data_docs' / 'index.html'}. Fix the rows, or loosen the threshold under `validate:` "
        "in params.yaml."
    )


def parse_rows(rows: list[dict]) -> tuple[list, list[dict]]:
    """Each raw row parsed into a conversation (None where it cannot be) and its feature row for the suite."""
    convs, features = [], []
    for i, row in enumerate(rows):
        try:
            conv, error = parse_row(row), None
        except ParseError as e:
            conv, error = None, str(e)
        convs.append(conv)
        features.append(conversation_features(i, conv, detect_form(row), error))
    return convs, features


def token_lengths(params: Params, tokenizer, convs: list, features: list[dict]) -> tuple[list[int], list[dict]]:
    """Token lengths on the exact text that will be trained, for the rows the template can render."""
    renderable = [
        i
        for i, f in enumerate(features)
        if f.get("roles_alternate") and f.get("last_role") == "assistant" and f.get("n_turns", 0) >= 2
    ]
    rendered = [render_llama2(convs[i], params.format.system_prompt) for i in renderable]
    return renderable, [row_lengths(t, params.model.max_length) for t in tokenize_rendered(tokenizer, rendered)]


def _result_record(result: dict, raw_rows: Path, excluded: dict, parse_errors: dict) -> dict:
    """reports/validation/result.json: every rule with its rows, and the rows left out or unparseable, with why."""
    return {
        "success": result["success"],
        "rules": result["rules"],
        "input": {"path": str(raw_rows), "sha256": sha256_file(raw_rows)},  # the audit's link to download
        # rows that broke a row rule within validate.max_bad_row_share: left out of the validated data
        "excluded_rows": {str(i): broke for i, broke in sorted(excluded.items())},
        "parse_errors": {str(i): why for i, why in parse_errors.items()},  # why rule parseable names each row
        "ge_result": result["ge_result"],
    }


def _summary(result: dict, report: dict, frame: pd.DataFrame, n_rows: int, n_excluded: int) -> dict:
    """metrics/validate.json: the verdict, rule counts and the token-length figures `dvc metrics` compares."""
    return {
        "success": result["success"],
        "rows": n_rows,
        "rows_excluded": n_excluded,
        "rules_failed": sum(r["status"] == "failed" for r in result["rules"]),
        "rules_not_evaluated": sum(r["status"] == "not evaluated" for r in result["rules"]),
        "duplicates": int(frame["is_duplicate"].sum()) if "is_duplicate" in frame else 0,
        "tokens_p50": report["percentiles"]["p50"],
        "tokens_p95": report["percentiles"]["p95"],
        "tokens_max": report["max"],
        "share_over_max_length": report["share_over_max_length"],
    }


def validate(
    params: Params,
    raw_rows: Path = paths.RAW_ROWS,
    out_conversations: Path = paths.CONVERSATIONS,
    report_dir: Path = paths.VALIDATION_REPORT_DIR,
    metrics_path: Path = paths.VALIDATION_METRICS,
    histogram_path: Path = paths.LENGTH_HISTOGRAM,
) -> dict:
    if not raw_rows.exists():
        raise PipelineError(f"{raw_rows} not found: run the download stage first (dvc repro download).")
    rows = read_jsonl(raw_rows)
    convs, features = parse_rows(rows)
    frame = mark_duplicates(pd.DataFrame(features))
    parse_errors = {f["row_index"]: f["parse_error"] for f in features if f["parse_error"]}
    tokenizer = load_tokenizer(params.model)
    renderable, lengths = token_lengths(params, tokenizer, convs, features)
    frame["n_tokens"] = pd.Series({i: ln["n_tokens"] for i, ln in zip(renderable, lengths)}, dtype="Int64")

    with staged_dir(report_dir) as tmp:
        result = run_suite(frame, params.validate_, params.model, tmp / "data_docs")
        excluded = excluded_rows(result)
        report = length_report(
            lengths, params.model.max_length, params.format.length_policy, getattr(tokenizer, "name_or_path", "?")
        )
        write_json(tmp / paths.LENGTH_REPORT.name, report)
        write_json(tmp / paths.VALIDATION_RESULT.name, _result_record(result, raw_rows, excluded, parse_errors))
        write_validation_page(tmp)  # reports/validation/index.html: readable offline, unlike the Data Docs
    save_histogram(lengths, params.model.max_length, histogram_path)
    summary = _summary(result, report, frame, len(rows), len(excluded))
    write_json(metrics_path, summary)
    log.info(
        "validation %s: %d rows, %d left out for breaking a row rule; %s",
        "passed" if result["success"] else "FAILED",
        len(rows),
        len(excluded),
        report["policy_effect"],
    )
    if not result["success"]:
        raise ValidationFailed(_failure_message(result, report_dir, parse_errors))

    dup = frame["is_duplicate"].tolist()
    write_jsonl(
        out_conversations,
        (
            {"row_index": i, **convs[i].to_dict(), **ln, "is_duplicate": bool(dup[i])}
            for i, ln in zip(renderable, lengths)
            if i not in excluded
        ),
    )
    return summary


def main() -> None:
    validate(load_params())


if __name__ == "__main__":
    run_main("validate", main)
