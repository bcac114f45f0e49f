"""Shared fixtures: the committed params, a scratch project directory, the real data in ../shared."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tasks.common import paths
from tasks.common.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def free_port() -> int:
    """A TCP port free on localhost now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    """predicate()'s first truthy value, polling every `every` s (errors count as not yet); TimeoutError after."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:
            pass
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}")


def needs_shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test (a user's fresh clone has no ../shared)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the reference data lives in ../shared/data beside the checkout")
    return path


@pytest.fixture(scope="session")
def params() -> Params:
    return load_params(ROOT / "params.yaml")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run a test from a scratch directory holding the shipped sample (stages use relative paths)."""
    (tmp_path / "data" / "sample").mkdir(parents=True)
    shutil.copy2(ROOT / paths.SAMPLE_DATA, tmp_path / paths.SAMPLE_DATA)
    tiny = ROOT / "models" / "tiny-llama"
    if tiny.exists():  # reuse the built tiny base (its fingerprint still guards staleness)
        shutil.copytree(tiny, tmp_path / "models" / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def project_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    return [f for f in out if f and (ROOT / f).is_file()]


def make_project_copy(dest: Path) -> Path:
    """A fresh git + DVC project at `dest` holding the repository's files, as a user's clone would."""
    skip = ("dvc.lock", "metrics/", "dvclive/", "reports/lengths.png", "reports/training_loss.png")
    for rel in project_files():
        if rel.startswith(skip):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


@pytest.fixture
def project_copy(tmp_path) -> Path:
    return make_project_copy(tmp_path / "project")


@pytest.fixture(scope="session")
def new_project():
    """make_project_copy, for fixtures of a wider scope than a test."""
    return make_project_copy


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect API (temporary SQLite) for flow tests, started once and shut down cleanly."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
