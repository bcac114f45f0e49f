"""A stage's terminal shows the pipeline's own lines; library messages go whole to logs/<stage>.log.

Sorted by logger name and by where a warning was raised, never by a message's words: the probe's library lines
are made up here, so a library rewording its messages cannot change what this test sees.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tasks.common import paths
from tests.conftest import ROOT

PROBE = textwrap.dedent(
    """
    import logging, sys
    sys.path.insert(0, {lib_dir!r})
    import transformers.utils.logging as tf_logging  # imported before the stage starts, as the stages do
    from tasks.common.runner import run_main

    def stage():
        logging.getLogger("tasks.probe").info("OURS-INFO")
        logging.getLogger("great_expectations.data_context").info("LIB-INFO")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("LIB-WARNING")
        tf_logging.get_logger("transformers.modeling_utils").warning("TRANSFORMERS-WARNING")
        import fake_library  # warns a FutureWarning from its own file, outside this project
        logging.getLogger("some.library").error("LIB-ERROR")

    run_main("probe", stage)
    """
)


def _run_probe(probe: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", probe],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def _warning_from_our_code(text: str, category: str = "UserWarning") -> str:
    """A stage whose warnings.warn is raised from a file of this project (tasks/probe.py, compiled in place)."""
    code = f"import warnings; warnings.warn({text!r}, {category})"
    return (
        "from tasks.common.runner import run_main\n"
        f"def stage():\n    exec(compile({code!r}, {str(ROOT / 'tasks' / 'probe.py')!r}, 'exec'))\n"
        "run_main('probe', stage)\n"
    )


def test_library_lines_go_to_the_stage_log_not_the_terminal(tmp_path):
    lib_dir = tmp_path / "site"
    lib_dir.mkdir()
    (lib_dir / "fake_library.py").write_text(
        "import warnings\nwarnings.warn('LIB-DEPRECATION: old_name is deprecated', FutureWarning)\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(lib_dir=str(lib_dir))],
        cwd=work,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    assert "[probe] OURS-INFO" in terminal
    assert "LIB-ERROR" in terminal  # errors reach the terminal whoever logs them
    for quiet in ("LIB-INFO", "LIB-WARNING", "TRANSFORMERS-WARNING", "LIB-DEPRECATION"):
        assert quiet not in terminal, quiet
    log = (work / paths.LOG_DIR / "probe.log").read_text()
    for line in ("OURS-INFO", "LIB-INFO", "LIB-WARNING", "TRANSFORMERS-WARNING", "LIB-DEPRECATION", "LIB-ERROR"):
        assert line in log, line
    assert "FutureWarning" in log and "great_expectations.data_context" in log  # whole: category and logger kept
    # The terminal says where the rest went.
    assert str(paths.LOG_DIR / "probe.log") in terminal


def test_a_warning_of_the_pipelines_own_code_stays_on_the_terminal(tmp_path):
    probe = _warning_from_our_code("OURS-WARNING")
    proc = _run_probe(probe, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "OURS-WARNING" in proc.stderr


def test_a_librarys_deprecation_pointing_at_our_code_goes_to_the_log_file(tmp_path):
    """trl warns `use_liger_kernel` is deprecated with stacklevel=2: the warning names this project's file, but it is
    the library's notice to maintainers, by its category: the log file, not the user's terminal."""
    probe = _warning_from_our_code("OLD-API", "FutureWarning")
    proc = _run_probe(probe, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "OLD-API" not in proc.stderr
    assert "OLD-API" in (tmp_path / paths.LOG_DIR / "probe.log").read_text()


def test_a_log_file_that_cannot_be_written_is_said_and_the_stage_goes_on(tmp_path):
    (tmp_path / paths.LOG_DIR).write_text("a file where the logs folder belongs\n")
    probe = (
        "import logging\nfrom tasks.common.runner import run_main\n"
        "run_main('probe', lambda: logging.getLogger('tasks.probe').info('OURS-DONE'))\n"
    )
    proc = _run_probe(probe, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"cannot write {paths.LOG_DIR / 'probe.log'}" in proc.stderr and "OURS-DONE" in proc.stderr
