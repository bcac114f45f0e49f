"""The stage runner every `python -m tasks.<stage>` goes through: logging, SIGTERM as Ctrl-C, the workspace lock, the
sweep of what a killed run left, and a user-fixable error (tasks/common/errors.py) printed as one paragraph instead of
a traceback."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from tasks.common import paths, run_lock, stage_log
from tasks.common.artifacts import chain, no_space, sweep_leftovers
from tasks.common.errors import PipelineError


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job, `kill`, a container shutting down), raised like Ctrl-C so the same
    clean-up runs: Python's default for SIGTERM ends the process at once and left a stage's temp file behind."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _sweep_killed_runs() -> None:
    """A SIGKILL (the OOM killer, a machine going down, a scheduler's hard stop) ends a stage before any clean-up:
    its temporary files and folders stay beside the outputs, never in their place, and DVC, which does not see them
    (.dvcignore), may never run that stage again. Every stage removes them before it writes anything: the workspace
    lock, held now by this run, proves no writer of them is alive. Not in a folder without DVC, where no lock keeps
    two runs apart, nor in the workers a multi-process train launches (its launcher swept before starting them)."""
    if not Path(".dvc").is_dir() or "LOCAL_RANK" in os.environ:
        return
    removed = sweep_leftovers([*paths.WRITTEN, run_lock.HOLDER_FILE])
    if removed:
        logging.getLogger(__name__).info(
            "removed what a killed run left unfinished: %s", ", ".join(str(p) for p in removed)
        )


def run_main(stage: str, fn: Callable[[], object]) -> None:
    """Run a stage entry point: user-fixable errors print one paragraph and exit 2, not a traceback.

    Every stage goes through here, so this is where a stage takes the workspace lock (tasks/common/run_lock.py): a
    stage started while another run holds the workspace refuses before it touches anything."""
    stage_log.configure(stage)  # ours to the terminal; everything to logs/<stage>.log once the stage runs
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit fails the write (EFBIG), not the process
    try:
        with run_lock.hold_for_stage(stage) or contextlib.nullcontext():
            library_lines = stage_log.open_file(stage)
            _sweep_killed_runs()
            fn()
        stage_log.report(stage, library_lines)
    except PipelineError as e:
        print(f"\n[{stage}] ERROR: {e}\n", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if not no_space(e):
            raise
        # a write outside the stage's own outputs (a log, a library's cache): its outputs are whole, as above
        where = next((x.filename for x in chain(e) if getattr(x, "filename", None)), None) or "a file (a cache)"
        print(
            f"\n[{stage}] ERROR: no space to write {where} (the disk is full or a file-size limit was "
            "reached); every output is as the last good run left it. Free space and run it again.\n",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt as e:
        # Ctrl-C or SIGTERM: each output is replaced whole or not at all, so none is half-written; say so instead
        # of a traceback. 130 and 143 are the shell's codes for SIGINT and SIGTERM.
        print(
            f"\n[{stage}] interrupted: no output is half-written (each is replaced whole or not at all); "
            "run it again to finish.\n",
            file=sys.stderr,
        )
        sys.exit(143 if isinstance(e, Terminated) else 130)
