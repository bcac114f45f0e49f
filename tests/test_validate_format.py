"""Stages 2 and 3: the validation suite names failing rules and rows; format applies the length policy and splits.

validate() runs great-expectations (seconds a call), so each distinct input is validated once per module
and the tests share the outcome.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.common import paths
from tasks.common.artifacts import read_jsonl
from tasks.common.base_model import load_tokenizer
from tasks.common.chat_template import BUILT_IN
from tasks.common.config import with_overrides
from tasks.common.conversation import Conversation, near_duplicate_key, parse_text
from tasks.common.errors import PipelineError, ValidationFailed
from tasks.format.stage import format_rows
from tasks.validate.expectations import ROW_RULES, SUITE_RULES
from tasks.validate.stage import headline, validate
from tests.conftest import ROOT

SAMPLE = ROOT / paths.SAMPLE_DATA
LLAMA2 = BUILT_IN["llama2"]
LLAMA2_ROW = re.compile(r"^(<s>\[INST\] (<<SYS>>\n.*?\n<</SYS>>\n\n)?.+? \[/INST\] .*? </s>)+$", re.S)


def _sample_rows() -> list[dict]:
    return read_jsonl(SAMPLE)


@dataclass
class Run:
    dir: Path
    raw: Path
    conversations: Path
    report_dir: Path
    metrics: Path
    histogram: Path
    summary: dict | None = None
    error: Exception | None = None
    conversations_before: bytes | None = None

    def result(self) -> dict:
        return json.loads((self.report_dir / "result.json").read_text())

    def rule(self, name: str) -> dict:
        return next(r for r in self.result()["rules"] if r["rule"] == name)

    def lengths(self) -> dict:
        return json.loads((self.report_dir / "lengths.json").read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A scratch project dir with the tiny base model (validate loads it from models/ relative to cwd)."""
    root = tmp_path_factory.mktemp("validate_project")
    (root / "data" / "sample").mkdir(parents=True)
    shutil.copy2(SAMPLE, root / paths.SAMPLE_DATA)
    tiny = ROOT / "models" / "tiny-llama"
    if tiny.exists():
        shutil.copytree(tiny, root / "models" / "tiny-llama")
    return root


def _validate(params, project: Path, name: str, rows: list[dict], previous_conversations: bytes | None = None) -> Run:
    d = project / name
    d.mkdir()
    run = Run(
        dir=d,
        raw=d / "raw.jsonl",
        conversations=d / "validated" / "conversations.jsonl",
        report_dir=d / "reports" / "validation",
        metrics=d / "metrics" / "validate.json",
        histogram=d / "reports" / "lengths.png",
    )
    run.raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    if previous_conversations is not None:
        run.conversations.parent.mkdir(parents=True)
        run.conversations.write_bytes(previous_conversations)
        run.conversations_before = previous_conversations
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        try:
            run.summary = validate(
                params,
                raw_rows=run.raw,
                out_conversations=run.conversations,
                report_dir=run.report_dir,
                metrics_path=run.metrics,
                histogram_path=run.histogram,
            )
        except PipelineError as e:
            run.error = e
    return run


# --- the shipped sample passes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_run(params, project) -> Run:
    return _validate(params, project, "sample", _sample_rows())


def test_sample_passes(sample_run):
    assert sample_run.error is None, sample_run.error
    convs = read_jsonl(sample_run.conversations)
    assert len(convs) == 64
    assert [c["row_index"] for c in convs] == list(range(64))
    assert all(isinstance(c["n_tokens"], int) and c["n_tokens"] > 0 for c in convs)
    assert all(0 < c["answer_tokens"] < c["n_tokens"] for c in convs)
    assert sample_run.summary["success"] is True and sample_run.summary["rows"] == 64
    assert json.loads((sample_run.report_dir / paths.VALIDATION_SUMMARY.name).read_text()) == sample_run.summary
    assert json.loads(sample_run.metrics.read_text()) == headline(sample_run.summary) == {"ok": True, "excluded": 0}


