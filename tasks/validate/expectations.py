"""The great-expectations suite over parsed conversations, kept as code.

Each input row becomes one row of features (parse error, roles, turn and character counts,
template leaks, encoding, duplicates, token length); each rule is one expectation on a feature,
its threshold a param. Running it through a Checkpoint gives the JSON result and the Data Docs HTML.

The suite reads the table BATCH_ROWS rows at a time, so that great-expectations' working memory stays one batch's
whatever the row count (issue 29), and the batches' results are merged into the result one run over all rows gives
(_merged): the same rules, statuses, counts, failing rows and values, shares and verdicts, fingerprint included.

Every failing row is kept in our compact form (an int64 array a rule, 8 bytes a row), from which result.json lists
them all (each rule's `rows`) and format leaves them out; great-expectations' own listing of them (its result's
unexpected_index_list and unexpected_index_query, and so its JSON and Data Docs) is cut to the first LISTED_ROWS of
a rule, so that its memory does not grow with the failing rows (_listing).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.common.config import ModelParams, ValidateParams
from tasks.common.conversation import ASSISTANT, FORM_MARKERS, FORMS, USER, Conversation

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    column: str | None  # feature the rule reads; None for table-level rules


# Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F; newline and tab are allowed. A regex scans
# a long text in C, where a per-character unicodedata.category loop took most of validate's time.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# The feature columns, in the order the suite's table has them.
FEATURES = (
    "row_index",
    "form",
    "parse_error",
    "n_turns",
    "roles_alternate",
    "last_role",
    "min_turn_chars",
    "total_chars",
    "has_template_marker",
    "has_replacement_char",
    "has_control_char",
)


def conversation_features(
    index: int, conv: Conversation | None, form: str | None, error: str | None, markers: tuple[str, ...] = FORM_MARKERS
) -> dict:
    """One row of features; structure fields are absent when the row could not be parsed. `markers`: the strings
    that mean a template leaked into content (the input forms' and the chat template's, leakage_markers)."""
    if conv is None:
        # "unknown", not None: great-expectations skips nulls, so a None form would never break `known_form`.
        return {"row_index": index, "form": form or "unknown", "parse_error": error}
    roles = [r for r, _ in conv.turns]
    texts = [t for _, t in conv.turns] + ([conv.system] if conv.system else [])
    joined = "\n".join(texts)
    return {
        "row_index": index,
        "form": form,
        "parse_error": None,
        "n_turns": len(roles),
        "roles_alternate": all(r == (USER if i % 2 == 0 else ASSISTANT) for i, r in enumerate(roles)),
        "last_role": roles[-1] if roles else None,
        "min_turn_chars": min((len(t) for t in texts), default=0),
        "total_chars": len(joined),
        "has_template_marker": any(m in joined for m in markers),
        "has_replacement_char": "\ufffd" in joined,
        "has_control_char": _CONTROL.search(joined) is not None,
    }


ROW_RULES = (
    "parseable",
    "known_form",
    "non_empty_turns",
    "roles_alternate",
    "ends_with_assistant",
    "turn_bounds",
    "char_bounds",
    "no_template_markers",
    "no_replacement_chars",
    "no_control_chars",
)
# Every rule of the suite, in the order it runs them and the report lists them.
SUITE_RULES = ("enough_rows", *ROW_RULES, "duplicates", "within_max_length", "under_hard_limit", "row_rules_together")


def rules(v: ValidateParams, model: ModelParams) -> list[tuple[Rule, object]]:
    """(rule, expectation) pairs; thresholds come from params.

    Row rules (ROW_RULES) tolerate up to validate.max_bad_row_share of rows breaking them: those rows are
    reported and left out of the validated data; past that share the run stops. Duplicates and token
    lengths have their own shares; the hard token limit tolerates nothing.
    """
    return _content_rules(v) + _share_rules(v, model)


def _content_rules(v: ValidateParams) -> list[tuple[Rule, object]]:
    """The row count, then the row rules: each tolerates validate.max_bad_row_share of rows breaking it."""
    import great_expectations as gx

    E = gx.expectations
    no = [False]
    row = {"mostly": 1 - v.max_bad_row_share}
    return [
        (
            Rule("enough_rows", f"at least {v.min_rows} rows", None),
            E.ExpectTableRowCountToBeBetween(min_value=v.min_rows),
        ),
        (
            Rule("parseable", "every row parses into a conversation", "parse_error"),
            E.ExpectColumnValuesToBeNull(column="parse_error", **row),
        ),
        (
            Rule("known_form", "rows are guanaco text, Llama-2 text, messages or Alpaca", "form"),
            E.ExpectColumnValuesToBeInSet(column="form", value_set=list(FORMS), **row),
        ),
        (
            Rule("non_empty_turns", "no empty turn or system prompt", "min_turn_chars"),
            E.ExpectColumnValuesToBeBetween(column="min_turn_chars", min_value=1, **row),
        ),
        (
            Rule("roles_alternate", "turns alternate user, assistant, user, ...", "roles_alternate"),
            E.ExpectColumnValuesToBeInSet(column="roles_alternate", value_set=[True], **row),
        ),
        (
            Rule("ends_with_assistant", "the conversation ends with an assistant answer", "last_role"),
            E.ExpectColumnValuesToBeInSet(column="last_role", value_set=[ASSISTANT], **row),
        ),
        (
            Rule("turn_bounds", f"between 2 and {v.max_turns} turns", "n_turns"),
            E.ExpectColumnValuesToBeBetween(column="n_turns", min_value=2, max_value=v.max_turns, **row),
        ),
        (
            Rule("char_bounds", f"between {v.min_chars} and {v.max_chars} characters", "total_chars"),
            E.ExpectColumnValuesToBeBetween(column="total_chars", min_value=v.min_chars, max_value=v.max_chars, **row),
        ),
        (
            Rule(
                "no_template_markers",
                "no chat template markers ([INST], <s>, <|im_start|>, ### Human: ...) inside content",
                "has_template_marker",
            ),
            E.ExpectColumnValuesToBeInSet(column="has_template_marker", value_set=no, **row),
        ),
        (
            Rule("no_replacement_chars", "no U+FFFD (text decoded with the wrong encoding)", "has_replacement_char"),
            E.ExpectColumnValuesToBeInSet(column="has_replacement_char", value_set=no, **row),
        ),
        (
            Rule("no_control_chars", "no control characters other than newline and tab", "has_control_char"),
            E.ExpectColumnValuesToBeInSet(column="has_control_char", value_set=no, **row),
        ),
    ]


def _share_rules(v: ValidateParams, model: ModelParams) -> list[tuple[Rule, object]]:
    """Rules with a share of their own (duplicates, lengths), and the hard token limit, which tolerates nothing."""
    import great_expectations as gx

    E = gx.expectations
    no = [False]
    return [
        (
            Rule("duplicates", f"at most {v.max_duplicate_share:.0%} duplicate or near-duplicate rows", "is_duplicate"),
            E.ExpectColumnValuesToBeInSet(column="is_duplicate", value_set=no, mostly=1 - v.max_duplicate_share),
        ),
        (
            Rule(
                "within_max_length",
                f"at least {v.min_share_within_max_length:.0%} of rows fit model.max_length={model.max_length} tokens",
                "n_tokens",
            ),
            E.ExpectColumnValuesToBeBetween(
                column="n_tokens", max_value=model.max_length, mostly=v.min_share_within_max_length
            ),
        ),
        (
            Rule("under_hard_limit", f"no row over {v.max_tokens_hard_limit} tokens", "n_tokens"),
            E.ExpectColumnValuesToBeBetween(column="n_tokens", max_value=v.max_tokens_hard_limit),
        ),
    ]


# Rows great-expectations validates at once. It holds a batch in the dtypes the suite is given (Python objects for
# the flags and strings: about 125 bytes a row), copies it without nulls for each rule on a column with nulls and
# works out each rule's condition: about 0.5 KB a row at its peak, measured 0.25-0.3 GB for a batch of 500k rows,
# whatever the table's size; and it lists the batch's failing rows (COMPLETE format: a dict a row, copied through
# JSON for its store) before _listing keeps them as arrays: about 1 KB a failing row, 0.15 GB more for a batch of
# 500k rows with 30% over max_length. Measured on 2M synthetic rows, 30% failing (benchmarks/suite_memory.py
# --failing-share 0.3): peak 0.87 GB in batches of 500k, 0.60 in batches of 200k, 0.54 of 100k, for 44, 46 and 46 s
# of suite. 200k: most of the saving, for a fixed cost a batch (about 0.15-0.4 s) paid 50 times at ten million rows.
BATCH_ROWS = 200_000
RESULT_FORMAT = {"result_format": "COMPLETE", "unexpected_index_column_names": ["row_index"]}
# The most failing rows of a rule great-expectations' result lists: its unexpected_index_list, and the query that
# selects them (unexpected_index_query: `df.filter(items=[...], axis=0)`, itself text a failing row), the first
# LISTED_ROWS in row order; as many as it lists failing values (constants.MAX_RESULT_RECORDS). COMPLETE format lists
# every one: about 1.5 KB a failing row at the suite's peak (a dict and a numpy int each, the query's text, copied
# through JSON for its store, its Data Docs and to_json_dict), 4.5 GB for a passing run of ten million rows with 30%
# over max_length (validate.min_share_within_max_length 0.7). The complete list is ours: an int64 array a rule while
# the suite runs, each rule's `rows` in result.json (which format reads), whatever the count. A rule with more
# failing rows says so: its result's meta and its result.json entry (`ge_rows_listed`) name the cut. Rules with
# LISTED_ROWS failing rows or fewer (every rule of the real 1k rows) are listed whole, as before.
LISTED_ROWS = 200
FINGERPRINT = "pandas_data_fingerprint"  # great-expectations' batch marker (_Fingerprint)


def excluded_rows(result: dict) -> dict[int, list[str]]:
    """Rows that broke a row rule (tolerated under the share), with the rules they broke."""
    out: dict[int, list[str]] = {}
    for r in result["rules"]:
        if r["rule"] in ROW_RULES:
            for i in r["rows"]:
                out.setdefault(i, []).append(r["rule"])
    return out


def _errors(res) -> list[dict]:
    """What great-expectations raised evaluating a rule: one {raised_exception, exception_message} or, in GX 1.x,
    one such entry per metric it tried to compute; empty when it evaluated the rule."""
    info = res.exception_info or {}
    return [e for e in ([info] if "raised_exception" in info else info.values()) if e.get("raised_exception")]


def _not_evaluated(res, column: str | None, present: set[str]) -> str | None:
    """Why great-expectations could not evaluate a rule (None when it did): it then reports success false with
    no observed value, which would read as a failure that no row caused."""
    errors = _errors(res)
    if not errors:
        return None
    if column and column not in present:  # features of parsed rows only: no row parsed
        return (
            f"no row has a `{column}` to check: it is computed for rows that parse, and none did (see rule parseable)"
        )
    return errors[0].get("exception_message") or "great-expectations raised an error"


def _checkpoint(docs_dir: Path, v: ValidateParams, model: ModelParams):
    """An ephemeral great-expectations context with the suite, a pandas batch, a Data Docs site in docs_dir and a
    checkpoint that validates one batch of rows (the docs are built once, from the merged result: _build_docs).
    Returns the context, the checkpoint and each rule's feature column."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    context.add_data_docs_site(
        "pipeline",
        {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    batch = (
        context.data_sources.add_pandas("conversations")
        .add_dataframe_asset("rows")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="guanaco_conversations"))
    pairs = rules(v, model)
    for rule, expectation in pairs:
        expectation.meta = {"rule": rule.name, "description": rule.description}
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="conversations", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(name="validate", validation_definitions=[definition], result_format=dict(RESULT_FORMAT))
    )
    return context, checkpoint, {rule.name: rule.column for rule, _ in pairs}


