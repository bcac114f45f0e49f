"""The great-expectations suite over parsed conversations, kept as code.

Each input row becomes one row of features (parse error, roles, turn and character counts,
template leaks, encoding, duplicates, token length); each rule is one expectation on a feature,
its threshold a param. Running it through a Checkpoint gives the JSON result and the Data Docs HTML.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

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


def excluded_rows(result: dict) -> dict[int, list[str]]:
    """Rows that broke a row rule (tolerated under the share), with the rules they broke."""
    out: dict[int, list[str]] = {}
    for r in result["rules"]:
        if r["rule"] in ROW_RULES:
            for i in r["rows"]:
                out.setdefault(i, []).append(r["rule"])
    return out


def _not_evaluated(res, column: str | None, frame: pd.DataFrame) -> str | None:
    """Why great-expectations could not evaluate a rule (None when it did): it then reports success false with
    no observed value, which would read as a failure that no row caused."""
    info = res.exception_info or {}
    # one {raised_exception, exception_message} or, in GX 1.x, one such entry per metric it tried to compute
    errors = [e for e in ([info] if "raised_exception" in info else info.values()) if e.get("raised_exception")]
    if not errors:
        return None
    if column and column not in frame:  # features of parsed rows only: no row parsed
        return (
            f"no row has a `{column}` to check: it is computed for rows that parse, and none did (see rule parseable)"
        )
    return errors[0].get("exception_message") or "great-expectations raised an error"


def _checkpoint(docs_dir: Path, v: ValidateParams, model: ModelParams):
    """An ephemeral great-expectations context with the suite, a pandas batch and a checkpoint that builds Data Docs
    into docs_dir. Returns the checkpoint and each rule's feature column."""
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
        gx.Checkpoint(
            name="validate",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row_index"]},
        )
    )
    return checkpoint, {rule.name: rule.column for rule, _ in pairs}


def _rule_report(res, columns: dict, frame: pd.DataFrame) -> dict:
    """One rule's entry in result.json: its status (or why it could not be evaluated) and the rows that broke it."""
    meta = res.expectation_config.meta or {}
    detail = res.result or {}
    rows = [int(d["row_index"]) for d in detail.get("unexpected_index_list") or [] if isinstance(d, dict)]
    reason = _not_evaluated(res, columns.get(meta.get("rule")), frame)
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
    }


def run_suite(features: pd.DataFrame, v: ValidateParams, model: ModelParams, docs_dir: Path) -> dict:
    """Run the suite, build Data Docs into docs_dir, and return {success, rules: [...], ge_result}.

    Each rule has a status: "passed", "failed" (rows broke it), or "not evaluated" (with the reason);
    `success` is true, false, or null when not evaluated. The suite succeeds only when every rule passed.
    """
    checkpoint, columns = _checkpoint(docs_dir, v, model)
    # The flag columns go to great-expectations as Python objects. scan.Scan.frame builds them so; a frame of numpy
    # bools is cast into a new frame, never in place and never copied whole when nothing needs a cast (at ten
    # million rows the table is about a gigabyte).
    flags = ("roles_alternate", "has_template_marker", "has_replacement_char", "has_control_char", "is_duplicate")
    casts = {col: "object" for col in flags if col in features and features[col].dtype != object}
    frame = features.astype(casts) if casts else features
    run = checkpoint.run(batch_parameters={"dataframe": frame})
    result = next(iter(run.run_results.values()))
    by_rule = [_rule_report(res, columns, frame) for res in result.results]
    together = _row_rules_together(by_rule, len(frame), v)
    by_rule.append(together)
    return {
        "success": bool(result.success) and together["success"],
        "rules": by_rule,
        "ge_result": result.to_json_dict(),
    }


def _row_rules_together(by_rule: list[dict], rows: int, v: ValidateParams) -> dict:
    """validate.max_bad_row_share bounds the rows left out by all row rules together, not by each alone: seven
    rules each broken by 1% of other rows would otherwise leave out 7% under a 1% limit. great-expectations checks
    one column a rule, so the union of their failing rows is counted here."""
    bad = sorted({i for r in by_rule if r["rule"] in ROW_RULES for i in r["rows"]})
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
