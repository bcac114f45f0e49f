"""Stage 4, train: QLoRA SFT with trl's SFTTrainer on a 4-bit NF4 base, LoRA through peft.

A recipe, read top to bottom as `train()` at the end reads: the set-up steps, each a function named for what it
does (tokenize the formatted rows into ids + answer-only labels, plan memory, load the 4-bit base, build the
trainer from params), then `fit` (resuming a killed run from its last checkpoint), then `finish` (save the
adapter atomically, report metrics). `Run` holds the trainer and what its callbacks measure. A NaN/inf loss or a
CUDA OOM stops the run with a message that says what to change, and no adapter is written (callbacks.py holds the
callbacks).

With train.distributed.mode ddp/fsdp, `python -m tasks.train` re-launches itself as N workers through
accelerate (tasks/train/distributed.py); each worker runs train() below, and rank 0 alone writes the outputs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.common import paths
from tasks.common.artifacts import no_space, sha256_file, staged_dir, write_json
from tasks.common.base_model import load_base_model, load_config, load_tokenizer
from tasks.common.config import Params, batch_split_problem, load_params, with_overrides
from tasks.common.conversation import Rendered
from tasks.common.environment import environment
from tasks.common.errors import PipelineError
from tasks.common.formatted import load_rows
from tasks.common.lineage import hardware, library_versions
from tasks.common.tokens import tokenize_rendered, truncate
from tasks.train import attention as attention_impl
from tasks.train import distributed
from tasks.train.checkpoints import (
    no_space_for_checkpoint,
    resumable_checkpoint,
    resume_in_training_dtype,
    run_fingerprint,
)
from tasks.train.choice import Choice
from tasks.train.compilation import (
    CompileMeter,
    Decision,
    compile_failure,
    compile_layers,
    configuration_key,
    decide,
    remember_compiled,
    use_cache_folder,
)
from tasks.train.dequantized_base import decide as decide_dequantized
from tasks.train.gemm_warmup import TOKEN_GRID, pads_micro_batches, warm_up
from tasks.train.loss_curve import save_loss_curve
from tasks.train.memory import (
    Estimate,
    ModelShape,
    estimate,
    layers_to_recompute,
    liger_applied,
    plan,
    resolve_budget,
    use_expandable_segments,
    visible_gpu_gib,
)
from tasks.train.mfu import mfu
from tasks.train.preflight import preflight
from tasks.train.step_overlap import trainer_class

log = logging.getLogger(__name__)

DATALOADER_WORKERS = 2  # collate ahead of the GPU (sft_config); the collator is light, two keep a step or more ahead


# --- set-up steps -------------------------------------------------------------------------------------------------


def build_dataset(tokenizer, rows: list[Rendered], answer_only: bool, max_length: int):
    """ids + labels, cut at max_length here (one place, whatever the batching), rows with no answer left dropped."""
    from datasets import Dataset

    toks = truncate(tokenize_rendered(tokenizer, rows, answer_only=answer_only), max_length)
    if not toks:
        raise PipelineError("no training row has an answer token within model.max_length: raise model.max_length.")
    return Dataset.from_dict({"input_ids": [t.input_ids for t in toks], "labels": [t.labels for t in toks]})


def model_shape(params: Params) -> ModelShape:
    """The base's shape, from its config alone (the weights are not loaded)."""
    return ModelShape.from_config(load_config(params.model))


def planned_tokens(dataset, params: Params) -> int:
    """The tokens the run will train on: every row's ids, times the epochs (or the share of them max_steps allows)."""
    t = params.train
    tokens = sum(len(ids) for ids in dataset["input_ids"]) * t.epochs
    if t.max_steps > 0:
        steps = math.ceil(len(dataset) / (t.batch_size * t.grad_accum)) * t.epochs
        tokens *= min(1.0, t.max_steps / steps)
    return int(tokens)