def _rule_report(res, failing: np.ndarray, columns: dict, present: set[str]) -> dict:
    """One rule's entry in result.json: its status (or why it could not be evaluated) and the rows that broke it
    (`failing`, every one, whatever great-expectations' result lists: _listing)."""
    meta = res.expectation_config.meta or {}
    detail = res.result or {}
    rows = failing.tolist()  # Python ints, as json writes them
    reason = _not_evaluated(res, columns.get(meta.get("rule")), present)
    cut = (res.meta or {}).get(LISTING_CUT)
    return {
        "rule": meta.get("rule"),
        "description": meta.get("description"),
        "status": "not evaluated" if reason else "passed" if res.success else "failed",
        "success": None if reason else bool(res.success),
        **({"reason": reason} if reason else {}),
        "unexpected_count": detail.get("unexpected_count"),
        "unexpected_percent": detail.get("unexpected_percent"),
        "observed_value": detail.get("observed_value"),
        "rows": rows,
        # only where great-expectations' listing was cut, so that a rule listed whole reads as before
        **({"ge_rows_listed": cut} if cut else {}),
    }


def run_suite(
    table: pd.DataFrame, v: ValidateParams, model: ModelParams, docs_dir: Path, batch_rows: int | None = None
) -> dict:
    """Run the suite over the table (scan.Scan.frame) batch_rows (default BATCH_ROWS) rows at a time, merge the
    batches' results into the one a single run over all rows gives, build Data Docs from it into docs_dir, and return
    {success, rules: [...], ge_result}. A caller that hands the table over without keeping it (validate does) has its
    memory back once the batches are validated, before great-expectations copies the failing rows (Data Docs, the
    JSON result).

    Each rule has a status: "passed", "failed" (rows broke it), or "not evaluated" (with the reason);
    `success` is true, false, or null when not evaluated. The suite succeeds only when every rule passed.
    """
    from great_expectations.core.run_identifier import RunIdentifier

    context, checkpoint, columns = _checkpoint(docs_dir, v, model)
    run_id = RunIdentifier(run_time=dt.datetime.now(dt.UTC))  # one run, whatever the batches
    rows, present = len(table), set(table.columns)
    fingerprint, parts, failing = _Fingerprint(rows), [], []
    for batch in _batches(table, batch_rows or BATCH_ROWS):
        fingerprint.add(batch)
        run = checkpoint.run(batch_parameters={"dataframe": batch}, run_id=run_id)
        ((key, part),) = run.run_results.items()  # the same key each batch, so the store keeps only the last
        failing.append(_listing(part))  # the batch's failing rows as arrays; its listing cut to LISTED_ROWS
        parts.append(part)
        del batch, run  # before the next batch is built
    del table  # every batch is validated: the table can go before great-expectations copies its result
    result, failing = _merged(parts, failing, rows, fingerprint.value())
    _build_docs(context, key, result)
    by_rule = [_rule_report(res, broke, columns, present) for res, broke in zip(result.results, failing)]
    together = _row_rules_together([broke for r, broke in zip(by_rule, failing) if r["rule"] in ROW_RULES], rows, v)
    del failing
    by_rule.append(together)
    return {
        "success": bool(result.success) and together["success"],
        "rules": by_rule,
        "ge_result": result.to_json_dict(),
    }


