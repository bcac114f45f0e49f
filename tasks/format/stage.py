"""Stage 3, format: validated conversations -> chat text (format.template), length policy applied, train/eval split.

Each output row holds the rendered `text`, the character spans of its answers (what carries the loss)
and its token count. Rows over model.max_length keep their whole text: train cuts their ids (tokens.cut;
see there why the text is not cut here), and report.json counts what that cut leaves, i.e. what is trained.
The split is by a hash of each conversation's folded text: deterministic, stable when rows are added, and
near-duplicates always land on the same side, so eval never leaks into train.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import orjson

from tasks.common import paths
from tasks.common.artifacts import atomic_writer, iter_jsonl, jsonl_line, staged_dir, write_json
from tasks.common.chat_template import ChatTemplate, chat_template
from tasks.common.config import FormatParams, ModelParams, load_params
from tasks.common.conversation import Conversation, content_key, key_words
from tasks.common.errors import PipelineError
from tasks.common.page_cache import lines_dropping_behind

log = logging.getLogger(__name__)


def load_template(params: FormatParams, model: ModelParams) -> ChatTemplate:
    """The chat template; only `tokenizer` needs the base's tokenizer here (validate checked a built-in's tokens)."""
    if params.template != "tokenizer":
        return chat_template(params.template)
    from tasks.common.base_model import load_tokenizer

    return chat_template(params.template, load_tokenizer(model))


BLOCK_ROWS = 65536  # rows read into Python lists before they become arrays


@dataclass
class Measures:
    """Every validated conversation's figures, in file order, as arrays: what the policies and the split decide
    on, about 50 bytes a row (0.5 GB at ten million rows), where a dict a row took about 600. The content key is
    kept as its first 128 bits (conversation.key_words), which order the rows as the whole key does unless two
    keys agree in 128 bits (probability about rows^2 / 2^129)."""

    row_index: np.ndarray
    n_tokens: np.ndarray
    answer_tokens: np.ndarray
    answer_tokens_cut: np.ndarray
    fully_masked: np.ndarray  # no answer token left once cut at max_length
    is_duplicate: np.ndarray
    key_high: np.ndarray
    key_low: np.ndarray

    def __len__(self) -> int:
        return len(self.row_index)


_FIGURES = ("row_index", "n_tokens", "answer_tokens", "answer_tokens_cut")
_FLAGS = {"fully_masked": "fully_masked_if_truncated", "is_duplicate": "is_duplicate"}


def _measures(conversations: Path, hasher) -> Measures:
    """Each validated conversation's figures without its text, read in blocks into arrays."""
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in (*_FIGURES, *_FLAGS, "key_high", "key_low")}

    def flush(block: list[dict], keys: list[str]) -> None:
        for name in _FIGURES:
            arrays[name].append(np.array([r[name] for r in block], dtype=np.int64))
        for name, key in _FLAGS.items():
            arrays[name].append(np.array([r[key] for r in block], dtype=bool))
        high, low = key_words(keys)
        arrays["key_high"].append(high)
        arrays["key_low"].append(low)

    block: list[dict] = []
    keys: list[str] = []
    for r in iter_jsonl(conversations, hasher):
        # content_key is carried from validate; conversations validated before it was carried get it computed here
        keys.append(r.get("content_key") or content_key(Conversation.from_dict(r)))
        block.append({name: r[name] for name in (*_FIGURES, *_FLAGS.values())})
        if len(block) == BLOCK_ROWS:
            flush(block, keys)
            block, keys = [], []
    if block:
        flush(block, keys)
    joined = {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in arrays.items()}
    empty = {"key_high": np.uint64, "key_low": np.uint64, **{name: bool for name in _FLAGS}}
    return Measures(**{name: a.astype(empty.get(name, np.int64), copy=False) for name, a in joined.items()})


def apply_policies(m: Measures, params: FormatParams, model: ModelParams, report: dict) -> np.ndarray:
    """The duplicate and length policies: which rows are kept (a mask in file order), with what each policy did
    counted in `report`."""
    kept = np.ones(len(m), dtype=bool)
    if params.duplicates == "drop":
        report["dropped_duplicates"] = int(m.is_duplicate.sum())
        kept &= ~m.is_duplicate

    over = kept & (m.n_tokens > model.max_length)
    if over.any() and params.length_policy == "fail":
        first = np.flatnonzero(over)[:10]
        listed = ", ".join(f"row {m.row_index[k]} ({m.n_tokens[k]} tokens)" for k in first)
        raise PipelineError(
            f"{int(over.sum())} conversation(s) exceed model.max_length={model.max_length}: {listed}. "
            "Raise model.max_length, or set format.length_policy to 'truncate' or 'drop'."
        )
    if params.length_policy == "drop":
        report["dropped_over_max_length"] = int(over.sum())
        return kept & ~over
    # truncate: train cuts at max_length (tokens.cut); rows left with no answer token go
    fully = over & m.fully_masked
    report["truncated"] = int(over.sum()) - int(fully.sum())
    report["dropped_no_answer_left"] = int(fully.sum())
    report["answer_tokens_cut"] = int(m.answer_tokens_cut[over & ~fully].sum())
    return kept & ~fully