def compile_or_not(params: Params, dataset, shape: ModelShape, world_size: int) -> tuple[Params, Decision]:
    """train.compile resolved to true or false for this run (auto weighs the planned run against the compile cost),
    so that the memory plan and the trainer see what will run."""
    decision = decide(params, shape, planned_tokens(dataset, params), world_size)
    return with_overrides(params, **{"train.compile": decision.on}), decision


def dequantize_or_not(
    params: Params, shape: ModelShape, budget_gib: float | None, world_size: int
) -> tuple[Params, Choice]:
    """train.dequantized_base resolved to true or false (auto: where the planner finds room for it)."""
    choice = decide_dequantized(params, shape, budget_gib, world_size)
    return with_overrides(params, **{"train.dequantized_base": choice.on}), choice


def memory_plan(params: Params, shape: ModelShape, budget_gib: float | None) -> Estimate:
    """Predict peak memory from the base's shape; with a budget, pick the fastest fitting layout."""
    est = plan(shape, params, budget_gib)
    log.info("memory planner: %s", est.describe())
    return est


def per_rank_batch(micro_batch: int, grad_accum: int, world_size: int) -> tuple[int, int]:
    """Split the planned global batch (micro_batch x grad_accum = batch_size x grad_accum) over the processes.

    Each rank's micro-batch is the largest divisor of its share that is at most the planned one (so it fits the
    same memory), and micro x accum x world_size stays the global batch: the optimizer steps, the learning-rate
    schedule and so the result do not depend on the number of processes.
    """
    total = micro_batch * grad_accum
    if problem := batch_split_problem(total, world_size):  # params check it too; a user's own launcher may differ
        raise PipelineError(problem)
    share = total // world_size
    micro = max(m for m in range(1, min(micro_batch, share) + 1) if share % m == 0)
    return micro, share // micro


def sft_config(params: Params, output_dir: Path, est: Estimate, world_size: int = 1):
    from trl import SFTConfig

    t = params.train
    micro_batch, grad_accum = per_rank_batch(est.micro_batch, est.grad_accum, world_size)
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
        per_device_train_batch_size=micro_batch,  # the planner keeps batch_size x grad_accum; split over ranks
        gradient_accumulation_steps=grad_accum,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        activation_checkpointing=est.gradient_checkpointing,  # the planner's (train.gradient_checkpointing: auto)
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        max_length=None,  # rows were cut to model.max_length in build_dataset
        packing=False,
        padding_free=t.padding_free,
        # train.gemm_warmup: each padding-free micro-batch padded onto the warm-up's grid of token counts, so that no
        # GEMM meets a token count whose kernel cuBLAS has not loaded (the token counts leave the padding out; it needs
        # the sync-free trainer's count, tasks/train/step_overlap.py)
        pad_to_multiple_of=TOKEN_GRID if pads_micro_batches(params) else None,
        use_liger_kernel=liger_applied(params),
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # the NaN guard must see the real loss
        # No checkpoints under FSDP: with PEFT, the Trainer's sharded FSDP checkpoints hold an empty adapter (PEFT 0.21
        # misses the LoRA weights under FSDP1's nested wrappers; tests/test_distributed.py watches for a fix), so a
        # resumed run would restore the optimizer and step but restart LoRA from its initial weights, silently.
        save_strategy="no" if t.distributed.mode == "fsdp" else "steps",
        save_steps=t.save_steps,
        save_on_each_node=t.distributed.num_machines > 1,  # each host resumes from its own artifacts/checkpoints
        save_total_limit=2,
        include_num_input_tokens_seen="non_padding",
        report_to="none",  # dvclive is attached by build_trainer, with our paths
        dataset_num_proc=None,
        use_cpu=not torch.cuda.is_available(),
        # train.sync_free_step: a micro-batch's tensors (five, padding-free) reach the GPU from pinned memory without a
        # wait each; the Trainer's plain copy synchronizes the stream once per tensor (tasks/train/step_overlap.py)
        accelerator_config={"non_blocking": t.sync_free_step and torch.cuda.is_available()},
        dataloader_pin_memory=torch.cuda.is_available(),
        # On a GPU, two worker processes collate the next micro-batches while the GPU trains on this one: in the main
        # process collating took 4.9 ms a step of the 7B recipe with the GPU idle (benchmarks/results/
        # dequantized_auto_h100_de02df7/profile_ours_compile.json). On the CPU they would only take its cores.
        dataloader_num_workers=DATALOADER_WORKERS if torch.cuda.is_available() else 0,
        dataloader_persistent_workers=torch.cuda.is_available(),
        # DDP: every LoRA weight gets a gradient every step, so no search for unused parameters (it is slower, and
        # fails with reentrant gradient checkpointing). On the CPU the workers' group is gloo (accelerate's choice
        # for CPU too, unless this torch has MPI; named here so it is never MPI).
        ddp_find_unused_parameters=False if world_size > 1 else None,
        ddp_backend="gloo" if world_size > 1 and not torch.cuda.is_available() else None,
    )


