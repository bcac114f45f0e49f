"""The code each stage runs: its module and every `tasks` module it imports, directly or through another.

dvc.yaml must list exactly these as the stage's code deps, or editing one would not re-run the stage and a
release could claim code that did not make it (tests/test_dvc_yaml.py holds dvc.yaml to this). Imports are
read from the source (module level and inside functions alike), so nothing is imported to find them.
"""

from __future__ import annotations

import ast
from pathlib import Path

STAGES = ("download", "validate", "format", "train", "evaluate", "publish")


def _imported_tasks_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("tasks.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tasks":  # from tasks import paths, distributed
                names |= {f"tasks.{a.name}" for a in node.names}
            elif node.module.startswith("tasks."):
                names.add(node.module)
    return names


def stage_code(stage: str, root: Path | str = ".") -> list[str]:
    """Sorted repo-relative paths of the .py files `python -m tasks.<stage>` runs."""
    root = Path(root)
    seen: set[str] = set()
    todo = [f"tasks.{stage}"]
    while todo:
        module = todo.pop()
        path = root / (module.replace(".", "/") + ".py")
        if module in seen or not path.is_file():  # a package name (`tasks`) or a missing file: nothing to follow
            continue
        seen.add(module)
        todo.extend(_imported_tasks_modules(path))
    return sorted(m.replace(".", "/") + ".py" for m in seen)
