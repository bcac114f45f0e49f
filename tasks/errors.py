"""One error type for everything a user can fix, and the entry-point wrapper that prints it plainly."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A problem with the user's input or setup. The message says what is wrong and what to do."""


class ValidationFailed(PipelineError):
    """The data broke the validation suite; the report names the rows and the rules."""


def run_main(stage: str, fn: Callable[[], object]) -> None:
    """Run a stage entry point: user-fixable errors print one paragraph and exit 2, not a traceback."""
    logging.basicConfig(level=logging.INFO, format=f"[{stage}] %(message)s")
    try:
        fn()
    except PipelineError as e:
        print(f"\n[{stage}] ERROR: {e}\n", file=sys.stderr)
        sys.exit(2)