def _process_group(world: distributed.World):
    """Under a launcher, join the workers' process group now rather than when the Trainer builds it: rank 0 must
    go first where files are written (the tiny base, the checkpoint marker), and FSDP's cpu_ram_efficient_loading
    reads the group while the base loads. The Trainer then reuses this group. None for a lone process."""
    if world.size == 1:
        return None
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    return PartialState(cpu=cpu, backend="gloo" if cpu else None)


def load_model(params: Params, world: distributed.World):
    """The 4-bit base on this rank's GPU (DDP), or stored for sharding (FSDP), with padding-free attention."""
    if params.train.distributed.mode == "fsdp" and world.rank == 0:
        log.warning(
            "train.distributed.mode=fsdp writes no checkpoints (see sft_config): a killed FSDP run starts "
            "again from step 0"
        )
    attention = attention_impl.register() if params.train.padding_free else "sdpa"
    return load_base_model(
        params.model,
        params.quant,
        attn_implementation=attention,
        gpu=world.local_rank,
        fsdp=params.train.distributed.mode == "fsdp",
    )


@dataclass
class Run:
    """One training run: the trainer, the plan it runs under, and the callbacks whose measurements the metrics read."""

    trainer: object  # trl's SFTTrainer
    params: Params
    shape: ModelShape
    est: Estimate
    resume: bool
    meter: object  # callbacks.ThroughputMeter: tokens/s, peak memory, the longest micro-batch
    recompute: object | None  # callbacks.RecomputeSomeLayers when the planner recomputes some layers only
    compile_meter: object  # compilation.CompileMeter: the first step's cost, graphs, recompilations
    compiled: Decision  # whether the decoder layers are compiled, and why (train.compile: auto decides)
    dequantized: Choice  # whether the 4-bit base is kept dequantized, and why (train.dequantized_base: auto decides)
    gemm_warmup: dict | None = None  # what gemm_warmup.warm_up ran before the first step (None: off, or not on CUDA)

    def layout(self) -> dict:
        """How the run was spread: the mode, the processes, their collective backend."""
        return {
            "mode": self.params.train.distributed.mode,
            "world_size": self.trainer.args.world_size,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        }


