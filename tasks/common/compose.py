"""Compose params.yaml from conf/ with Hydra overrides, the way `dvc exp run -S ...` does.

DVC's own composition function is used so that a Prefect run with preset=X and `dvc exp run -S
preset=X` write the same params.yaml. The result is checked by the typed config before it replaces
the current params.yaml, so a bad override never leaves a broken file behind.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks.common.artifacts import write_bytes
from tasks.common.config import load_params
from tasks.common.errors import PipelineError


def compose_params(project_dir: Path, overrides: list[str]) -> Path:
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException, OverrideParseException

    target = project_dir / "params.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        composed = Path(tmp) / "params.yaml"
        try:
            compose_and_dump(composed, str((project_dir / "conf").resolve()), None, "config", "", overrides)
        except HydraException as e:
            # Hydra's grammar error ("mismatched input ' ('") does not say that the value needs quoting.
            hint = (
                " A value holding parentheses, brackets, braces, commas or quotes must be quoted for Hydra: "
                "key='value' (in a shell, inside the shell's own quotes: -S \"download.path='/data/my (copy).jsonl'\")."
                if isinstance(e, OverrideParseException)
                else ""
            )
            raise PipelineError(f"cannot compose params with overrides {overrides}: {e}.{hint}") from None
        load_params(composed)  # typed check before anything is replaced
        write_bytes(target, composed.read_bytes())
    return target


if __name__ == "__main__":
    import sys

    compose_params(Path.cwd(), sys.argv[1:])