def _batches(table: pd.DataFrame, batch_rows: int) -> Iterator[pd.DataFrame]:
    """The table's rows, batch_rows at a time (one empty batch for no rows), as great-expectations is given them."""
    # Counts are float with NaN when any row of the whole table does not parse, in every batch alike.
    float_counts = bool(table["parse_error"].notna().any())
    for start in range(0, max(len(table), 1), batch_rows):
        yield _as_given(table, start, min(start + batch_rows, len(table)), float_counts)


def _as_given(table: pd.DataFrame, start: int, stop: int, float_counts: bool) -> pd.DataFrame:
    """Rows [start, stop) of the compact table in the columns and dtypes the suite has always been given (its
    results list values of these types and its fingerprint hashes them): row_index int64 first; counts int64, or
    float64 with NaN where the row did not parse; the coded features, parse errors and duplicate flags as Python
    objects (None where absent); n_tokens nullable Int64. Indexed by row number, as rows of the whole table."""
    part = table.iloc[start:stop]
    columns: dict[str, object] = {"row_index": np.arange(start, stop, dtype=np.int64)}
    for name, column in part.items():
        if name == "n_tokens":
            values = column.to_numpy(dtype=np.int64, na_value=-1)
            columns[name] = pd.arrays.IntegerArray(values, values < 0)
        elif pd.api.types.is_integer_dtype(column.dtype):  # the counts
            columns[name] = (
                column.to_numpy(dtype=np.float64, na_value=np.nan) if float_counts else column.to_numpy(np.int64)
            )
        else:
            columns[name] = column.to_numpy(dtype=object, na_value=None)
    return pd.DataFrame(columns, index=part.index, copy=False)