def build_trainer(
    params: Params,
    model,
    tokenizer,
    dataset,
    shape: ModelShape,
    est: Estimate,
    decision: Decision,
    dequantized: Choice,
    world: distributed.World,
    checkpoint_dir: Path,
    resume: bool,
    extra_callbacks: list,
) -> Run:
    """SFTTrainer with LoRA from params, the NaN stop, the throughput meter and dvclive (streaming into the
    checkpoint folder, so it resumes with it and replaces dvclive/train only once the run succeeded)."""
    from peft import LoraConfig

    from tasks.train.callbacks import (
        MarkCompleteCheckpoints,
        RecomputeSomeLayers,
        StopOnNonFiniteLoss,
        ThroughputMeter,
        live_plots,
    )
    from tasks.train.dequantized_base import dequantize_base
    from tasks.train.fp8_base import fp8_base

    lora = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=list(params.lora.target_modules),
        bias=params.lora.bias,
        task_type="CAUSAL_LM",
    )
    meter, compile_meter = ThroughputMeter(), CompileMeter()
    live = live_plots(resume, checkpoint_dir / "dvclive", main_process=world.rank == 0)
    recompute = None
    if est.partial_recompute or est.recompute_thresholds:
        recompute = RecomputeSomeLayers(est.recompute_layers, est.recompute_thresholds)
        extra_callbacks = [recompute, *extra_callbacks]
    trainer = trainer_class(params.train.sync_free_step)(
        model=model,
        args=sft_config(params, checkpoint_dir, est, world.size),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[meter, compile_meter, StopOnNonFiniteLoss(), MarkCompleteCheckpoints(), live, *extra_callbacks],
    )
    meter.watch(trainer.model)
    resume_in_training_dtype(trainer)
    log.info("train.dequantized_base (%s): %s", dequantized.setting, dequantized.reason)
    if dequantized.on:
        log.info("train.dequantized_base: %d 4-bit linears dequantized for the run", dequantize_base(trainer.model))
    if params.train.fp8_base:
        log.info("train.fp8_base: %d 4-bit linears kept in float8 for the run", fp8_base(trainer.model))
    log.info("train.compile (%s): %s", decision.setting, decision.reason)
    if decision.on:
        if params.train.liger_kernels:
            log.info("train.liger_kernels: off in this compiled run (inductor fuses the layers; memory.liger_applied)")
        use_cache_folder()
        log.info("train.compile: %d decoder layers compiled (regional torch.compile)", compile_layers(trainer.model))
    return Run(trainer, params, shape, est, resume, meter, recompute, compile_meter, decision, dequantized)


# --- fitting ------------------------------------------------------------------------------------------------------


