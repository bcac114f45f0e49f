"""The validation report as a person opens it: offline, in headless Chromium, with the suite's rules and the verdict."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest

from tasks.common import paths
from tasks.common.artifacts import read_jsonl
from tasks.validate.expectations import SUITE_RULES
from tasks.validate.report_images import dump_dom, find_chromium, screenshot
from tasks.validate.stage import validate
from tasks.validate.validation_page import render
from tests.conftest import ROOT

SAMPLE = ROOT / paths.SAMPLE_DATA


def _text(dom: str) -> str:
    dom = re.sub(r"(?s)<(script|style)\b.*?</\1>", " ", dom)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


@pytest.fixture(scope="module")
def report_dir(params, tmp_path_factory) -> Path:
    """The validate stage run on the shipped sample in a scratch project; its reports/validation/."""
    root = tmp_path_factory.mktemp("report_pages")
    (root / "data" / "sample").mkdir(parents=True)
    shutil.copy2(SAMPLE, root / paths.SAMPLE_DATA)
    if (ROOT / "models/tiny-llama").exists():
        shutil.copytree(ROOT / "models/tiny-llama", root / "models/tiny-llama")
    raw = root / "raw.jsonl"
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in read_jsonl(SAMPLE)), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        validate(
            params,
            raw_rows=raw,
            out_conversations=root / "validated/conversations.jsonl",
            report_dir=root / "reports/validation",
            metrics_path=root / "metrics/validate.json",
            histogram_path=root / "reports/lengths.png",
        )
    return root / "reports/validation"


def test_the_validate_stage_writes_a_self_contained_page(report_dir):
    page = (report_dir / "index.html").read_text()
    # nothing to fetch: no external stylesheet, script, image or font
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page must not load anything remote"
    assert "<script" not in page and "<style>" in page
    for rule in SUITE_RULES:
        assert rule in page


def test_a_failed_run_reads_as_failed_with_its_rows():
    result = {
        "success": False,
        "input": {"path": "data/raw/rows.jsonl", "sha256": "ab" * 32},
        "rules": [
            {
                "rule": "parseable",
                "description": "every row parses into a conversation",
                "status": "failed",
                "rows": [3, 7],
                "observed_value": None,
            },
            {
                "rule": "duplicates",
                "description": "at most 5% duplicate rows",
                "status": "not evaluated",
                "reason": "no row parsed",
                "rows": [],
            },
        ],
        "excluded_rows": {},
        "parse_errors": {"3": "no '### Assistant:' turn", "7": "empty text"},
    }
    text = _text(render(result))
    assert "Validation FAILED: 1 rule(s) broken" in text
    assert "2: 3, 7" in text and "no row parsed" in text and "no '### Assistant:' turn" in text


@pytest.fixture(scope="module")
def chromium():
    if find_chromium() is None:
        pytest.skip("chromium is absent (apt-get install -y chromium): cannot open the report as a browser would")


def test_report_index_in_headless_chromium_shows_rules_and_verdict(chromium, report_dir, tmp_path):
    text = _text(dump_dom(report_dir / "index.html"))
    assert "Validation passed: every rule holds" in text
    for rule in SUITE_RULES:
        assert rule in text
    assert text.count("passed") >= len(SUITE_RULES)
    assert "p95" in text and "truncate" in text  # the token lengths

    png = screenshot(report_dir / "index.html", tmp_path / "validation_report.png")
    assert png.stat().st_size > 10_000  # a rendered page, not a blank one
    shutil.copy2(png, report_dir.parent / "validation_report.png")  # kept beside the reports, for a look


def test_data_docs_validation_result_page_still_carries_the_verdict(chromium, report_dir):
    """The great-expectations page linked from the index: unstyled offline, but its text is there."""
    pages = list((report_dir / "data_docs" / "validations").rglob("*.html"))
    assert pages, "the validate stage wrote no Data Docs validation page"
    text = _text(dump_dom(pages[0]))
    assert "guanaco_conversations" in text and "Succeeded" in text
