"""Keeping the GPU fed: what makes the CPU wait for the GPU inside a training step, taken out.

A QLoRA step on a 7B model issues thousands of small kernels, and on the GPU machines here the CPU issuing them is
the bottleneck (benchmarks/results/profile_h200: the GPU idle for 30% of a step). The CPU keeps up only by running
ahead, queuing kernels while the GPU works through earlier ones; every synchronize empties that queue, and the GPU
then idles until the CPU is ahead again. These synchronizations are ours to remove, with no change to the math:

- bitsandbytes' optimizers call `torch.cuda.synchronize()` after updating each parameter (128 times a step for LoRA
  r=64 on q/v of Llama-2-7B), and paged ones once more at the end. Its kernels and their order on the stream stay
  as they are; only the waits go. Paged state is CUDA managed memory, read only by kernels on the same stream, and
  a checkpoint's copy to the host waits for the stream anyway.
- The Trainer counts the non-padding tokens of each micro-batch with a `.item()` on the GPU. A padding-free batch
  is one row of real tokens, so the count is its length, known on the host.
- trl's loss (SFTTrainer.compute_loss, trl 1.16) reads four numbers off the GPU between each micro-batch's forward
  and backward: whether any label is valid, the mean entropy and token accuracy it logs, and the token count (again).
  Its fused LM head also picks the labelled positions with a boolean index (`hidden_states[mask]`), whose size the
  CPU must read. Here the loss is trl's own sum (its fused head's log-probabilities over the labelled tokens), the
  two metrics stay on the GPU until a log line reads them, the count comes from the host, and the head scores every
  position and zeroes the unlabelled ones (trl's own path on devices without Triton: the same log-probabilities).
- transformers checks whether a padding-free row holds several sequences with a read off the GPU, once a forward;
  the answer changes nothing for the padding-free attention (packed_check_without_host_read).
- The Trainer copies each micro-batch's tensors to the GPU from pageable memory, and each such copy waits for the
  stream (five a step, padding-free: ids, labels, positions and the two boundary tensors). With pinned memory and
  accelerate's non_blocking (set in the stage's SFTConfig) they are queued like kernels.
- A padding-free micro-batch padded onto train.gemm_warmup's grid (tasks/train/gemm_warmup.py) is longer than its
  rows: `CountRealTokens` has the collator count the real tokens on the host, and every token count uses that.

Host time between steps is also GPU idle time, since each step's start finds the GPU's queue drained (a full launch
queue makes CUDA wait until it is empty: benchmarks/cuda_launch_stalls.py). The Trainer walks every module of the
model four times a step, each walk milliseconds of host time for a 7B model's 1,500 modules: it counts the
parameters for its FLOP estimate, sets every module to training mode, clears every parameter's gradient, and clips
the gradients of every parameter. Here the count is taken once, the training-mode walk is skipped when every module
already trains (a flat check of a list), and only the trainable parameters' gradients are cleared and clipped (a
frozen one never has one).

`train.sync_free_step` switches all of them (on by default); off, the stage runs as stock trl and bitsandbytes do.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

REAL_TOKENS = "num_real_tokens"  # a padding-free micro-batch's tokens before any padding (CountRealTokens)


def step_without_synchronize(self, closure=None):
    """bitsandbytes' Optimizer8bit.step (0.50), without its `sync_gpu` after every parameter and at the end."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if not self.initialized:
        self.check_overrides()
        self.to_gpu()
        self.initialized = True
    with torch.no_grad():
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
    return loss


def drop_optimizer_syncs(optimizer) -> bool:
    """Give a bitsandbytes optimizer the synchronize-free step; anything else is left alone. True if changed."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return False
    if not isinstance(optimizer, Optimizer8bit):
        return False
    optimizer.step = types.MethodType(step_without_synchronize, optimizer)
    return True


class ModelWalk:
    """The model's modules and trainable parameters, listed once: what the Trainer's per-step walks visit."""

    def __init__(self, model):
        self.modules = list(model.modules())
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def all_training(self) -> bool:
        return all(m.training for m in self.modules)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.trainable:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


@contextlib.contextmanager
def train_call_skipped(model, walk: ModelWalk):
    """Inside, `model.train()` returns at once when every module already trains (the call would change nothing)."""
    if not walk.all_training():
        yield
        return
    model.__dict__["train"] = lambda mode=True: model if mode else type(model).train(model, mode)
    try:
        yield
    finally:
        model.__dict__.pop("train", None)


class CountRealTokens:
    """The Trainer's collator, with each batch's count of real tokens added under REAL_TOKENS (a plain int, so it stays
    on the host): a padding-free batch padded onto train.gemm_warmup's grid is longer than its rows."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        batch[REAL_TOKENS] = sum(len(example["input_ids"]) for example in examples)
        return batch


def host_token_count(inputs) -> int | None:
    """Non-padding tokens of a padding-free micro-batch, from the host (no GPU read): the collator's count, or the
    flattened row's length; None for padded batches."""
    if "attention_mask" in inputs or "position_ids" not in inputs or "cu_seq_lens_q" not in inputs:
        return None
    if REAL_TOKENS in inputs:
        return int(inputs[REAL_TOKENS])
    return int(inputs["position_ids"].shape[-1])


