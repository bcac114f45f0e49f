"""The token-length report: what max_length will cut, drop or let through, before anyone trains on it.

Lengths are counted with the base model's own tokenizer on the exact text that will be trained
(chat template and system prompt included). The report says, for the configured policy, how many
rows and answer tokens are affected, so nothing is silently truncated and no outlier causes an OOM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.artifacts import write_bytes
from tasks.tokens import Tokenized, cut

PERCENTILES = (50, 90, 95, 99)


def row_lengths(tok: Tokenized, max_length: int) -> dict:
    """Per-row figures: tokens, answer tokens, and what the cut at max_length (tokens.cut) leaves of them."""
    kept = cut(tok, max_length)
    return {
        "n_tokens": len(tok.input_ids),
        "answer_tokens": tok.answer_tokens,
        "answer_tokens_cut": tok.answer_tokens - kept.answer_tokens,
        "fully_masked_if_truncated": kept.answer_tokens == 0,
    }


def length_report(lengths: list[dict], max_length: int, policy: str, tokenizer_name: str) -> dict:
    n = np.array([r["n_tokens"] for r in lengths]) if lengths else np.zeros(0, dtype=int)
    over = [r for r in lengths if r["n_tokens"] > max_length]
    answer_total = sum(r["answer_tokens"] for r in lengths)
    cut = sum(r["answer_tokens_cut"] for r in over)
    effect = {
        "truncate": f"{len(over)} rows cut to {max_length} tokens, losing {cut} answer tokens "
        f"({cut / max(answer_total, 1):.1%} of all answer tokens); "
        f"{sum(r['fully_masked_if_truncated'] for r in over)} rows keep no answer token and are dropped",
        "drop": f"{len(over)} rows dropped ({sum(r['n_tokens'] for r in over)} tokens)",
        "fail": f"the format stage fails if any row is over max_length ({len(over)} are)",
    }[policy]
    return {
        "tokenizer": tokenizer_name,
        "max_length": max_length,
        "rows": len(lengths),
        "total_tokens": int(n.sum()),
        "mean": round(float(n.mean()), 1) if len(n) else 0,
        "max": int(n.max()) if len(n) else 0,
        "percentiles": {f"p{p}": float(np.percentile(n, p)) if len(n) else 0 for p in PERCENTILES},
        "rows_over_max_length": len(over),
        "share_over_max_length": round(len(over) / max(len(lengths), 1), 4),
        "answer_tokens_total": answer_total,
        "answer_tokens_cut_by_truncation": cut,
        "policy": policy,
        "policy_effect": effect,
    }


def save_histogram(lengths: list[dict], max_length: int, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n_tokens"] for r in lengths]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.hist(n, bins=min(60, max(10, len(n) // 5)), color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length = {max_length}")
    over = sum(x > max_length for x in n)
    ax.set_title(f"Tokens per conversation ({len(n)} rows, {over} over max_length)")
    ax.set_xlabel("tokens (chat template included)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
