"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): a tiny PEFT LoRA model wrapped in FSDP1 as
accelerate wraps it for FSDP-QLoRA (PEFT's auto-wrap policy, use_orig_params False), one training step, then the
adapter saved by tasks.fsdp_adapter on rank 0 beside the same weights saved by PEFT from rank 0's unwrapped copy."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.train.fsdp_adapter import fsdp_adapter_state, save_adapter

out = Path(sys.argv[1])
dist.init_process_group("gloo")
torch.manual_seed(0)
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
)
peft_model = get_peft_model(
    model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
)
wrapped = FSDP(
    peft_model,
    auto_wrap_policy=fsdp_auto_wrap_policy(peft_model),
    use_orig_params=False,
    device_id=torch.device("cpu"),
    sharding_strategy=ShardingStrategy.FULL_SHARD,
)
optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0)
ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(dist.get_rank()))
wrapped(input_ids=ids, labels=ids).loss.backward()
optimizer.step()  # lora_B leaves zero: the saved weights are the trained ones, not the initial ones

weights = fsdp_adapter_state(wrapped, "default")
# What the Trainer's FSDP checkpoints hold of the adapter (accelerate's save_fsdp_model, adapter_only): empty while
# PEFT misses the LoRA weights under nested FSDP wrappers, which is why tasks/train/stage.py writes no FSDP checkpoints.
from accelerate.utils.fsdp_utils import _get_model_state_dict  # noqa: E402

with FSDP.state_dict_type(wrapped, StateDictType.SHARDED_STATE_DICT):
    checkpoint_keys = len(_get_model_state_dict(wrapped, adapter_only=True))
# The reference: every weight gathered (FSDP's own full state dict), loaded into a plain copy, saved by PEFT.
with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
    full = wrapped.state_dict()
if dist.get_rank() == 0:
    save_adapter(peft_model, out / "ours", weights, "default")
    torch.manual_seed(0)
    plain = get_peft_model(
        LlamaForCausalLM(model.config),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    plain.load_state_dict(full)
    plain.save_pretrained(out / "peft")
    (out / "checkpoint_adapter_keys.txt").write_text(str(checkpoint_keys))
else:
    assert weights == {}, "only rank 0 receives the weights"
dist.destroy_process_group()
