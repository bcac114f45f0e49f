"""validate's one pass over the raw rows: parse, features, duplicates, render, token counts, in flat memory.

The raw rows are read in blocks, never all at once: a million conversations are gigabytes of text, while what the
suite needs is a compact table of per-row features (counts, flags). Each row is parsed, rendered and tokenized
exactly once; its conversation goes straight to a candidates file, with its token counts and its content key
(the sha256 of its folded text), which format uses to split without re-reading the text. Duplicates are found by
that key, first occurrence kept, so no text is held to compare.

What is kept a row is numpy, not Python objects (issue 29: Python lists of ints, bools and 32-byte digests cost
about 0.9 KB a row and left the heap fragmented): each coded feature as a 1-byte code (6), each count as 4 bytes
(12), the duplicate flag (1), the content key's first 128 bits (16, SeenKeys), the renderable rows' index, token
counts and candidate line's length in bytes (20). About 55 bytes a row in all, 0.55 GB at ten million rows; the
suite's compact table is built from them at the end (Scan.frame, about 30 bytes a row) and the content keys are
dropped with the pass.

The fast tokenizer releases the GIL, so each block is tokenized on a worker thread while the next block is parsed.
On more than 2 cores that one parsing thread is the bottleneck, and the blocks go to a pool of worker processes
instead (scan_pool.py), with the same results byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.common.artifacts import atomic_writer, jsonl_line
from tasks.common.chat_template import ChatTemplate
from tasks.common.conversation import FORM_MARKERS, ParseError, content_key, detect_form, key_words, parse_row
from tasks.common.errors import PipelineError
from tasks.common.page_cache import lines_dropping_behind
from tasks.validate.expectations import FEATURES, conversation_features
from tasks.validate.lengths import length_rows, measure_rendered

BLOCK_ROWS = 2000  # rows a block: large enough for the tokenizer's batching, small enough to bound memory

# Features whose values are None, bools or a few short strings: kept as a code a row into the column's own values.
# int8: each takes a handful of values (the forms, the roles, True/False/None), and numpy refuses a code past 127
# (OverflowError) rather than wrapping it.
CODED = ("form", "roles_alternate", "last_role", "has_template_marker", "has_replacement_char", "has_control_char")
CODE = np.int8
# Counts, present for the rows that parse (absent, so null, for the rest). int32, as are token counts and row
# numbers: 2^31 characters or tokens in one row would be gigabytes of text, far past anything a row can hold.
COUNTS = ("n_turns", "min_turn_chars", "total_chars")
COUNT = np.int32


class SeenKeys:
    """The content keys seen so far, as their first 128 bits (conversation.key_words), for duplicates: a few sorted
    runs of unique keys, merged as they grow (each key is moved about log2(rows / block) times), looked up with a
    binary search. 16 bytes a unique row, where a Python set of 32-byte digests took about 110."""

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (high, low) words, each run sorted by (high, low)

    def add(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        """Whether each key (in order) was seen before it: in an earlier call, or earlier in this one."""
        order = np.lexsort((low, high))  # stable: of equal keys, the earliest comes first
        sorted_high, sorted_low = high[order], low[order]
        repeat = np.zeros(len(order), dtype=bool)
        repeat[1:] = (sorted_high[1:] == sorted_high[:-1]) & (sorted_low[1:] == sorted_low[:-1])
        duplicate = np.zeros(len(order), dtype=bool)
        duplicate[order] = repeat
        first_high, first_low, first_at = sorted_high[~repeat], sorted_low[~repeat], order[~repeat]
        seen = np.zeros(len(first_high), dtype=bool)
        for run_high, run_low in self._runs:
            seen |= _contains(run_high, run_low, first_high, first_low)
        duplicate[first_at[seen]] = True
        if (~seen).any():
            self._runs.append((first_high[~seen], first_low[~seen]))
            while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
                (h1, l1), (h2, l2) = self._runs.pop(), self._runs.pop()
                merged_high, merged_low = np.concatenate((h2, h1)), np.concatenate((l2, l1))
                by_key = np.lexsort((merged_low, merged_high))
                self._runs.append((merged_high[by_key], merged_low[by_key]))
        return duplicate


def _contains(run_high, run_low, high, low) -> np.ndarray:
    """Whether each (high, low) is in the run (sorted by (high, low)). Keys sharing their high word are rare (about
    rows^2 / 2^65), so a range of more than one entry is searched in Python."""
    left, right = np.searchsorted(run_high, high, "left"), np.searchsorted(run_high, high, "right")
    found = np.zeros(len(high), dtype=bool)
    single = right - left == 1
    found[single] = run_low[left[single]] == low[single]
    for k in np.flatnonzero(right - left > 1):
        found[k] = bool((run_low[left[k] : right[k]] == low[k]).any())
    return found


@dataclass
class Scan:
    """What one pass over the raw rows leaves, compact: per row a code or a count for each feature and whether it
    is a duplicate; per renderable row its index (in the candidates file's line order) and its [n_tokens,
    answer_tokens, answer_tokens_cut]. Blocks of numpy arrays, joined when read."""

    values: dict[str, dict] = field(default_factory=lambda: {name: {} for name in CODED})  # value -> code
    codes: dict[str, list[np.ndarray]] = field(default_factory=lambda: {name: [] for name in CODED})
    counts: dict[str, list[np.ndarray]] = field(default_factory=lambda: {name: [] for name in COUNTS})
    duplicates: list[np.ndarray] = field(default_factory=list)
    parse_errors: dict[int, str] = field(default_factory=dict)
    renderable_blocks: list[np.ndarray] = field(default_factory=list)
    measured: list[np.ndarray] = field(default_factory=list)
    line_bytes: list[np.ndarray] = field(default_factory=list)  # each candidate line's length in bytes (COUNT)
    input_sha256: str = ""
    rows: int = 0
    duplicate_rows: int = 0

    def add_features(self, features: list[dict], duplicate: np.ndarray) -> None:
        """One block's features (conversation_features' dicts, in row order) and duplicate flags."""
        for name in CODED:
            values = self.values[name]
            # an absent feature (a row that does not parse) is None, as the suite's table has it
            self.codes[name].append(np.array([values.setdefault(f.get(name), len(values)) for f in features], CODE))
        for name in COUNTS:
            self.counts[name].append(np.array([f.get(name, 0) for f in features], dtype=COUNT))
        self.duplicates.append(duplicate)
        self.duplicate_rows += int(duplicate.sum())
        self.rows += len(features)

    @property
    def renderable(self) -> np.ndarray:
        return _joined(self.renderable_blocks, COUNT)

    def candidate_line_bytes(self) -> np.ndarray:
        """Each line of the candidates file's length in bytes, in order (the stage cuts excluded rows out by them)."""
        return _joined(self.line_bytes, COUNT)

    def lengths(self) -> np.ndarray:
        """Per renderable row [n_tokens, answer_tokens, answer_tokens_cut] (lengths.measure_rendered's figures)."""
        return np.concatenate(self.measured) if self.measured else np.zeros((0, 3), dtype=COUNT)

    def frame(self) -> pd.DataFrame:
        """The suite's table, compact: one row per raw row, indexed by row number; each coded feature and the parse
        error a category (1 byte a row; null where the row lacks it), the counts and n_tokens nullable Int32 (5
        bytes; null where the row does not parse or cannot be rendered), is_duplicate a bool: about 30 bytes a row.
        When no row parses, the structure features are absent rather than all null, so the suite reports their rules
        as not evaluated instead of passing them on no values. expectations.run_suite gives great-expectations a
        batch of it at a time, in the dtypes the suite has always been given. The per-block arrays are released as
        their columns are built."""
        rows, parsed = self.rows, np.ones(self.rows, dtype=bool)
        parsed[list(self.parse_errors)] = False
        columns: dict[str, object] = {}
        for name in FEATURES[1:]:  # row_index is the table's index
            if name == "parse_error":
                columns[name] = self._parse_error_column()
            elif name in CODED:
                columns[name] = _category(_joined(self.codes.pop(name), CODE), self.values[name])
            else:
                columns[name] = pd.arrays.IntegerArray(_joined(self.counts.pop(name), COUNT), ~parsed)
        if len(self.parse_errors) == rows:
            columns = {name: columns[name] for name in ("form", "parse_error")}
        columns["is_duplicate"] = _joined(self.duplicates, bool)
        self.duplicates.clear()
        n_tokens = np.full(rows, -1, dtype=COUNT)
        n_tokens[self.renderable] = self.lengths()[:, 0]
        columns["n_tokens"] = pd.arrays.IntegerArray(n_tokens, n_tokens < 0)
        return pd.DataFrame(columns, copy=False)

    def _parse_error_column(self) -> pd.Categorical:
        """Each row's parse error (null where it parsed), as a category of the distinct messages."""
        messages = list(dict.fromkeys(self.parse_errors.values()))
        code_of = {message: k for k, message in enumerate(messages)}
        codes = np.full(self.rows, -1, dtype=np.int32)  # pandas narrows them to the fewest bytes the messages need
        codes[list(self.parse_errors)] = [code_of[message] for message in self.parse_errors.values()]
        return pd.Categorical.from_codes(codes, categories=messages)


