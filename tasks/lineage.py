"""Facts about how an artifact was made: code commit, library versions, hardware.

Captured where they are true (the training environment at train time, the code at publish time)
and gathered into each release's lineage.json by the publish stage.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "tokenizers",
             "great_expectations", "dvc", "dvclive", "prefect", "pandas", "pydantic")


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict:
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_count": torch.cuda.device_count(),
                 "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return info


# The code that decides what an artifact holds: the stage modules, the flows and the DVC pipeline.
CODE_GLOBS = ("tasks/*.py", "flows/*.py", "dvc.yaml", "pyproject.toml")


def code_sha256(root: Path | str = ".") -> str:
    """One hash over the code files (path + content), so an audit can tell the code apart even without git."""
    root, digest = Path(root), hashlib.sha256()
    for path in sorted({p for pattern in CODE_GLOBS for p in root.glob(pattern) if p.is_file()}):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()  # DVC's own file hash, so records compare with dvc.lock


def stage_code_hashes(root: Path | str = ".", from_lock: bool = True) -> dict[str, dict[str, str]]:
    """What code each stage ran: {stage: {file: md5}} over exactly the modules it imports (tasks/stage_code.py).

    For a stage DVC ran, the md5s dvc.lock recorded when it ran (the code of that run, even if the files changed
    since); for the others (publish itself, or stages called without DVC), and with from_lock=False, the files
    as they are now.
    """
    import yaml

    from tasks.stage_code import STAGES, stage_code

    root = Path(root)
    lock_file = root / "dvc.lock"
    locked = yaml.safe_load(lock_file.read_text())["stages"] if from_lock and lock_file.exists() else {}
    record = {}
    for stage in STAGES:
        ran = {d["path"]: d.get("md5") for d in locked.get(stage, {}).get("deps", [])}
        record[stage] = {f: ran.get(f) or _md5(root / f) for f in stage_code(stage, root)}
    return record


def code_version() -> dict:
    """The git commit of the code, whether the working tree differed from it, and the code files' own hash."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", "tasks", "flows", "dvc.yaml", "pyproject.toml")
    return {"git_commit": commit, "code_dirty": bool(status) if status is not None else None, "code_sha256": code_sha256(),
            "stages": stage_code_hashes()}
