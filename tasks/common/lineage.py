"""Facts about the environment an artifact was made in: library versions and hardware (tasks/common/environment.py: the
whole installed set against the lock).

Captured where they are true (the training environment at train time) and gathered into each release's
lineage.json by the publish stage; the code record is tasks/publish/stage_code.py's.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import torch

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