LISTING_CUT = "rows_listed"  # the meta key of a rule's result whose listing _listing cut


def _listing(part) -> list[np.ndarray]:
    """Each rule's failing rows in one batch's result, as an int64 array of row numbers (8 bytes a row, where
    great-expectations' listing takes about 1.5 KB at its peak: LISTED_ROWS); its listing cut to the first
    LISTED_ROWS in place, unexpected_index_query dropped where it was (_metrics writes it again over the rows
    listed). A listing of LISTED_ROWS rows or fewer stays as great-expectations gave it."""
    failing = []
    for res in part.results:
        detail = res.result or {}
        listed = detail.get("unexpected_index_list") or []
        failing.append(np.fromiter((d["row_index"] for d in listed if isinstance(d, dict)), dtype=np.int64))
        if len(listed) > LISTED_ROWS:
            detail["unexpected_index_list"] = listed[:LISTED_ROWS]
            detail.pop("unexpected_index_query", None)
    return failing


class _Fingerprint:
    """great-expectations' fingerprint of the data it validates (batch_markers.pandas_data_fingerprint: the md5 of
    pandas' row hashes, taken while the table's shallow size is under its HASH_THRESHOLD), taken over the batches as
    over the whole table: a row's hash depends on that row alone, so the batches' hashes in order are the table's."""

    def __init__(self, rows: int) -> None:
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._bytes = pd.RangeIndex(rows).memory_usage()  # the whole table's index

    def add(self, batch: pd.DataFrame) -> None:
        self._md5.update(pd.util.hash_pandas_object(batch, index=True).to_numpy())
        self._bytes += int(batch.memory_usage(index=False).sum())

    def value(self) -> str | None:
        from great_expectations.execution_engine.pandas_execution_engine import HASH_THRESHOLD

        return self._md5.hexdigest() if self._bytes < HASH_THRESHOLD else None


