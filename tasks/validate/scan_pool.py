"""validate's scan on more cores: scan.py's per-block work in a pool of worker processes (issue 29).

One process parses, renders and measures about 2,000 rows a second of Python work, whatever the cores; the fast
tokenizer alone scales with them. So on more than SERIAL_CORES usable cores (the process's CPU affinity) the raw
rows' blocks go to a pool of worker processes, each of which does for its block all the per-row work: JSON, parse,
features, content keys, rendering, token counts (its tokenizer on one thread: the pool is the parallelism), and
serializes the block's candidate lines but for their duplicate flags. The main process keeps what needs the rows in
order, and little else: it reads the file (the input's sha256 over its bytes in order), hands out at most IN_FLIGHT
blocks a worker, takes their results back in block order, turns each block's feature values into the scan's codes,
finds the duplicates (SeenKeys sees the keys in row order) and writes the lines with their flags. The outputs are
those of the one-process scan byte for byte (tests/test_validate_pool.py): the candidates file, the feature table,
the parse errors, the token counts, the input's sha256, and a line that is not JSON stops the stage with the same
error, naming the file and line.

What a worker sends back a row: its coded features as 2-byte codes into the block's own values, three counts, its
content key's first 128 bits, and for a renderable row its candidate line as bytes (cut where the duplicate flag
goes) and its three token counts: the main process's work a row is numpy's and joining each line to its flag
(about 13 us a row, measured: 0.26 s of its CPU for 20,000 rows, where the one-process scan took 12.5 s).

Memory stays flat: at most IN_FLIGHT x workers blocks are out at a time (their lines and their results), and nothing
is kept a row beyond what Scan keeps. Workers are started by a fork server (a clean process that imported the
libraries once, never one whose tokenizer has run threads), each given the tokenizer and template by pickle. A worker
that fails or dies stops the stage with a PipelineError naming the raw rows file and the rows; on an error, Ctrl-C
or SIGTERM the workers are killed before the stage unwinds (the candidates file is an atomic_writer's, so no
output is half-written); Ctrl-C waits while a worker is being launched (_signals_held); workers ignore Ctrl-C
themselves (the stage ends them) and leave if the stage's process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.common.artifacts import atomic_writer
from tasks.common.chat_template import ChatTemplate
from tasks.common.conversation import FORM_MARKERS, ParseError, content_key, detect_form, key_words, parse_row
from tasks.common.errors import PipelineError
from tasks.validate.expectations import conversation_features
from tasks.validate.lengths import length_rows, measure_rendered
from tasks.validate.scan import (
    CODE,
    CODED,
    COUNT,
    COUNTS,
    Scan,
    SeenKeys,
    line_blocks,
    not_json,
    renderable,
)

SERIAL_CORES = 2  # up to this many usable cores the scan is one process (scan.scan_rows: the 2-core figures' path)
# auto's most workers: each holds about 0.2 GB of its own (PSS: its heap, its tokenizer, its blocks; the libraries
# are the fork server's, shared). 16 workers took the stage's processes to 4.3 GB together at 500k rows on 16 cores
# (docs/performance.md), over the 3 GB a data stage may take; 8 keep it near 2.7 GB. A number set by hand is not capped.
MAX_AUTO_WORKERS = 8
IN_FLIGHT = 2  # blocks out a worker: one it works on, one waiting, so none idles while the main process writes
LOCAL_CODE = np.int16  # a block's codes into its own distinct values (fewer than the scan's, which are int8)
WATCH_SECONDS = 1.0  # how often a worker checks that the stage's process is still there


def pool_workers(setting: int | str) -> int:
    """Worker processes for validate.workers: auto gives one a usable core, at most MAX_AUTO_WORKERS, when there are
    more than SERIAL_CORES, else 0 (the one-process scan, unchanged); a number is taken as it is (0: one process)."""
    if setting != "auto":
        return int(setting)
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    return min(cores, MAX_AUTO_WORKERS) if cores > SERIAL_CORES else 0


@dataclass
class _Block:
    """One block's results from a worker, compact (see the module docstring)."""

    values: dict[str, list]  # per CODED feature, its distinct values in the block, in the order first seen
    codes: dict[str, np.ndarray]  # per CODED feature, each row's index into values[name] (LOCAL_CODE)
    counts: dict[str, np.ndarray]  # per COUNTS feature, each row's count (COUNT; 0 where it did not parse)
    parse_errors: dict[int, str]  # row index -> why it does not parse, in row order
    parsed_at: np.ndarray  # positions in the block of the rows that parse
    high: np.ndarray  # their content keys' first 128 bits (conversation.key_words)
    low: np.ndarray
    renderable: np.ndarray  # row indexes of the renderable rows (COUNT), in order
    measured: np.ndarray  # their [n_tokens, answer_tokens, answer_tokens_cut] (COUNT)
    heads: list[bytes]  # their candidate lines up to the duplicate flag
    tails: list[bytes]  # and after it


