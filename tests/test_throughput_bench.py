"""The throughput benchmark's bookkeeping (benchmarks/train_throughput.py): turn order, resuming, the loss check."""

from __future__ import annotations

import pytest

from benchmarks import train_throughput
from benchmarks.train_throughput import (
    LOSS_TOLERANCE,
    REFERENCE,
    UNSLOTH,
    UNSLOTH_RECIPE,
    _median_run,
    add_ratios,
    check_losses,
    loss_gap,
    turns,
)


def test_turns_interleave_and_resume_where_the_last_command_stopped():
    names = [REFERENCE, "ours_compile", "ours_16gib_compile"]
    assert turns(names, 2, {}) == [(r, n) for r in (0, 1) for n in names]
    done = {REFERENCE: [{}, {}], "ours_compile": [{}, {}], "ours_16gib_compile": [{}]}
    assert turns(names, 2, done) == [(1, "ours_16gib_compile")]
    assert turns(names, 3, done) == [(1, "ours_16gib_compile"), *[(2, n) for n in names]]


def test_loss_gap_is_the_largest_relative_distance_at_the_same_steps():
    assert loss_gap([10.0, 9.0], [10.0, 9.09]) == abs(9.0 - 9.09) / 9.09
    assert loss_gap([10.0], [10.0, 9.0]) is None  # different numbers of logged steps: nothing comparable
    assert loss_gap([], []) is None


def test_same_math_configs_are_checked_against_every_reference_run():
    # the figures of the H200 run where ours kept the recipe's cosine schedule and plain trl a constant one
    plain = [11.0752, 10.2743, 9.5339, 9.5199]
    cosine = [11.1213, 10.4548, 9.8374, 10.053]
    runs = {REFERENCE: [{"losses": plain}], "ours_compile": [{"losses": cosine}], "ours_same": [{"losses": plain}]}
    results = {name: dict(rs[0]) for name, rs in runs.items()}
    results["big_batch"] = {"losses": cosine}  # not the same math: not checked
    runs["big_batch"] = [{"losses": cosine}]
    check_losses(results, runs)
    assert results["ours_compile"]["same_math_loss_check"] == "FAIL"
    assert results["ours_compile"]["loss_max_rel_gap_vs_reference"] > 0.05 > LOSS_TOLERANCE
    assert results["ours_same"]["same_math_loss_check"] == "pass"
    assert "same_math_loss_check" not in results["big_batch"]


def test_unsloth_with_the_recipe_settings_is_checked_as_same_math_and_its_docs_settings_are_not():
    plain = [11.0752, 10.2743, 9.5339, 9.5199]
    runs = {REFERENCE: [{"losses": plain}], UNSLOTH_RECIPE: [{"losses": [x * 1.002 for x in plain]}]}
    runs[UNSLOTH] = [{"losses": plain}]
    results = {name: dict(rs[0]) for name, rs in runs.items()}
    check_losses(results, runs)
    assert results[UNSLOTH_RECIPE]["same_math_loss_check"] == "pass"
    assert "same_math_loss_check" not in results[UNSLOTH]  # dropout 0 and 8-bit Adam: not plain_trl's math


def test_an_unsloth_configuration_without_its_venv_is_recorded_as_skipped_not_run(monkeypatch, tmp_path):
    monkeypatch.setenv("UNSLOTH_PYTHON", str(tmp_path / "no-venv" / "bin" / "python"))
    monkeypatch.setattr(train_throughput.subprocess, "run", lambda *a, **k: pytest.fail("no process for a skip"))
    r = train_throughput.run_process(UNSLOTH, "run 1")
    assert r["skipped"] is True and "no Unsloth python at" in r["error"] and "gpu_acceptance.sh unsloth" in r["error"]
    # the invocation's summary takes it like a failed run: no tokens/s, no ratio, no crash
    results = {
        REFERENCE: {"tokens_per_second": 1000.0},
        UNSLOTH: _median_run([r]),
        "ours_compile": {"tokens_per_second": 2500.0},
    }
    add_ratios(results)
    assert "speedup_vs_unsloth" not in results["ours_compile"] and "speedup_vs_reference" not in results[UNSLOTH]
    assert results["ours_compile"]["speedup_vs_reference"] == 2.5


def test_every_row_is_divided_by_each_reference_that_ran():
    results = {
        REFERENCE: {"tokens_per_second": 1000.0},
        UNSLOTH: {"tokens_per_second": 2000.0},
        UNSLOTH_RECIPE: {"tokens_per_second": 1600.0},
        "ours_compile": {"tokens_per_second": 3000.0},
    }
    add_ratios(results)
    assert results["ours_compile"]["speedup_vs_reference"] == 3.0
    assert results["ours_compile"]["speedup_vs_unsloth"] == 1.5
    assert results["ours_compile"]["speedup_vs_unsloth_recipe"] == 1.88
    assert results[UNSLOTH]["speedup_vs_reference"] == 2.0
    assert "speedup_vs_trl_tuned" not in results["ours_compile"]  # trl_tuned did not run


def test_fp8_runs_are_checked_by_their_heldout_loss_against_bf16_not_as_same_math():
    from benchmarks.train_throughput import check_fp8_losses, check_losses

    runs = {name: [{"losses": [2.0, 1.0]}] for name in ("plain_trl", "epoch_compile_deq", "epoch_compile_fp8")}
    results = {
        "plain_trl": {},
        "epoch_compile_deq": {"heldout_loss": 2.0},
        "epoch_compile_fp8": {"heldout_loss": 2.0 * 1.004},
    }
    check_losses(results, runs)
    assert "same_math_loss_check" not in results["epoch_compile_fp8"]  # float8 matmuls are not plain trl's math
    check_fp8_losses(results)
    assert results["epoch_compile_fp8"]["fp8_loss_check"] == "pass"
    results["epoch_compile_fp8"]["heldout_loss"] = 2.0 * 1.006
    check_fp8_losses(results)
    assert results["epoch_compile_fp8"]["fp8_loss_check"] == "FAIL"
