"""Keeping the GPU fed: what makes the CPU wait for the GPU inside a training step, taken out.

A QLoRA step on a 7B model issues thousands of small kernels, and on the GPU machines here the CPU issuing them is
the bottleneck (benchmarks/results/profile_h200: the GPU idle for 30% of a step). The CPU keeps up only by running
ahead, queuing kernels while the GPU works through earlier ones; every synchronize empties that queue, and the GPU
then idles until the CPU is ahead again. Two synchronizations a step are ours to remove, with no change to the math:

- bitsandbytes' optimizers call `torch.cuda.synchronize()` after updating each parameter (128 times a step for LoRA
  r=64 on q/v of Llama-2-7B), and paged ones once more at the end. Its kernels and their order on the stream stay
  as they are; only the waits go. Paged state is CUDA managed memory, read only by kernels on the same stream, and
  a checkpoint's copy to the host waits for the stream anyway.
- The Trainer counts the non-padding tokens of each micro-batch with a `.item()` on the GPU. A padding-free batch
  is one row of real tokens, so the count is its length, known on the host.

`train.sync_free_step` switches both (on by default); off, the stage runs as stock trl and bitsandbytes do.
"""

from __future__ import annotations

import functools
import types

import torch


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


def host_token_count(inputs) -> int | None:
    """Non-padding tokens of a padding-free micro-batch, read off its shape (no GPU read); None for padded batches."""
    if "attention_mask" in inputs or "position_ids" not in inputs or "cu_seq_lens_q" not in inputs:
        return None
    return int(inputs["position_ids"].shape[-1])


@functools.cache
def trainer_class(sync_free: bool):
    """trl's SFTTrainer, or (sync_free) a subclass that keeps the two synchronizations above out of each step."""
    from trl import SFTTrainer

    if not sync_free:
        return SFTTrainer

    class SyncFreeSFTTrainer(SFTTrainer):
        def create_optimizer(self, model=None):
            # Here, before the learning-rate scheduler wraps optimizer.step, so the scheduler sees this step.
            optimizer = super().create_optimizer(model)
            drop_optimizer_syncs(optimizer)
            return optimizer

        def _track_num_input_tokens(self, inputs):
            count = host_token_count(inputs)
            if count is None or self.args.world_size > 1 or self.args.include_num_input_tokens_seen != "non_padding":
                return super()._track_num_input_tokens(inputs)  # several ranks: the count is a collective anyway
            self.state.num_input_tokens_seen += count

    return SyncFreeSFTTrainer
