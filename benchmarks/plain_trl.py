"""The reference for speed: QLoRA SFT written the way the notebooks and trl's docs write it, nothing of ours.

4-bit NF4 base (bf16 compute), `use_cache=False`, pad = eos with right padding, peft's default LoRA targets
for Llama (q_proj, v_proj) at r=64 / alpha 16 / dropout 0.1, and `SFTTrainer` on the `text` column with
trl's defaults (gradient checkpointing on, no packing, loss on every token, logged every 10 steps), batch 8,
paged AdamW 32-bit, group_by_length as the notebooks set it, max_length 1024. It trains on the `text` of the
same formatted rows the pipeline trains on (data/formatted/train.jsonl), so both see the same conversations.

`tuned=True` is the second reference: the same script as an informed trl user tunes it for one large GPU
(gradient checkpointing off, Liger's kernels through `use_liger_kernel`, bf16, batch 8), the same rows in the same
order. benchmarks/train_throughput.py runs them as the configurations `plain_trl` and `trl_tuned`, interleaved with
ours.
"""

from __future__ import annotations

from pathlib import Path

MAX_LENGTH = 1024
# What makes a run see the same rows in the same order with the same math as this reference: SFTConfig's settings
# that benchmarks/unsloth_trl.py shares (it must not import trl before Unsloth, so they are plain keywords here)
SAME_ROWS_AND_MATH = dict(
    per_device_train_batch_size=8,
    learning_rate=2e-4,
    weight_decay=0.001,
    max_grad_norm=0.3,
    warmup_steps=0.03,
    lr_scheduler_type="constant",
    train_sampling_strategy="group_by_length",
    max_length=MAX_LENGTH,
    packing=False,
    dataset_text_field="text",
    include_num_input_tokens_seen="non_padding",
    save_strategy="no",
    report_to="none",
)


def train_plain_trl(
    model_dir: Path, train_jsonl: Path, out_dir: Path, max_steps: int, callbacks: list, tuned: bool = False
):
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()  # the CPU only for a smoke run of this script (no paged optimizer, no bf16)
    dataset = load_dataset("json", data_files=str(train_jsonl), split="train").select_columns(["text"])
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=bnb_config,
        dtype=torch.bfloat16 if cuda else torch.float32,
        device_map={"": 0} if cuda else "cpu",
        use_kernels=False,  # the default fetches Hub kernels at load time: the GPU machine here is offline
    )
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    peft_config = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(out_dir),
        **SAME_ROWS_AND_MATH,
        bf16=cuda,
        optim="paged_adamw_32bit" if cuda else "adamw_torch",
        max_steps=max_steps,
        use_cpu=not cuda,
        # the tuned reference: no recomputation (a 7-8B QLoRA fits an 80 GB card without it) and Liger's fused
        # RMSNorm/RoPE/SwiGLU/linear-cross-entropy kernels, as trl's docs offer them
        **(dict(gradient_checkpointing=False, use_liger_kernel=True) if tuned else {}),
    )
    trainer = SFTTrainer(
        model=model,
        train_dataset=dataset,
        peft_config=peft_config,
        processing_class=tokenizer,
        args=args,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer
