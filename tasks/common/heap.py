"""The cyclic garbage collector, kept off the libraries' objects while a data stage streams its rows.

A data stage imports great-expectations, pandas, transformers and the tokenizer before its first row: a few hundred
thousand long-lived objects. Python's collector walks all of them at every full collection, and a streaming pass
allocates so many short-lived containers (each row's dicts, lists and strings) that full collections come every few
thousand rows. Measured on 100k diverse rows (docs/performance.md, "Data stages"), validate spent about 5% of its
wall time there, and the pass frees its rows by reference counting anyway, not by the collector.

`frozen_heap()` moves what exists before the pass into the permanent generation (gc.freeze), so collections walk only
what the pass itself made, and lets the youngest generation grow larger between collections. The collector stays on:
a reference cycle made during the pass is still found, later and in fewer walks. Afterwards the objects are unfrozen
and the thresholds put back, so nothing outside the pass runs differently.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

YOUNG_THRESHOLD = 50_000  # allocations between two young collections (Python's default: 700)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Run the block with the objects made before it out of the collector's walks (see the module docstring)."""
    thresholds = gc.get_threshold()
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
