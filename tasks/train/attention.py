"""Padding-free attention: a micro-batch flattened into one row, each conversation attending only to itself.

trl's padding-free collator concatenates the micro-batch and passes the sequence boundaries
(`cu_seq_lens_q/k`, `max_length_q/k`) down to every attention call. This registers an attention
implementation that hands them to PyTorch's own variable-length FlashAttention kernel
(`torch.nn.attention.varlen.varlen_attn`) on CUDA, so no compute or memory goes to padding and no
token attends across a boundary. On the CPU (tests, the tiny model) it runs the same math one
conversation at a time with SDPA. Calls without boundaries (generation, padded evaluation) fall
through to the stock SDPA implementation unchanged.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "varlen_sdpa"


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq = kwargs.get("cu_seq_lens_q")
    if cu_seq is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError("padding-free attention expects the micro-batch flattened into one row")
    # (1, heads, tokens, dim) -> (tokens, heads, dim), the layout of the varlen kernels
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    cu_seq = cu_seq.to(device=query.device, dtype=torch.int32)
    gqa = k.shape[1] != q.shape[1]
    if query.is_cuda:
        if gqa and "enable_gqa" not in _varlen_params():
            # Grouped-query bases (Llama-3, Qwen2.5, Mistral v0.3): PyTorch 2.11's varlen kernel takes as many k/v
            # heads as query heads, so each k/v head is repeated for its group, as transformers' repeat_kv does for
            # SDPA (query head i reads k/v head i // group). The kept k/v then have a Llama-2-like full size, which
            # is what the memory planner's activation fit assumes.
            k, v = repeat_kv_heads(q, k, v)
            gqa = False
        longest = int(kwargs.get("max_length_q") or int(cu_seq.diff().max()))
        out = _varlen_kernel()(q, k, v, cu_seq, cu_seq, longest, longest, scale=scaling, **_causal_kwargs(gqa))
    else:
        bounds = cu_seq.tolist()
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    *(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=scaling, enable_gqa=gqa
                ).transpose(0, 1)
                for s, e in zip(bounds[:-1], bounds[1:])
            ]
        )
    return out.unsqueeze(0), None  # (1, tokens, heads, dim), as the stock implementations return


def repeat_kv_heads(q, k, v):
    """k and v, in the varlen layout (tokens, heads, dim), with each head repeated for its group of query heads."""
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


# PyTorch's varlen kernel and its parameter names, resolved once. A plain global, not functools.cache: the forward
# runs inside compiled decoder layers, and dynamo warns at every cached call it traces through (it ignores the cache).
_varlen: tuple | None = None


def _resolve_varlen() -> tuple:
    global _varlen
    if _varlen is None:
        from torch.nn.attention.varlen import varlen_attn

        _varlen = (varlen_attn, frozenset(inspect.signature(varlen_attn).parameters))
    return _varlen


def _varlen_kernel():
    return _resolve_varlen()[0]


def _varlen_params() -> frozenset[str]:
    return _resolve_varlen()[1]


def _causal_kwargs(gqa: bool) -> dict:
    """Causal masking is `window_size=(-1, 0)` in newer PyTorch, `is_causal=True` in the first releases of the API."""
    params = _varlen_params()
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if gqa:  # only asked for where the kernel takes it (varlen_attention_forward repeats k/v otherwise)
        kwargs["enable_gqa"] = True
    return kwargs


# PyTorch's varlen attention is its FlashAttention kernel, built for Ampere (compute capability 8.0) and newer: on a
# T4 or V100 it would fail at the first forward (not run here: no such GPU), so preflight says so before the base loads.
MIN_CAPABILITY = (8, 0)


def unavailable_reason() -> str | None:
    """Why padding-free training cannot run here, or None: any CPU can; on CUDA it needs a PyTorch with varlen
    attention and an Ampere-or-newer GPU."""
    if not torch.cuda.is_available():
        return None
    try:
        _varlen_kernel()
    except ImportError:
        return "train.padding_free needs PyTorch >= 2.10 (torch.nn.attention.varlen) on CUDA"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (
            f"train.padding_free uses PyTorch's FlashAttention, which needs an Ampere or newer GPU (compute "
            f"capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+); this {torch.cuda.get_device_name()} is "
            f"{capability[0]}.{capability[1]}: set train.padding_free=false"
        )
    return None


def _mask(*args, attention_mask=None, **kwargs):
    """No 4D mask for padding-free batches (the boundaries travel as cu_seq_lens); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make `attn_implementation="varlen_sdpa"` loadable; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    if torch.cuda.is_available() and unavailable_reason() is None:
        _resolve_varlen()  # here, before any compiled layer traces the forward
    return NAME
