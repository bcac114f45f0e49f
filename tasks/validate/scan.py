"""validate's one pass over the raw rows: parse, features, duplicates, render, token counts, in bounded memory.

The raw rows are read in blocks, never all at once: a million conversations are gigabytes of text, while what the
suite needs is a compact table of per-row features (counts, flags). Each row is parsed, rendered and tokenized
exactly once; its conversation goes straight to a candidates file, with its token counts and its content key
(the sha256 of its folded text), which format uses to split without re-reading the text. Duplicates are found by
that key, first occurrence kept, so no text is held to compare.

The fast tokenizer releases the GIL, so each block is tokenized on a worker thread while the next block is parsed.
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
from tasks.common.conversation import FORM_MARKERS, ParseError, content_key, detect_form, parse_row
from tasks.common.errors import PipelineError
from tasks.validate.expectations import FEATURES, conversation_features
from tasks.validate.lengths import length_rows, measure_rendered

BLOCK_ROWS = 2000  # rows a block: large enough for the tokenizer's batching, small enough to bound memory


@dataclass
class Scan:
    """What one pass over the raw rows leaves: a value per row for each feature, and per renderable row its index
    (in the candidates file's line order) and its [n_tokens, answer_tokens, answer_tokens_cut]."""

    features: dict[str, list] = field(default_factory=lambda: {name: [] for name in FEATURES})
    is_duplicate: list[bool] = field(default_factory=list)
    parse_errors: dict[int, str] = field(default_factory=dict)
    renderable: list[int] = field(default_factory=list)
    measured: list[np.ndarray] = field(default_factory=list)
    input_sha256: str = ""

    @property
    def rows(self) -> int:
        return len(self.is_duplicate)

    def lengths(self) -> np.ndarray:
        return np.concatenate(self.measured) if self.measured else np.zeros((0, 3), dtype=np.int64)

    def frame(self) -> pd.DataFrame:
        """The suite's table: one row per raw row (structure features null where the row did not parse)."""
        frame = pd.DataFrame(self.features)
        if len(self.parse_errors) == self.rows:
            # No row parsed, so no row has structure features: their columns are absent (not all null), and the
            # suite reports the rules on them as not evaluated instead of passing them on no values.
            frame = frame[["row_index", "form", "parse_error"]]
        frame["is_duplicate"] = self.is_duplicate
        n_tokens = np.full(self.rows, -1, dtype=np.int64)
        n_tokens[self.renderable] = self.lengths()[:, 0]
        frame["n_tokens"] = pd.arrays.IntegerArray(n_tokens, n_tokens < 0)  # null where the row cannot be rendered
        return frame


def raw_blocks(path: Path, hasher) -> Iterator[list[tuple[int, dict]]]:
    """(row index, row) blocks of the raw rows file; the index counts non-blank lines from 0, as download wrote."""
    block: list[tuple[int, dict]] = []
    index = 0
    with open(path, "rb", buffering=1 << 20) as f:
        for lineno, line in enumerate(f, 1):
            hasher.update(line)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise PipelineError(
                    f"{path}, line {lineno}: not valid JSON. This file is written by the download stage: run it "
                    "again (dvc repro download)."
                ) from None
            block.append((index, row))
            index += 1
            if len(block) == BLOCK_ROWS:
                yield block
                block = []
    if block:
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


def _parse_block(block, scan: Scan, seen: set[bytes], template: ChatTemplate, system_prompt: str | None) -> _Parsed:
    parsed = _Parsed()
    markers = tuple(dict.fromkeys(FORM_MARKERS + template.markers))  # the input forms' and the output template's
    for i, row in block:
        try:
            conv, error = parse_row(row), None
        except ParseError as e:
            conv, error = None, str(e)
            scan.parse_errors[i] = error
        features = conversation_features(i, conv, detect_form(row), error, markers)
        for name, column in scan.features.items():
            column.append(features.get(name))
        duplicate, key = False, None
        if conv is not None:
            key = content_key(conv)
            digest = bytes.fromhex(key)  # 32 bytes a row held, not the 64-character hex string
            duplicate = digest in seen
            seen.add(digest)
        scan.is_duplicate.append(duplicate)
        if renderable(features):
            parsed.rows.append((i, conv, duplicate, key))
            parsed.rendered.append(template.render(conv, system_prompt))
    return parsed


def _write_block(parsed: _Parsed, measured: np.ndarray, scan: Scan, out) -> None:
    scan.measured.append(measured)
    for (i, conv, duplicate, key), lengths in zip(parsed.rows, length_rows(measured)):
        scan.renderable.append(i)
        row = {"row_index": i, **conv.to_dict(), **lengths, "is_duplicate": duplicate, "content_key": key}
        out.write(jsonl_line(row))


def scan_rows(
    raw_rows: Path,
    tokenizer,
    max_length: int,
    template: ChatTemplate,
    system_prompt: str | None,
    candidates: Path,
    output: Path | None = None,
) -> Scan:
    """Read raw_rows once; write every renderable conversation to `candidates` (in row order) and return the scan.

    Token counts are on the exact text that will be trained (lengths.measure_rendered); block k is tokenized on a
    worker thread while block k+1 is parsed.
    """
    scan, seen, hasher = Scan(), set(), hashlib.sha256()
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
