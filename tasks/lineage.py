"""Facts about the environment an artifact was made in: library versions, the whole installed set against the lock,
and hardware.

Captured where they are true (the training environment at train time) and gathered into each release's
lineage.json by the publish stage; the code record is tasks/stage_code.py's.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

import torch

from tasks.artifacts import sha256_file

LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "tokenizers",
    "great_expectations",
    "dvc",
    "dvclive",
    "prefect",
    "pandas",
    "pydantic",
)


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return info


# The lock files a fresh clone installs from (Makefile, docs/environment.md); each variant's pins are compared with
# what is installed to say which one this environment is.
LOCK_DIR = Path("requirements")
LOCK_VARIANTS = ("cpu.lock", "gpu.lock")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict[str, str]:
    """Every distribution this interpreter imports from, {normalized name: version}; where two copies exist (a venv
    over the host's packages), the one found first on sys.path, as import finds it."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_normal(name), dist.version)
    return found


def lock_pins(lock: Path) -> dict[str, str]:
    """A lock file's pins that apply to this interpreter and platform (markers evaluated), {name: version}."""
    from packaging.requirements import Requirement

    pins = {}
    for line in lock.read_text().splitlines():
        line = line.strip().removesuffix("\\").strip()
        if not line or line.startswith(("#", "--", "-")):
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            (spec,) = req.specifier
            pins[_normal(req.name)] = spec.version
    return pins


def lock_differences(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """'name: locked X, installed Y' for each pin the environment does not hold."""
    return [
        f"{name}: locked {version}, installed {installed.get(name, 'nothing')}"
        for name, version in sorted(pins.items())
        if installed.get(name) != version
    ]


def environment(root: Path | str = ".") -> dict:
    """The whole Python environment: every installed distribution (and the sha256 of that list), the lock files'
    sha256, and the lock variant whose every pin is installed (None, with the differences, when none is)."""
    root = Path(root)
    installed = installed_distributions()
    listing = sorted(f"{name}=={version}" for name, version in installed.items())
    locks = {
        str(LOCK_DIR / name): sha256_file(root / LOCK_DIR / name)
        for name in ("build.lock", *LOCK_VARIANTS)
        if (root / LOCK_DIR / name).is_file()
    }
    matched, differences = None, {}
    for name in LOCK_VARIANTS:
        lock = root / LOCK_DIR / name
        if lock.is_file():
            differences[str(LOCK_DIR / name)] = lock_differences(lock_pins(lock), installed)
            if not differences[str(LOCK_DIR / name)]:
                matched = str(LOCK_DIR / name)
                break
    return {
        "python": sys.version.split()[0],
        "lock": matched,
        "lock_differences": {} if matched else differences,
        "locks_sha256": locks,
        "distributions_sha256": hashlib.sha256("\n".join(listing).encode()).hexdigest(),
        "distributions": listing,
    }