def fit(trainer, resume: bool, est: Estimate, params: Params):
    """trainer.train(), resuming from the last checkpoint; a CUDA OOM becomes advice on what to change."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        return trainer.train(resume_from_checkpoint=True if resume else None)
    except torch.OutOfMemoryError:
        total = torch.cuda.mem_get_info()[1] / 2**30
        raise PipelineError(
            f"CUDA out of memory at micro-batch {est.micro_batch}, max_length {params.model.max_length}; the planner "
            f"predicted {est.peak_gib:.1f} GiB on a {total:.0f} GiB GPU. Set train.memory_budget_gib to auto (or e.g. "
            f"{max(1, int(total * 0.8))}) so the planner picks a layout that fits, lower model.max_length, or turn on "
            "train.gradient_checkpointing. The last checkpoint is kept: the next run resumes from it."
        ) from None
    except Exception as e:
        if no_space(e):  # a checkpoint (or the live plots) could not be written
            raise no_space_for_checkpoint(Path(trainer.args.output_dir), e) from None
        if params.train.compile is True and compile_failure(e):  # resolved by compile_or_not: auto is gone here
            raise PipelineError(
                f"train.compile: torch.compile failed on the decoder layers ({type(e).__name__}: {str(e)[:500]}); "
                "set train.compile: false to train eagerly."
            ) from e
        raise


# --- the finish step ----------------------------------------------------------------------------------------------


def save_adapter(trainer, params: Params, adapter_dir: Path, fingerprint: str, train_rows: Path, layout: dict):
    """Rank 0 writes the adapter and its run record atomically. Under FSDP the LoRA weights are sharded: gathering
    them is a collective every rank joins (PEFT's own save misses them, see tasks/train/fsdp_adapter.py)."""
    from tasks.train.fsdp_adapter import fsdp_adapter_state
    from tasks.train.fsdp_adapter import save_adapter as save_fsdp_adapter

    trainer.accelerator.wait_for_everyone()  # every rank done training (and writing its last checkpoint files)
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    name = peft_model.active_adapter
    fsdp_weights = fsdp_adapter_state(trainer.model, name) if trainer.is_fsdp_enabled else None
    if not trainer.is_world_process_zero():
        return
    with staged_dir(adapter_dir) as tmp:
        if fsdp_weights is None:
            peft_model.save_pretrained(tmp)
        else:
            save_fsdp_adapter(peft_model, tmp, fsdp_weights, name)
        # The training environment, recorded where it is true (publish copies it into the lineage).
        write_json(
            tmp / "training_run.json",
            {
                "fingerprint": fingerprint,
                "train_rows_sha256": sha256_file(train_rows),
                "seed": params.train.seed,
                "adapter_sha256": sha256_file(tmp / paths.ADAPTER_WEIGHTS),  # what evaluate and publish must match
                "base_model": params.model.base,
                "libraries": library_versions(),
                "environment": environment(),  # every installed distribution, and which lock they match
                "hardware": hardware(),
                "distributed": layout,
            },
        )


def whole_run_loss(state, loss_since_resume: float, resumed_at: int) -> float:
    """The mean training loss over every step of the run, across a resume. The Trainer's training_loss covers only
    the steps since it resumed (so a resumed run would report, and publish as its final loss, a figure of its last
    steps alone); the steps before come from the checkpoint's logged losses, each the mean over its logging window.
    Steps between the last log and the checkpoint have no logged loss and are left out of the mean."""
    if resumed_at == 0:
        return loss_since_resume
    total, covered = 0.0, 0
    for entry in state.log_history:
        if "loss" in entry and entry["step"] <= resumed_at:
            total += entry["loss"] * (entry["step"] - covered)
            covered = entry["step"]
    since = state.global_step - resumed_at
    return (total + loss_since_resume * since) / max(covered + since, 1)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def headline(metrics: dict) -> dict:
    """metrics/train.json, the train row of `dvc metrics show`: short names and rounded figures, so that the one table
    of every stage fits an 80-column terminal. `loss` shares its column with the evaluation's held-out loss. Every
    figure, at full precision, is in reports/training.json."""
    peak = metrics["peak_memory_gib"]
    return {
        "loss": round(metrics["train_loss"], 3),
        "tok/s": round(metrics["tokens_per_second"]),
        "peak_GiB": None if peak is None else round(peak, 1),  # null on the CPU: `dvc metrics show` leaves it out
    }


def run_metrics(run: Run, result, wall: float, rows: int) -> dict:
    """What the run measured and how it was laid out. Under several processes (a collective: every rank calls it):
    train_loss is the mean over ranks, tokens count all ranks (the whole job's throughput), memory is rank 0's GPU,
    and micro_batch and grad_accum are per rank (micro x accum x world_size = the global batch)."""
    trainer, meter, est, layout = run.trainer, run.meter, run.est, run.layout()
    state, args, acc = trainer.state, trainer.args, trainer.accelerator
    # The Trainer's training_loss holds this rank's loss alone after the last logging step: average over ranks.
    train_loss = acc.reduce(torch.tensor(result.training_loss, dtype=torch.float64, device=args.device), "mean").item()
    train_loss = whole_run_loss(state, train_loss, meter.step0)
    peak_per_rank = None
    if torch.cuda.is_available() and args.world_size > 1:  # each GPU's own peak (rank 0 gathers FSDP weights)
        peaks = acc.gather(torch.tensor([meter.peak_allocated], device=args.device)).tolist()
        peak_per_rank = {f"rank{i}": _round(x) for i, x in enumerate(peaks)}  # a dict: `dvc metrics show` flattens it
    micro = args.per_device_train_batch_size
    recomputed_at_max = est.recompute_layers
    if est.recompute_thresholds:  # the longest micro-batch seen may have needed fewer
        recomputed_at_max = layers_to_recompute(est.recompute_thresholds, meter.max_tokens)
    mean_recomputed = run.recompute.mean_recomputed() if run.recompute else None
    tokens_per_second = round(meter.tokens_this_run(state) / wall, 1)
    steady = meter.steady_tokens_per_second()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "train_loss": round(float(train_loss), 6),
        "steps": state.global_step,
        "epochs": round(float(state.epoch or 0), 3),
        "train_rows": rows,
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_second": tokens_per_second,
        "steady_tokens_per_second": steady,
        # per GPU: the steady rate (the whole job's) over the processes
        **mfu((steady or tokens_per_second) / args.world_size, run.shape, device),
        "wall_seconds": round(wall, 2),
        "resumed": run.resume,
        "resumed_from_step": meter.step0,  # 0 unless resumed: the step of the checkpoint it went on from
        "device": device,
        "peak_memory_gib": _round(meter.peak_allocated),
        "peak_reserved_gib": _round(meter.peak_reserved),
        "predicted_peak_gib": est.peak_gib,  # worst case (every row max_length), what the budget is checked against
        "max_micro_batch_tokens": meter.max_tokens,
        "predicted_peak_at_max_micro_batch_gib": estimate(
            run.shape, run.params, micro, meter.max_tokens, est.gradient_checkpointing, recomputed_at_max
        ).peak_gib,
        "micro_batch": micro,
        "grad_accum": args.gradient_accumulation_steps,
        "gradient_checkpointing": est.gradient_checkpointing,
        "recompute_layers": est.recompute_layers,  # of the model's decoder layers; the planner may pick some only
        # train.adaptive_recompute: layers recomputed per micro-batch on average (recompute_layers at the longest)
        "recompute_layers_mean": float(est.recompute_layers) if mean_recomputed is None else mean_recomputed,
        "memory_budget_gib": est.budget_gib,  # what the planner fitted (auto: a share of this GPU's memory)
        "layout_reason": est.reason,
        # train.compile: the decision and its reason, the first step's cost, graphs and recompilations after it
        "compile": {**run.compiled.record(), **run.compile_meter.report([s for s, _ in meter.timer.step_times()])},
        "dequantized_base": run.dequantized.record(),  # train.dequantized_base: on or off, and why
        "gemm_warmup": run.gemm_warmup,  # train.gemm_warmup: the GEMMs run before step 1, and their seconds
        "distributed_mode": layout["mode"],
        **({"peak_memory_gib_per_rank": peak_per_rank} if peak_per_rank else {}),
        "world_size": layout["world_size"],
    }


