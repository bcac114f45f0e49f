"""Serving-ready layout: what vLLM's LoRA loader needs of an adapter folder, checked before a release is signed.

vLLM reads `adapter_config.json` through its PEFTHelper (vllm/lora/peft_helper.py): `r`, `lora_alpha` and
`target_modules` are required; `validate_legal` refuses `modules_to_save`, DoRA (`use_dora`), any adapter bias
(`bias` other than "none"), and a rank (`r`, or any `rank_pattern` value) above the server's `--max-lora-rank`,
which takes only the values of vllm/config/lora.py's MaxLoRARanks (1, 8, 16, 32, 64, 128, 256, 320, 512; default 16).
The weights are `adapter_model.safetensors`, each tensor named `<module path>.lora_A.weight` or `.lora_B.weight`
(vllm/lora/utils.py parse_fine_tuned_lora_name). Embedding and lm_head LoRA are refused too: vLLM's support for them
depends on the model and the release, and this recipe trains none.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.common import paths

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
REQUIRED_KEYS = ("r", "lora_alpha", "target_modules")  # vllm/lora/peft_helper.py PEFTHelper's required fields
UNSERVED_MODULES = ("embed_tokens", "lm_head")


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`; None above its largest."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= rank), None)


def serve_command(base: str, name: str, folder: str, rank: int) -> str:
    return f"vllm serve {base} --enable-lora --lora-modules {name}={folder} --max-lora-rank {vllm_max_lora_rank(rank)}"


def vllm_problems(folder: Path) -> list[str]:
    """What in the adapter folder vLLM's LoRA loader would refuse, each naming the file and key; [] if nothing."""
    from safetensors import safe_open

    config_file, weights = folder / "adapter_config.json", folder / paths.ADAPTER_WEIGHTS
    for required in (config_file, weights):
        if not required.is_file():
            return [f"{required.name} is missing"]
    config = json.loads(config_file.read_text(encoding="utf-8"))
    problems = [f"adapter_config.json has no {key!r}" for key in REQUIRED_KEYS if key not in config]
    if problems:
        return problems
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"adapter_config.json peft_type is {config['peft_type']!r}: vLLM loads LORA only")
    if config.get("modules_to_save"):
        problems.append(f"adapter_config.json modules_to_save is {config['modules_to_save']!r}: vLLM needs null")
    if config.get("use_dora"):
        problems.append("adapter_config.json use_dora is true: vLLM does not load DoRA")
    if config.get("bias", "none") != "none":
        problems.append(f"adapter_config.json bias is {config['bias']!r}: vLLM loads no adapter bias")
    ranks = {config["r"], *(config.get("rank_pattern") or {}).values()}
    if vllm_max_lora_rank(max(ranks)) is None:
        problems.append(f"adapter_config.json rank {max(ranks)} is above vLLM's largest --max-lora-rank (512)")
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    if unserved := sorted(set(targets) & set(UNSERVED_MODULES)):
        problems.append(f"adapter_config.json target_modules {unserved}: embedding/lm_head LoRA is not served")
    with safe_open(weights, framework="pt") as f:
        for name in f.keys():
            kind = next((k for k in (".lora_A.weight", ".lora_B.weight") if name.endswith(k)), None)
            module = name.removesuffix(kind).rsplit(".", 1)[-1] if kind else None
            if kind is None:
                problems.append(f"{weights.name} tensor {name!r} is not a lora_A/lora_B weight")
            elif module not in targets:
                problems.append(f"{weights.name} tensor {name!r} adapts {module!r}, not in target_modules")
            else:
                shape = f.get_slice(name).get_shape()
                rank = shape[0] if kind == ".lora_A.weight" else shape[1]
                if rank not in ranks:
                    problems.append(f"{weights.name} tensor {name!r} has rank {rank}, not adapter_config.json's r")
    return problems
