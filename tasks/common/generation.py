"""Greedy continuation: the one way evaluate generates and publish's load-and-generate check generates again, so
that the check compares like with like (tasks/publish/generation_check.py: the same tokens, exactly)."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_new_tokens(model, prompt_ids: list[int], stop: int, pad: int, max_new_tokens: int) -> list[int]:
    """The new token ids of a greedy continuation of one prompt, ending at `stop` (the template's end of turn)."""
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop,
        pad_token_id=pad,
    )
    return out[0, len(prompt_ids) :].tolist()