def finish(
    run: Run,
    result,
    wall: float,
    rows: int,
    fingerprint: str,
    train_rows: Path,
    adapter_dir: Path,
    checkpoint_dir: Path,
    metrics_path: Path,
    report_path: Path,
) -> dict:
    """After a successful fit: the adapter and its run record, the metrics, the live plots and the loss curve in
    place of the last good ones, and the checkpoints removed (nothing left to resume). Rank 0 writes; every rank
    joins the collectives."""
    trainer = run.trainer
    save_adapter(trainer, run.params, adapter_dir, fingerprint, train_rows, run.layout())
    metrics = run_metrics(run, result, wall, rows)
    if trainer.is_world_process_zero():
        live_dir = checkpoint_dir / "dvclive"
        if live_dir.exists():  # the run succeeded: its plots replace the last good ones
            with staged_dir(paths.DVCLIVE_DIR) as tmp:
                shutil.copytree(live_dir, tmp, dirs_exist_ok=True)
            if paths.LOSS_TSV.is_file():
                save_loss_curve(paths.LOSS_TSV, paths.LOSS_CURVE)
        write_json(report_path, metrics)
        write_json(metrics_path, headline(metrics))
        if run.compiled.on and torch.cuda.is_available():  # the next run of this configuration finds the cache warm
            remember_compiled(use_cache_folder(), configuration_key(run.params, run.shape, metrics["device"]))
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the run finished: nothing left to resume
    trainer.accelerator.wait_for_everyone()  # the other ranks end once the adapter and metrics are in place
    log.info(
        "trained %d steps, loss %.4f, %.0f tokens/s",
        metrics["steps"],
        metrics["train_loss"],
        metrics["tokens_per_second"],
    )
    return metrics