@dataclass
class _NotJson:
    lineno: int  # the first line of the block that is not JSON


_worker: tuple | None = None  # (tokenizer, template, system_prompt, max_length, markers), set in each worker


def _start_worker(tokenizer, template: ChatTemplate, system_prompt: str | None, max_length: int, stage: int) -> None:
    """A worker's set-up: Ctrl-C is the stage's to handle (it ends the workers), the tokenizer runs on this one
    thread (the workers are the parallelism), and the worker leaves if the stage's process is gone (SIGKILL)."""
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the Rust tokenizer at each call
    markers = tuple(dict.fromkeys(FORM_MARKERS + template.markers))  # as scan._parse_block has them
    _worker = (tokenizer, template, system_prompt, max_length, markers)
    parent = os.getppid()  # the fork server, which itself ends with the stage's process

    def watch() -> None:
        while os.getppid() == parent and _alive(stage):
            time.sleep(WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _scan_block(lines: list[bytes], linenos: list[int], first: int) -> _Block | _NotJson:
    """One block of raw lines (rows first, first + 1, ...), in a worker: scan._parse_block's work and the block's
    token counts and candidate lines, but for what needs the rows before it (codes, duplicates)."""
    tokenizer, template, system_prompt, max_length, markers = _worker
    rows = []
    for line, lineno in zip(lines, linenos):
        try:
            rows.append(json.loads(line))
        except ValueError:
            return _NotJson(lineno)
    values: dict[str, dict] = {name: {} for name in CODED}
    codes: dict[str, list[int]] = {name: [] for name in CODED}
    counts: dict[str, list[int]] = {name: [] for name in COUNTS}
    parse_errors: dict[int, str] = {}
    parsed_at, keys, to_render = [], [], []
    for k, row in enumerate(rows):  # every row parsed before any is rendered, as scan._parse_block does
        i = first + k
        try:
            conv, error = parse_row(row), None
        except ParseError as e:
            conv, error = None, str(e)
            parse_errors[i] = error
        f = conversation_features(i, conv, detect_form(row), error, markers)
        for name in CODED:
            seen = values[name]
            codes[name].append(seen.setdefault(f.get(name), len(seen)))
        for name in COUNTS:
            counts[name].append(f.get(name, 0))
        if conv is not None:
            parsed_at.append(k)
            keys.append(content_key(conv))
            if renderable(f):  # a row that does not parse never is
                to_render.append((i, conv, keys[-1]))
    rendered = [template.render(conv, system_prompt) for _, conv, _ in to_render]
    measured = measure_rendered(tokenizer, rendered, max_length)
    del rendered
    heads, tails = [], []
    for (i, conv, key), lengths in zip(to_render, length_rows(measured)):
        # scan._write_block's line, {row_index, conversation, lengths, is_duplicate, content_key}, cut at the flag
        line = json.dumps({"row_index": i, **conv.to_dict(), **lengths}, ensure_ascii=False)
        heads.append((line[:-1] + ', "is_duplicate": ').encode())
        tails.append(f', "content_key": {json.dumps(key)}}}\n'.encode())
    high, low = key_words(keys) if keys else (np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    return _Block(
        values={name: list(v) for name, v in values.items()},
        codes={name: np.array(c, dtype=LOCAL_CODE) for name, c in codes.items()},
        counts={name: np.array(c, dtype=COUNT) for name, c in counts.items()},
        parse_errors=parse_errors,
        parsed_at=np.array(parsed_at, dtype=np.int64),
        high=high,
        low=low,
        renderable=np.array([i for i, _, _ in to_render], dtype=COUNT),
        measured=measured.astype(COUNT),
        heads=heads,
        tails=tails,
    )


_FLAGS = (b"false", b"true")


def _take(block: _Block, first: int, rows: int, scan: Scan, seen: SeenKeys, out) -> None:
    """One block's results into the scan and the candidates file, in block order (scan._parse_block and
    scan._write_block's bookkeeping, the same arrays)."""
    for name in CODED:
        values = scan.values[name]
        # the block's values in the order first seen, so new ones get their codes in row order, as one by one
        remap = np.array([values.setdefault(v, len(values)) for v in block.values[name]], CODE)
        scan.codes[name].append(remap[block.codes[name]])
    for name in COUNTS:
        scan.counts[name].append(block.counts[name])
    scan.parse_errors.update(block.parse_errors)
    duplicate = np.zeros(rows, dtype=bool)
    if len(block.parsed_at):
        duplicate[block.parsed_at] = seen.add(block.high, block.low)
    scan.duplicates.append(duplicate)
    scan.duplicate_rows += int(duplicate.sum())
    scan.rows += rows
    scan.measured.append(block.measured)
    scan.renderable_blocks.append(block.renderable)
    flags = duplicate[block.renderable - first].tolist()
    out.write(b"".join(part for parts in zip(block.heads, (_FLAGS[f] for f in flags), block.tails) for part in parts))
    sizes = [len(head) + len(_FLAGS[f]) + len(tail) for head, f, tail in zip(block.heads, flags, block.tails)]
    scan.line_bytes.append(np.array(sizes, dtype=COUNT))


def scan_in_pool(
    raw_rows: Path,
    tokenizer,
    max_length: int,
    template: ChatTemplate,
    system_prompt: str | None,
    candidates: Path,
    output: Path | None,
    workers: int,
) -> Scan:
    """scan.scan_rows with its per-block work in `workers` worker processes; the same Scan and candidates file."""
    scan, seen, hasher = Scan(), SeenKeys(), hashlib.sha256()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_preload(tokenizer))
    args = (tokenizer, template, system_prompt, max_length, os.getpid())
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=args)
    try:
        with atomic_writer(candidates, reported_as=output) as out:
            pending: deque[tuple[int, int, Future]] = deque()
            first = 0
            for lines, linenos in line_blocks(raw_rows, hasher):
                try:
                    with _signals_held():  # a submit may launch a worker (and pickle the tokenizer for it)
                        future = pool.submit(_scan_block, lines, linenos, first)
                except Exception as e:
                    raise _failed(raw_rows, first, len(lines), e) from e
                pending.append((first, len(lines), future))
                first += len(lines)
                if len(pending) >= IN_FLIGHT * workers:
                    _next(pending, raw_rows, scan, seen, out)
            while pending:
                _next(pending, raw_rows, scan, seen, out)
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)
    scan.input_sha256 = hasher.hexdigest()
    return scan


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C or SIGTERM while a worker is being launched would cut its start-up data (the pickled tokenizer) short,
    and it would print a traceback: they wait until the launch is done, then are raised as they came."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are the main thread's: nothing to hold
        return
    caught: list[int] = []
    held = {sig: signal.signal(sig, lambda sig, _: caught.append(sig)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if caught:
            signal.raise_signal(caught[0])


def _preload(tokenizer) -> list[str]:
    """What the fork server imports once for all the workers: the libraries (the tokenizer's class pulls in
    transformers, and torch with it: seconds a process), never this project's modules. Python 3.11's fork server
    does not take the stage's sys.path, so `tasks` could resolve to another checkout there; each worker imports it
    itself, with the stage's sys.path and working directory (multiprocessing's spawn preparation)."""
    module = type(tokenizer).__module__
    return ["numpy", "pandas", *([module] if module.split(".")[0] in ("transformers", "tokenizers") else [])]


def _next(pending: deque, raw_rows: Path, scan: Scan, seen: SeenKeys, out) -> None:
    first, rows, future = pending.popleft()
    try:
        block = future.result()
    except PipelineError:  # the user's to fix (a template that cannot render a row): as the one-process scan says it
        raise
    except Exception as e:
        raise _failed(raw_rows, first, rows, e) from e
    if isinstance(block, _NotJson):
        raise not_json(raw_rows, block.lineno) from None
    _take(block, first, rows, scan, seen, out)


def _failed(raw_rows: Path, first: int, rows: int, e: Exception) -> PipelineError:
    """A worker that raised, died (BrokenProcessPool: killed, out of memory) or could not be started."""
    return PipelineError(
        f"validate's scan failed in a worker process on rows {first} to {first + rows - 1} of {raw_rows}: "
        f"{type(e).__name__}: {e}. Run it again; with validate.workers=0 it runs in one process."
    )


def _stop(pool: ProcessPoolExecutor) -> None:
    """End the workers now (an error, Ctrl-C, SIGTERM): the blocks they are on are not waited for."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
    # the pool sees its workers gone, fails what they had, and joins them; shutdown waits for that
    pool.shutdown(wait=True, cancel_futures=True)
