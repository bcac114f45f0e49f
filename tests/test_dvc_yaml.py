"""dvc.yaml and the code: each stage's deps list exactly the code it runs, and its paths are tasks/common/paths.py's."""

from __future__ import annotations

import yaml

from tasks.common import paths
from tasks.publish.stage_code import STAGES, stage_code
from tests.conftest import ROOT


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_depends_on_exactly_the_code_it_runs():
    """Editing any module a stage imports (directly or not) must re-run that stage, and nothing else is listed."""
    stages = _stages()
    assert tuple(stages) == STAGES
    for stage in STAGES:
        listed = sorted(d for d in stages[stage]["deps"] if d.endswith(".py"))
        expected = stage_code(stage, ROOT)
        assert listed == expected, (
            f"dvc.yaml stage {stage!r}: code deps differ from what `python -m tasks.{stage}` imports.\n"
            f"missing: {sorted(set(expected) - set(listed))}\nnot imported: {sorted(set(listed) - set(expected))}"
        )
        assert stages[stage]["cmd"] == f"python -m tasks.{stage}"


def test_the_import_walk_follows_imports_inside_functions(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "a.py").write_text("from tasks import b\n")
    (tmp_path / "tasks" / "b.py").write_text("def f():\n    from tasks.c import x\n")
    (tmp_path / "tasks" / "c.py").write_text("import tasks.d\nimport os\n")
    (tmp_path / "tasks" / "d.py").write_text("")
    assert stage_code("a", tmp_path) == ["tasks/a.py", "tasks/b.py", "tasks/c.py", "tasks/d.py"]


def test_a_stage_package_runs_its_init_main_and_the_packages_above_what_it_imports(tmp_path):
    for package in ("tasks", "tasks/s", "tasks/common"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "tasks" / "s" / "__main__.py").write_text("from tasks.s.stage import main\n")
    (tmp_path / "tasks" / "s" / "stage.py").write_text("from tasks.common import paths\nfrom tasks.common.x import f\n")
    (tmp_path / "tasks" / "common" / "paths.py").write_text("")
    (tmp_path / "tasks" / "common" / "x.py").write_text("")
    (tmp_path / "tasks" / "common" / "unused.py").write_text("")
    assert stage_code("s", tmp_path) == [
        "tasks/__init__.py",
        "tasks/common/__init__.py",
        "tasks/common/paths.py",
        "tasks/common/x.py",
        "tasks/s/__init__.py",
        "tasks/s/__main__.py",
        "tasks/s/stage.py",
    ]


def test_every_output_persists_and_matches_tasks_paths():
    """persist: a failed stage keeps the last good outputs (each stage swaps its outputs in only on success)."""
    declared = {}
    for stage in _stages().values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                ((path, opts),) = entry.items()
                declared[path] = opts
    assert all(opts.get("persist") is True for opts in declared.values()), declared
    for expected in (
        paths.RAW_DIR,
        paths.VALIDATED_DIR,
        paths.VALIDATION_REPORT_DIR,
        paths.VALIDATION_METRICS,
        paths.LENGTH_HISTOGRAM,
        paths.FORMATTED_DIR,
        paths.ADAPTER_DIR,
        paths.TRAIN_METRICS,
        paths.EVAL_METRICS,
        paths.EVALUATION,
        paths.TRAINING,
        paths.GENERATIONS,
        paths.EVAL_RUN,
        paths.RELEASE_DIR,
    ):
        assert str(expected) in declared, expected


def test_every_output_is_swept_of_what_a_killed_run_left():
    """The next stage removes a killed run's temporary names beside (or inside) paths.WRITTEN: every output is one
    of them or inside one."""
    from pathlib import PurePosixPath

    written = [PurePosixPath(p) for p in paths.WRITTEN]
    for stage in _stages().values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                ((path, _),) = entry.items()
                assert any(PurePosixPath(path).is_relative_to(w) for w in written), path


def test_the_metrics_table_fits_80_columns_with_a_gpu_runs_widest_figures(tmp_path):
    """`dvc metrics show` prints every stage's headline row in one table: with a GPU run's extra column (peak
    memory) and the widest figures a run gives (ten million rows excluded, five-digit losses and tokens/s), it
    still fits an 80-column terminal. The CPU sample's own table is checked in test_pipeline_e2e."""
    import json
    import subprocess

    from tasks.evaluate.stage import headline as eval_headline
    from tasks.train.stage import headline as train_headline
    from tasks.validate.stage import headline as validate_headline

    rows = {
        paths.VALIDATION_METRICS: validate_headline({"success": False, "rows": 10**7, "rows_excluded": 10**7 - 1}),
        paths.TRAIN_METRICS: train_headline(
            {"train_loss": 12.34567, "tokens_per_second": 99999.4, "peak_memory_gib": 79.96}
        ),
        paths.EVAL_METRICS: eval_headline(
            {"base": {"loss": 11.18173}, "tuned": {"loss": 10.75391, "stop_rate": 0.9375}}
        ),
    }
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    for path, figures in rows.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(figures))
    table = subprocess.run(
        ["dvc", "metrics", "show", *map(str, rows)], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert "peak_GiB" in table and "99999" in table, table
    assert max(map(len, table.splitlines())) <= 80, table