# --- the recipe ---------------------------------------------------------------------------------------------------


def train(
    params: Params,
    train_rows: Path = paths.TRAIN_ROWS,
    adapter_dir: Path = paths.ADAPTER_DIR,
    checkpoint_dir: Path = paths.CHECKPOINT_DIR,
    metrics_path: Path = paths.TRAIN_METRICS,
    extra_callbacks: list | None = None,
    report_path: Path = paths.TRAINING,
) -> dict:
    """Train the adapter; returns every figure of the run (report_path gets them all, metrics_path the headline
    ones)."""
    preflight(params)
    if params.train.expandable_segments:
        use_expandable_segments()
    world = distributed.world()  # rank 0 of 1, unless launched as one of several workers
    group = _process_group(world)
    rows = load_rows(train_rows)
    # Each host's first process first: it builds the tiny base if missing and prunes stale checkpoints (files of
    # this host); the host's other processes then find them done.
    with group.local_main_process_first() if group else contextlib.nullcontext():
        tokenizer = load_tokenizer(params.model)
        dataset = build_dataset(tokenizer, rows, params.train.answer_only_loss, params.model.max_length)
        fingerprint = run_fingerprint(params, train_rows)  # train.distributed included: no resume across layouts
        shape = model_shape(params)
        budget = resolve_budget(params.train.memory_budget_gib, visible_gpu_gib())  # GiB (auto: this GPU's share)
        # The base's form first (counting activations as eager: what fits eager fits compiled), then compilation, whose
        # cache key and cost depend on it, then the layout.
        params, dequantized = dequantize_or_not(params, shape, budget, world.size)
        params, decision = compile_or_not(params, dataset, shape, world.size)
        est = memory_plan(params, shape, budget)
        resume = resumable_checkpoint(checkpoint_dir, fingerprint)
    model = load_model(params, world)
    run = build_trainer(
        params,
        model,
        tokenizer,
        dataset,
        shape,
        est,
        decision,
        dequantized,
        world,
        checkpoint_dir,
        resume,
        extra_callbacks or [],
    )
    start = time.perf_counter()
    run.gemm_warmup = warm_up(params, run.trainer.model, run.trainer.args.per_device_train_batch_size)
    result = fit(run.trainer, resume, est, params)
    wall = time.perf_counter() - start
    return finish(
        run, result, wall, len(rows), fingerprint, train_rows, adapter_dir, checkpoint_dir, metrics_path, report_path
    )


def main() -> None:
    distributed.die_with_launcher()  # a worker of launch() below: stop when the launching process is killed
    params = load_params()
    pinned = distributed.one_gpu_env(params, torch.cuda.device_count())
    if pinned is not None:  # mode single on a multi-GPU box: restart this stage seeing one GPU (CUDA reads it at start)
        log.warning(
            "train.distributed.mode=single with %d GPUs visible: training on GPU %s alone (set mode ddp or "
            "fsdp and num_processes to use them all)",
            torch.cuda.device_count(),
            pinned["CUDA_VISIBLE_DEVICES"],
        )
        os.execve(sys.executable, [sys.executable, "-m", distributed.MODULE], pinned)
    if distributed.needs_launch(params):
        preflight(params)  # fail here, before N processes start
        sys.exit(distributed.launch(params))  # re-run this stage as N workers; their exit status is ours
    train(params)