def _category(codes: np.ndarray, values: dict) -> pd.Categorical:
    """Codes into `values` (value -> code, in the order first seen) as a Categorical: None is no category but null."""
    known = [value for value in values if value is not None]
    recode = np.array([known.index(value) if value is not None else -1 for value in values], dtype=CODE)
    return pd.Categorical.from_codes(recode[codes], categories=known)


def _joined(blocks: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=dtype)


def not_json(path: Path, lineno: int) -> PipelineError:
    """The error for a line of the raw rows that is not JSON (1-based line number, blank lines counted)."""
    return PipelineError(
        f"{path}, line {lineno}: not valid JSON. This file is written by the download stage: run it again (dvc repro "
        "download)."
    )


def line_blocks(path: Path, hasher) -> Iterator[tuple[list[bytes], list[int]]]:
    """(lines, their line numbers) blocks of BLOCK_ROWS non-blank lines of the raw rows file, every byte (blank
    lines too) fed to hasher in order. The one reader of the raw rows: raw_blocks and scan_pool both take theirs."""
    lines: list[bytes] = []
    linenos: list[int] = []
    with open(path, "rb", buffering=1 << 20) as f:
        for lineno, line in enumerate(lines_dropping_behind(f), 1):
            hasher.update(line)
            if not line.strip():
                continue
            lines.append(line)
            linenos.append(lineno)
            if len(lines) == BLOCK_ROWS:
                yield lines, linenos
                lines, linenos = [], []
    if lines:
        yield lines, linenos


