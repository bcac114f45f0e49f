"""Tokenize rendered conversations into input ids and loss labels, in one batched fast-tokenizer call.

The text already carries `<s>` and `</s>` (the chat template puts them there), so nothing is added:
no double BOS, exactly one EOS per assistant turn. A token carries loss when it overlaps an answer
span (the answer text and its closing `</s>`); everything else, system and user prompts included,
gets label -100.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.common.conversation import Rendered

IGNORE = -100


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE] * len(ids)
    j = 0
    for i, (start, end) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and end > spans[j][0] and start < spans[j][1]:
            labels[i] = ids[i]
    return labels


def tokenize_rendered(
    tokenizer, rendered: list[Rendered], answer_only: bool = True, batch: int = 1000
) -> list[Tokenized]:
    out: list[Tokenized] = []
    for k in range(0, len(rendered), batch):
        chunk = rendered[k : k + batch]
        enc = tokenizer(
            [r.text for r in chunk],
            add_special_tokens=False,
            return_offsets_mapping=answer_only,
            return_attention_mask=False,
        )
        for n, r in enumerate(chunk):
            ids = enc["input_ids"][n]
            labels = _labels(ids, enc["offset_mapping"][n], r.answer_spans) if answer_only else list(ids)
            out.append(Tokenized(ids, labels))
    return out


# The one cut at model.max_length. Rows keep their whole text up to here: cutting the text instead is not exact,
# since the cut text can tokenize otherwise (4 of the 299 guanaco-llama2-1k rows over 512 Llama-2 tokens do).
# So train and evaluate cut the ids with it, and the per-row figures validate writes (lengths.row_lengths) and
# the format report sums are measured with it too: the report says what will be trained.
def cut(tok: Tokenized, max_length: int) -> Tokenized:
    """The first max_length tokens of a row, with their labels."""
    return Tokenized(tok.input_ids[:max_length], tok.labels[:max_length])


def truncate(toks: list[Tokenized], max_length: int) -> list[Tokenized]:
    """Cut each row; drop rows left with no answer token (no loss to learn)."""
    return [t for t in (cut(t, max_length) for t in toks) if t.answer_tokens > 0]