def _merged(parts: list, failing: list[list[np.ndarray]], rows: int, fingerprint: str | None):
    """The suite's result over all rows from its results over each batch, in row order, and each rule's failing rows
    over all rows (from `failing`, _listing's arrays a batch). One batch: its result as great-expectations gave it,
    when no rule's listing was cut. Each rule is merged by _merged_rule; the suite's statistics are counted again,
    and its meta is the first batch's (one run id for all) with the whole table's fingerprint."""
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult
    from great_expectations.validator.validation_statistics import calc_validation_statistics

    first = parts[0]
    merged = [
        _merged_rule([part.results[k] for part in parts], [batch[k] for batch in failing], rows)
        for k in range(len(first.results))
    ]
    results, rows_of = [res for res, _ in merged], [broke for _, broke in merged]
    if len(parts) == 1 and all(res is part_res for res, part_res in zip(results, first.results)):
        return first, rows_of
    statistics = calc_validation_statistics(results)
    markers = type(first.meta["batch_markers"])(first.meta["batch_markers"])
    markers.pop(FINGERPRINT, None)
    if fingerprint is not None:
        markers[FINGERPRINT] = fingerprint
    return ExpectationSuiteValidationResult(
        success=statistics.success,
        results=results,
        suite_name=first.suite_name,
        suite_parameters=first.suite_parameters,
        statistics={
            "evaluated_expectations": statistics.evaluated_expectations,
            "successful_expectations": statistics.successful_expectations,
            "unsuccessful_expectations": statistics.unsuccessful_expectations,
            "success_percent": statistics.success_percent,
        },
        meta={**first.meta, "batch_markers": markers},
        batch_id=first.batch_id,
        id=first.id,
    ), rows_of


