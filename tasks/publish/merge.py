"""The merged model (publish.merged: true): the adapter folded into the base, one standalone model in release/merged/.

The base is loaded unquantized, in the compute dtype (quant.compute_dtype: bf16 on a GPU recipe), not in 4 bits:
PEFT merges a LoRA into a 4-bit layer by dequantizing, adding and re-quantizing it, which rounds the update away
again, and its docs advise merging QLoRA adapters into the unquantized base. The folder holds the weights as
safetensors, the release's tokenizer with its chat_template and a model card; release/lineage.json records it and
the release's signature covers it, like every other file of the release.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

from tasks.common.artifacts import sha256_tree, write_text
from tasks.common.base_model import load_base_model
from tasks.common.config import Params
from tasks.common.errors import PipelineError

log = logging.getLogger(__name__)


def unquantized(params: Params):
    """The quant params with 4-bit loading off: the base in its compute dtype, as the merge needs it."""
    return params.quant.model_copy(update={"load_in_4bit": False})


def merged_card(params: Params, release_id: str, folder: str) -> str:
    return f"""---
base_model: {params.model.base}
tags: [qlora, guanaco, merged-lora]
---
# {params.publish.name} (merged)

The LoRA adapter of release `{release_id}` merged into `{params.model.base}` loaded unquantized
({params.quant.compute_dtype}): a standalone model, loaded with `AutoModelForCausalLM.from_pretrained` or served with
`vllm serve <this folder>`. Its tokenizer carries the chat template the adapter was trained with.

The release's `lineage.json` (one folder up) records how it was made, and the release's signature (`model.sig`)
covers every file here. Publish checked that it generates the same greedy tokens as the adapter on that base.
Files: `{folder}/`.
"""


def write_merged(params: Params, release_dir: Path, out: Path, tokenizer, release_id: str) -> dict:
    """Merge the adapter in release_dir into the unquantized base and save the model, tokenizer and card in `out`
    (a folder inside the release being staged: a failure leaves no part of it anywhere). Return its lineage entry."""
    import peft
    import torch
    from peft import PeftModel

    quant = unquantized(params)
    model = PeftModel.from_pretrained(load_base_model(params.model, quant), release_dir)
    try:
        merged = model.merge_and_unload(safe_merge=True)  # refuses an update with NaN/inf instead of saving it
    except ValueError as e:
        raise PipelineError(
            f"cannot publish the merged model: merging {release_dir}/ into {params.model.base} failed ({e})."
        ) from None
    merged.save_pretrained(out)  # safetensors (transformers' only format), sharded past its default shard size
    tokenizer.save_pretrained(out)
    write_text(out / "README.md", merged_card(params, release_id, out.name))
    dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
    del model, merged
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the load-and-generate check, next, loads models again
    log.info("merged the adapter into %s (%s) in %s", params.model.base, dtype, out)
    return {
        "folder": out.name,
        "base": params.model.base,
        "base_loaded_as": f"unquantized, {dtype}",
        "method": f"peft {peft.__version__} merge_and_unload(safe_merge=True)",
        "files_sha256": sha256_tree(out),
    }