def test_sample_reports(sample_run):
    result = sample_run.result()
    assert result["success"] is True
    assert {r["rule"] for r in result["rules"]} == set(SUITE_RULES)
    assert all(r["success"] for r in result["rules"])
    assert (sample_run.report_dir / "data_docs" / "index.html").is_file()
    lengths = sample_run.lengths()
    assert set(lengths["percentiles"]) == {"p50", "p90", "p95", "p99"}
    assert lengths["percentiles"]["p50"] <= lengths["percentiles"]["p95"] <= lengths["max"]
    convs = read_jsonl(sample_run.conversations)
    assert lengths["rows"] == 64 and lengths["max"] == max(c["n_tokens"] for c in convs)
    assert lengths["rows_over_max_length"] == sum(c["n_tokens"] > lengths["max_length"] for c in convs)
    assert sample_run.histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- bad rows fail, named by rule and row; the last good conversations stay --------------------


def _bad_rows(sample: list[dict]) -> list[tuple[tuple[str, ...], dict]]:
    """(rules it must break, the row)."""
    msg = lambda *pairs: {"messages": [{"role": r, "content": c} for r, c in pairs]}  # noqa: E731
    return [
        (("non_empty_turns",), {"text": "### Human: Tell me something interesting?### Assistant: "}),
        (
            ("roles_alternate",),
            msg(
                ("user", "First question here?"),
                ("user", "Second question here?"),
                ("assistant", "One answer for both."),
            ),
        ),
        (
            ("ends_with_assistant",),
            msg(
                ("user", "Hello there, friend."), ("assistant", "Hi! How can I help?"), ("user", "Never mind, thanks.")
            ),
        ),
        (
            ("no_template_markers",),
            {"text": "### Human: What does [INST] mean in a prompt?### Assistant: It opens a turn."},
        ),
        (("no_control_chars",), {"text": "### Human: Ring the bell\x07 please.### Assistant: Ding ding, done."}),
        (
            ("no_replacement_chars",),
            {"text": "### Human: What is a caf\ufffd?### Assistant: A place that serves coffee."},
        ),
        (("duplicates",), dict(sample[5])),
        # no readable column / a non-string text: neither parses nor has a known form
        (("parseable", "known_form"), {"prompt": "What is 2+2?", "response": "4"}),
        (("parseable", "known_form"), {"text": 123}),
    ]


@pytest.fixture(scope="module")
def bad_run(params, project, sample_run) -> tuple[Run, dict[str, list[int]]]:
    rows = _sample_rows()
    assert len(rows) == 64 >= params.validate_.min_rows
    expected: dict[str, list[int]] = {}
    for rules, row in _bad_rows(rows):
        for rule in rules:
            expected.setdefault(rule, []).append(len(rows))
        rows.append(row)
    # together they are far over validate.max_bad_row_share, which bounds the union of the row rules' rows too
    expected["row_rules_together"] = sorted({i for rule, ids in expected.items() if rule in ROW_RULES for i in ids})
    p = with_overrides(params, **{"validate.max_duplicate_share": 0.0})  # one duplicate is one too many
    run = _validate(p, project, "bad", rows, previous_conversations=sample_run.conversations.read_bytes())
    return run, expected


def test_bad_rows_raise_naming_rules_and_rows(bad_run):
    run, expected = bad_run
    assert isinstance(run.error, ValidationFailed)
    message = str(run.error)
    for rule, rows in expected.items():
        line = next((ln for ln in message.splitlines() if ln.strip().startswith(f"- {rule}:")), None)
        assert line is not None, f"{rule} missing from:\n{message}"
        assert f"rows {rows}" in line, line
    assert "result.json" in message