def raw_blocks(path: Path, hasher) -> Iterator[list[tuple[int, dict]]]:
    """(row index, row) blocks of the raw rows file; the index counts non-blank lines from 0, as download wrote."""
    index = 0
    for lines, linenos in line_blocks(path, hasher):
        block = []
        for line, lineno in zip(lines, linenos):
            try:
                block.append((index, json.loads(line)))
            except ValueError:
                raise not_json(path, lineno) from None
            index += 1
        yield block


def renderable(features: dict) -> bool:
    """Whether the chat template can render a row (user/assistant turns alternating, ending with an answer): the
    rows that are tokenized, measured and can be trained on."""
    alternate, last = features.get("roles_alternate"), features.get("last_role")
    return bool(alternate) and last == "assistant" and features.get("n_turns", 0) >= 2


@dataclass
class _Parsed:
    """One block, parsed: the renderable rows' conversations, their rendering and their content keys."""

    rows: list[tuple[int, object, bool, str]] = field(default_factory=list)  # (index, conv, is_duplicate, key)
    rendered: list = field(default_factory=list)


def _parse_block(block, scan: Scan, seen: SeenKeys, template: ChatTemplate, system_prompt: str | None) -> _Parsed:
    markers = tuple(dict.fromkeys(FORM_MARKERS + template.markers))  # the input forms' and the output template's
    features, convs, keys = [], [], []
    for i, row in block:
        try:
            conv, error = parse_row(row), None
        except ParseError as e:
            conv, error = None, str(e)
            scan.parse_errors[i] = error
        features.append(conversation_features(i, conv, detect_form(row), error, markers))
        convs.append(conv)
        if conv is not None:
            keys.append(content_key(conv))
    # duplicates by content key, first occurrence kept; rows that do not parse have no key and are no duplicate
    duplicate = np.zeros(len(block), dtype=bool)
    parsed_at = [k for k, conv in enumerate(convs) if conv is not None]
    if keys:
        duplicate[parsed_at] = seen.add(*key_words(keys))
    scan.add_features(features, duplicate)
    parsed, key_of = _Parsed(), dict(zip(parsed_at, keys))
    for k, ((i, _), conv, f) in enumerate(zip(block, convs, features)):
        if renderable(f):
            parsed.rows.append((i, conv, bool(duplicate[k]), key_of[k]))
            parsed.rendered.append(template.render(conv, system_prompt))
    return parsed


def _write_block(parsed: _Parsed, measured: np.ndarray, scan: Scan, out) -> None:
    scan.measured.append(measured.astype(COUNT))  # kept: 12 bytes a row, not 24
    scan.renderable_blocks.append(np.array([i for i, *_ in parsed.rows], dtype=COUNT))
    sizes = []
    for (i, conv, duplicate, key), lengths in zip(parsed.rows, length_rows(measured)):
        line = jsonl_line({"row_index": i, **conv.to_dict(), **lengths, "is_duplicate": duplicate, "content_key": key})
        out.write(line)
        sizes.append(len(line))
    scan.line_bytes.append(np.array(sizes, dtype=COUNT))


def scan_rows(
    raw_rows: Path,
    tokenizer,
    max_length: int,
    template: ChatTemplate,
    system_prompt: str | None,
    candidates: Path,
    output: Path | None = None,
    workers: int = 0,
) -> Scan:
    """Read raw_rows once; write every renderable conversation to `candidates` (in row order) and return the scan.

    Token counts are on the exact text that will be trained (lengths.measure_rendered); block k is tokenized on a
    worker thread while block k+1 is parsed. With `workers` (scan_pool.pool_workers: on more than 2 cores) each
    block is parsed, rendered and tokenized in a pool of that many worker processes instead, with the same results
    (scan_pool.py).
    """
    if workers:
        from tasks.validate.scan_pool import scan_in_pool

        return scan_in_pool(raw_rows, tokenizer, max_length, template, system_prompt, candidates, output, workers)
    scan, seen, hasher = Scan(), SeenKeys(), hashlib.sha256()
    with ThreadPoolExecutor(max_workers=1) as worker, atomic_writer(candidates, reported_as=output) as out:
        pending = None
        for block in raw_blocks(raw_rows, hasher):
            parsed = _parse_block(block, scan, seen, template, system_prompt)
            job = worker.submit(measure_rendered, tokenizer, parsed.rendered, max_length)
            if pending is not None:
                _write_block(pending[0], pending[1].result(), scan, out)
            pending = (parsed, job)
        if pending is not None:
            _write_block(pending[0], pending[1].result(), scan, out)
    scan.input_sha256 = hasher.hexdigest()
    return scan
