"""train.fp8_base: the frozen base's matmuls in float8, on GPUs with FP8 tensor cores (compute capability 8.9+).

Opt-in, because it is not the recipe's math: the weights and activations are rounded to 8 bits on their way into
each base matmul (the adapter stays in the compute dtype), so the check that matters is the eval loss after the
epoch against the bf16 path's (docs/performance.md). Each bitsandbytes 4-bit linear is dequantized once, as
train.dequantized_base does, and stored as float8 e4m3 twice: scaled per output channel for the forward (x @ W^T),
and transposed, scaled per input channel, for the backward's input gradient (dy @ W). Two copies because
torch._scaled_mm takes its second operand column-major with a scale per its own column; together they are 2 bytes a
weight, as the bf16 dequantized base. Activations and output gradients are scaled per token as they go.

No weight gradient is ever computed (the base is frozen). torchao's Float8Linear (convert_to_float8_training)
computes one in every backward whether the weight wants it or not: a third of the base's matmuls, wasted here, which
is why this is a small autograd function of our own around torch._scaled_mm rather than that.

One process on one GPU only, as train.dequantized_base (preflight refuses the rest).
"""

from __future__ import annotations

import torch

from tasks.train.dequantized_base import dequantized_weight, swap_4bit_linears

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: e4m3 has the precision; per-row scales give it the range
MIN_AMAX = 1e-12  # an all-zero row scales by this, not by 0 (which would divide by zero)
MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first CUDA GPUs with FP8 tensor cores


def rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (2-D) as float8 and a float32 scale per row, t ~= q * scale: each row's largest magnitude maps to FP8_MAX."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_AMAX) / FP8_MAX
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ W^T with both in float8; dx = dy @ W likewise; no dW (the base is frozen)."""

    @staticmethod
    def forward(ctx, x, w_out, scale_out, w_in, scale_in):
        xq, x_scale = rowwise_fp8(x)
        ctx.save_for_backward(w_in, scale_in)
        return torch._scaled_mm(xq, w_out.t(), scale_a=x_scale, scale_b=scale_out, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, dy):
        w_in, scale_in = ctx.saved_tensors
        dyq, dy_scale = rowwise_fp8(dy.contiguous())
        dx = torch._scaled_mm(dyq, w_in.t(), scale_a=dy_scale, scale_b=scale_in, out_dtype=dy.dtype)
        return dx, None, None, None, None


class Fp8Linear(torch.nn.Module):
    """A frozen linear whose weight is kept in float8 (see the module docstring); its output in the compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        w_out, scale_out = rowwise_fp8(weight)  # [out, in], a scale per output channel
        w_in, scale_in = rowwise_fp8(weight.t().contiguous())  # [in, out] row-major, a scale per input channel
        # Buffers, not parameters: frozen, outside the optimizer and the saved adapter, and not in the state dict.
        self.register_buffer("w_out", w_out, persistent=False)
        self.register_buffer("scale_out", scale_out.reshape(1, -1), persistent=False)
        self.register_buffer("w_in", w_in, persistent=False)
        self.register_buffer("scale_in", scale_in.reshape(1, -1), persistent=False)
        self.bias = bias

    @classmethod
    def from_4bit(cls, layer) -> Fp8Linear:
        return cls(dequantized_weight(layer), layer.bias, layer.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        flat = x.reshape(-1, self.in_features).contiguous()
        y = _Fp8Matmul.apply(flat, self.w_out, self.scale_out, self.w_in, self.scale_in)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(inp_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={FP8}"


def fp8_base(model) -> int:
    """Every bitsandbytes 4-bit linear in `model` swapped for an Fp8Linear; returns how many."""
    return swap_4bit_linears(model, Fp8Linear.from_4bit)


def fp8_unavailable_reason() -> str | None:
    """Why this machine cannot run train.fp8_base, or None."""
    if not torch.cuda.is_available():
        return "train.fp8_base needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+): set it to false"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (
            f"train.fp8_base needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper or later); this GPU is "
            f"{capability[0]}.{capability[1]}: set it to false"
        )
    return None