def test_bad_rows_result_lists_each_failing_rule_with_rows(bad_run):
    run, expected = bad_run
    result = run.result()
    assert result["success"] is False
    failed = {r["rule"]: r["rows"] for r in result["rules"] if not r["success"]}
    assert failed == expected  # exactly these rules, exactly these rows
    assert {r["rule"] for r in result["rules"]} == set(SUITE_RULES)
    metrics = json.loads(run.metrics.read_text())
    summary = json.loads((run.report_dir / paths.VALIDATION_SUMMARY.name).read_text())
    assert metrics["ok"] is False and summary["rules_failed"] == len(expected)
    assert (run.report_dir / "data_docs" / "index.html").is_file()  # the failed run can be read


def test_bad_rows_leave_previous_conversations_untouched(bad_run):
    run, _ = bad_run
    assert run.conversations.read_bytes() == run.conversations_before
    assert [p.name for p in run.conversations.parent.iterdir()] == ["conversations.jsonl"]


def test_row_over_hard_limit_fails(params, project):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        tokenizer = load_tokenizer(params.model)
    answer = "qz7 " * 12_500
    long_row = {"text": f"### Human: Repeat the word qz7 many times.### Assistant: {answer.strip()}"}
    n_tokens = len(tokenizer(LLAMA2.render(parse_text(long_row["text"])).text, add_special_tokens=False)["input_ids"])
    assert n_tokens > params.validate_.max_tokens_hard_limit == 32768
    assert len(long_row["text"]) < params.validate_.max_chars  # so only the token limit is at stake
    rows = _sample_rows()
    rows.insert(10, long_row)
    run = _validate(params, project, "long", rows)
    assert isinstance(run.error, ValidationFailed)
    assert re.search(r"- under_hard_limit: .*rows \[10\]", str(run.error))
    failed = {r["rule"]: r["rows"] for r in run.result()["rules"] if not r["success"]}
    assert failed == {"under_hard_limit": [10]}
    assert run.lengths()["max"] == n_tokens
    assert not run.conversations.exists()


# --- length policy and split on a short max_length ---------------------------------------------

NEAR_DUPS = [  # (guanaco text, the same conversation as messages differing only in case/punctuation)
    (
        "### Human: What is the boiling point of water?### Assistant: It is 100 degrees Celsius at sea level.",
        [("user", "what is the boiling point of water"), ("assistant", "It is 100 degrees celsius, at sea level!")],
    ),
    (
        "### Human: Name three primary colors.### Assistant: Red, yellow and blue.",
        [("user", "NAME THREE PRIMARY COLORS"), ("assistant", "red -- yellow -- and blue")],
    ),
]


