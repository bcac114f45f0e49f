"""The peer for speed: benchmarks/plain_trl.py's QLoRA SFT loaded and trained through Unsloth, in Unsloth's own venv.

Run by benchmarks/train_throughput.py (configurations `unsloth`, `unsloth_nogc`, `unsloth_recipe`) with the python
named by UNSLOTH_PYTHON: a venv made beside ours from the GPU machine's torch python (gpu_acceptance.sh's `unsloth`
phase, Unsloth 2026.10.9 with trl 1.15.0, transformers 5.17.0, datasets 4.8.5, since Unsloth caps those below what
the pipeline uses). Our repo is on its PYTHONPATH, but none of our dependencies are installed there: this file imports
only the standard library at module level, then Unsloth (first, as its docs require: it patches transformers, trl
and peft as they import), then trl and benchmarks/step_clock.py (transformers and tasks/train/step_timer.py only).

The same rows in the same order as plain_trl: the `text` of data/formatted/train.jsonl, batch 8, no accumulation,
length-grouped with the Trainer's default seed (42; Unsloth's SFTConfig would otherwise default to 3407, which reorders
the batches), max_length 1024, no packing. The same measure: StepClock on the Trainer's non-padding token count
(`include_num_input_tokens_seen="non_padding"`, which Unsloth's SFTConfig would otherwise default off) from the end
of step 2 to the end of the last. Settings:

  unsloth         what Unsloth's docs recommend: its `FastLanguageModel.from_pretrained` + `get_peft_model` path as in
                  the docs' fine-tuning guide and notebooks and the LoRA hyperparameters guide
                  (unsloth.ai/docs/get-started/fine-tuning-llms-guide/lora-hyperparameters-guide): load_in_4bit with
                  Unsloth's own NF4 config (double quantization on), dtype auto (bf16 on H100/H200),
                  lora_dropout 0 and bias "none" ("optimized"), use_gradient_checkpointing "unsloth" (the docs' and
                  the code's default: offloaded recomputation, on for a card of any size), optimizer adamw_8bit, and
                  Unsloth's own choice of padding-free batching (auto). With the recipe's r 64 / alpha 16 / lr 2e-4 and
                  plain_trl's target modules (q_proj, v_proj): the docs would adapt all seven linear layers, which
                  trains a different, larger adapter, so tokens/s would not compare the same work.
  unsloth_nogc    the same without recomputation (use_gradient_checkpointing False): the docs' comment reads
                  `True or "unsloth" for very long context`, and batch 8 x 1024 tokens on a 7B fits an 80 GB card
                  without it (trl_tuned and ours run without it); the fastest Unsloth a user with this card would pick.
  unsloth_recipe  the recipe's (and plain_trl's) settings through Unsloth: plain_trl's BitsAndBytesConfig (NF4, bf16
                  compute, no double quantization), r 64 / alpha 16 / dropout 0.1, paged_adamw_32bit, lr 2e-4, weight
                  decay 0.001, max_grad_norm 0.3, constant schedule, bf16, gradient checkpointing on (trl's default,
                  as plain_trl has it; plain HF recomputation, not Unsloth's offloaded one). Only Unsloth's kernels
                  (fused LoRA with dropout, RoPE, RMSNorm, cross-entropy) differ from plain_trl.

Prints one line `RESULT {json}` in the schema of train_throughput.run_plain_trl.

    UNSLOTH_PYTHON -m benchmarks.unsloth_trl --setting unsloth --model-dir M --train-jsonl J --out-dir O --max-steps 40
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.plain_trl import MAX_LENGTH, SAME_ROWS_AND_MATH  # standard library only at import

TARGET_MODULES = ["q_proj", "v_proj"]  # peft's default for Llama, what plain_trl.py trains
# per setting: LoRA dropout, use_gradient_checkpointing, optimizer, whether plain_trl's BitsAndBytesConfig is passed
SETTINGS: dict[str, dict] = {
    "unsloth": {"lora_dropout": 0.0, "gradient_checkpointing": "unsloth", "optim": "adamw_8bit", "recipe_bnb": False},
    "unsloth_nogc": {"lora_dropout": 0.0, "gradient_checkpointing": False, "optim": "adamw_8bit", "recipe_bnb": False},
    "unsloth_recipe": {
        "lora_dropout": 0.1,
        "gradient_checkpointing": True,
        "optim": "paged_adamw_32bit",
        "recipe_bnb": True,
    },
}


def _unsloth():
    """Unsloth, imported before transformers, trl and peft (it patches them as they import; its docs require this
    order). The GPU machine is offline: no Hub look-ups, no usage statistics fetched at load."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth

    return unsloth


