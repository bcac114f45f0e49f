"""Compose params.yaml from conf/ with Hydra overrides, the way `dvc exp run -S ...` does.

DVC's own composition function is used so that a Prefect run with preset=X and `dvc exp run -S
preset=X` write the same params.yaml. The result is checked by the typed config before it replaces
the current params.yaml, so a bad override never leaves a broken file behind.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

from tasks.common.artifacts import write_bytes
from tasks.common.config import load_params
from tasks.common.errors import PipelineError

# What Hydra reads in an unquoted override value (its grammar's unquoted characters); anything else, a letter
# outside ASCII (é), a typographic dash (–), brackets or a comma, it reads only inside quotes.
_UNQUOTED = frozenset(string.ascii_letters + string.digits + "_-+./\\$%*@?|:~ ")


def unquoted_problem(override: str) -> str | None:
    """Why Hydra cannot read `override` as written, in words, or None."""
    key, sep, value = override.partition("=")
    if not sep or value[:1] in ("'", '"', "[", "{") or "${" in value:  # quoted, a list, a dict, an interpolation
        return None
    bad = next((c for c in value if c not in _UNQUOTED), None)
    if bad is None:
        return None
    return (
        f"the value of {key.lstrip('+~')} holds {bad!r}, which Hydra reads only inside quotes: {key}='{value}' "
        f"(in a shell, inside the shell's own quotes: -S \"{key}='{value}'\"). A value holding parentheses, "
        "brackets, braces, commas, quotes, a letter outside ASCII or a typographic dash must be quoted for Hydra: "
        "key='value'"
    )


def compose_params(project_dir: Path, overrides: list[str]) -> Path:
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException, OverrideParseException

    for override in overrides:  # before Hydra, whose own words for it ("mismatched input") say nothing of quoting
        if problem := unquoted_problem(override):
            raise PipelineError(f"cannot compose params with override {override!r}: {problem}.")
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

    try:
        compose_params(Path.cwd(), sys.argv[1:])
    except PipelineError as e:  # a user's override: the message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
