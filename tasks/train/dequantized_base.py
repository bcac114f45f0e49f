"""train.dequantized_base: the 4-bit base dequantized once for the whole run, where memory allows.

In training, bitsandbytes' 4-bit linear dequantizes its NF4 weight to the compute dtype in every forward and again in
every backward, then runs an ordinary matmul (`MatMul4Bit`): 448 dequantizations a step for Llama-2-7B, each a
kernel plus a custom op's Python on the CPU, which is the bottleneck on the fast path (README, Performance). The base
is frozen, so every one of them yields the same tensor. This replaces each 4-bit linear with a frozen linear holding
that tensor, computed once: the same weights, rounded by NF4, and the same products, for 2 bytes a weight instead of
about 0.5 (Llama-2-7B: 12.6 GiB instead of 3.5). The adapter, its training and what is saved do not change.

One process on one GPU only: DDP would broadcast these buffers every step, and FSDP exists to save the memory this
spends (preflight refuses both).

`auto` (the default) keeps it where the memory planner finds room: on when the run's fastest layout (the configured
micro-batch, recomputing what the 4-bit base would) still fits the budget with the weights at 2 bytes, off when the
dequantized base would cost a smaller micro-batch or more recomputation, and off where there is no budget to plan
for (the CPU), several processes, or no 4-bit base. The choice and its reason go to reports/training.json.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.common.config import Params, with_overrides
from tasks.common.errors import PipelineError
from tasks.train.choice import Choice
from tasks.train.memory import Estimate, ModelShape, plan


def _layout(est: Estimate) -> str:
    if not est.recompute_layers:
        return f"micro-batch {est.micro_batch}, no recomputation"
    return f"micro-batch {est.micro_batch}, {est.recompute_layers} of {est.layers} layers recomputed"


def decide(params: Params, shape: ModelShape, budget_gib: float | None, world_size: int = 1) -> Choice:
    """Whether this run keeps its 4-bit base dequantized, and why (auto: where the planner finds room).

    Decided before train.compile's auto, so a compiled run's smaller activations are not counted on: what fits eager
    fits compiled."""
    t = params.train
    if t.dequantized_base is True or t.dequantized_base is False:
        return Choice.pinned(t.dequantized_base, "train.dequantized_base")

    def off(why: str) -> Choice:
        return Choice(False, "auto", why)

    if not params.quant.load_in_4bit:
        return off("the base is not 4-bit (quant.load_in_4bit is false): nothing to dequantize")
    if t.fp8_base:
        return off("train.fp8_base replaces the 4-bit base")
    if t.distributed.mode != "single" or world_size > 1:
        return off(f"{max(world_size, t.distributed.num_processes)} processes: one GPU only (DDP would broadcast it)")
    if budget_gib is None:
        return off("no memory budget to plan for (no CUDA GPU, or train.memory_budget_gib is null)")
    try:
        four_bit = plan(shape, with_overrides(params, **{"train.dequantized_base": False}), budget_gib)
        dequantized = plan(shape, with_overrides(params, **{"train.dequantized_base": True}), budget_gib)
    except PipelineError:
        return off(f"no room within {budget_gib:g} GiB")
    same = (dequantized.micro_batch, dequantized.recompute_layers) == (four_bit.micro_batch, four_bit.recompute_layers)
    if not same or dequantized.recompute_thresholds is not None:
        return off(
            f"no room within {budget_gib:g} GiB: dequantized it would run {_layout(dequantized)} (predicted "
            f"{dequantized.peak_gib:.1f} GiB), where the 4-bit base runs {_layout(four_bit)}"
        )
    return Choice(
        True,
        "auto",
        f"room within {budget_gib:g} GiB: predicted peak {dequantized.peak_gib:.1f} GiB dequantized against "
        f"{four_bit.peak_gib:.1f} on the 4-bit base, the same layout ({_layout(four_bit)})",
    )


def dequantized_weight(layer) -> torch.Tensor:
    """A bitsandbytes 4-bit linear's weight, dequantized and cast as MatMul4Bit casts it before its matmul."""
    import bitsandbytes.functional as bnb_functional

    weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return weight if layer.compute_dtype is None else weight.to(layer.compute_dtype)


class DequantizedLinear(torch.nn.Module):
    """A frozen linear with a bitsandbytes 4-bit layer's weight dequantized: its forward, minus the dequantization."""

    def __init__(self, layer):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.compute_dtype = layer.compute_dtype
        weight = dequantized_weight(layer)
        # A buffer, not a parameter: frozen, outside the optimizer and the saved adapter, and not in the state dict.
        self.register_buffer("weight", weight, persistent=False)
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias).to(inp_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


def swap_4bit_linears(model, replacement) -> int:
    """Swap every bitsandbytes 4-bit linear in `model` (LoRA-wrapped or not) for replacement(layer), in place, one at
    a time (so only one layer's extra copy exists at once); the 4-bit weights are then freed. Returns how many."""
    import bitsandbytes as bnb

    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, bnb.nn.Linear4bit)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, replacement(child))
    return len(swaps)


def dequantize_base(model) -> int:
    """Every bitsandbytes 4-bit linear in `model` swapped for a DequantizedLinear; returns how many."""
    return swap_4bit_linears(model, DequantizedLinear)
