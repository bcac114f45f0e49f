"""Checkpoints of a training run: which run they belong to, and whether a new run may resume from them.

A checkpoint is resumed only by the very run that wrote it: the same training params and the same training
rows (the fingerprint). The audit recomputes the same fingerprint to tie an adapter to its params and data.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import yaml

from tasks.common.artifacts import sha256_file, sha256_text, space_reason, write_json, write_text
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
        steps = [int(c.name.split("-")[-1]) for c in checkpoint_dir.glob("checkpoint-*")]
        if steps:
            live_plots_as_of(checkpoint_dir / "dvclive", max(steps))  # the Trainer resumes from the last one
        return bool(steps)
    if checkpoint_dir.exists():
        log.info("removing checkpoints of a different run in %s", checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": fingerprint})
    return False


def live_plots_as_of(live_dir: Path, step: int) -> None:
    """The live plots (dvclive, streaming into the checkpoint folder) as they were at the checkpoint resumed from.
    dvclive resumes by appending, and a killed run has logged past its last checkpoint: the resumed run logged those
    steps again, each twice in the plots (found by tests/test_kill.py). And dvclive appends a row, and rewrites its
    summary files, in place: a row cut short by the kill is dropped, and a summary file it cannot read back (which
    would stop the resume) removed, as the resumed run writes them again."""
    for tsv in sorted((live_dir / "plots").rglob("*.tsv")):
        header, *rows = tsv.read_text(encoding="utf-8").splitlines(keepends=True) or [""]
        columns = header.rstrip("\n").split("\t")
        if not header.endswith("\n") or "step" not in columns:
            tsv.unlink()  # cut short at its header: dvclive starts it again
            continue
        at = columns.index("step")
        kept = [r for r in rows if r.endswith("\n") and _step(r, at) <= step]
        if kept != rows:
            write_text(tsv, header + "".join(kept))
    for summary, parse in ((live_dir / "metrics.json", json.loads), (live_dir / "params.yaml", yaml.safe_load)):
        try:
            whole = isinstance(parse(summary.read_text(encoding="utf-8")), dict)
        except FileNotFoundError:
            continue
        except (ValueError, yaml.YAMLError):  # UnicodeDecodeError is a ValueError
            whole = False
        if not whole:
            summary.unlink()


def _step(row: str, at: int) -> float:
    try:
        return int(row.split("\t")[at])
    except (IndexError, ValueError):
        return math.inf  # not a whole row: dropped


def resume_in_training_dtype(trainer) -> None:
    """Resume with the adapter in the dtype the run trains it in. trl casts a QLoRA adapter's weights to bf16 (as
    the QLoRA paper does); the Trainer resumes through PEFT's load_adapter, which casts them back to fp32: a resumed
    run went on in another precision than the run it resumes, and wrote an fp32 adapter, twice the size and of other
    weights than the uninterrupted run's (found by tests/test_kill.py). The checkpoint holds the bf16 weights; cast
    back before the optimizer's state is loaded, they are the very weights the killed run had."""
    load = trainer._load_from_checkpoint

    def load_in_training_dtype(resume_from_checkpoint, model=None):
        dtypes = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
        load(resume_from_checkpoint, model)
        for name, p in trainer.model.named_parameters():
            if name in dtypes and p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])

    trainer._load_from_checkpoint = load_in_training_dtype


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
