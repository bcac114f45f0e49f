"""The format stage's output as the train and evaluate stages read it: rendered rows with their answer spans."""

from __future__ import annotations

from pathlib import Path

from tasks.common.artifacts import read_jsonl
from tasks.common.conversation import Rendered
from tasks.common.errors import PipelineError


def load_rows(path: Path) -> list[Rendered]:
    if not path.exists():
        raise PipelineError(f"{path} not found: run the format stage first (dvc repro format).")
    return [Rendered(r["text"], [tuple(s) for s in r["answer_spans"]]) for r in read_jsonl(path)]
