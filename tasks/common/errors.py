"""One error type for everything a user can fix (tasks/common/runner.py prints it as one paragraph, not a traceback)."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the user's input or setup. The message says what is wrong and what to do."""


class ValidationFailed(PipelineError):
    """The data broke the validation suite; the report names the rows and the rules."""


class DiskFull(PipelineError):
    """An output could not be written: its filesystem is full, or a file-size limit (ulimit -f) was reached."""
