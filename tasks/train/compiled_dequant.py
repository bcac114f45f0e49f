"""train.compiled_dequant: in a compiled run, the 4-bit base's NF4 dequantization written as tensor operations that
inductor compiles into the decoder layer's own code.

bitsandbytes' 4-bit linear dequantizes its weight in every forward and again in every backward (MatMul4Bit), through
a custom op: 448 calls a step on Llama-2-7B, each a trip through the op's Python and ctypes on the CPU. Inside a
compiled layer inductor cannot look into that op, so the CPU still issues each one by hand, and on the compiled fast
path the CPU issuing work is what the GPU waits on (docs/performance.md, "Where a step's time went"). Written as plain
tensor operations (split each byte into its two 4-bit codes, look them up in the 16-value NF4 table, scale by the
block's absmax, cast), the dequantization becomes part of the layer's generated code: one Triton kernel a weight,
launched from it.

Nothing else changes. The packed weights stay where they were (the same Params4bit, 0.5 byte a weight) and only
they are kept for the backward, which dequantizes again, as MatMul4Bit does; the values are bitsandbytes' own, bit
for bit (tests/test_compiled_dequant.py compares them with bitsandbytes.functional.dequantize_4bit). A nested
(double-quantized) absmax is expanded to float32 once here, as bitsandbytes expands it at every call: 4 bytes per
64 weights instead of about 1 (0.3 GiB more on Llama-2-7B; the recipe does not double-quantize).

Only where it pays and is safe: a compiled run (eager, these operations would be several kernels instead of
bitsandbytes' one), NF4 weights, one process (a DDP run would broadcast these buffers every step; FSDP shards the
packed weights itself). Elsewhere bitsandbytes' path runs, and reports/training.json says which ran.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tasks.train.dequantized_base import swap_4bit_linears


def block_absmax(quant_state) -> torch.Tensor:
    """The float32 absmax of each block, as bitsandbytes' dequantize_4bit computes it (expanding a nested one)."""
    if not quant_state.nested:
        return quant_state.absmax
    inner = quant_state.state2  # the absmax itself quantized blockwise, 8 bits a value
    # each 8-bit value's block scale, one per value (the last block may be short)
    scales = inner.absmax.repeat_interleave(inner.blocksize)[: quant_state.absmax.numel()]
    return inner.code[quant_state.absmax.to(torch.int32)] * scales + quant_state.offset


def dequantize_nf4(packed, absmax, code, blocksize: int, shape: tuple[int, int], dtype) -> torch.Tensor:
    """bitsandbytes' NF4 dequantization as tensor operations: each byte holds two codes, high nibble first; each code
    is looked up in `code` and scaled, in float32, by its block's absmax, then rounded once to `dtype`."""
    flat = packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(-1)
    values = code[codes.to(torch.int32)]
    return (values.view(-1, blocksize) * absmax.view(-1, 1)).view(shape).to(dtype)


class CompiledNF4Linear(torch.nn.Module):
    """A bitsandbytes NF4 linear whose forward dequantizes with tensor operations (module docstring): the same packed
    weight (still the module's `weight` parameter, frozen), bias and compute dtype."""

    def __init__(self, layer):
        super().__init__()
        state = layer.weight.quant_state
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.compute_dtype = layer.compute_dtype
        self.weight = layer.weight
        self.bias = layer.bias
        self.blocksize, self.shape = state.blocksize, tuple(state.shape)
        # Buffers, not parameters: frozen, outside the optimizer and the saved adapter, and not in the state dict.
        self.register_buffer("absmax", block_absmax(state).float(), persistent=False)
        self.register_buffer("code", state.code.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        # Inside torch.utils.checkpoint, the dequantized weight is marked for recomputation: AOTAutograd's partitioner
        # then dequantizes again in the backward instead of keeping every layer's weight in the compute dtype until
        # then (by its own rules it would keep it: a matmul's operand cannot be fused into the backward's kernels).
        args = (self.weight, self.absmax, self.code, self.blocksize, self.shape, x.dtype)
        weight = checkpoint(dequantize_nf4, *args, use_reentrant=False)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias).to(inp_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, dequantized in the graph"


def supported(layer) -> bool:
    """Whether a 4-bit linear can take the compiled path: NF4, a 2-D weight of whole blocks, packed in bytes."""
    state = layer.weight.quant_state
    return (
        state.quant_type == "nf4"
        and len(state.shape) == 2
        and math.prod(state.shape) % state.blocksize == 0
        and layer.weight.dtype == torch.uint8
    )


def use_compiled_dequant(model) -> int:
    """Every supported bitsandbytes 4-bit linear in `model` swapped for a CompiledNF4Linear; returns how many (the
    others keep bitsandbytes' path)."""
    swap_4bit_linears(model, lambda layer: CompiledNF4Linear(layer) if supported(layer) else layer)
    return sum(isinstance(m, CompiledNF4Linear) for m in model.modules())
