"""Where a stage's log lines go: the pipeline's own to the terminal, everything whole to logs/<stage>.log.

Libraries (bitsandbytes, great-expectations, transformers, huggingface_hub, ...) log lines that read like failures
and are not, and warn about their own deprecations. Sorting them by the logger's name and by where a warning was
raised, never by the words of a message, keeps the terminal to what this pipeline says while a library rewording
its messages changes nothing; a deprecation notice goes to the file by its category, wherever it points. Anything at
ERROR or above reaches the terminal whoever logs it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from tasks.common import paths

OWN_LOGGERS = ("tasks", "flows", "benchmarks", "__main__")
_PROJECT = Path(__file__).resolve().parent.parent


def _on_terminal(record: logging.LogRecord) -> bool:
    """The pipeline's own records (a warnings.warn is ours when raised from this project's files), and errors."""
    if record.name == "py.warnings":
        own = getattr(record, "own_warning", False)
    else:
        own = record.name.split(".")[0] in OWN_LOGGERS
    return own or record.levelno >= logging.ERROR


class _CountLibrary(logging.Filter):
    """Counts what only the file got, so the stage can say where to look."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count += not _on_terminal(record)
        return True


# A library's deprecation notice points at its caller (stacklevel): raised "from" this project's file, it is still
# the library speaking, to the maintainers of this code (trl's `use_liger_kernel` FutureWarning on a GPU run, say),
# not to the user running the stage. By category, into the log file.
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    here = Path(filename).resolve().is_relative_to(_PROJECT) and ".venv" not in Path(filename).parts
    own = here and not issubclass(category, _DEPRECATIONS)
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    logging.getLogger("py.warnings").warning(text, extra={"own_warning": own})


def _adopt_self_handled_loggers() -> None:
    """transformers, datasets and huggingface_hub log through a terminal handler of their own with propagation off:
    hand every such logger (of the libraries imported so far: the stages import theirs before run_main) back to the
    root logger, so its lines are sorted like everyone else's."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.split(".")[0] in OWN_LOGGERS:
            continue
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # a terminal handler, not a file someone chose
                logger.removeHandler(handler)
        logger.propagate = True


def log_file(stage: str) -> Path:
    rank = os.environ.get("RANK", "0")  # ranks of a multi-GPU run each keep their own file
    return paths.LOG_DIR / (f"{stage}.log" if rank == "0" else f"{stage}.rank{rank}.log")


def configure(stage: str) -> None:
    """Send this process's logging and warnings to the terminal, sorted; open_file adds the stage's log file."""
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setFormatter(logging.Formatter(f"[{stage}] %(message)s"))
    to_terminal.addFilter(_on_terminal)
    root = logging.getLogger()
    root.handlers[:] = [to_terminal]
    root.setLevel(logging.INFO)
    warnings.showwarning = _showwarning
    _adopt_self_handled_loggers()


class _LogFile(logging.FileHandler):
    """The stage's log file. When a write to it fails (the disk filled up during the run), it says so once on the
    terminal and stops, instead of logging's "--- Logging error ---" traceback on every message after."""

    def handleError(self, record: logging.LogRecord) -> None:
        logging.getLogger().removeHandler(self)
        error = sys.exc_info()[1]
        logging.getLogger(__name__).warning(
            "cannot write %s any more (%s): library messages go nowhere from here",
            self.baseFilename,
            getattr(error, "strerror", None) or type(error).__name__,
        )


def open_file(stage: str) -> _CountLibrary | None:
    """Add logs/<stage>.log (replaced each run) to the handlers: called once the stage holds the workspace, so a
    stage refused by another run's lock writes nothing. A log file that cannot be written (a full disk, a
    read-only folder) is said on the terminal and the stage goes on: its outputs do not depend on it."""
    path = log_file(stage)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file = _LogFile(path, mode="w", encoding="utf-8")
    except OSError as e:
        logging.getLogger(__name__).warning(
            "cannot write %s (%s): library messages go nowhere this run", path, e.strerror or type(e).__name__
        )
        return None
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    counter = _CountLibrary()
    to_file.addFilter(counter)
    logging.getLogger().addHandler(to_file)
    return counter


def report(stage: str, counter: _CountLibrary | None) -> None:
    """One line saying where the library messages went, when there were any."""
    if counter is not None and counter.count:
        logging.getLogger(__name__).info(
            "%d library message(s) (warnings included) are in %s", counter.count, log_file(stage)
        )