@contextlib.contextmanager
def lm_head_without_compaction():
    """trl's fused LM head scoring every position, not only the labelled ones: no boolean index, so no read of its
    size. trl decides by `_use_triton` in its trainer utils (trl 1.16); if that is gone, it stays as trl has it."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: False
    try:
        yield
    finally:
        trl_utils._use_triton = original


@contextlib.contextmanager
def packed_check_without_host_read():
    """transformers' check for packed sequences without its read off the GPU. Before building the attention mask of
    a batch with position ids and no attention mask, transformers 5 asks whether the row holds one sequence or
    several (`masking_utils.find_packed_sequence_indices`): an `.all()` on the GPU that the host waits for, once a
    forward (the one synchronization a step the de02df7 profile still counted). The answer only picks between no
    mask and a mask of sequence ids, and the padding-free attention here builds no mask either way (attention.py's
    `_mask`: the boundaries travel as cu_seq_lens). Inside, the check returns the sequence ids unread, as transformers
    does itself when tracing; if either name is gone, it stays as transformers has it."""
    import transformers.masking_utils as masking_utils

    check = getattr(masking_utils, "find_packed_sequence_indices", None)
    is_tracing = getattr(masking_utils, "is_tracing", None)
    if check is None or is_tracing is None:
        yield
        return

    def ids_unread(position_ids):
        masking_utils.is_tracing = lambda *args, **kwargs: True  # for the check's own data-dependent branch only
        try:
            return check(position_ids)
        finally:
            masking_utils.is_tracing = is_tracing

    masking_utils.find_packed_sequence_indices = ids_unread
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = check


def sync_free_loss_applies(trainer, inputs, return_outputs: bool) -> bool:
    """Whether the synchronize-free loss computes what trl's compute_loss would: one process training on a
    padding-free micro-batch with trl's plain token-mean loss (no custom loss, label smoothing, router loss or DFT)."""
    return (
        trainer.model.training
        and not return_outputs
        and trainer.compute_loss_func is None
        and trainer.label_smoother is None
        and trainer.args.loss_type == "nll"
        and not trainer.aux_loss_enabled
        and trainer.accelerator.num_processes == 1
        and host_token_count(inputs) is not None
    )


@functools.cache
def trainer_class(sync_free: bool):
    """trl's SFTTrainer, or (sync_free) a subclass that keeps the synchronizations above out of each step."""
    from trl import SFTTrainer

    if not sync_free:
        return SFTTrainer

    class SyncFreeSFTTrainer(SFTTrainer):
        def create_optimizer(self, model=None):
            # Here, before the learning-rate scheduler wraps optimizer.step, so the scheduler sees this step.
            optimizer = super().create_optimizer(model)
            drop_optimizer_syncs(optimizer)
            return optimizer

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.padding_free:
                self.data_collator = CountRealTokens(self.data_collator)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real_tokens = inputs.pop(REAL_TOKENS, None)  # the model takes no such argument
            if not sync_free_loss_applies(self, inputs, return_outputs):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            with lm_head_without_compaction(), packed_check_without_host_read():
                outputs = model(**inputs, fused_lm_head=True)
            valid = outputs.label_mask.sum()
            num_tokens = valid if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            # trl's per-micro-batch metrics, zero without a valid label, kept on the GPU until log() reads them
            per_valid = valid.clamp(min=1)
            has_valid = valid > 0
            pending = self.__dict__.setdefault("_pending_metrics", [])
            pending.append(
                torch.stack(
                    [
                        torch.where(has_valid, outputs.entropy.detach().sum() / per_valid, 0.0),
                        torch.where(has_valid, outputs.is_top1.sum() / per_valid, 0.0),
                    ]
                )
            )
            self._total_train_tokens += (real_tokens or host_token_count(inputs)) // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

        def log(self, logs, start_time=None):
            pending = self.__dict__.pop("_pending_metrics", None)
            if pending:  # one read for all the micro-batches since the last log line
                for entropy, accuracy in torch.stack(pending).tolist():
                    self._metrics["train"]["entropy"].append(entropy)
                    self._metrics["train"]["mean_token_accuracy"].append(accuracy)
            return super().log(logs, start_time)

        def training_step(self, model, inputs, num_items_in_batch=None):
            walk = self._walk(model)
            if "zero_grad" not in model.__dict__:  # the Trainer's model.zero_grad() after each optimizer step
                model.__dict__["zero_grad"] = walk.zero_grad
            with train_call_skipped(model, walk):  # the Trainer's model.train() at each micro-batch
                return super().training_step(model, inputs, num_items_in_batch)

        def _clip_grad_norm(self, model):
            # The Trainer clips over model.parameters(), a walk of every module at every step; a frozen parameter has
            # no gradient, so the trainable ones give the same norm and the same clipping. One process only: FSDP's
            # clipping is chosen by comparing the list with the model's whole parameter list.
            mixed = getattr(self, "_has_mixed_mesh_grads", None)
            if self.accelerator.num_processes != 1 or mixed is None or mixed(model):
                return super()._clip_grad_norm(model)
            return self.accelerator.clip_grad_norm_(self._walk(model).trainable, self.args.max_grad_norm)

        def _walk(self, model) -> ModelWalk:
            walks = self.__dict__.setdefault("_walks", {})
            if id(model) not in walks:
                walks[id(model)] = ModelWalk(model)
            return walks[id(model)]

        def floating_point_ops(self, inputs):
            # The Trainer's own estimate (6 x tokens x parameters), with the parameter count taken once: counting walks
            # every module and parameter of the model, host time at every step
            main_input = getattr(self.model, "main_input_name", "input_ids")
            if main_input not in inputs or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if "_parameters_counted" not in self.__dict__:
                self._parameters_counted = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main_input].numel() * self._parameters_counted

        def _track_num_input_tokens(self, inputs):
            count = host_token_count(inputs)
            if count is None or self.args.world_size > 1 or self.args.include_num_input_tokens_seen != "non_padding":
                return super()._track_num_input_tokens(inputs)  # several ranks: the count is a collective anyway
            self.state.num_input_tokens_seen += count

    return SyncFreeSFTTrainer
