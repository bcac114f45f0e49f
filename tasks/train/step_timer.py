"""The step timer behind steady tokens/s (tasks/train/callbacks.py's ThroughputMeter, metrics/train.json) and the
benchmarks' StepClock (benchmarks/step_clock.py).

Its own module, importing only torch, so that a process without the pipeline's dependencies (benchmarks/unsloth_trl.py,
in Unsloth's venv) times its steps with the same code.
"""

from __future__ import annotations

import time

import torch


class StepTimer:
    """When each optimizer step ended and how many tokens had been seen by then, without stopping the GPU.

    On CUDA each mark is an event recorded on the stream: the CPU can run on into the next step while the GPU
    finishes this one (a synchronize at every step end made it wait, so the GPU waited in turn while the next step
    was prepared), and the events are read once, at the end. Without CUDA, the wall clock."""

    def __init__(self):
        self.marks: list[tuple[object, int]] = []  # (CUDA event or perf_counter seconds, tokens seen)

    def mark(self, tokens: int) -> None:
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((event, tokens))
        else:
            self.marks.append((time.perf_counter(), tokens))

    def seconds_between(self, a: int, b: int) -> float:
        """Seconds from the end of step a+1 to the end of step b+1 (indices into marks)."""
        (t_a, _), (t_b, _) = self.marks[a], self.marks[b]
        if isinstance(t_a, float):
            return t_b - t_a
        t_b.synchronize()
        return t_a.elapsed_time(t_b) / 1000

    def step_times(self) -> list[tuple[float, int]]:
        """(seconds, tokens) of every step after the first."""
        return [
            (self.seconds_between(i, i + 1), self.marks[i + 1][1] - self.marks[i][1])
            for i in range(len(self.marks) - 1)
        ]

    def tokens_per_second(self, skip: int = 2) -> float | None:
        """Tokens/s from the end of step `skip` to the end of the last step (kernel warm-up and allocator growth
        left out)."""
        if len(self.marks) <= skip + 1:
            return None
        seconds = self.seconds_between(skip - 1, len(self.marks) - 1)
        return round((self.marks[-1][1] - self.marks[skip - 1][1]) / seconds, 1)