def train_unsloth(model_dir: Path, train_jsonl: Path, out_dir: Path, max_steps: int, setting: str, callbacks: list):
    FastLanguageModel = _unsloth().FastLanguageModel
    import torch
    from datasets import load_dataset
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    s = SETTINGS[setting]
    cuda = torch.cuda.is_available()  # the CPU only for a smoke run of this script (Unsloth's CPU backend)
    bf16 = cuda and torch.cuda.is_bf16_supported()
    dataset = load_dataset("json", data_files=str(train_jsonl), split="train").select_columns(["text"])
    extra = {}
    if s["recipe_bnb"]:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16,
        )
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(model_dir),
        max_seq_length=MAX_LENGTH,
        dtype=None,  # auto: bf16 where the card has it
        load_in_4bit=True,
        **extra,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=64,
        target_modules=TARGET_MODULES,
        lora_alpha=16,
        lora_dropout=s["lora_dropout"],
        bias="none",
        use_gradient_checkpointing=s["gradient_checkpointing"],
        max_seq_length=MAX_LENGTH,
    )
    args = SFTConfig(
        output_dir=str(out_dir),
        **SAME_ROWS_AND_MATH,
        # set where Unsloth's SFTConfig defaults differ from the Trainer's: accumulation 2, seed 3407 (which would
        # reorder the batches), logging every step, bf16 off
        gradient_accumulation_steps=1,
        seed=42,
        logging_steps=10,
        bf16=bf16,
        fp16=cuda and not bf16,
        optim=s["optim"],
        max_steps=max_steps,
        # trl's default is on; Unsloth's `use_gradient_checkpointing` above decides which kind
        gradient_checkpointing=s["gradient_checkpointing"] is not False,
    )
    trainer = SFTTrainer(
        model=model,
        train_dataset=dataset,
        processing_class=tokenizer,
        args=args,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def run(setting: str, model_dir: Path, train_jsonl: Path, out_dir: Path, max_steps: int) -> dict:
    """Train and return the result in the schema of train_throughput.run_plain_trl."""
    import importlib.metadata as md

    _unsloth()  # first: StepClock imports transformers
    import torch

    from benchmarks.step_clock import StepClock

    clock = StepClock()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = train_unsloth(model_dir, train_jsonl, out_dir, max_steps, setting, [clock])
    s = SETTINGS[setting]
    tokens_seen = int(trainer.state.num_input_tokens_seen)
    padding_free = bool(getattr(trainer.args, "padding_free", False))
    versions = {p: md.version(p) for p in ("unsloth", "unsloth_zoo", "trl", "transformers", "peft", "bitsandbytes")}
    return {
        "steps": trainer.state.global_step,
        "micro_batch": 8,
        "grad_accum": 1,
        "tokens_seen": tokens_seen,
        # no count, no rate: a Trainer that stopped counting must not read as 0 tok/s or as the reference's figure
        "tokens_per_second": clock.tokens_per_second() if tokens_seen else None,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "predicted_peak_gib": None,
        "max_micro_batch_tokens": None,
        "predicted_at_max_micro_batch_gib": None,
        "gradient_checkpointing": s["gradient_checkpointing"],
        "layout_reason": (
            f"Unsloth {versions['unsloth']} {setting}: recompute {s['gradient_checkpointing']!r}, "
            f"dropout {s['lora_dropout']}, {s['optim']}, padding-free {padding_free}"
        ),
        "padding_free": padding_free,
        "versions": versions,
        "losses": clock.losses,
        **({} if tokens_seen else {"error": "the Trainer's num_input_tokens_seen stayed 0: no tokens/s"}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=SETTINGS, required=True)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--train-jsonl", type=Path, required=True)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--max-steps", type=int, required=True)
    a = ap.parse_args()
    result = run(a.setting, a.model_dir, a.train_jsonl, a.out_dir, a.max_steps)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
