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
from pathlib import Path

from tasks.common import paths
from tasks.common.artifacts import atomic_writer, iter_jsonl, jsonl_line, staged_dir, write_json
from tasks.common.chat_template import ChatTemplate, chat_template
from tasks.common.config import FormatParams, ModelParams, load_params
from tasks.common.conversation import Conversation, content_key
from tasks.common.errors import PipelineError

log = logging.getLogger(__name__)


def load_template(params: FormatParams, model: ModelParams) -> ChatTemplate:
    """The chat template; only `tokenizer` needs the base's tokenizer here (validate checked a built-in's tokens)."""
    if params.template != "tokenizer":
        return chat_template(params.template)
    from tasks.common.base_model import load_tokenizer

    return chat_template(params.template, load_tokenizer(model))


def apply_policies(rows: list[dict], params: FormatParams, model: ModelParams, report: dict) -> list[dict]:
    """The duplicate and length policies: the rows kept, with what each policy did counted in `report`."""
    if params.duplicates == "drop":
        report["dropped_duplicates"] = sum(r["is_duplicate"] for r in rows)
        rows = [r for r in rows if not r["is_duplicate"]]

    over = [r for r in rows if r["n_tokens"] > model.max_length]
    if over and params.length_policy == "fail":
        listed = ", ".join(f"row {r['row_index']} ({r['n_tokens']} tokens)" for r in over[:10])
        raise PipelineError(
            f"{len(over)} conversation(s) exceed model.max_length={model.max_length}: {listed}. "
            "Raise model.max_length, or set format.length_policy to 'truncate' or 'drop'."
        )
    if params.length_policy == "drop":
        report["dropped_over_max_length"] = len(over)
        return [r for r in rows if r["n_tokens"] <= model.max_length]
    # truncate: train cuts at max_length (tokens.cut); rows left with no answer token go
    fully = {r["row_index"] for r in over if r["fully_masked_if_truncated"]}
    report["truncated"] = len(over) - len(fully)
    report["dropped_no_answer_left"] = len(fully)
    report["answer_tokens_cut"] = sum(r["answer_tokens_cut"] for r in over if r["row_index"] not in fully)
    return [r for r in rows if r["row_index"] not in fully]


def eval_row_indices(rows: list[dict], params: FormatParams) -> set[int]:
    """The row indices that go to eval: the first keys in content-key order, near-duplicates on one side only."""
    n_eval = max(params.min_eval_rows, round(params.eval_fraction * len(rows)))
    if n_eval >= len(rows):
        raise PipelineError(
            f"only {len(rows)} conversation(s) left after filtering, too few for {n_eval} eval row(s) and any "
            "training: add data or lower format.min_eval_rows / format.eval_fraction."
        )
    keyed = sorted((r["content_key"], r["row_index"]) for r in rows)
    # Near-duplicates share a key: extend the cut past the last eval key so no group straddles the split.
    cut = n_eval
    while cut < len(keyed) and keyed[cut][0] == keyed[cut - 1][0]:
        cut += 1
    if cut >= len(keyed):
        raise PipelineError(
            f"all {len(rows)} conversation(s) are near-duplicates of the eval rows, leaving none to train on: "
            "add data or lower format.min_eval_rows / format.eval_fraction."
        )
    return {index for _, index in keyed[:cut]}


def _measures(conversations: Path, hasher) -> list[dict]:
    """Each validated conversation's figures without its text (what the policies and the split decide on)."""
    keep = ("row_index", "n_tokens", "answer_tokens", "answer_tokens_cut", "fully_masked_if_truncated", "is_duplicate")
    rows = []
    for r in iter_jsonl(conversations, hasher):
        # content_key is carried from validate; conversations validated before it was carried get it computed here
        key = r.get("content_key") or content_key(Conversation.from_dict(r))
        rows.append({**{k: r[k] for k in keep}, "content_key": key})
    return rows


def _write_splits(
    conversations: Path, template: ChatTemplate, params: FormatParams, kept: set[int], eval_ids: set[int], tmp: Path
) -> dict:
    """Render the kept conversations into train.jsonl and eval.jsonl (input order in each); their sha256s."""
    with atomic_writer(tmp / paths.TRAIN_ROWS.name) as train, atomic_writer(tmp / paths.EVAL_ROWS.name) as evals:
        for r in iter_jsonl(conversations):
            if r["row_index"] not in kept:
                continue
            rendered = template.render(Conversation.from_dict(r), params.system_prompt)
            row = {"row_index": r["row_index"], "text": rendered.text, "answer_spans": rendered.answer_spans}
            out = evals if r["row_index"] in eval_ids else train
            out.write(jsonl_line({**row, "n_tokens": r["n_tokens"]}))
    return {"train_sha256": train.hexdigest(), "eval_sha256": evals.hexdigest()}


def format_rows(
    params: FormatParams,
    model: ModelParams,
    conversations: Path = paths.CONVERSATIONS,
    out_dir: Path = paths.FORMATTED_DIR,
) -> dict:
    """Two streaming passes over the validated conversations: their figures decide what is kept and where it goes,
    then the kept ones are rendered into the split files. No text is held in memory."""
    if not conversations.exists():
        raise PipelineError(f"{conversations} not found: run the validate stage first (dvc repro validate).")
    template = load_template(params, model)
    hasher = hashlib.sha256()
    rows = _measures(conversations, hasher)
    report: dict = {
        "rows_in": len(rows),
        "input_sha256": hasher.hexdigest(),  # the audit's link to validate
        "length_policy": params.length_policy,
        "max_length": model.max_length,
    }
    rows = apply_policies(rows, params, model, report)
    eval_ids = eval_row_indices(rows, params)

    # Tokens and answer tokens the model will see: what the cut at max_length leaves. tokens.cut keeps a row's
    # first max_length tokens, and validate measured the answer tokens it cuts with that same function.
    train = [r for r in rows if r["row_index"] not in eval_ids]
    evals = [r for r in rows if r["row_index"] in eval_ids]
    for name, split in (("train", train), ("eval", evals)):
        report[f"{name}_tokens"] = sum(min(r["n_tokens"], model.max_length) for r in split)
        report[f"{name}_answer_tokens"] = sum(r["answer_tokens"] - r["answer_tokens_cut"] for r in split)
    report |= {"train_rows": len(train), "eval_rows": len(evals)}

    # The three files are swapped in together: train, eval and their report always belong to one run.
    with staged_dir(out_dir) as tmp:
        kept = {r["row_index"] for r in rows}
        report |= _write_splits(conversations, template, params, kept, eval_ids, tmp)
        write_json(tmp / paths.FORMAT_REPORT.name, report)
    log.info("formatted %d train / %d eval rows (%s)", report["train_rows"], report["eval_rows"], params.length_policy)
    return report


def main() -> None:
    params = load_params()
    format_rows(params.format, params.model)
