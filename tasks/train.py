"""Stage 4, train: QLoRA SFT with trl's SFTTrainer on a 4-bit NF4 base, LoRA through peft.

Read top to bottom: tokenize the formatted rows into ids + answer-only labels, load the 4-bit base,
build the SFTConfig from params, train (resuming a killed run from its last checkpoint), save the
adapter atomically, write metrics. Guards: a NaN/inf loss or a CUDA OOM stops the run with a message
that says what to change, and no adapter is written.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from tasks import paths
from tasks.artifacts import read_jsonl, sha256_file, sha256_text, staged_dir, write_json
from tasks import attention as attention_impl
from tasks.base_model import load_base_model, load_config, load_tokenizer
from tasks.config import Params, load_params
from tasks.conversation import Rendered
from tasks.errors import PipelineError, run_main
from tasks.lineage import hardware, library_versions
from tasks.memory import Estimate, ModelShape, estimate, plan
from tasks.tokens import tokenize_rendered, truncate

log = logging.getLogger(__name__)
FINGERPRINT = "run.json"


def load_rows(path: Path) -> list[Rendered]:
    if not path.exists():
        raise PipelineError(f"{path} not found: run the format stage first (dvc repro format).")
    return [Rendered(r["text"], [tuple(s) for s in r["answer_spans"]]) for r in read_jsonl(path)]


def build_dataset(tokenizer, rows: list[Rendered], answer_only: bool, max_length: int):
    """ids + labels, cut at max_length here (one place, whatever the batching), rows with no answer left dropped."""
    from datasets import Dataset

    toks = truncate(tokenize_rendered(tokenizer, rows, answer_only=answer_only), max_length)
    if not toks:
        raise PipelineError("no training row has an answer token within model.max_length: raise model.max_length.")
    return Dataset.from_dict({"input_ids": [t.input_ids for t in toks], "labels": [t.labels for t in toks]})


def preflight(params: Params) -> None:
    """Settings that cannot work on this machine fail here, before anything is loaded."""
    t, cuda = params.train, torch.cuda.is_available()
    problems = []
    if not cuda and t.optimizer.startswith("paged"):
        problems.append(f"train.optimizer={t.optimizer} needs a CUDA GPU (use adamw_torch on the CPU)")
    if not cuda and t.liger_kernels:
        problems.append("train.liger_kernels needs a CUDA GPU")
    if not cuda and t.precision == "fp16":
        problems.append("train.precision=fp16 needs a CUDA GPU (use fp32 on the CPU)")
    if cuda and t.precision == "bf16" and not torch.cuda.is_bf16_supported():
        problems.append("this GPU has no bf16: set train.precision=fp16 and quant.compute_dtype=float16")
    if t.padding_free and not attention_impl.available():
        problems.append("train.padding_free needs PyTorch >= 2.10 (torch.nn.attention.varlen) on CUDA")
    if problems:
        raise PipelineError("this configuration cannot run here: " + "; ".join(problems) + ".")


def memory_plan(params: Params) -> tuple[ModelShape, Estimate]:
    """Predict peak memory from the base's config; with a budget, pick the micro-batch that fits."""
    shape = ModelShape.from_config(load_config(params.model))
    est = plan(shape, params, params.train.memory_budget_gib)
    log.info("memory planner: %s", est.describe())
    return shape, est


def run_fingerprint(params: Params, train_rows: Path) -> str:
    """What a checkpoint must match to be resumed: the training params and the exact training data."""
    relevant = {k: params.as_dict()[k] for k in ("model", "quant", "lora", "train")}
    return sha256_text(json.dumps(relevant, sort_keys=True) + sha256_file(train_rows))


