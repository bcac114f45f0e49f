"""Checkpoints of a training run: which run they belong to, and whether a new run may resume from them.

A checkpoint is resumed only by the very run that wrote it: the same training params and the same training
rows (the fingerprint). The audit recomputes the same fingerprint to tie an adapter to its params and data.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tasks.common.artifacts import sha256_file, sha256_text, write_json
from tasks.common.config import Params

log = logging.getLogger(__name__)
FINGERPRINT = "run.json"


def run_fingerprint(params: Params, train_rows: Path) -> str:
    """What a checkpoint must match to be resumed: the training params and the exact training data."""
    relevant = {k: params.as_dict()[k] for k in ("model", "quant", "lora", "train")}
    return sha256_text(json.dumps(relevant, sort_keys=True) + sha256_file(train_rows))


def resumable_checkpoint(checkpoint_dir: Path, fingerprint: str) -> bool:
    """True when checkpoint_dir holds checkpoints of this very run; stale ones are removed."""
    marker = checkpoint_dir / FINGERPRINT
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        for ckpt in checkpoint_dir.glob("checkpoint-*"):
            if not (ckpt / "trainer_state.json").exists():  # killed while writing it: unusable
                log.info("removing incomplete checkpoint %s", ckpt)
                shutil.rmtree(ckpt)
        return any(checkpoint_dir.glob("checkpoint-*"))
    if checkpoint_dir.exists():
        log.info("removing checkpoints of a different run in %s", checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": fingerprint})
    return False
