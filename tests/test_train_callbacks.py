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


def test_live_plots_log_lines_do_not_build_a_studio_payload_when_studio_is_off(tmp_path, monkeypatch):
    """dvclive built DVC Studio's payload at every log line even with Studio off, re-parsing its params.yaml of the
    Trainer's arguments (about 45 ms a line, the GPU idle meanwhile). With Studio off, a params file that cannot even
    be parsed must not stop a log line, and the metrics are still written."""
    import json

    from tasks.train.callbacks import live_plots

    monkeypatch.delenv("DVC_STUDIO_TOKEN", raising=False)
    monkeypatch.setenv("DVC_STUDIO_OFFLINE", "true")
    callback = live_plots(False, tmp_path / "live", main_process=True)
    live = callback.live
    (tmp_path / "live").mkdir(exist_ok=True)
    with open(live.params_file, "w") as f:
        f.write("learning_rate: [unclosed\n")  # what dvclive's payload would parse, were it built
    live.log_metric("loss", 1.5)
    live.next_step()
    live.log_metric("loss", 1.25)
    live.next_step()
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["loss"] == 1.25
    assert (tmp_path / "live" / "plots" / "metrics" / "loss.tsv").read_text().count("\n") == 3  # header, 2 steps
