"""Saving the LoRA adapter of an FSDP-QLoRA run: gather the sharded LoRA weights and write them as PEFT does.

PEFT 0.21's own save misses the LoRA weights under FSDP1's nested wrappers (see fsdp_adapter_state), so the
train stage gathers them here and writes the same files PeftModel.save_pretrained writes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

from tasks.common.paths import ADAPTER_WEIGHTS


def fsdp_adapter_state(fsdp_model, adapter_name: str) -> dict:
    """The LoRA weights of an FSDP-wrapped PEFT model, whole, on rank 0 ({} on the others), keyed as PEFT saves them
    (`...q_proj.lora_A.weight`). A collective: every rank must call it.

    Why not PEFT's save_pretrained(state_dict=<the FSDP full state dict>), as Trainer.save_model does: PEFT 0.21 picks
    the adapter's keys by the module names of the model, which under FSDP1 hold `_fsdp_wrapped_module.` in the middle
    (each decoder layer and LoRA layer is its own FSDP unit) and so match none of the state dict's clean keys. The
    adapter came out empty on 2 H200s. tests/test_distributed.py checks these keys against PEFT's own on a plain model.
    """
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    on_gpu = next(fsdp_model.parameters()).is_cuda  # CPU shards (the tests' gloo runs) stay where they are
    with FSDP.state_dict_type(
        fsdp_model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=True)
    ):
        full = fsdp_model.state_dict()  # rank 0: every weight, gathered to the CPU; the others: {}
    return lora_weights(full, adapter_name)


def lora_weights(state_dict: Mapping, adapter_name: str) -> dict:
    """The LoRA entries of a PEFT model's full state dict, renamed as PEFT names them in adapter_model.safetensors."""
    tag = f".{adapter_name}."
    return {k.replace(tag, ".", 1): v for k, v in state_dict.items() if ".lora_" in k and tag in k}


def save_adapter(peft_model, out_dir, weights: dict, adapter_name: str) -> None:
    """Write adapter_model.safetensors + adapter_config.json as PeftModel.save_pretrained does (same names, config
    saved in inference mode), from weights gathered by fsdp_adapter_state."""
    from safetensors.torch import save_file

    if not weights:
        raise RuntimeError("no LoRA weights were gathered from the FSDP model: refusing to save an empty adapter")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in weights.items()},
        str(Path(out_dir) / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(str(out_dir))
