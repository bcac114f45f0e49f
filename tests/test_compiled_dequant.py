"""train.compiled_dequant (tasks/train/compiled_dequant.py): bitsandbytes' NF4 dequantization as tensor operations
gives bitsandbytes' values bit for bit, the 4-bit path's loss and gradients, one compiled graph for every layer, and
keeps only the packed weights for the backward."""

from __future__ import annotations

import pytest
import torch

from tasks.common.config import with_overrides
from tests.test_dequantized_base import _loss_and_grads, _tiny_4bit_lora

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_values_are_bitsandbytes_own_bit_for_bit(device, nested, dtype):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    from tasks.train.compiled_dequant import block_absmax, dequantize_nf4

    torch.manual_seed(0)
    weight = torch.randn(96, 640) * 0.02  # 61,440 weights: 960 blocks of 64, and 240 of the nested absmax's 256
    weight[3, :64] = 0  # a block of zeros
    weight[5, 7] = 1.5  # an outlier
    packed = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, quant_type="nf4", compress_statistics=nested)
    packed = packed._quantize(device)
    state = packed.quant_state
    expected = bnb_functional.dequantize_4bit(packed.data, state).to(dtype)
    got = dequantize_nf4(packed.data, block_absmax(state), state.code, state.blocksize, tuple(state.shape), dtype)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_the_4bit_paths_loss_and_lora_gradients(tmp_path):
    import bitsandbytes as bnb

    from tasks.train.compiled_dequant import CompiledNF4Linear, use_compiled_dequant

    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _tiny_4bit_lora(tmp_path)
    loss_4bit, grads_4bit = _loss_and_grads(model, ids)
    keys = set(model.state_dict())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    assert use_compiled_dequant(model) == 7 * 2
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, CompiledNF4Linear) and q.weight.dtype == torch.uint8  # still the packed weight
    loss, grads = _loss_and_grads(model, ids)

    assert loss == loss_4bit
    assert grads.keys() == grads_4bit.keys() and len(grads) == 2 * 2 * 2
    for name in grads:
        torch.testing.assert_close(grads[name], grads_4bit[name], rtol=1e-6, atol=1e-8)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    assert {k for k in keys if "lora_" in k} <= set(model.state_dict())


def test_compiled_one_graph_for_every_layer_and_only_packed_weights_kept_for_the_backward(tmp_path):
    """inductor (its CPU backend here) compiles the layers with the dequantization inside them: one graph serves every
    layer and new lengths, the loss is the eager one's, and nothing the size of a dequantized weight is saved for the
    backward (it dequantizes again, as bitsandbytes does)."""
    import torch._dynamo.utils

    from tasks.train import compilation
    from tasks.train.compiled_dequant import use_compiled_dequant

    torch._dynamo.reset()
    model = _tiny_4bit_lora(tmp_path)
    model.config.use_cache = False  # as the Trainer sets it: a KV cache guards on each layer's index
    use_compiled_dequant(model)
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    eager_loss, _ = _loss_and_grads(model, ids)
    assert compilation.compile_layers(model) == 2
    torch._dynamo.utils.counters.clear()

    weight_shapes = {tuple(m.shape) for m in model.modules() if hasattr(m, "blocksize")}
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compiled_loss, grads = _loss_and_grads(model, ids)
    for length in (17, 33):
        _loss_and_grads(model, ids[:, :length])
    assert compilation.compiled_graphs() == 1
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert len(grads) == 2 * 2 * 2
    assert saved and not [s for s in saved if s[0] in weight_shapes and s[1].is_floating_point]


def test_it_takes_effect_only_in_a_compiled_single_process_run_on_a_4bit_base(params):
    """Where it does not apply, bitsandbytes' own path runs, and reports/training.json says which ran."""
    from tasks.train.stage import compiled_dequant_applies, dequantization

    bf16 = with_overrides(params, **{"quant.load_in_4bit": True})
    assert compiled_dequant_applies(bf16, 1)
    assert dequantization(bf16, compiled=True, world_size=1).startswith("compiled into the decoder layers")
    assert dequantization(bf16, compiled=False, world_size=1).startswith("bitsandbytes")  # eager: bitsandbytes' op
    off = with_overrides(bf16, **{"train.compiled_dequant": False})
    assert not compiled_dequant_applies(off, 1) and dequantization(off, True, 1).startswith("bitsandbytes")
    ddp = with_overrides(bf16, **{"train.distributed.mode": "ddp", "train.distributed.num_processes": 2})
    assert not compiled_dequant_applies(ddp, 2) and dequantization(ddp, True, 2).startswith("bitsandbytes")
    for lever in ("train.dequantized_base", "train.fp8_base"):
        other = with_overrides(bf16, **{lever: True})
        assert not compiled_dequant_applies(other, 1) and lever in dequantization(other, True, 1)
    plain = with_overrides(bf16, **{"quant.load_in_4bit": False})
    assert not compiled_dequant_applies(plain, 1) and dequantization(plain, True, 1).startswith("none")
