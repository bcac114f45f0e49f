"""What the train stage attaches to the Trainer: a stop on a non-finite loss, a throughput and memory meter, the
marker of a complete checkpoint, and dvclive's live plots."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from tasks.common import paths
from tasks.common.artifacts import write_json
from tasks.common.errors import PipelineError
from tasks.train.checkpoints import COMPLETE
from tasks.train.step_timer import StepTimer

log = logging.getLogger(__name__)


def on_training_forward(model, see_tokens) -> None:
    """Call see_tokens(tokens in the micro-batch) before each training forward of model (padded or padding-free:
    the input's element count, what activation memory grows with)."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and module.training:
            see_tokens(ids.numel())

    model.register_forward_pre_hook(hook, with_kwargs=True)


class StopOnNonFiniteLoss(TrainerCallback):
    """A NaN/inf loss stops the run at once (logging_nan_inf_filter is off so this sees the real loss)."""

    def on_log(self, args, state, control, logs=None, **kw):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise PipelineError(
                f"training loss became {loss} at step {state.global_step}. Lower train.learning_rate, "
                "use precision bf16 rather than fp16, or check the data; no adapter was written."
            )


class MarkCompleteCheckpoints(TrainerCallback):
    """The Trainer writes a checkpoint's files one after another (weights, optimizer, state, RNG); on_save runs once
    all are on disk. Its marker is what makes a checkpoint resumable (checkpoints.py): one cut short by a full disk
    or a kill has none, and is removed rather than resumed from."""

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            write_json(
                Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE, {"step": state.global_step}
            )


class ThroughputMeter(TrainerCallback):
    """Tokens/s on every log line (and so in dvclive), steady tokens/s after warm-up, peak GPU memory, and the
    largest micro-batch in tokens (what the peak depends on)."""

    def __init__(self):
        self.t0, self.tokens0, self.max_tokens, self.step0 = None, 0, 0, 0
        self.peak_allocated = self.peak_reserved = None
        self.timer = StepTimer()

    def watch(self, model) -> None:
        on_training_forward(model, lambda tokens: setattr(self, "max_tokens", max(self.max_tokens, tokens)))

    def on_train_begin(self, args, state, control, **kw):
        self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
        self.step0 = state.global_step  # a resumed run: the checkpoint's step
        if self.step0 and state.is_world_process_zero:  # said, so a resumed run is told from a restart at step 0
            log.info("resumed at step %d of %d from the last complete checkpoint", self.step0, state.max_steps)

    def on_step_end(self, args, state, control, **kw):
        self.timer.mark(state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kw):
        # wall clock: the Trainer has just read the loss off the GPU, so the time is not ahead of the work
        if logs is not None and self.t0 is not None:
            logs["tokens_per_second"] = round(self.tokens_this_run(state) / (time.perf_counter() - self.t0), 1)

    def on_train_end(self, args, state, control, **kw):
        # Read here, before any later callback (a benchmark's held-out pass, say) allocates more.
        if torch.cuda.is_available():
            self.peak_allocated = torch.cuda.max_memory_allocated() / 2**30
            self.peak_reserved = torch.cuda.max_memory_reserved() / 2**30

    def tokens_this_run(self, state) -> int:
        return state.num_input_tokens_seen - self.tokens0  # a resumed run counts from where it resumed

    def steady_tokens_per_second(self, skip: int = 2) -> float | None:
        """Throughput after the first `skip` steps (kernel warm-up, allocator growth)."""
        return self.timer.tokens_per_second(skip)


class RecomputeSomeLayers(TrainerCallback):
    """Gradient checkpointing on the first `layers` decoder layers only, the memory planner's partial layout; with
    `thresholds` (tasks/memory.recompute_thresholds), on as few of them as each micro-batch's token count needs.

    The Trainer turns recomputation on for every layer when training begins; this runs right after and turns it off
    for the rest, which then keep their activations. Which layers are recomputed changes no result, only memory.
    (transformers' own `every_n_layers` recomputes 1/n of the layers; the planner needs any count from 1 to all.)
    The adaptive count is set by a forward pre-hook on the model, before its first layer runs. In a compiled run the
    switch is read inside each layer's compiled forward (transformers wraps `forward`): a recomputed layer breaks the
    graph at torch.utils.checkpoint and runs eagerly (compilation.compile_settings says why), the others stay
    compiled, and flipping the switch recompiles nothing (tests/test_compilation.py)."""

    def __init__(self, layers: int, thresholds: list[int] | None = None):
        self.layers, self.thresholds = layers, thresholds
        self.decoder_layers: list = []
        self.micro_batches = self.recomputed = 0  # training forwards seen, and layers they recomputed, summed

    def on_train_begin(self, args, state, control, model=None, **kw):
        from transformers.modeling_layers import GradientCheckpointingLayer

        from tasks.train.memory import layers_to_recompute

        self.decoder_layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for index, layer in enumerate(self.decoder_layers):
            layer.gradient_checkpointing = index < self.layers
        total = len(self.decoder_layers)
        if self.thresholds is None:
            log.info("recomputation on for %d of %d decoder layers", min(self.layers, total), total)
            return
        log.info(
            "recomputation on for up to %d of %d decoder layers, by micro-batch tokens (none up to %d tokens)",
            min(self.layers, total),
            total,
            self.thresholds[0],
        )

        on_training_forward(model, lambda tokens: self._switch(layers_to_recompute(self.thresholds, tokens)))

    def _switch(self, layers: int) -> None:
        for index, layer in enumerate(self.decoder_layers):
            layer.gradient_checkpointing = index < layers
        self.micro_batches += 1
        self.recomputed += min(layers, len(self.decoder_layers))

    def mean_recomputed(self) -> float | None:
        """Layers recomputed per training micro-batch, on average (None when not adaptive or before training)."""
        return round(self.recomputed / self.micro_batches, 2) if self.micro_batches else None


def live_plots(resume: bool, live_dir: Path, main_process: bool) -> TrainerCallback:
    """dvclive streaming into live_dir (rank 0 only: it writes files); a no-op without dvclive installed."""
    try:
        from transformers.integrations import DVCLiveCallback

        from dvclive import Live
    except ImportError:  # a bare GPU box running only the stage code: train without the live plots
        log.warning("dvclive is not installed: metrics are not streamed to %s", paths.DVCLIVE_DIR)
        return TrainerCallback()
    if not main_process:  # rank 0's logs already hold the loss of all ranks
        return TrainerCallback()

    class OptimizerStepLive(DVCLiveCallback):
        """transformers' callback advances dvclive's step once per log line, so with logging_steps 2 the plots'
        "step" ran 0..14 over 30 optimizer steps; here each line is logged at its optimizer step (a resumed run
        continues at the checkpoint's step, whatever dvclive counted)."""

        def on_log(self, args, state, control, **kwargs):
            self.live.step = state.global_step
            super().on_log(args, state, control, **kwargs)

    class LocalLive(Live):
        """dvclive's Live, minus the Studio payload when nothing will be posted. Every log line, dvclive builds the
        payload for DVC Studio whether or not Studio is set up, and that re-parses its params.yaml of the Trainer's
        arguments: about 45 ms of CPU a log line (cProfile of the tiny run: 1.4 of its 6 s), while the GPU waits.
        dvclive skips the post itself when Studio is off ("data" in its events to skip); the payload goes with it."""

        def post_data_to_studio(self):
            if "data" not in getattr(self, "_studio_events_to_skip", ()):
                super().post_data_to_studio()

    return OptimizerStepLive(live=LocalLive(dir=str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=None))
