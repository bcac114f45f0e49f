"""train.dequantized_base (tasks/train/dequantized_base.py): the 4-bit base dequantized once gives the 4-bit
path's math."""

from __future__ import annotations

import pytest
import torch

from tasks.common.config import with_overrides
from tasks.common.errors import PipelineError


def _tiny_4bit_lora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(
        tmp_path / "base",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        dtype=torch.float32,
        device_map="cpu",
    )
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, so the LoRA path carries gradient into lora_A too
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dequantized_base_gives_the_4bit_loss_and_lora_gradients(tmp_path):
    import bitsandbytes as bnb

    from tasks.train.dequantized_base import DequantizedLinear, dequantize_base

    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    four_bit = _tiny_4bit_lora(tmp_path)
    loss_4bit, grads_4bit = _loss_and_grads(four_bit, ids)
    adapter_keys = set(four_bit.state_dict())

    assert dequantize_base(four_bit) == 7 * 2  # q, k, v, o, gate, up, down in 2 layers, LoRA-wrapped or not
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in four_bit.modules())
    q = four_bit.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, DequantizedLinear) and q.base_layer.weight.dtype == torch.float32
    loss_deq, grads_deq = _loss_and_grads(four_bit, ids)

    assert loss_deq == pytest.approx(loss_4bit, rel=1e-6)
    assert grads_deq.keys() == grads_4bit.keys() and len(grads_deq) == 2 * 2 * 2  # lora_A/B of q and v, 2 layers
    for name in grads_4bit:
        torch.testing.assert_close(grads_deq[name], grads_4bit[name], rtol=1e-5, atol=1e-7)
    # the dequantized weights are buffers outside the state dict: the 4-bit weights' entries are gone, LoRA's stay
    lora_keys = {k for k in adapter_keys if "lora_" in k}
    assert lora_keys <= set(four_bit.state_dict()) and not any("weight.absmax" in k for k in four_bit.state_dict())
    assert sum(p.requires_grad for p in four_bit.parameters()) == len(grads_deq)


def test_preflight_keeps_the_dequantized_base_to_one_process_and_a_4bit_base(params):
    from tasks.train.preflight import hardware_problems

    on = with_overrides(params, **{"train.dequantized_base": True})
    assert hardware_problems(on) == []
    ddp = with_overrides(on, **{"train.distributed.mode": "ddp", "train.distributed.num_processes": 2})
    assert any("one GPU only" in p and "mode=ddp" in p for p in hardware_problems(ddp))
    plain = with_overrides(on, **{"quant.load_in_4bit": False})
    assert any("load_in_4bit is false" in p for p in hardware_problems(plain))


def test_planner_counts_the_dequantized_base(params):
    from transformers import LlamaConfig

    from benchmarks.model_shapes import LLAMA2_7B_CHAT
    from tasks.train.memory import ModelShape, estimate

    shape = ModelShape.from_config(LlamaConfig(**LLAMA2_7B_CHAT))
    bf16 = with_overrides(params, **{"quant.compute_dtype": "bfloat16", "train.precision": "bf16"})
    four_bit = estimate(shape, bf16).base_weights_gib
    dequantized = estimate(shape, with_overrides(bf16, **{"train.dequantized_base": True})).base_weights_gib
    assert 3.5 < four_bit < 4.0 and 12.5 < dequantized < 13.5


def test_auto_dequantizes_only_where_the_planner_finds_room(params):
    from transformers import LlamaConfig

    from benchmarks.model_shapes import LLAMA2_7B_CHAT
    from tasks.train.dequantized_base import decide
    from tasks.train.memory import ModelShape, plan

    shape = ModelShape.from_config(LlamaConfig(**LLAMA2_7B_CHAT))
    recipe = with_overrides(
        params,
        **{
            "quant.compute_dtype": "bfloat16",
            "train.precision": "bf16",
            "train.batch_size": 8,
            "train.grad_accum": 1,
            "model.max_length": 1024,
            "train.gradient_checkpointing": "auto",
            "train.dequantized_base": "auto",
        },
    )
    assert recipe.train.dequantized_base == "auto"
    peak = {
        on: plan(shape, with_overrides(recipe, **{"train.dequantized_base": on}), None).peak_gib for on in (False, True)
    }
    assert peak[True] - peak[False] > 8  # 2 bytes a weight instead of ~0.5

    room = decide(recipe, shape, budget_gib=67.0)  # an 80 GB card's auto budget
    assert room.on and room.setting == "auto" and "room within 67 GiB" in room.reason

    # a budget the 4-bit base fits with no recomputation, where the dequantized one would need some: off, and why
    tight = round((peak[False] + peak[True]) / 2, 1)
    assert plan(shape, with_overrides(recipe, **{"train.dequantized_base": False}), tight).recompute_layers == 0
    no_room = decide(recipe, shape, budget_gib=tight)
    assert not no_room.on and "no room" in no_room.reason and "recomputed" in no_room.reason

    assert not decide(recipe, shape, budget_gib=10.0).on  # the 4-bit base fits only recomputing, the dequantized not
    assert "no memory budget" in decide(recipe, shape, budget_gib=None).reason  # the CPU: nothing to plan for
    ddp = {"train.distributed.mode": "ddp", "train.distributed.num_processes": 2}
    assert "one GPU only" in decide(with_overrides(recipe, **ddp), shape, 67.0, world_size=2).reason
    assert not decide(with_overrides(recipe, **{"train.fp8_base": True}), shape, 67.0).on
    assert not decide(with_overrides(recipe, **{"quant.load_in_4bit": False}), shape, 67.0).on
    pinned = decide(with_overrides(recipe, **{"train.dequantized_base": True}), shape, None)
    assert pinned.on and pinned.setting == "true"


def test_the_train_stage_trains_the_same_adapter_on_a_dequantized_base(workdir, params, caplog):
    from tasks.download.stage import download
    from tasks.format.stage import format_rows
    from tasks.train.stage import train
    from tasks.validate.stage import validate

    download(params.download)
    validate(params)
    format_rows(params.format, params.model)
    base = with_overrides(params, **{"train.max_steps": 2})
    four_bit = train(base)  # params.yaml: auto, off on the CPU (no memory budget), and the report says why
    assert four_bit["dequantized_base"]["setting"] == "auto" and not four_bit["dequantized_base"]["on"]
    with caplog.at_level("INFO", logger="tasks.train"):
        dequantized = train(with_overrides(base, **{"train.dequantized_base": True}))
    assert "train.dequantized_base: 14 4-bit linears dequantized" in caplog.text  # the tiny base: 7 in 2 layers
    assert dequantized["dequantized_base"] == {"on": True, "setting": "true", "reason": "set by train.dequantized_base"}
    assert dequantized["train_loss"] == pytest.approx(four_bit["train_loss"], rel=1e-5)
    assert dequantized["tokens_seen"] == four_bit["tokens_seen"]
    with pytest.raises(PipelineError, match="one GPU only"):
        ddp = {"train.distributed.mode": "ddp", "train.distributed.num_processes": 2}
        train(with_overrides(base, **{"train.dequantized_base": True, **ddp}))
