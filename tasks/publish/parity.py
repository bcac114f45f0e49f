"""Train/serve parity: the release's tokenizer, through its own chat_template, gives exactly the token ids that were
trained, for the eval rows. A server (transformers, vLLM, TGI) renders conversations with that template; a
template that differs from the one the adapter learned (a space, a missing end-of-turn token) costs quality with
no error anywhere, so publish refuses such a release and the audit re-checks it."""

from __future__ import annotations

from pathlib import Path

from tasks.common import paths
from tasks.common.artifacts import iter_jsonl
from tasks.common.chat_template import ChatTemplate
from tasks.common.conversation import Conversation


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _token(tokenizer, ids: list[int], at: int) -> str:
    return repr(tokenizer.convert_ids_to_tokens(ids[at])) if at < len(ids) else "(the end)"


def first_mismatch(
    release_dir: Path,
    template: ChatTemplate,
    system_prompt: str | None,
    eval_rows: Path = paths.EVAL_ROWS,
    conversations: Path = paths.CONVERSATIONS,
) -> tuple[int, str | None]:
    """(rows compared, None) when every eval row's served ids equal its trained ids, else the first difference in
    words: the row, the token position and the two tokens there."""
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(release_dir)
    wanted = {r["row_index"]: r["text"] for r in iter_jsonl(eval_rows)}
    compared = 0
    for row in iter_jsonl(conversations):
        text = wanted.get(row["row_index"])
        if text is None:
            continue
        messages = template.messages(Conversation.from_dict(row), system_prompt)
        got = _ids(served.apply_chat_template(messages, tokenize=True))
        trained = served(text, add_special_tokens=False)["input_ids"]
        compared += 1
        if got != trained:
            at = next((i for i, (a, b) in enumerate(zip(got, trained)) if a != b), min(len(got), len(trained)))
            return compared, (
                f"eval row {row['row_index']}: the release's chat_template gives token "
                f"{_token(served, got, at)} at position {at} where training had {_token(served, trained, at)} "
                f"({len(got)} vs {len(trained)} tokens)"
            )
    return compared, None
