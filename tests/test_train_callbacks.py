"""The step timer behind steady tokens/s (metrics/train.json) and the benchmarks' clock."""

from __future__ import annotations

import types

from tasks.train import step_timer
from tasks.train.step_timer import StepTimer


def test_step_timer_counts_from_the_end_of_the_warm_up(monkeypatch):
    clock = iter([0.0, 4.0, 5.0, 5.5, 6.0])  # a slow first step, then steady ones
    monkeypatch.setattr(step_timer, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    timer = StepTimer()
    assert timer.tokens_per_second() is None
    for tokens in (100, 200, 300, 400, 500):
        timer.mark(tokens)
    assert timer.tokens_per_second(skip=2) == round((500 - 200) / (6.0 - 4.0), 1)
    assert timer.tokens_per_second(skip=1) == round((500 - 100) / 6.0, 1)
    assert timer.step_times() == [(4.0, 100), (1.0, 100), (0.5, 100), (0.5, 100)]
    assert StepTimer().tokens_per_second() is None
