"""train.gemm_warmup: cuBLAS's GEMM kernels loaded before the first step, not in the middle of one.

cuBLAS loads a GEMM kernel into the process the first time it picks it, and loading waits until the GPU has drained
its queue. A padding-free micro-batch has a token count of its own, and a GEMM at a new count can pick a kernel not
yet loaded: 15 such loads in steps 5 to 7 of the 7B recipe, each holding the host 3 to 5 ms with the GPU idle, once
77 ms for the queue to drain (the profile in benchmarks/results/dequantized_auto_h100_de02df7, "Lazy Function Loading"
at the end of each such GEMM). CUDA_MODULE_LOADING=EAGER does not prevent them and costs seconds and 1 GiB
(benchmarks/cuda_launch_stalls.py).

So before the first step the stage runs each distinct GEMM of a step once at every TOKEN_GRID-th token count a
micro-batch can reach, and pads each padding-free micro-batch onto that grid (trl's pad_to_multiple_of: the padding
is one-token sequences of their own, labelled -100, so no real token's attention, loss or gradient changes; at most
TOKEN_GRID - 1 tokens, under 1% of a 7B recipe's micro-batch). Counts between the grid's points picked kernels the
warm-up had not loaded (the same benchmark). The padding is left out of every token count
(tasks/train/step_overlap.py's CountRealTokens), which is why the padding needs train.sync_free_step's trainer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # torch alone at import: benchmarks/cuda_launch_stalls.py runs this in a bare torch environment
    from tasks.common.config import Params

TOKEN_GRID = 64  # token counts this far apart in the warm-up's sweep, and micro-batches padded onto them


def pads_micro_batches(params: Params) -> bool:
    """Whether padding-free micro-batches are padded onto the warm-up's grid (CUDA only)."""
    t = params.train
    return t.gemm_warmup and t.padding_free and t.sync_free_step and torch.cuda.is_available()


def gemm_shapes(model) -> list[tuple[int, int, bool]]:
    """(in_features, out_features, trainable) of every distinct linear layer in the model: the base's projections
    (4-bit or not: bitsandbytes' training path dequantizes, then runs the same GEMM), LoRA's A and B, the LM head."""
    shapes = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and hasattr(module, "in_features") and hasattr(module, "out_features"):
            shapes.add((int(module.in_features), int(module.out_features), bool(weight.requires_grad)))
    return sorted(shapes)


def warm_gemm_kernels(
    shapes, max_tokens: int, dtype: torch.dtype, step: int = TOKEN_GRID, device: torch.device | None = None
) -> dict:
    """Run each GEMM of a training step (forward, input gradient, and weight gradient where trainable) once at every
    `step`-th token count up to `max_tokens`, so that cuBLAS loads now each kernel it will pick, on this process's GPU
    unless `device` says otherwise. Nothing is kept; returns what it ran and how long it took. (An FP8 base's own
    matmuls are not among them: train.fp8_base runs torch._scaled_mm.)"""
    start = time.perf_counter()
    gemms = 0
    device = device or torch.device("cuda", torch.cuda.current_device())
    with torch.no_grad():
        for fan_in, fan_out, trainable in shapes:
            weight = torch.empty(fan_out, fan_in, device=device, dtype=dtype)
            x = torch.empty(max_tokens, fan_in, device=device, dtype=dtype)
            grad = torch.empty(max_tokens, fan_out, device=device, dtype=dtype)
            for m in range(step, max_tokens + step, step):
                m = min(m, max_tokens)
                torch.mm(x[:m], weight.T)
                torch.mm(grad[:m], weight)
                gemms += 2
                if trainable:
                    torch.mm(grad[:m].T, x[:m])
                    gemms += 1
            del weight, x, grad
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the sweep's buffers: the planner's budget is for the run
    return {"gemms": gemms, "max_tokens": max_tokens, "seconds": round(time.perf_counter() - start, 2)}


def warm_up(params: Params, model, micro_batch: int) -> dict | None:
    """train.gemm_warmup on CUDA, for the model as the trainer holds it: the warm-up over every token count one
    micro-batch can reach. None when off or on the CPU."""
    from tasks.common.base_model import compute_dtype

    t = params.train
    if not (t.gemm_warmup and torch.cuda.is_available()):
        return None
    # the most tokens one micro-batch can hold: padding-free, its rows end to end (then onto the grid); padded,
    # micro-batch x longest row
    max_tokens = micro_batch * params.model.max_length
    if pads_micro_batches(params):
        max_tokens = -(-max_tokens // TOKEN_GRID) * TOKEN_GRID
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, compute_dtype(params.quant))
    try:
        return warm_gemm_kernels(gemm_shapes(model), max_tokens, dtype)
    except torch.OutOfMemoryError:  # only a speed-up: the run goes on without it, its budget untouched
        torch.cuda.empty_cache()
        return {"skipped": f"out of GPU memory for {max_tokens}-token buffers", "max_tokens": max_tokens}
