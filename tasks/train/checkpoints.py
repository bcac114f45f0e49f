"""Checkpoints of a training run: which run they belong to, and whether a new run may resume from them.

A checkpoint is resumed only by the very run that wrote it: the same training params and the same training
rows (the fingerprint). The audit recomputes the same fingerprint to tie an adapter to its params and data.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tasks.common.artifacts import sha256_file, sha256_text, space_reason, write_json
from tasks.common.config import Params
from tasks.common.errors import DiskFull

log = logging.getLogger(__name__)
FINGERPRINT = "run.json"
COMPLETE = "complete.json"  # in a checkpoint folder once every file of it is written (callbacks.py)


def run_fingerprint(params: Params, train_rows: Path) -> str:
    """What a checkpoint must match to be resumed: the training params and the exact training data."""
    relevant = {k: params.as_dict()[k] for k in ("model", "quant", "lora", "train")}
    return sha256_text(json.dumps(relevant, sort_keys=True) + sha256_file(train_rows))


def resumable_checkpoint(checkpoint_dir: Path, fingerprint: str) -> bool:
    """True when checkpoint_dir holds checkpoints of this very run; stale ones are removed."""
    marker = checkpoint_dir / FINGERPRINT
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        for ckpt in checkpoint_dir.glob("checkpoint-*"):
            if not (ckpt / COMPLETE).exists():  # cut short (a kill, a full disk) while it was written: unusable
                log.info("removing incomplete checkpoint %s", ckpt)
                shutil.rmtree(ckpt)
        return any(checkpoint_dir.glob("checkpoint-*"))
    if checkpoint_dir.exists():
        log.info("removing checkpoints of a different run in %s", checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": fingerprint})
    return False


def no_space_for_checkpoint(checkpoint_dir: Path, error: BaseException) -> DiskFull:
    """The one line train stops with when a checkpoint could not be written (a full disk, a file-size limit)."""
    complete = sorted(
        (c for c in Path(checkpoint_dir).glob("checkpoint-*") if (c / COMPLETE).exists()),
        key=lambda c: int(c.name.split("-")[-1]),
    )
    biggest = max((sum(f.stat().st_size for f in c.rglob("*") if f.is_file()) for c in complete), default=0)
    why = space_reason(checkpoint_dir, error)
    last = f"the next run resumes from {complete[-1].name}" if complete else "no complete checkpoint is kept"
    need = f" (a checkpoint takes {biggest / 2**20:.1f} MiB)" if biggest else ""
    return DiskFull(
        f"no space to write a checkpoint in {checkpoint_dir}: {why}. The unfinished one will not be resumed from; "
        f"{last}; no adapter was written. Free space{need} and run the train stage again."
    )
