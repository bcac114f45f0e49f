"""The token-length report: what max_length will cut, drop or let through, before anyone trains on it.

Lengths are counted with the base model's own tokenizer on the exact text that will be trained
(chat template and system prompt included). The report says, for the configured policy, how many
rows and answer tokens are affected, so nothing is silently truncated and no outlier causes an OOM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.common.artifacts import write_bytes
from tasks.common.conversation import Rendered
from tasks.common.tokens import Tokenized, cut, tokenize_rendered

PERCENTILES = (50, 90, 95, 99)


def _figures(n_tokens: int, answer_tokens: int, answer_tokens_cut: int) -> dict:
    """A row's figures as validated conversations carry them."""
    return {
        "n_tokens": n_tokens,
        "answer_tokens": answer_tokens,
        "answer_tokens_cut": answer_tokens_cut,
        "fully_masked_if_truncated": answer_tokens - answer_tokens_cut == 0,
    }


def row_lengths(tok: Tokenized, max_length: int) -> dict:
    """Per-row figures: tokens, answer tokens, and what the cut at max_length (tokens.cut) leaves of them."""
    return _figures(len(tok.input_ids), tok.answer_tokens, tok.answer_tokens - cut(tok, max_length).answer_tokens)


def _first_over(enc, n: int, part: int, value: int) -> int:
    """The first token index in [0, n) whose offset `part` (0 start, 1 end) is over `value`; n if none. Offsets
    never go backwards, so this is a bisection; the token holding character `value` (char_to_token, one call) is
    tried first, and taken when its neighbours prove it the answer (two calls, against about nine for the
    bisection): for an end, that token; for a start, the one after it."""
    at = enc.char_to_token(value) if 0 <= value else None
    if at is not None:
        guess = at + 1 - part  # part 1 (ends): the token holding `value`; part 0 (starts): the next one
        if (guess == n or enc.token_to_chars(guess)[part] > value) and (
            guess == 0 or enc.token_to_chars(guess - 1)[part] <= value
        ):
            return guess
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if enc.token_to_chars(mid)[part] > value:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _answer_counts(enc, spans: list[tuple[int, int]], max_length: int) -> tuple[int, int]:
    """(answer tokens, answer tokens at or past max_length) of one encoded row: the counts tokens._labels and
    tokens.cut give, found without converting every token's offsets to Python.

    A token carries loss when it overlaps an answer span (end > span start and start < span end). A tokenizer
    cuts a text into consecutive pieces, so token offsets never go backwards and each span's tokens are one index
    range [a, b): a bisection on token_to_chars finds its ends in a few calls instead of one per token.
    """
    n = len(enc)
    total = past = 0
    done = 0  # tokens before this index were counted already (a token overlapping two spans counts once)
    for s0, s1 in spans:
        a = max(done, _first_over(enc, n, 1, s0))  # the first token ending after the span starts
        b = _first_over(enc, n, 0, s1 - 1)  # the first token starting at or after its end
        if b > a:
            total += b - a
            past += max(0, b - max(a, max_length))
            done = b
    return total, past


def measure_rendered(tokenizer, rendered: list[Rendered], max_length: int) -> np.ndarray:
    """Per-row [n_tokens, answer_tokens, answer_tokens_cut] (int64, one row each) of rendered conversations: the
    figures row_lengths gives, in one batched call of the fast tokenizer's backend (which releases the GIL, so a
    caller can overlap it with other work). Tokenizers without a Rust backend take the slow, exact path."""
    out = np.zeros((len(rendered), 3), dtype=np.int64)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        for k, tok in enumerate(tokenize_rendered(tokenizer, rendered)):
            out[k] = (len(tok.input_ids), tok.answer_tokens, tok.answer_tokens - cut(tok, max_length).answer_tokens)
        return out
    encodings = backend.encode_batch([r.text for r in rendered], add_special_tokens=False)
    for k, (enc, r) in enumerate(zip(encodings, rendered)):
        out[k, 0] = len(enc)
        out[k, 1:] = _answer_counts(enc, r.answer_spans, max_length)
    return out


def length_rows(measured: np.ndarray) -> list[dict]:
    """measure_rendered's figures as row_lengths' dicts (what each validated conversation carries)."""
    return [_figures(*row) for row in measured.tolist()]


def length_report(measured: np.ndarray, max_length: int, policy: str, tokenizer_name: str) -> dict:
    """The report on all renderable rows, from measure_rendered's [n_tokens, answer_tokens, answer_tokens_cut]."""
    measured = measured.reshape(-1, 3)
    n, answers, cuts = measured[:, 0], measured[:, 1], measured[:, 2]
    over = n > max_length
    answer_total = int(answers.sum())
    cut_total = int(cuts[over].sum())
    effect = {
        "truncate": f"{int(over.sum())} rows cut to {max_length} tokens, losing {cut_total} answer tokens "
        f"({cut_total / max(answer_total, 1):.1%} of all answer tokens); "
        f"{int((answers[over] - cuts[over] == 0).sum())} rows keep no answer token and are dropped",
        "drop": f"{int(over.sum())} rows dropped ({int(n[over].sum())} tokens)",
        "fail": f"the format stage fails if any row is over max_length ({int(over.sum())} are)",
    }[policy]
    return {
        "tokenizer": tokenizer_name,
        "max_length": max_length,
        "rows": len(n),
        "total_tokens": int(n.sum()),
        "mean": round(float(n.mean()), 1) if len(n) else 0,
        "max": int(n.max()) if len(n) else 0,
        "percentiles": {f"p{p}": float(np.percentile(n, p)) if len(n) else 0 for p in PERCENTILES},
        "rows_over_max_length": int(over.sum()),
        "share_over_max_length": round(int(over.sum()) / max(len(n), 1), 4),
        "answer_tokens_total": answer_total,
        "answer_tokens_cut_by_truncation": cut_total,
        "policy": policy,
        "policy_effect": effect,
    }


def save_histogram(n_tokens: np.ndarray, max_length: int, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.asarray(n_tokens, dtype=np.int64)  # an array, not a list: 8 bytes a row, where a Python int takes 36
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.hist(n, bins=min(60, max(10, len(n) // 5)), color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length = {max_length}")
    over = int((n > max_length).sum())
    ax.set_title(f"Tokens per conversation ({len(n)} rows, {over} over max_length)")
    ax.set_xlabel("tokens (chat template included)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
