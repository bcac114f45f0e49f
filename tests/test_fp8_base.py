"""train.fp8_base (tasks/train/fp8_base.py): the frozen base's matmuls in float8. Not the same math, so these check
that it stays close to the 4-bit path's and that it is refused where it cannot run. torch._scaled_mm runs on the
CPU too, so the float8 layers themselves are exercised here; their speed is measured on the GPU (docs/performance.md).
"""

from __future__ import annotations

import pytest
import torch

from tasks.common.config import with_overrides
from tasks.common.errors import PipelineError
from tests.test_dequantized_base import _loss_and_grads, _tiny_4bit_lora


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_an_fp8_linear_is_a_frozen_linear_within_float8_rounding():
    from tasks.train.fp8_base import FP8, Fp8Linear

    torch.manual_seed(0)
    weight, bias = torch.randn(48, 64, dtype=torch.bfloat16) * 0.05, torch.randn(48, dtype=torch.bfloat16)
    layer = Fp8Linear(weight, bias, torch.bfloat16)
    x = torch.randn(2, 17, 64, dtype=torch.bfloat16, requires_grad=True)  # 34 tokens: not a multiple of 16
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), torch.nn.functional.linear(x_ref, weight, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)

    assert y.shape == y_ref.shape and y.dtype == torch.bfloat16
    assert _relative_error(y, y_ref) < 0.06  # e4m3 keeps 3 mantissa bits: a few percent, not more
    assert _relative_error(x.grad, x_ref.grad) < 0.06
    assert list(layer.parameters()) == [] and layer.state_dict() == {}  # frozen, and never saved with the adapter
    # the two copies are the same weight, one per output channel, one transposed and per input channel
    assert layer.w_out.dtype == layer.w_in.dtype == FP8 and layer.w_in.shape == (64, 48)
    # row-major both, so each .t() is column-major: cuBLASLt multiplies only row-major by column-major (the CPU's
    # _scaled_mm takes any layout, so this is the check that holds it here)
    assert layer.w_out.is_contiguous() and layer.w_in.is_contiguous()
    assert _relative_error(layer.w_out.float() * layer.scale_out.t(), weight) < 0.06
    assert _relative_error((layer.w_in.float() * layer.scale_in.t()).t(), weight) < 0.06


def test_an_all_zero_row_stays_zero_rather_than_dividing_by_zero():
    from tasks.train.fp8_base import rowwise_fp8

    q, scale = rowwise_fp8(torch.zeros(2, 32))
    assert torch.isfinite(scale).all() and (q.float() == 0).all()


def test_the_fp8_base_keeps_the_4bit_loss_and_lora_gradients_close(tmp_path):
    import bitsandbytes as bnb

    from tasks.train.fp8_base import Fp8Linear, fp8_base

    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _tiny_4bit_lora(tmp_path)
    loss_4bit, grads_4bit = _loss_and_grads(model, ids)

    assert fp8_base(model) == 7 * 2  # q, k, v, o, gate, up, down in 2 layers, LoRA-wrapped or not
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, Fp8Linear)
    loss_fp8, grads_fp8 = _loss_and_grads(model, ids)

    assert loss_fp8 == pytest.approx(loss_4bit, rel=0.01)
    assert grads_fp8.keys() == grads_4bit.keys() and len(grads_fp8) == 2 * 2 * 2  # lora_A/B of q and v, 2 layers
    for name in grads_4bit:
        cosine = torch.nn.functional.cosine_similarity(grads_fp8[name].flatten(), grads_4bit[name].flatten(), dim=0)
        assert cosine > 0.99, name
    assert sum(p.requires_grad for p in model.parameters()) == len(grads_fp8)  # only LoRA trains


def test_preflight_refuses_fp8_where_it_cannot_run(params):
    from tasks.train.preflight import hardware_problems

    on = with_overrides(params, **{"train.fp8_base": True})
    problems = hardware_problems(on)
    if not torch.cuda.is_available():
        assert any("train.fp8_base needs a CUDA GPU" in p and "set it to false" in p for p in problems)
    both = with_overrides(on, **{"train.dequantized_base": True})
    assert any("set one of them" in p for p in hardware_problems(both))
    ddp = with_overrides(on, **{"train.distributed.mode": "ddp", "train.distributed.num_processes": 2})
    assert any("train.fp8_base runs on one GPU only" in p for p in hardware_problems(ddp))
    plain = with_overrides(on, **{"quant.load_in_4bit": False})
    assert any("train.fp8_base" in p and "load_in_4bit is false" in p for p in hardware_problems(plain))


def test_planner_counts_two_bytes_a_weight_for_the_fp8_base(params):
    from transformers import LlamaConfig

    from benchmarks.model_shapes import LLAMA2_7B_CHAT
    from tasks.train.memory import ModelShape, estimate

    shape = ModelShape.from_config(LlamaConfig(**LLAMA2_7B_CHAT))
    bf16 = with_overrides(params, **{"quant.compute_dtype": "bfloat16", "train.precision": "bf16"})
    fp8 = estimate(shape, with_overrides(bf16, **{"train.fp8_base": True})).base_weights_gib
    dequantized = estimate(shape, with_overrides(bf16, **{"train.dequantized_base": True})).base_weights_gib
    assert fp8 == pytest.approx(dequantized, rel=0.01)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_train_stage_stops_before_loading_when_fp8_cannot_run(workdir, params):
    from tasks.train.stage import train

    with pytest.raises(PipelineError, match="train.fp8_base needs a CUDA GPU"):
        train(with_overrides(params, **{"train.fp8_base": True, "train.max_steps": 1}))
