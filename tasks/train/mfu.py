"""Model FLOPs utilisation: the share of the GPU's dense bf16 peak that the model's own matmuls use.

One formula for every run, ours and the references alike (benchmarks/train_throughput.py uses this too): FLOPs a
token = 4 x N, N the base's matmul weights (every decoder projection and the LM head; the input embedding is a
lookup). A QLoRA step runs the forward (2N) and the backward to the activations (2N); the frozen base computes no
weight gradients, and the LoRA matmuls (r=64: under 1% of N) and attention's score matmuls are left out, as in the
usual MFU (PaLM appendix B leaves attention out of its 6N too). Tokens are the non-padding ones: padding is waste,
not work.
"""

from __future__ import annotations

from tasks.train.memory import ModelShape

# Dense bf16 tensor-core peak of one GPU (the vendors' datasheets, SXM parts; sparsity excluded), by the name
# torch.cuda.get_device_name gives. H200 has the H100's compute, with more and faster memory.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def flops_per_token(shape: ModelShape) -> float:
    return 4.0 * shape.matmul_params


def peak_flops(device_name: str) -> float | None:
    """The bf16 peak of the named GPU, or None when it is not in the table (MFU is then not given)."""
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in device_name:
            return flops
    return None


def mfu(tokens_per_second: float | None, shape: ModelShape, device_name: str) -> dict:
    """{"mfu": share or None, "peak_flops": what it divides by, "flops_per_token": 4N}."""
    peak = peak_flops(device_name)
    per_token = flops_per_token(shape)
    value = None if not (tokens_per_second and peak) else round(tokens_per_second * per_token / peak, 4)
    return {"mfu": value, "peak_flops": peak, "flops_per_token": per_token}