def eval_rows(m: Measures, kept: np.ndarray, params: FormatParams) -> np.ndarray:
    """The rows that go to eval (a mask in file order): the first kept rows in content-key order (row index breaking
    ties), near-duplicates on one side only."""
    n_rows = int(kept.sum())
    n_eval = max(params.min_eval_rows, round(params.eval_fraction * n_rows))
    if n_eval >= n_rows:
        raise PipelineError(
            f"only {n_rows} conversation(s) left after filtering, too few for {n_eval} eval row(s) and any "
            "training: add data or lower format.min_eval_rows / format.eval_fraction."
        )
    at = np.flatnonzero(kept)
    keyed = at[np.lexsort((m.row_index[at], m.key_low[at], m.key_high[at]))]
    del at

    def same_key(a: int, b: int) -> bool:
        return m.key_high[a] == m.key_high[b] and m.key_low[a] == m.key_low[b]

    # Near-duplicates share a key: extend the cut past the last eval key so no group straddles the split.
    cut = n_eval
    while cut < n_rows and same_key(keyed[cut], keyed[cut - 1]):
        cut += 1
    if cut >= n_rows:
        raise PipelineError(
            f"all {n_rows} conversation(s) are near-duplicates of the eval rows, leaving none to train on: "
            "add data or lower format.min_eval_rows / format.eval_fraction."
        )
    evals = np.zeros(len(m), dtype=bool)
    evals[keyed[:cut]] = True
    return evals


def _write_splits(
    conversations: Path, template: ChatTemplate, params: FormatParams, kept: np.ndarray, evals: np.ndarray, tmp: Path
) -> dict:
    """Render the kept conversations into train.jsonl and eval.jsonl (input order in each); their sha256s. Line k
    of the conversations (blank lines aside, as iter_jsonl reads them) is row k of the masks; rows not kept are not
    parsed."""
    where = kept.astype(np.int8) + (kept & evals)  # 0 left out, 1 train, 2 eval
    destinations = chain.from_iterable(where[k : k + BLOCK_ROWS].tolist() for k in range(0, len(where), BLOCK_ROWS))
    with atomic_writer(tmp / paths.TRAIN_ROWS.name) as train, atomic_writer(tmp / paths.EVAL_ROWS.name) as evals_out:
        outs = (None, train, evals_out)
        with open(conversations, "rb", buffering=1 << 20) as f:
            for line, to in zip((line for line in lines_dropping_behind(f) if line.strip()), destinations):
                if not to:
                    continue
                r = orjson.loads(line)
                rendered = template.render(Conversation.from_dict(r), params.system_prompt)
                row = {"row_index": r["row_index"], "text": rendered.text, "answer_spans": rendered.answer_spans}
                outs[to].write(jsonl_line({**row, "n_tokens": r["n_tokens"]}))
    return {"train_sha256": train.hexdigest(), "eval_sha256": evals_out.hexdigest()}


def format_rows(
    params: FormatParams,
    model: ModelParams,
    conversations: Path = paths.CONVERSATIONS,
    out_dir: Path = paths.FORMATTED_DIR,
) -> dict:
    """Two streaming passes over the validated conversations: their figures (arrays, Measures) decide what is kept
    and where it goes, then the kept ones are rendered into the split files. No text is held in memory."""
    if not conversations.exists():
        raise PipelineError(f"{conversations} not found: run the validate stage first (dvc repro validate).")
    template = load_template(params, model)
    hasher = hashlib.sha256()
    measures = _measures(conversations, hasher)
    report: dict = {
        "rows_in": len(measures),
        "input_sha256": hasher.hexdigest(),  # the audit's link to validate
        "length_policy": params.length_policy,
        "max_length": model.max_length,
    }
    kept = apply_policies(measures, params, model, report)
    evals = eval_rows(measures, kept, params)

    # Tokens and answer tokens the model will see: what the cut at max_length leaves. tokens.cut keeps a row's
    # first max_length tokens, and validate measured the answer tokens it cuts with that same function.
    splits = {"train": kept & ~evals, "eval": evals}
    for name, split in splits.items():
        report[f"{name}_tokens"] = int(np.minimum(measures.n_tokens[split], model.max_length).sum())
        report[f"{name}_answer_tokens"] = int((measures.answer_tokens - measures.answer_tokens_cut)[split].sum())
    report |= {f"{name}_rows": int(split.sum()) for name, split in splits.items()}

    # The three files are swapped in together: train, eval and their report always belong to one run.
    with staged_dir(out_dir) as tmp:
        report |= _write_splits(conversations, template, params, kept, evals, tmp)
        write_json(tmp / paths.FORMAT_REPORT.name, report)
    log.info("formatted %d train / %d eval rows (%s)", report["train_rows"], report["eval_rows"], params.length_policy)
    return report


def main() -> None:
    params = load_params()
    format_rows(params.format, params.model)
