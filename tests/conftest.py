"""Shared fixtures: the committed params, a scratch project directory, the real data in ../shared, and the team's
Prefect set-up (a throwaway PostgreSQL cluster, the server on it, the deployment on a work pool, its worker)."""

from __future__ import annotations

import fcntl
import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
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


def scratch_project(root: Path) -> Path:
    """A scratch project directory holding the shipped sample and, when built, the tiny base (its fingerprint still
    guards staleness); the stages use paths relative to it."""
    (root / "data" / "sample").mkdir(parents=True)
    shutil.copy2(ROOT / paths.SAMPLE_DATA, root / paths.SAMPLE_DATA)
    if (ROOT / paths.TINY_BASE_DIR).exists():
        shutil.copytree(ROOT / paths.TINY_BASE_DIR, root / paths.TINY_BASE_DIR)
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run a test from a scratch project directory (scratch_project)."""
    monkeypatch.chdir(scratch_project(tmp_path))
    return tmp_path


def venv_env(**more: str) -> dict[str, str]:
    """This environment with the running venv's bin/ first on PATH (dvc, prefect, the stages' python), plus `more`."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **more}


def dvc(project: Path, *args: str, with_stderr: bool = False) -> str:
    """`dvc <args>` in project, which must succeed; its output (stdout, and stderr with with_stderr)."""
    proc = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, env=venv_env())
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr if with_stderr else proc.stdout


def dvc_fails(project: Path, *args: str) -> str:
    """`dvc <args>` in project, which must fail; everything it printed."""
    proc = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, env=venv_env())
    assert proc.returncode != 0, f"dvc {' '.join(args)} should have failed:\n{proc.stdout}"
    return proc.stdout + proc.stderr


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


FIRST_REPRO_OUTPUT = "first-repro.out"  # beside reproduced_template's project: what its `dvc repro` printed


@pytest.fixture(scope="session")
def reproduced_template(tmp_path_factory, worker_id) -> Path:
    """A fresh clone (make_project_copy) on which `dvc repro` has run once, made once for the whole test run:
    pytest-xdist's workers share it through a lock file in the run's base folder. What that repro printed is in
    FIRST_REPRO_OUTPUT beside it (test_pipeline_e2e checks it). Tests copy it (reproduced_project) when their subject
    comes after a first good run: a fault, a kill, a schedule."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent  # above each worker's own folder
    template = shared / "reproduced" / "project"
    with open(shared / "reproduced.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (template.parent / FIRST_REPRO_OUTPUT).exists():
            shutil.rmtree(template.parent, ignore_errors=True)
            make_project_copy(template)
            (template.parent / FIRST_REPRO_OUTPUT).write_text(dvc(template, "repro", with_stderr=True))
    return template


@pytest.fixture
def reproduced_project(reproduced_template, tmp_path) -> Path:
    """This test's own copy of reproduced_template (git history, DVC cache, dvc.lock and outputs)."""
    return Path(shutil.copytree(reproduced_template, tmp_path / "project", symlinks=True))


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


# --- the team's set-up: PostgreSQL, the Prefect server on it, the deployment on a work pool, a worker -------------


def _pg_bindir() -> Path | None:
    """Where initdb and pg_ctl live (Debian keeps them under /usr/lib/postgresql/<version>/bin)."""
    found = shutil.which("initdb") and shutil.which("pg_ctl")
    if found:
        return Path(shutil.which("initdb")).resolve().parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(d, "initdb").exists() and Path(d, "pg_ctl").exists():
            return Path(d)
    return None


@dataclass
class Postgres:
    url: str  # the asyncpg URL of the `prefect` database
    bindir: Path
    data: Path
    as_user: list[str]

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        """pg_ctl on this cluster; the server it starts logs to postgres.log beside the cluster (its output must not
        go to our pipes, which it would hold open)."""
        return subprocess.run(
            [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args],
            check=True,
            capture_output=True,
            text=True,
        )

    @property
    def log(self) -> Path:
        return self.data.parent / "postgres.log"


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free local port; yields it (url, pg_ctl), stops and deletes it after."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are absent: apt-get install -y postgresql")
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="guanaco-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run the cluster as the postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root needs runuser to start PostgreSQL as the postgres user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres", "postgres")
    data, port = base / "data", free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    db = Postgres(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect", bindir, data, as_user)
    # `pg_ctl restart` starts it again with these same options (kept in postmaster.opts)
    options = f"-p {port} -h 127.0.0.1 -k {base} -c fsync=off"
    db.pg_ctl("-w", "-t", "60", "-o", options, "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect")
        yield db
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


class Team:
    """`prefect server start` on PostgreSQL with basic authentication on, the deployment registered on a process work
    pool (`python -m flows.deploy --pool`), and `prefect worker start` on it, each a real process of its own that a
    test may stop, kill and start again (same port, same database). Every log goes to <tmp>/<name>.log (appended)."""

    POOL = "guanaco-pool"
    DEPLOYMENT = "guanaco-qlora-pipeline/guanaco-scheduled"

    def __init__(self, database_url: str, project: Path, tmp: Path, server_env=None, worker_env=None):
        self.project, self.tmp = project, tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.auth = f"admin:{secrets.token_urlsafe(16)}"
        self.env = {
            **os.environ,
            "PREFECT_API_AUTH_STRING": self.auth,  # every client: CLI, deploy, worker, flow runs
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_API_URL": self.url,
            "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PYTHONPATH": str(project),
            "PATH": venv_env()["PATH"],
        }
        from flows.deploy import DURABLE_LEASES

        self.server_env = {  # as docs/team.md starts it,
            "PREFECT_SERVER_API_AUTH_STRING": self.auth,
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": DURABLE_LEASES,
            # and, for the tests' time only, a run waiting for the deployment's slot retries every 2 s (30 s by
            # default) and the worker polls every 2 s (10 s): how soon things happen, not what happens
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
            **(server_env or {}),
        }
        self.worker_env = {"PREFECT_WORKER_QUERY_SECONDS": "2", **(worker_env or {})}
        self.server: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    def _start(self, name: str, *cmd: str, extra_env: dict) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "a") as log:
            return subprocess.Popen(
                [sys.executable, "-m", *cmd],
                cwd=self.project,
                env={**self.env, **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200
        except OSError:
            return False

    def start_server(self) -> None:
        cmd = ("prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port))
        self.server = self._start("server", *cmd, extra_env=self.server_env)
        wait_for(self.healthy, 180, "the Prefect server")

    def stop_server(self) -> None:
        _stop(self.server)
        self.server = None

    def deploy(self, *args: str) -> str:
        """`python -m flows.deploy --pool`; what it printed."""
        return subprocess.run(
            [sys.executable, "-m", "flows.deploy", "--pool", self.POOL, "--project-dir", str(self.project), *args],
            cwd=self.project,
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def start_worker(self) -> None:
        self.worker = self._start(
            "worker", "prefect", "worker", "start", "--pool", self.POOL, extra_env=self.worker_env
        )

    def call(self, fn):
        """fn(client)'s result, with an API client of this server (fn is async)."""
        import anyio
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        async def call():
            async with get_client() as client:
                return await fn(client)

        with temporary_settings({PREFECT_API_URL: self.url, PREFECT_API_AUTH_STRING: self.auth}):
            return anyio.run(call)

    def close(self) -> None:
        for p in (self.worker, self.server):
            _stop(p)


def _stop(p: subprocess.Popen | None) -> None:
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
