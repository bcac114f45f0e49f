"""validate's scan in a pool of worker processes (tasks/validate/scan_pool.py) gives the one-process scan's results
byte for byte, stops with a clear error when a worker fails, and leaves no worker behind.

The pool is forced on here (2 or 3 workers, in small blocks so that many are in flight and finish out of order),
whatever the cores of the machine running the tests: `validate.workers: auto` uses it only on more than 2 cores.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from tasks.common.chat_template import BUILT_IN, Llama2, chat_template
from tasks.common.errors import PipelineError
from tasks.validate import scan, scan_pool
from tasks.validate.scan import scan_rows
from tests.conftest import needs_shared
from tests.data_stage_sets import TOKENIZER, messy_rows, write_jsonl

SYSTEM = "Be brief."
MAX_LENGTH = 512  # some rows are over it: their cut answer tokens are counted


@pytest.fixture(scope="module")
def tokenizer():
    from tasks.common.base_model import load_tokenizer
    from tasks.common.config import ModelParams

    needs_shared("guanaco-raw-1k", "train.jsonl")
    needs_shared("llama-2-tokenizer")
    return load_tokenizer(ModelParams(base="tiny-llama", revision=None, tokenizer=str(TOKENIZER), max_length=512))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """3,000 rows: unparseable rows, rows that parse but cannot be rendered, other forms, exact duplicates, rows
    over max_length, and a blank line (skipped, but hashed)."""
    needs_shared("guanaco-raw-1k", "train.jsonl")
    path = write_jsonl(tmp_path_factory.mktemp("pool") / "rows.jsonl", messy_rows(3000, seed=5, bad_share=0.03))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1234] + [b"\n"] + lines[1234:]))
    return path


def _scan(raw, tokenizer, out, workers, template=None):
    template = template or chat_template("llama2", tokenizer)
    return scan_rows(raw, tokenizer, MAX_LENGTH, template, SYSTEM, out, workers=workers)


def _no_worker_left():
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("workers", [2, 3])
def test_the_pool_gives_the_one_process_scans_results_byte_for_byte(raw, tokenizer, tmp_path, monkeypatch, workers):
    serial = _scan(raw, tokenizer, tmp_path / "serial.jsonl", 0)
    monkeypatch.setattr(scan, "BLOCK_ROWS", 170)  # 18 blocks (scan.line_blocks), up to 2 x workers in flight
    pooled = _scan(raw, tokenizer, tmp_path / "pooled.jsonl", workers)
    _no_worker_left()

    assert (tmp_path / "pooled.jsonl").read_bytes() == (tmp_path / "serial.jsonl").read_bytes()
    assert pooled.input_sha256 == serial.input_sha256
    assert (pooled.rows, pooled.duplicate_rows) == (serial.rows, serial.duplicate_rows)
    assert list(pooled.parse_errors.items()) == list(serial.parse_errors.items())
    assert {k: list(v.items()) for k, v in pooled.values.items()} == {
        k: list(v.items()) for k, v in serial.values.items()
    }
    assert np.array_equal(pooled.renderable, serial.renderable) and pooled.renderable.dtype == serial.renderable.dtype
    assert np.array_equal(pooled.lengths(), serial.lengths()) and pooled.lengths().dtype == serial.lengths().dtype
    pooled_frame, serial_frame = pooled.frame(), serial.frame()
    assert pooled_frame.equals(serial_frame) and (pooled_frame.dtypes == serial_frame.dtypes).all()

    # the set has what the pool must get right
    assert serial.rows == 3000 and serial.duplicate_rows >= 50 and len(serial.parse_errors) >= 20
    parsed_not_renderable = serial.rows - len(serial.parse_errors) - len(serial.renderable)
    assert parsed_not_renderable >= 10
    assert (serial.lengths()[:, 0] > MAX_LENGTH).any() and serial.lengths()[:, 2].any()
    lines = (tmp_path / "serial.jsonl").read_text(encoding="utf-8").splitlines()
    assert any(json.loads(line)["is_duplicate"] for line in lines)


def test_a_line_that_is_not_json_stops_the_pool_with_the_same_error(raw, tokenizer, tmp_path, monkeypatch):
    lines = raw.read_bytes().splitlines(keepends=True)
    broken = tmp_path / "rows.jsonl"
    broken.write_bytes(b"".join(lines[:2100] + [b'{"text": "cut off\n'] + lines[2100:] + [b"not json either\n"]))
    errors = []
    for workers in (0, 2):
        monkeypatch.setattr(scan, "BLOCK_ROWS", 300)
        with pytest.raises(PipelineError) as e:
            _scan(broken, tokenizer, tmp_path / f"out{workers}.jsonl", workers)
        errors.append(str(e.value))
        assert not (tmp_path / f"out{workers}.jsonl").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]  # no temp file left
    _no_worker_left()
    assert errors[0] == errors[1]
    assert errors[0].startswith(f"{broken}, line 2101: not valid JSON")


@dataclass(frozen=True)
class _Failing(Llama2):
    """A template that fails on the row holding `trigger`, in the way `how` says (in the worker process)."""

    trigger: str = ""
    how: str = ""

    def render(self, conv, default_system=None):
        if any(self.trigger in text for _, text in conv.turns):
            if self.how == "die":
                os._exit(3)  # as the OOM killer would end it
            if self.how == "interrupt":
                raise KeyboardInterrupt
            if self.how == "pipeline":
                raise PipelineError("this template cannot render that row")
            raise RuntimeError("a bug in a worker")
        return super().render(conv, default_system)


def _failing(how: str) -> _Failing:
    llama2 = BUILT_IN["llama2"]
    fields = (llama2.name, llama2.jinja, llama2.end_of_turn, llama2.special_tokens, llama2.markers)
    return _Failing(*fields, trigger="(variant 2)", how=how)


@pytest.mark.parametrize(
    ("how", "error", "says"),
    [
        ("bug", PipelineError, r"failed in a worker process on rows \d+ to \d+ of {raw}: RuntimeError: a bug"),
        ("die", PipelineError, r"failed in a worker process on rows \d+ to \d+ of {raw}: BrokenProcessPool"),
        ("pipeline", PipelineError, "this template cannot render that row"),
        ("interrupt", KeyboardInterrupt, ""),
    ],
)
def test_a_failing_worker_stops_the_scan_clearly_and_no_worker_is_left(raw, tokenizer, tmp_path, how, error, says):
    out = tmp_path / "out.jsonl"
    with pytest.raises(error) as e:
        _scan(raw, tokenizer, out, 2, _failing(how))
    assert re.search(says.format(raw=re.escape(str(raw))), str(e.value))
    _no_worker_left()
    assert list(tmp_path.iterdir()) == []  # the candidates' temp file is gone too


def test_auto_uses_the_pool_only_on_more_than_two_cores(monkeypatch):
    for cores, workers in ((1, 0), (2, 0), (3, 3), (8, 8), (16, 8), (64, 8)):  # capped for memory
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert scan_pool.pool_workers("auto") == workers
    assert scan_pool.pool_workers(0) == 0
    assert scan_pool.pool_workers(2) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["messy_10k", "messy_2k_failing"])
def test_the_stages_with_the_pool_give_the_recorded_results(tmp_path, name):
    """The whole validate stage with the pool forced on, then format: every report, the validated and formatted
    files, byte for byte as tests/golden/data_stages.json recorded them (tests/test_data_scale.py)."""
    from tests.data_stage_sets import GOLDEN, fingerprint, input_sets

    needs_shared("guanaco-raw-1k", "train.jsonl")
    needs_shared("guanaco-llama2-1k", "train.parquet")
    needs_shared("llama-2-tokenizer")
    path, overrides = input_sets(tmp_path)[name]
    got = fingerprint(path, [*overrides, "validate.workers=2"], tmp_path / "project")
    want = json.loads(GOLDEN.read_text(encoding="utf-8"))[name]
    assert got == want, {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_a_stopped_validate_with_the_pool_leaves_no_worker(tmp_path, how):
    """Ctrl-C while the pool scans (forced on, 2 workers): exit 130 with the one-line message, no traceback, no
    temp file, and every process the stage started (the fork server, the workers) gone. SIGKILL (no clean-up runs):
    the fork server and the workers leave by themselves."""
    import psutil

    from benchmarks.data_stages import iter_perturbed_rows
    from tasks.common import paths
    from tasks.common.compose import compose_params
    from tests.conftest import ROOT, wait_for
    from tests.data_stage_sets import RAW_1K

    needs_shared("guanaco-raw-1k", "train.jsonl")
    needs_shared("llama-2-tokenizer")
    rows = write_jsonl(tmp_path / "rows.jsonl", list(iter_perturbed_rows(RAW_1K, 30_000)))
    project = tmp_path / "project"
    (project / "data" / "sample").mkdir(parents=True)
    shutil.copy2(ROOT / paths.SAMPLE_DATA, project / paths.SAMPLE_DATA)
    shutil.copytree(ROOT / "conf", project / "conf")
    overrides = ["download.source=local", f"download.path={rows}", f"model.tokenizer={TOKENIZER.resolve()}"]
    compose_params(project, ["preset=llama2_7b_guanaco", *overrides, "validate.workers=2"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def stage(name):
        return subprocess.Popen(
            [sys.executable, "-m", f"tasks.{name}"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal (test_interrupt.py)
        )

    proc = stage("download")
    assert proc.communicate(timeout=600) and proc.returncode == 0
    proc = stage("validate")
    validated = project / "data" / "validated"
    started = psutil.Process(proc.pid)

    def scanning():
        return list(validated.glob(".*.tmp")) and len(started.children(recursive=True)) >= 3

    wait_for(scanning, timeout=300, what="validate's pool to scan", every=0.05)
    children = started.children(recursive=True)  # the fork server and the 2 workers
    if how == "sigkill":
        proc.kill()
        proc.communicate(timeout=120)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
        return
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "[validate] interrupted: no output is half-written" in err
    assert "Traceback" not in err, err
    assert list(validated.iterdir()) == []  # no temp file, no output
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


def test_a_tokenizer_that_cannot_be_sent_to_the_workers_stops_the_scan_clearly(raw, tokenizer, tmp_path):
    def unpicklable():  # a local function: pickle refuses it
        return tokenizer

    with pytest.raises(PipelineError, match=f"rows 0 to 1999 of {re.escape(str(raw))}: .*validate.workers=0"):
        scan_rows(raw, unpicklable, MAX_LENGTH, chat_template("llama2", tokenizer), SYSTEM, tmp_path / "o", workers=2)
    _no_worker_left()
    assert list(tmp_path.iterdir()) == []
