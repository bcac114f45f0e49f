"""The data stages rebuilt for scale (issue 12) give exactly the results they gave before.

tests/golden/data_stages.json was recorded with the stages as they were before the rewrite (whole files in memory,
a feature dict a row, every token's offsets converted); here the streaming stages run on the same inputs: the real
1k rows in both forms, the 10k benchmark set, a messy 10k set (bad rows of every kind, other forms, duplicates) under
two policies, and a messy set that fails. Verdict, every rule's failing rows, the rows left out and why, the length
report, the validate metrics and the formatted train/eval files must all be identical.
"""

from __future__ import annotations

import json
import re

import pytest

from tasks.common.conversation import Conversation, near_duplicate_key
from tests.conftest import needs_shared
from tests.data_stage_sets import GOLDEN, fingerprint, input_sets


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    needs_shared("guanaco-raw-1k", "train.jsonl")
    needs_shared("guanaco-llama2-1k", "train.parquet")
    needs_shared("llama-2-tokenizer")
    work = tmp_path_factory.mktemp("data-sets")
    return work, input_sets(work)


GOLDEN_PRINTS = json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GOLDEN_PRINTS))
def test_data_stages_give_the_recorded_results(sets, name):
    work, inputs = sets
    got = fingerprint(*inputs[name], work / "project" / name)
    want = GOLDEN_PRINTS[name]
    assert got == want, {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}


@pytest.mark.parametrize(
    "text",
    [
        "Hello, World!  It's   fine_ok 42.",
        "  leading and trailing...  ",
        "tabs\tand\nnewlines\r\nand \x1f unit separators",
        "___",
        "!!!",
        "",
        "café au lait, naïve résumé",  # not ASCII: the regex path
        "mixed ASCII then ünïcödé — dashes",
        "snake_case_ñame, «quoted» 中文，标点。",
        "a lone surrogate \ud800 inside",
    ],
)
def test_near_duplicate_key_ascii_fast_path_matches_the_regex(text):
    conv = Conversation(turns=(("user", text), ("assistant", "Fine.")))
    folded = " ".join(t for _, t in conv.turns).lower()
    assert near_duplicate_key(conv) == re.sub(r"\W+", " ", folded).strip()


def test_near_duplicate_key_fast_path_on_the_real_rows():
    raw = needs_shared("guanaco-raw-1k", "train.jsonl")
    for line in raw.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        conv = Conversation(turns=(("user", text),))
        assert near_duplicate_key(conv) == re.sub(r"\W+", " ", text.lower()).strip()


@pytest.mark.parametrize("max_length", [16, 512, 1024])
def test_measured_lengths_equal_the_label_counts_train_uses(max_length):
    """lengths.measure_rendered bisects token offsets; tokens._labels walks every token. Same figures, every row,
    on the real rows (with a system prompt, so every row has a prompt before its first answer span)."""
    from tasks.common.base_model import load_tokenizer
    from tasks.common.chat_template import BUILT_IN
    from tasks.common.config import ModelParams
    from tasks.common.conversation import parse_row
    from tasks.common.tokens import tokenize_rendered
    from tasks.validate.lengths import measure_rendered, row_lengths

    raw = needs_shared("guanaco-raw-1k", "train.jsonl")
    tok_dir = needs_shared("llama-2-tokenizer")
    tokenizer = load_tokenizer(ModelParams(base="tiny-llama", revision=None, tokenizer=str(tok_dir), max_length=512))
    lines = raw.read_text(encoding="utf-8").splitlines()
    rendered = [BUILT_IN["llama2"].render(parse_row(json.loads(line)), "Be brief.") for line in lines]
    measured = measure_rendered(tokenizer, rendered, max_length).tolist()
    expected = [row_lengths(t, max_length) for t in tokenize_rendered(tokenizer, rendered)]
    assert measured == [[e["n_tokens"], e["answer_tokens"], e["answer_tokens_cut"]] for e in expected]
    assert any(m[2] for m in measured)  # some answers are cut: the cut count is exercised


def test_control_character_regex_is_exactly_unicode_cc_but_newline_and_tab():
    """expectations._CONTROL replaced a per-character unicodedata.category loop: the same set, every code point."""
    import sys
    import unicodedata

    from tasks.validate.expectations import _CONTROL

    differ = [
        c
        for c in range(sys.maxunicode + 1)
        if (unicodedata.category(chr(c)) == "Cc" and chr(c) not in "\n\t") != bool(_CONTROL.match(chr(c)))
    ]
    assert differ == []


def test_the_benchmarks_diverse_rows_are_all_different_and_shaped_like_the_real_ones():
    """benchmarks/data_stages.py's default rows (issue 29): no tagged repeats; turn counts and lengths as the real."""
    from benchmarks.data_stages import iter_diverse_rows
    from tasks.common.conversation import parse_text
    from tests.data_stage_sets import RAW_1K

    needs_shared("guanaco-raw-1k", "train.jsonl")
    rows = [r["text"] for r in iter_diverse_rows(RAW_1K, 5000)]
    assert rows == [r["text"] for r in iter_diverse_rows(RAW_1K, 5000)]  # seeded: every run writes the same rows
    assert len(set(rows)) >= 0.999 * len(rows)
    real = [json.loads(line)["text"] for line in RAW_1K.read_text(encoding="utf-8").splitlines()]

    def single_turn_share(texts):
        return sum(len(parse_text(t).turns) == 2 for t in texts) / len(texts)

    def mean_length(texts):
        return sum(map(len, texts)) / len(texts)

    assert abs(single_turn_share(rows) - single_turn_share(real)) < 0.03  # 647 of the 1,000 real rows
    assert abs(mean_length(rows) / mean_length(real) - 1) < 0.1


def test_the_benchmarks_floor_alone_times_the_tokenizer_on_every_renderable_row(tmp_path):
    """`benchmarks/data_stages.py --no-stages` (the floor measured again on its own, as for the 10M rows): the floor's
    figures for the size asked, no stage run, and its scratch project removed."""
    import subprocess
    import sys

    from tests.data_stage_sets import RAW_1K

    needs_shared("guanaco-raw-1k", "train.jsonl")
    needs_shared("llama-2-tokenizer")
    out, work = tmp_path / "floor.json", tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "benchmarks.data_stages", "--rows", "300", "--no-stages", "--no-floor-backend"]
    cmd += ["--raw", str(RAW_1K), "--work", str(work), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    (run,) = json.loads(out.read_text(encoding="utf-8"))["runs"]
    assert "stages" not in run and "validate_workers" not in run and run["rows"] == 300
    assert 290 <= run["floor"]["texts"] <= 300 and run["floor"]["tokens"] > 300 * 50 and run["floor"]["seconds"] > 0
    assert list(work.iterdir()) == []