def _eval_side_pair(sample: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    """A near-duplicate pair whose split key sorts before every sample row's, so it must land in eval."""
    import hashlib

    def key(conv: Conversation) -> str:
        return hashlib.sha256(near_duplicate_key(conv).encode()).hexdigest()

    from tasks.common.conversation import parse_row

    lowest = min(key(parse_row(r)) for r in sample)
    for k in range(10_000):
        text = f"### Human: What is {k} times three?### Assistant: {k} times three is {3 * k}."
        if key(parse_text(text)) < lowest:
            return text, [("user", f"WHAT IS {k} TIMES THREE"), ("assistant", f"{k} times three is {3 * k}!!")]
    raise AssertionError("no candidate found")


@pytest.fixture(scope="module")
def short_run(params, project) -> Run:
    sample = _sample_rows()
    rows = list(sample)
    for text, messages in [*NEAR_DUPS, _eval_side_pair(sample)]:
        rows.append({"text": text})
        rows.append({"messages": [{"role": r, "content": c} for r, c in messages]})
    p = with_overrides(params, **{"model.max_length": 128, "validate.min_share_within_max_length": 0.0})
    run = _validate(p, project, "short", rows)
    assert run.error is None, run.error
    return run


def _fmt(params, run: Run, out: Path, **changes) -> dict:
    p = with_overrides(params, **{"model.max_length": 128, **{f"format.{k}": v for k, v in changes.items()}})
    return format_rows(p.format, p.model, run.conversations, out)


def _split(out: Path) -> tuple[list[dict], list[dict]]:
    return read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")


def test_short_max_length_counts_rows_over(short_run):
    convs = read_jsonl(short_run.conversations)
    over = [c for c in convs if c["n_tokens"] > 128]
    assert 0 < len(over) < len(convs)
    assert short_run.lengths()["rows_over_max_length"] == len(over)
    assert short_run.summary["duplicates"] == 3
    assert sum(c["is_duplicate"] for c in convs) == 3


def test_policy_drop_removes_exactly_rows_over(params, short_run, tmp_path):
    convs = read_jsonl(short_run.conversations)
    report = _fmt(params, short_run, tmp_path, length_policy="drop", duplicates="keep")
    train, evals = _split(tmp_path)
    kept = {r["row_index"] for r in train + evals}
    assert kept == {c["row_index"] for c in convs if c["n_tokens"] <= 128}
    assert report["dropped_over_max_length"] == sum(c["n_tokens"] > 128 for c in convs)
    assert all(r["n_tokens"] <= 128 for r in train + evals)


def test_policy_fail_lists_rows(params, short_run, tmp_path):
    convs = read_jsonl(short_run.conversations)
    over = [c for c in convs if c["n_tokens"] > 128]
    with pytest.raises(PipelineError, match=rf"{len(over)} conversation\(s\) exceed model.max_length=128") as err:
        _fmt(params, short_run, tmp_path / "out", length_policy="fail", duplicates="keep")
    first = over[0]
    assert f"row {first['row_index']} ({first['n_tokens']} tokens)" in str(err.value)
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_policy_truncate_keeps_and_counts(params, short_run, tmp_path):
    convs = read_jsonl(short_run.conversations)
    over = [c for c in convs if c["n_tokens"] > 128]
    report = _fmt(params, short_run, tmp_path, length_policy="truncate", duplicates="keep")
    train, evals = _split(tmp_path)
    kept = {r["row_index"] for r in train + evals}
    fully = {c["row_index"] for c in over if c["fully_masked_if_truncated"]}
    assert kept == {c["row_index"] for c in convs} - fully
    assert report["truncated"] == len(over) - len(fully) > 0
    assert report["dropped_no_answer_left"] == len(fully)
    assert report["answer_tokens_cut"] > 0
    assert report["truncated"] + report["dropped_no_answer_left"] == short_run.lengths()["rows_over_max_length"]
    assert any(r["n_tokens"] > 128 for r in train + evals)


def test_duplicates_drop(params, short_run, tmp_path):
    report = _fmt(params, short_run, tmp_path, length_policy="truncate", duplicates="drop")
    train, evals = _split(tmp_path)
    assert report["dropped_duplicates"] == 3
    dups = {c["row_index"] for c in read_jsonl(short_run.conversations) if c["is_duplicate"]}
    assert not dups & {r["row_index"] for r in train + evals}


def test_near_duplicates_land_on_the_same_side(params, short_run, tmp_path):
    _fmt(params, short_run, tmp_path, length_policy="truncate", duplicates="keep")
    train, evals = _split(tmp_path)
    side = {r["row_index"]: "eval" for r in evals} | {r["row_index"]: "train" for r in train}
    n = 64
    pairs = [(n + 2 * k, n + 2 * k + 1) for k in range(3)]
    for a, b in pairs:
        assert a in side and b in side
        assert side[a] == side[b], (a, b)
    assert side[pairs[-1][0]] == "eval"  # the pair chosen to sort first is in eval, whole


# --- the split ----------------------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint(params, sample_run, tmp_path):
    p = with_overrides(params, **{"format.duplicates": "keep"})
    a = format_rows(p.format, p.model, sample_run.conversations, tmp_path / "a")
    b = format_rows(p.format, p.model, sample_run.conversations, tmp_path / "b")
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a == b
    train, evals = _split(tmp_path / "a")
    n = 64
    assert len(evals) == max(p.format.min_eval_rows, round(p.format.eval_fraction * n)) == a["eval_rows"]
    assert len(train) == n - len(evals) == a["train_rows"]
    assert not {r["row_index"] for r in train} & {r["row_index"] for r in evals}
    assert {r["row_index"] for r in train} | {r["row_index"] for r in evals} == set(range(n))
    for r in train + evals:
        assert LLAMA2_ROW.match(r["text"]), r["text"][:80]
        assert [r["text"][s:e][-5:] for s, e in r["answer_spans"]] == [" </s>"] * len(r["answer_spans"])
    convs = {c["row_index"]: Conversation.from_dict(c) for c in read_jsonl(sample_run.conversations)}
    for r in evals:
        assert LLAMA2.render(parse_text(r["text"])).text == r["text"]
        assert parse_text(r["text"]) == convs[r["row_index"]]


def test_split_with_system_prompt(params, sample_run, tmp_path):
    p = with_overrides(params, **{"format.system_prompt": "You are helpful."})
    format_rows(p.format, p.model, sample_run.conversations, tmp_path)
    train, evals = _split(tmp_path)
    for r in train + evals:
        assert r["text"].startswith("<s>[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\n")
        assert r["text"].count("<<SYS>>") == 1


def _synthetic(path: Path, n_pairs: int) -> Path:
    rows = []
    for k in range(n_pairs):
        for dup, (q, a) in enumerate(
            [(f"What is {k} plus one?", f"It is {k + 1}."), (f"what is {k} plus one", f"it is {k + 1}!")]
        ):
            rows.append(
                {
                    "row_index": len(rows),
                    "system": None,
                    "turns": [{"role": "user", "text": q}, {"role": "assistant", "text": a}],
                    "n_tokens": 20,
                    "answer_tokens": 6,
                    "answer_tokens_cut": 0,
                    "fully_masked_if_truncated": False,
                    "is_duplicate": bool(dup),
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_near_duplicate_pair_is_not_split_at_the_eval_boundary(params, tmp_path):
    # every row has a twin, and 5 eval rows cannot hold whole pairs: the 5th row's twin must follow it
    conversations = _synthetic(tmp_path / "pairs.jsonl", 20)
    p = with_overrides(params, **{"format.duplicates": "keep", "format.min_eval_rows": 5})
    format_rows(p.format, p.model, conversations, tmp_path / "out")
    train, evals = _split(tmp_path / "out")
    eval_pairs = [r["row_index"] // 2 for r in evals]
    train_pairs = {r["row_index"] // 2 for r in train}
    assert len(evals) >= 5
    assert not set(eval_pairs) & train_pairs
    assert all(eval_pairs.count(k) == 2 for k in set(eval_pairs))


def test_too_few_rows_for_eval(params, sample_run, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(c) + "\n" for c in read_jsonl(sample_run.conversations)[:4]))
    with pytest.raises(PipelineError, match=r"only 4 conversation\(s\) left .* too few for 4 eval row"):
        format_rows(params.format, params.model, few, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_all_rows_near_duplicates_of_eval_is_an_error(params, tmp_path):
    conversations = _synthetic(tmp_path / "one.jsonl", 1)
    rows = read_jsonl(conversations)
    rows += [dict(rows[0], row_index=i) for i in range(2, 8)]
    conversations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = with_overrides(params, **{"format.duplicates": "keep", "format.min_eval_rows": 1})
    with pytest.raises(PipelineError, match="none to train on"):
        format_rows(p.format, p.model, conversations, tmp_path / "out")


# --- why a row does not parse reaches the message and result.json; rules nothing broke are not failed --------


def test_bad_rows_say_why_they_do_not_parse(bad_run):
    run, expected = bad_run
    no_column, not_text = expected["parseable"]  # the {"prompt", "response"} row, then {"text": 123}
    line = f"row {no_column}: no column to read: found ['prompt', 'response']; expected `text`"
    assert line in str(run.error)
    errors = run.result()["parse_errors"]
    assert errors[str(no_column)].startswith("no column to read: found ['prompt', 'response']")
    assert errors[str(not_text)] == "`text` is an int, expected a string"
    assert set(errors) == {str(no_column), str(not_text)}


def test_failed_rules_have_status_failed(bad_run):
    run, expected = bad_run
    status = {r["rule"]: r["status"] for r in run.result()["rules"]}
    assert {rule for rule, s in status.items() if s == "failed"} == set(expected)
    assert {s for rule, s in status.items() if rule not in expected} == {"passed"}


@pytest.fixture(scope="module")
def unparsed_run(params, project) -> Run:
    """Every row has `text`, none in a form the parser knows: no row parses, so most features do not exist."""
    rows = [{"text": f"Question {k}? Answer {k}."} for k in range(20)]
    return _validate(params, project, "unparsed", rows)


def test_rules_that_cannot_be_evaluated_say_so_and_are_not_failed(unparsed_run):
    rules = {r["rule"]: r for r in unparsed_run.result()["rules"]}
    unevaluated = set(ROW_RULES) - {"parseable", "known_form"}  # every row rule on a parsed row's structure
    assert {n for n, r in rules.items() if r["status"] == "not evaluated"} == unevaluated
    for name in unevaluated:
        assert rules[name]["success"] is None, name  # not false: nothing broke it
        assert "none did (see rule parseable)" in rules[name]["reason"], rules[name]["reason"]
    assert {n for n, r in rules.items() if r["status"] == "failed"} == {"parseable", "row_rules_together"}
    assert all(r["success"] is False for r in rules.values() if r["status"] == "failed")
    assert all(r["success"] is True for r in rules.values() if r["status"] == "passed")
    message = str(unparsed_run.error)
    assert isinstance(unparsed_run.error, ValidationFailed)
    assert not re.search(r"\b0 row\(s\) break it", message) and "observed None" not in message
    assert "rules that could not be checked:\n  - non_empty_turns: no row has a `min_turn_chars` to check" in message
    assert "row 0: `text` has neither '### Human:'/'### Assistant:' markers" in message
    summary = json.loads((unparsed_run.report_dir / paths.VALIDATION_SUMMARY.name).read_text())
    assert summary["rules_failed"] == 2 and summary["rules_not_evaluated"] == 8


# --- the format report counts what train will train: tokens after the cut at max_length ----------------------


def test_truncate_report_counts_what_train_trains(params, project, short_run, tmp_path):
    from tasks.common.formatted import load_rows
    from tasks.train.stage import build_dataset

    report = _fmt(params, short_run, tmp_path, length_policy="truncate", duplicates="keep")
    train, evals = _split(tmp_path)
    assert any(r["n_tokens"] > 128 for r in train)  # some rows are cut: the test is about them
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        tokenizer = load_tokenizer(params.model)
    for name, rows in (("train", train), ("eval", evals)):
        dataset = build_dataset(tokenizer, load_rows(tmp_path / f"{name}.jsonl"), answer_only=True, max_length=128)
        assert len(dataset) == len(rows)  # format already dropped the rows the cut leaves with no answer
        assert report[f"{name}_tokens"] == sum(len(ids) for ids in dataset["input_ids"]) <= 128 * len(rows)
        assert report[f"{name}_answer_tokens"] == sum(sum(x != -100 for x in labels) for labels in dataset["labels"])
    convs = {c["row_index"]: c for c in read_jsonl(short_run.conversations)}
    kept = [convs[r["row_index"]] for r in train + evals]
    assert report["answer_tokens_cut"] == sum(c["answer_tokens_cut"] for c in kept) > 0
    assert report["train_answer_tokens"] + report["eval_answer_tokens"] + report["answer_tokens_cut"] == sum(
        c["answer_tokens"] for c in kept
    )