def resumable_checkpoint(checkpoint_dir: Path, fingerprint: str) -> bool:
    """True when checkpoint_dir holds checkpoints of this very run; stale ones are removed."""
    marker = checkpoint_dir / FINGERPRINT
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        for ckpt in checkpoint_dir.glob("checkpoint-*"):
            if not (ckpt / "trainer_state.json").exists():  # killed while writing it: unusable
                log.info("removing incomplete checkpoint %s", ckpt)
                shutil.rmtree(ckpt)
        return any(checkpoint_dir.glob("checkpoint-*"))
    if checkpoint_dir.exists():
        log.info("removing checkpoints of a different run in %s", checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": fingerprint})
    return False


def sft_config(params: Params, output_dir: Path, est: Estimate):
    from trl import SFTConfig

    t = params.train
    return SFTConfig(
        output_dir=str(output_dir),
        seed=t.seed,
        data_seed=t.seed,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        per_device_train_batch_size=est.micro_batch,  # the planner keeps batch_size x grad_accum
        gradient_accumulation_steps=est.grad_accum,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        max_length=None,  # rows were cut to model.max_length in build_dataset
        packing=False,
        padding_free=t.padding_free,
        use_liger_kernel=t.liger_kernels,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # the NaN guard must see the real loss
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        include_num_input_tokens_seen="non_padding",
        report_to="none",  # dvclive is attached explicitly below, with our paths
        dataset_num_proc=None,
        use_cpu=not torch.cuda.is_available(),
    )


def _callbacks(resume: bool):
    from transformers import TrainerCallback
    from transformers.integrations import DVCLiveCallback

    class Guard(TrainerCallback):
        """Stops on a non-finite loss and adds tokens/s to every log line (and so to dvclive)."""

        def __init__(self):
            self.t0, self.tokens0 = None, 0
            self.marks: list[tuple[float, int]] = []  # (time, tokens seen) after each optimizer step

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

        def watch(self, model) -> None:
            """Record the largest micro-batch (in tokens) the model is fed: what the peak memory depends on."""
            self.max_tokens = 0

            def hook(module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                if ids is not None and module.training:
                    self.max_tokens = max(self.max_tokens, ids.numel())

            model.register_forward_pre_hook(hook, with_kwargs=True)

        def on_train_end(self, args, state, control, **kw):
            # Read here, before any later callback (a benchmark's held-out pass, say) allocates more.
            self.peak_allocated = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            self.peak_reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        def steady_tokens_per_second(self, skip: int = 2) -> float | None:
            """Throughput after the first `skip` steps (kernel warm-up, allocator growth)."""
            if len(self.marks) <= skip + 1:
                return None
            (t_a, n_a), (t_b, n_b) = self.marks[skip - 1], self.marks[-1]
            return round((n_b - n_a) / (t_b - t_a), 1)

        def on_log(self, args, state, control, logs=None, **kw):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise PipelineError(
                    f"training loss became {loss} at step {state.global_step}. Lower train.learning_rate, "
                    "use precision bf16 rather than fp16, or check the data; no adapter was written."
                )
            if logs is not None and self.t0 is not None:
                logs["tokens_per_second"] = round((state.num_input_tokens_seen - self.tokens0) / (time.perf_counter() - self.t0), 1)

    try:
        from dvclive import Live
    except ImportError:  # a bare GPU box running only the stage code: train without the live plots
        log.warning("dvclive is not installed: metrics are not streamed to %s", paths.DVCLIVE_DIR)
        return Guard(), TrainerCallback()
    live = Live(dir=str(paths.DVCLIVE_DIR), resume=resume, save_dvc_exp=False, dvcyaml=None)
    return Guard(), DVCLiveCallback(live=live)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def train(params: Params, train_rows: Path = paths.TRAIN_ROWS, adapter_dir: Path = paths.ADAPTER_DIR,
          checkpoint_dir: Path = paths.CHECKPOINT_DIR, metrics_path: Path = paths.TRAIN_METRICS,
          extra_callbacks: list | None = None) -> dict:
    from peft import LoraConfig
    from trl import SFTTrainer

    preflight(params)
    rows = load_rows(train_rows)
    tokenizer = load_tokenizer(params.model)
    dataset = build_dataset(tokenizer, rows, params.train.answer_only_loss, params.model.max_length)
    shape, est = memory_plan(params)
    fingerprint = run_fingerprint(params, train_rows)
    resume = resumable_checkpoint(checkpoint_dir, fingerprint)

    attention = attention_impl.register() if params.train.padding_free else "sdpa"
    model = load_base_model(params.model, params.quant, attn_implementation=attention)
    lora = LoraConfig(
        r=params.lora.r, lora_alpha=params.lora.alpha, lora_dropout=params.lora.dropout,
        target_modules=list(params.lora.target_modules), bias=params.lora.bias, task_type="CAUSAL_LM",
    )
    guard, live = _callbacks(resume)
    trainer = SFTTrainer(
        model=model, args=sft_config(params, checkpoint_dir, est), train_dataset=dataset,
        processing_class=tokenizer, peft_config=lora, callbacks=[guard, live, *(extra_callbacks or [])],
    )
    guard.watch(trainer.model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=True if resume else None)
    except torch.OutOfMemoryError:
        free = torch.cuda.mem_get_info()[1] / 2**30
        raise PipelineError(
            f"CUDA out of memory at micro-batch {est.micro_batch}, max_length {params.model.max_length}; the planner "
            f"predicted {est.peak_gib:.1f} GiB on a {free:.0f} GiB GPU. Set train.memory_budget_gib (e.g. "
            f"{max(1, int(free * 0.8))}) so the planner picks a micro-batch that fits, lower model.max_length, "
            "or turn on train.gradient_checkpointing. The last checkpoint is kept: the next run resumes from it."
        ) from None
    wall = time.perf_counter() - start
    state = trainer.state

    with staged_dir(adapter_dir) as tmp:
        trainer.model.save_pretrained(tmp)
        # The training environment, recorded where it is true (publish copies it into the lineage).
        write_json(tmp / "training_run.json", {
            "fingerprint": fingerprint, "train_rows_sha256": sha256_file(train_rows), "seed": params.train.seed,
            "adapter_sha256": sha256_file(tmp / "adapter_model.safetensors"),  # what evaluate and publish must match
            "base_model": params.model.base, "libraries": library_versions(), "hardware": hardware(),
        })
    metrics = {
        "train_loss": round(float(result.training_loss), 6),
        "steps": state.global_step,
        "epochs": round(float(state.epoch or 0), 3),
        "train_rows": len(rows),
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_second": round((state.num_input_tokens_seen - guard.tokens0) / wall, 1),  # this run only
        "steady_tokens_per_second": guard.steady_tokens_per_second(),
        "wall_seconds": round(wall, 2),
        "resumed": resume,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "peak_memory_gib": _round(guard.peak_allocated),
        "peak_reserved_gib": _round(guard.peak_reserved),
        "predicted_peak_gib": est.peak_gib,  # worst case (every row max_length), what the budget is checked against
        "max_micro_batch_tokens": guard.max_tokens,
        "predicted_peak_at_max_micro_batch_gib": estimate(shape, params, est.micro_batch, guard.max_tokens).peak_gib,
        "micro_batch": est.micro_batch,
        "grad_accum": est.grad_accum,
    }
    write_json(metrics_path, metrics)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the run finished: nothing left to resume
    log.info("trained %d steps, loss %.4f, %.0f tokens/s", metrics["steps"], metrics["train_loss"], metrics["tokens_per_second"])
    return metrics


def main() -> None:
    train(load_params())


if __name__ == "__main__":
    run_main("train", main)
