"""The benchmarks' clock: one measure for the pipeline's runs, the trl references and Unsloth.

Imports only transformers and tasks.train.step_timer (torch), so benchmarks/unsloth_trl.py can use it from Unsloth's
own venv, where the pipeline's other dependencies are not installed.
"""

from __future__ import annotations


class StepClock:
    """Tokens/s from the Trainer's non-padding token count, from the end of step `skip` to the end of the last step
    (tasks.train.step_timer.StepTimer: CUDA events, no synchronize between steps), and the logged losses; the same
    measure for the reference and for ours."""

    def __new__(cls, skip: int = 2):
        from transformers import TrainerCallback

        from tasks.train.step_timer import StepTimer

        class _Clock(TrainerCallback):
            def __init__(self):
                self.timer = StepTimer()
                self.losses: list[float] = []

            def on_step_end(self, args, state, control, **kw):
                self.timer.mark(state.num_input_tokens_seen)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))

            def tokens_per_second(self) -> float | None:
                return self.timer.tokens_per_second(skip)

        return _Clock()