def _merged_rule(parts: list, failing: list[np.ndarray], rows: int):
    """One rule's result over all rows from its result on each batch (in row order), computed by great-expectations
    itself: the rule's metrics_validate on the metrics one run would have computed (_metrics), so every share and
    verdict is taken over all rows with its own formulas; and its failing rows over all rows (`failing`: each
    batch's). A rule it could not evaluate (a column absent from the table, so from every batch) keeps its first
    batch's result. One batch whose listing was not cut keeps its result as great-expectations gave it."""
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult

    raised = [k for k, part in enumerate(parts) if _errors(part)]
    if raised:
        return parts[raised[0]], failing[raised[0]]
    every = np.concatenate(failing)
    first = parts[0]
    if len(parts) == 1 and len(every) <= LISTED_ROWS:
        return first, every
    expectation = first.expectation_config.to_domain_obj()
    runtime = {"result_format": dict(RESULT_FORMAT)}
    wanted = expectation.get_validation_dependencies(runtime_configuration=runtime).metric_configurations
    values = _metrics(expectation, [part.result for part in parts], rows)
    outcome = expectation.metrics_validate({c.id: values[name] for name, c in wanted.items()}, runtime)
    meta = first.meta
    if len(every) > LISTED_ROWS:  # said where great-expectations' result is read: its JSON, its Data Docs
        cut = (
            f"the first {LISTED_ROWS} of {len(every)} failing rows (unexpected_index_list, unexpected_index_query); "
            "every one is in reports/validation/result.json, this rule's `rows`"
        )
        meta = {**(meta or {}), LISTING_CUT: cut}
    return ExpectationValidationResult(
        success=outcome.success,
        expectation_config=first.expectation_config,
        result=outcome.result,
        meta=meta,
        exception_info=first.exception_info,
    ), every


def _metrics(expectation, results: list[dict], rows: int) -> dict:
    """The metrics, by name, that one run over all rows computes for a rule, from its results on each batch: the row
    count (all a table rule reads); for a column rule, the null and failing counts summed, the failing rows
    concatenated up to LISTED_ROWS (each batch's listing holds its first LISTED_ROWS: _listing) and the query that
    selects those, and the failing values concatenated up to the number great-expectations lists
    (MAX_RESULT_RECORDS, the first in row order). A metric not named here is a KeyError, not a guess."""
    from great_expectations.constants import MAX_RESULT_RECORDS
    from great_expectations.core.metric_function_types import SummarizationMetricNameSuffixes as Suffix

    metrics: dict = {"table.row_count": rows}
    metric = getattr(expectation, "map_metric", None)
    if metric is None:
        return metrics
    nulls = [r.get("missing_count") for r in results]  # not reported by a rule that reads no null count
    failing = [row for r in results for row in r["unexpected_index_list"]][:LISTED_ROWS]
    values = [value for r in results for value in r["unexpected_list"]]  # each batch's are at most as many
    # great-expectations' query lists the failing rows' pandas index labels, as Python ints: each batch is indexed
    # by row number (_as_given), so they are the rows' row_index (which the index list holds as numpy ints)
    query = f"df.filter(items={[int(row['row_index']) for row in failing]}, axis=0)"
    return metrics | {
        f"column_values.nonnull.{Suffix.UNEXPECTED_COUNT.value}": None if None in nulls else sum(nulls),
        f"{metric}.{Suffix.UNEXPECTED_COUNT.value}": sum(r["unexpected_count"] for r in results),
        f"{metric}.{Suffix.UNEXPECTED_VALUES.value}": values[:MAX_RESULT_RECORDS],
        f"{metric}.{Suffix.UNEXPECTED_INDEX_LIST.value}": failing,
        f"{metric}.{Suffix.UNEXPECTED_INDEX_QUERY.value}": query,
    }


def _build_docs(context, key, result) -> None:
    """Data Docs from the merged result: stored under the run's key (replacing the last batch's) and rendered, as
    great-expectations' UpdateDataDocsAction renders a checkpoint's result."""
    context.validation_results_store.set(key, result)
    context.build_data_docs(resource_identifiers=[key, key.expectation_suite_identifier])


def _row_rules_together(failing: list[np.ndarray], rows: int, v: ValidateParams) -> dict:
    """validate.max_bad_row_share bounds the rows left out by all row rules together, not by each alone: seven
    rules each broken by 1% of other rows would otherwise leave out 7% under a 1% limit. great-expectations checks
    one column a rule, so the union of their failing rows (`failing`: the row rules') is counted here."""
    bad = np.unique(np.concatenate(failing)).tolist() if failing else []  # sorted, each once
    share = len(bad) / rows if rows else 0.0
    ok = share <= v.max_bad_row_share
    return {
        "rule": "row_rules_together",
        "description": f"rows breaking any row rule stay within validate.max_bad_row_share ({v.max_bad_row_share:g})",
        "status": "passed" if ok else "failed",
        "success": ok,
        "unexpected_count": len(bad),
        "unexpected_percent": round(100 * share, 3),
        "observed_value": f"{len(bad)} of {rows} rows ({100 * share:.2f}%)",
        "rows": bad,
    }
