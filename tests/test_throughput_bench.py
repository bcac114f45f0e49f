"""The throughput benchmark's bookkeeping (benchmarks/train_throughput.py): turn order, resuming, the loss check."""

from __future__ import annotations

from benchmarks.train_throughput import LOSS_TOLERANCE, REFERENCE, check_losses, loss_gap, turns


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
