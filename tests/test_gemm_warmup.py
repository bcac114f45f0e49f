"""train.gemm_warmup (tasks/train/gemm_warmup.py): every GEMM of a step, at every token count on its grid, before the
first step."""

from __future__ import annotations

import torch


def test_gemm_shapes_are_the_4bit_lora_models_linears(tmp_path):
    """Every distinct GEMM a step runs: the 4-bit base's projections at their logical shapes (not the packed storage),
    frozen; LoRA's A and B, trainable; the LM head."""
    from tasks.train.gemm_warmup import gemm_shapes
    from tests.test_dequantized_base import _tiny_4bit_lora

    assert gemm_shapes(_tiny_4bit_lora(tmp_path)) == sorted(
        {(64, 64, False), (64, 128, False), (128, 64, False), (64, 4, True), (4, 64, True), (64, 100, False)}
    )


def test_gemm_warmup_runs_each_gemm_at_every_token_count():
    from tasks.train.gemm_warmup import warm_gemm_kernels

    record = warm_gemm_kernels([(8, 16, False), (16, 4, True)], 150, torch.float32, step=64, device=torch.device("cpu"))
    # token counts 64, 128 and 150: forward and input gradient of both, the weight gradient of the trainable one
    assert record["gemms"] == 3 * 2 + 3 * 3 and record["max_tokens"] == 150


def test_no_warm_up_and_no_padding_without_cuda(params):
    from tasks.train.gemm_warmup import pads_micro_batches, warm_up

    assert params.train.gemm_warmup  # on by default; CUDA only
    assert warm_up(params, torch.nn.Linear(2, 2), 4) is None and not pads_micro_batches(params)


def test_a_warm_up_out_of_gpu_memory_is_skipped_and_recorded(params, monkeypatch):
    """The warm-up is only a speed-up: without the memory for its buffers the run goes on, and the report says why."""
    import tasks.train.gemm_warmup as gemm_warmup

    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gemm_warmup, "warm_gemm_kernels", no_memory)
    record = gemm_warmup.warm_up(params, torch.nn.Linear(2, 2), 4)
    assert "out of GPU memory" in record["skipped"] and record["max_tokens"] % gemm_warmup.TOKEN_GRID == 0
