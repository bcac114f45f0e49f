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


def code_version() -> dict:
    """The git commit of the code, whether the working tree differed from it, and the code files' own hash."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", "tasks", "flows", "dvc.yaml", "pyproject.toml")
    return {"git_commit": commit, "code_dirty": bool(status) if status is not None else None, "code_sha256": code_sha256()}
