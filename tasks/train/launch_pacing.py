"""train.cpu_lead_layers: how far ahead of the GPU the CPU may queue work, counted in decoder layers.

The CPU keeps the GPU fed only by running ahead of it, and PyTorch lets it run as far as CUDA's launch queue allows.
In the 7B recipe's backward it gets up to 90 ms ahead; the queue is then so full that a launch in the optimizer step
(bitsandbytes' 28th, in every step of the de02df7 profile) blocks 57 to 86 ms, and CUDA returns from it only when the
GPU has drained the queue (benchmarks/cuda_launch_stalls.py, part `queue`). From there the CPU has no lead: the rest of
the optimizer's launches, the Trainer's work between steps and the next batch's copies all run with the GPU idle.

Here the CPU records a CUDA event as it starts each decoder layer's forward and each layer's backward, and before
queuing more than `lead` layers beyond the oldest event the GPU has not reached, waits for that event. The lead stays
large enough to cover the host's gaps (`lead` layers of the backward are tens of milliseconds of GPU work on a 7B
model) and the queue never fills, so the optimizer and the next step's start are queued behind work the GPU still has.
Nothing else changes: the same kernels, in the same order on the same stream.

The forward mark is taken in front of the layer's call (around nn.Module.compile's compiled call where the layer is
compiled, so nothing of it is traced); the backward mark is a hook on the layer's output, which autograd runs once that
output's gradient is complete, just before the layer's own backward is queued.

The bound counts layers, not time: a layer of a small model is less GPU work, so the same bound is a shorter lead.
Off (0) by default until it is measured on a GPU: benchmarks/train_throughput.py's ours_compile_lead8 and
ours_compile_lead16 against ours_compile (docs/performance.md says what was measured).
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tasks.train.compilation import decoder_layers

if TYPE_CHECKING:
    from tasks.common.config import Params

log = logging.getLogger(__name__)


class LaunchPacer:
    """Marks on the stream, and a wait for the oldest whenever more than `lead` are outstanding."""

    def __init__(self, lead: int, make_event: Callable[[], object] | None = None):
        if lead < 1:
            raise ValueError("LaunchPacer needs a lead of at least one layer")
        self.lead = lead
        self.make_event = make_event or torch.cuda.Event
        self.outstanding: collections.deque = collections.deque()
        self.marks = self.waits = 0

    def mark(self) -> None:
        event = self.make_event()
        event.record()
        self.outstanding.append(event)
        self.marks += 1
        while len(self.outstanding) > self.lead:
            oldest = self.outstanding.popleft()
            if not oldest.query():  # the GPU is not there yet: the CPU is `lead` layers ahead
                self.waits += 1
                oldest.synchronize()

    def report(self) -> dict:
        return {"lead_layers": self.lead, "marks": self.marks, "waits": self.waits}


def _paced_call(pacer: LaunchPacer, call: Callable, *args, **kwargs):
    pacer.mark()
    out = call(*args, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out
    if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
        hidden.register_hook(lambda grad: pacer.mark())  # returns None: the gradient is left as it is
    return out


def pace_layers(layers: list[torch.nn.Module], pacer: LaunchPacer) -> int:
    """Put `pacer` in front of every decoder layer's forward and backward. Call after compile_layers, if compiling: a
    compiled layer's compiled call is wrapped (outside dynamo's trace); an eager layer's call gets the same wrapper.
    Returns how many layers are paced."""
    for layer in layers:
        inner = layer._compiled_call_impl if layer._compiled_call_impl is not None else layer._call_impl
        # nn.Module.__call__ runs `_compiled_call_impl` when set (it is where nn.Module.compile puts its compiled call)
        layer._compiled_call_impl = functools.partial(_paced_call, pacer, inner)
    return len(layers)


def pace(params: Params, model) -> LaunchPacer | None:
    """train.cpu_lead_layers on CUDA, for the model as the trainer holds it (after compile_layers, if compiling: the
    compiled calls are what gets wrapped). None when unbounded (0) or on the CPU."""
    lead = params.train.cpu_lead_layers
    if not (lead and torch.cuda.is_available()):
        return None
    pacer = LaunchPacer(lead)
    paced = pace_layers(decoder_layers(model), pacer)
    log.info("train.cpu_lead_layers: the CPU queues at most %d of %d decoder layers ahead of the GPU", lead, paced)
    return pacer
