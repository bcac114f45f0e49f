"""Stage 2, validate: parse every raw row, run the great-expectations suite, and report token lengths.

One streaming pass (scan.py) parses, renders and tokenizes each row once and keeps a compact feature table;
the suite runs over that table, not over the texts. Writes reports/validation/ (result.json, index.html: the
report readable offline, Data Docs HTML, lengths.json), reports/lengths.png and metrics/validate.json whatever the
verdict, so a failed run can be read. Only on success does it write data/validated/conversations.jsonl (each
conversation with its token counts and content key); on failure it exits non-zero, nothing downstream runs, and
the last good conversations stay in place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from tasks.common import paths
from tasks.common.artifacts import atomic_writer, staged_dir, write_json
from tasks.common.base_model import is_tiny_base, load_tokenizer
from tasks.common.chat_template import chat_template
from tasks.common.config import Params, load_params
from tasks.common.errors import PipelineError, ValidationFailed
from tasks.common.heap import frozen_heap
from tasks.validate.expectations import excluded_rows, run_suite
from tasks.validate.lengths import length_report, save_histogram
from tasks.validate.scan import Scan, scan_rows
from tasks.validate.scan_pool import pool_workers
from tasks.validate.validation_page import write_validation_page

log = logging.getLogger(__name__)
MAX_ROWS_LISTED = 20
MAX_REASONS_LISTED = 3


def _tokenizer_hint(model) -> str:
    """When rows are too long for a tiny base, the cause may be its tokenizer rather than the data."""
    if model.tokenizer is None and is_tiny_base(model.base):
        return (
            f"\n      model.base {model.base}'s tokenizer was learned from the 64-row sample: it cuts real text into "
            "about 1.7x the tokens of Llama-2's, so the rows may be too long for it rather than for the recipe. "
            "Raise model.max_length, or point model.tokenizer at the real base's tokenizer."
        )
    return ""


def _failure_message(result: dict, report_dir: Path, parse_errors: dict[int, str], model=None) -> str:
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
        if r["rule"] in ("within_max_length", "under_hard_limit") and model is not None:
            lines[-1] += _tokenizer_hint(model)
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
        + f"\nRow numbers count from 0 in {paths.RAW_ROWS}. Details: {report_dir / 'index.html'} (open it in a "
        f"browser; it reads offline) and {report_dir / 'result.json'}. Fix the rows, or loosen the threshold under "
        "`validate:` (`dvc exp run -S validate.<setting>=...`, or params.yaml for `dvc repro`)."
    )


def _result_record(result: dict, raw_rows: Path, input_sha256: str, excluded: dict, parse_errors: dict) -> dict:
    """reports/validation/result.json: every rule with its rows, and the rows left out or unparseable, with why."""
    return {
        "success": result["success"],
        "rules": result["rules"],
        "input": {"path": str(raw_rows), "sha256": input_sha256},  # the audit's link to download
        # rows that broke a row rule within validate.max_bad_row_share: left out of the validated data
        "excluded_rows": {str(i): broke for i, broke in sorted(excluded.items())},
        "parse_errors": {str(i): why for i, why in parse_errors.items()},  # why rule parseable names each row
        "ge_result": result["ge_result"],
    }


def headline(summary: dict) -> dict:
    """metrics/validate.json, the validate row of `dvc metrics show`: the verdict and the rows left out for breaking
    a row rule. Short names, so that the one table of every stage fits an 80-column terminal with the GPU's
    figures in it; reports/validation/summary.json holds every figure (the row count among them)."""
    return {"ok": summary["success"], "excluded": summary["rows_excluded"]}


def _summary(result: dict, report: dict, n_rows: int, n_excluded: int, n_duplicates: int) -> dict:
    """The verdict, rule counts and the token-length figures `dvc metrics diff` can compare."""
    return {
        "success": result["success"],
        "rows": n_rows,
        "rows_excluded": n_excluded,
        "rules_failed": sum(r["status"] == "failed" for r in result["rules"]),
        "rules_not_evaluated": sum(r["status"] == "not evaluated" for r in result["rules"]),
        "duplicates": n_duplicates,
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
    tokenizer = load_tokenizer(params.model)
    template = chat_template(params.format.template, tokenizer)  # a template foreign to this tokenizer stops here
    # Conversations go to a hidden candidates file during the pass; they replace the last good ones only if the
    # suite passes, less the rows it leaves out.
    candidates = out_conversations.with_name(f".{out_conversations.name}.candidates")
    try:
        with frozen_heap():  # the libraries' objects out of the collector's walks: the scan and the suite
            scan = scan_rows(
                raw_rows,
                tokenizer,
                params.model.max_length,
                template,
                params.format.system_prompt,
                candidates,
                out_conversations,  # what a full disk is reported for
                workers=pool_workers(params.validate_.workers),  # 0 (one process) on up to 2 cores
            )
            summary, excluded = _check(params, scan, raw_rows, report_dir, metrics_path, histogram_path, tokenizer)
        _keep_candidates(candidates, scan, excluded, out_conversations)
    finally:
        candidates.unlink(missing_ok=True)
    return summary


def _check(params, scan: Scan, raw_rows, report_dir, metrics_path, histogram_path, tokenizer) -> tuple[dict, dict]:
    """Run the suite over the scan's feature table and write the reports; raise ValidationFailed on a failed verdict.

    The scan's feature arrays go into the suite's compact table (Scan.frame releases them), handed to the suite and
    not kept: it reads a batch of rows at a time and frees the table when done (expectations.run_suite). What grows
    with rows is then the table (28 bytes a row) and the token counts with the renderable rows' index (16) while the
    batches run, 16 after; for each row that breaks a rule, 8 bytes while the batches run (the suite keeps them as
    arrays and cuts great-expectations' own listing to expectations.LISTED_ROWS a rule), and after them result.json's
    `rows` as Python ints and their JSON text, about 0.1 KB, once the table is freed (measured:
    benchmarks/suite_memory.py --failing-share, docs/performance.md)."""
    report = length_report(
        scan.lengths(), params.model.max_length, params.format.length_policy, getattr(tokenizer, "name_or_path", "?")
    )
    with staged_dir(report_dir) as tmp:
        result = run_suite(scan.frame(), params.validate_, params.model, tmp / "data_docs")
        excluded = excluded_rows(result)
        write_json(tmp / paths.LENGTH_REPORT.name, report)
        record = _result_record(result, raw_rows, scan.input_sha256, excluded, scan.parse_errors)
        write_json(tmp / paths.VALIDATION_RESULT.name, record)
        write_validation_page(tmp)  # reports/validation/index.html: readable offline, unlike the Data Docs
        summary = _summary(result, report, scan.rows, len(excluded), scan.duplicate_rows)
        write_json(tmp / paths.VALIDATION_SUMMARY.name, summary)
    del result
    save_histogram(scan.lengths()[:, 0], params.model.max_length, histogram_path)  # renderable rows, in order
    write_json(metrics_path, headline(summary))
    log.info(
        "validation %s: %d rows, %d left out for breaking a row rule; %s",
        "passed" if summary["success"] else "FAILED",
        scan.rows,
        len(excluded),
        report["policy_effect"],
    )
    if not summary["success"]:
        raise ValidationFailed(_failure_message(record, report_dir, scan.parse_errors, params.model))
    return summary, excluded


def _keep_candidates(candidates: Path, scan: Scan, excluded: dict, out: Path) -> None:
    """Make the candidates the validated conversations, less the excluded rows (line k holds row renderable[k], and
    is line_bytes[k] bytes long). The lines between two excluded ones are copied as one range by the kernel
    (HashingWriter.copy_range): at ten million rows the file is 17 GB, and a few excluded rows cut out of it line by
    line in Python took 7 s a million rows."""
    renderable = scan.renderable
    dropped = np.flatnonzero(np.isin(renderable, np.fromiter(excluded, dtype=np.int64, count=len(excluded))))
    if not len(dropped):
        os.replace(candidates, out)
        return
    line_bytes = scan.candidate_line_bytes().astype(np.int64)
    ends = np.cumsum(line_bytes)
    if candidates.stat().st_size != (ends[-1] if len(ends) else 0):  # the scan's own file, written moments ago
        raise PipelineError(f"{candidates} is not the size the scan wrote: run the validate stage again.")
    # kept: from the start (or the end of a dropped line) to the start of the next dropped line (or the file's end)
    keep_from = np.concatenate(([0], ends[dropped])).tolist()
    keep_to = np.concatenate((ends[dropped] - line_bytes[dropped], [ends[-1]])).tolist()
    with open(candidates, "rb") as lines, atomic_writer(out) as kept:
        for start, stop in zip(keep_from, keep_to):
            if stop > start:
                kept.copy_range(lines, start, stop - start)


def main() -> None:
    validate(load_params())
