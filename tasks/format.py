"""Stage 3, format: validated conversations -> Llama-2 chat text, length policy applied, train/eval split.

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

from tasks import paths
from tasks.artifacts import read_jsonl, sha256_file, staged_dir, write_json, write_jsonl
from tasks.config import FormatParams, ModelParams, load_params
from tasks.conversation import Conversation, near_duplicate_key, render_llama2
from tasks.errors import PipelineError, run_main

log = logging.getLogger(__name__)


def _split_key(conv: Conversation) -> str:
    return hashlib.sha256(near_duplicate_key(conv).encode("utf-8")).hexdigest()


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


def split_rows(rows: list[dict], params: FormatParams) -> tuple[list[dict], list[dict]]:
    """Render each conversation and split train/eval by a content key, near-duplicates on one side only."""
    n_eval = max(params.min_eval_rows, round(params.eval_fraction * len(rows)))
    if n_eval >= len(rows):
        raise PipelineError(
            f"only {len(rows)} conversation(s) left after filtering, too few for {n_eval} eval row(s) and any "
            "training: add data or lower format.min_eval_rows / format.eval_fraction."
        )
    keyed = []
    for r in rows:
        conv = Conversation.from_dict(r)
        rendered = render_llama2(conv, params.system_prompt)
        keyed.append(
            (
                _split_key(conv),
                {
                    "row_index": r["row_index"],
                    "text": rendered.text,
                    "answer_spans": rendered.answer_spans,
                    "n_tokens": r["n_tokens"],
                },
            )
        )
    keyed.sort(key=lambda kv: kv[0])
    # Near-duplicates share a key: extend the cut past the last eval key so no group straddles the split.
    cut = n_eval
    while cut < len(keyed) and keyed[cut][0] == keyed[cut - 1][0]:
        cut += 1
    if cut >= len(keyed):
        raise PipelineError(
            f"all {len(rows)} conversation(s) are near-duplicates of the eval rows, leaving none to train on: "
            "add data or lower format.min_eval_rows / format.eval_fraction."
        )
    eval_ids = {row["row_index"] for _, row in keyed[:cut]}
    # Rows keep their input order inside each split, so a diff of the files reads like a diff of the data.
    ordered = [row for _, row in sorted(keyed, key=lambda kv: kv[1]["row_index"])]
    return [r for r in ordered if r["row_index"] not in eval_ids], [r for r in ordered if r["row_index"] in eval_ids]


def format_rows(
    params: FormatParams,
    model: ModelParams,
    conversations: Path = paths.CONVERSATIONS,
    out_dir: Path = paths.FORMATTED_DIR,
) -> dict:
    if not conversations.exists():
        raise PipelineError(f"{conversations} not found: run the validate stage first (dvc repro validate).")
    rows = read_jsonl(conversations)
    report: dict = {
        "rows_in": len(rows),
        "input_sha256": sha256_file(conversations),  # the audit's link to validate
        "length_policy": params.length_policy,
        "max_length": model.max_length,
    }
    rows = apply_policies(rows, params, model, report)
    train, evals = split_rows(rows, params)

    # Tokens and answer tokens the model will see: what the cut at max_length leaves. tokens.cut keeps a row's
    # first max_length tokens, and validate measured the answer tokens it cuts with that same function.
    measured = {r["row_index"]: r for r in rows}
    for name, split in (("train", train), ("eval", evals)):
        rs = [measured[r["row_index"]] for r in split]
        report[f"{name}_tokens"] = sum(min(r["n_tokens"], model.max_length) for r in rs)
        report[f"{name}_answer_tokens"] = sum(r["answer_tokens"] - r["answer_tokens_cut"] for r in rs)

    # The three files are swapped in together: train, eval and their report always belong to one run.
    with staged_dir(out_dir) as tmp:
        train_path, eval_path = tmp / paths.TRAIN_ROWS.name, tmp / paths.EVAL_ROWS.name
        write_jsonl(train_path, train)
        write_jsonl(eval_path, evals)
        report |= {
            "train_rows": len(train),
            "eval_rows": len(evals),
            "train_sha256": sha256_file(train_path),
            "eval_sha256": sha256_file(eval_path),
        }
        write_json(tmp / paths.FORMAT_REPORT.name, report)
    log.info("formatted %d train / %d eval rows (%s)", len(train), len(evals), params.length_policy)
    return report


def main() -> None:
    params = load_params()
    format_rows(params.format, params.model)


if __name__ == "__main__":
    run_main("format", main)
