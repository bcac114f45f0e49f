"""The code each stage runs, and the record of it a release carries.

A stage runs its module and every `tasks` module it imports, directly or through another. dvc.yaml must list
exactly these as the stage's code deps, or editing one would not re-run the stage and a release could claim
code that did not make it (tests/test_dvc_yaml.py holds dvc.yaml to this). Imports are read from the source
(module level and inside functions alike), so nothing is imported to find them. publish records the git
commit, a hash over the code and, per stage, the files it ran; the audit checks them.
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
from pathlib import Path

from tasks.common.paths import STAGES


def _imported_tasks_modules(path: Path) -> set[str]:
    """The `tasks` names a file imports: `import tasks.a.b`, `from tasks.a import b` (b a module or a name in a)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("tasks.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tasks" or node.module.startswith("tasks."):
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}  # a submodule, if a file holds it
    return names


def _files(module: str, root: Path) -> list[str]:
    """The files importing `module` runs: each enclosing package's __init__.py, then the module's own file (a
    package's __init__.py); none for a name that is not a module (a function imported from one)."""
    parts = module.split(".")
    own = root.joinpath(*parts)
    if own.with_suffix(".py").is_file():
        own_file = own.with_suffix(".py")
    elif (own / "__init__.py").is_file():
        own_file = own / "__init__.py"
    else:
        return []
    packages = [root.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts))]
    return [f.relative_to(root).as_posix() for f in (*packages, own_file) if f.is_file()]


def stage_code(stage: str, root: Path | str = ".") -> list[str]:
    """Sorted repo-relative paths of the .py files `python -m tasks.<stage>` runs (a stage package runs its
    __init__.py and __main__.py, then whatever they import)."""
    root = Path(root)
    seen: set[str] = set()
    files: set[str] = set()
    todo = [f"tasks.{stage}", f"tasks.{stage}.__main__"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        found = _files(module, root)
        files.update(found)
        for path in found:
            todo.extend(_imported_tasks_modules(root / path))
    return sorted(files)


# The code that decides what an artifact holds: the stage modules, the flows and the DVC pipeline.
CODE_GLOBS = ("tasks/**/*.py", "flows/*.py", "dvc.yaml", "pyproject.toml")


def code_sha256(root: Path | str = ".") -> str:
    """One hash over the code files (path + content), so an audit can tell the code apart even without git."""
    root, digest = Path(root), hashlib.sha256()
    for path in sorted({p for pattern in CODE_GLOBS for p in root.glob(pattern) if p.is_file()}):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()  # DVC's own file hash, so records compare with dvc.lock


def stage_code_hashes(
    root: Path | str = ".", from_lock: bool = True, running: str | None = None
) -> dict[str, dict[str, str]]:
    """What code each stage ran: {stage: {file: md5}} over exactly the modules it imports (tasks/publish/stage_code.py).

    For a stage DVC ran, the md5s dvc.lock recorded when it ran (the code of that run, even if the files changed
    since); for the stage `running` now (publish, recording itself: dvc.lock still holds its previous run until it
    ends), for stages called without DVC, and with from_lock=False, the files as they are now.
    """
    import yaml

    root = Path(root)
    lock_file = root / "dvc.lock"
    locked = yaml.safe_load(lock_file.read_text())["stages"] if from_lock and lock_file.exists() else {}
    record = {}
    for stage in STAGES:
        ran = {} if stage == running else {d["path"]: d.get("md5") for d in locked.get(stage, {}).get("deps", [])}
        record[stage] = {f: ran.get(f) or _md5(root / f) for f in stage_code(stage, root)}
    return record


# Every tracked path whose uncommitted edit changes what a run does: code, the pipeline, params and their Hydra
# sources, DVC's record of the stages, and the environment's lock. An edit of any makes the record `dirty`.
RUN_INPUTS = ("tasks", "flows", "dvc.yaml", "dvc.lock", "params.yaml", "conf", "pyproject.toml", "requirements")


def code_version(running: str | None = None) -> dict:
    """The git commit of the code, whether the working tree differed from it, the code files' own hash, and each
    stage's code (`running`: the stage recording this, whose dvc.lock entry is still its last run's)."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", *RUN_INPUTS)
    dirty = sorted(line.split(maxsplit=1)[1] for line in status.splitlines()) if status is not None else None
    return {
        "git_commit": commit,
        "code_dirty": bool(dirty) if dirty is not None else None,
        "dirty_files": dirty,
        "code_sha256": code_sha256(),
        "stages": stage_code_hashes(running=running),
    }
