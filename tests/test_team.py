"""For a team: Prefect on a real PostgreSQL, the deployment on a process work pool run by a worker, one run at a time.

Starts a throwaway PostgreSQL cluster (Debian's `postgresql` binaries, initdb + pg_ctl on a free local port),
`prefect server start` on it with basic authentication on (PREFECT_SERVER_API_AUTH_STRING), registers the
deployment with `python -m flows.deploy --pool` (which makes the pool with a locked job template), starts
`prefect worker start --pool`, and triggers two runs at once: the first publishes, the second waits for the
deployment's concurrency slot (limit 1) and then finds everything up to date. An outsider without the credential
is refused, and a run that asks for another command is refused by the server.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from flows import history
from tests.conftest import Team, wait_for

pytestmark = pytest.mark.slow
POOL, DEPLOYMENT = Team.POOL, Team.DEPLOYMENT


@pytest.fixture(scope="module")
def team(postgres, new_project, tmp_path_factory):
    """Prefect server on PostgreSQL, a process work pool with the deployment on it, and a worker polling it."""
    tmp = tmp_path_factory.mktemp("team")
    setup = Team(postgres.url, new_project(tmp / "project"), tmp)
    try:
        setup.start_server()
        setup.deploy("--cron", "0 3 * * *")
        setup.start_worker()
        yield setup.project, setup.url, setup.env, tmp, setup.auth
    finally:
        setup.close()


def _client_call(url: str, auth: str, fn):
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    async def call():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings({PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth}):
        return anyio.run(call)


def _post(url: str, path: str, auth: str | None) -> int:
    """An HTTP POST to the API, with basic credentials or none; returns the status code."""
    request = urllib.request.Request(f"{url}{path}", data=b"{}", method="POST")
    request.add_header("Content-Type", "application/json")
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


def test_an_outsider_is_refused_and_a_run_cannot_change_what_the_worker_runs(team):
    project, url, env, tmp, auth = team
    # No credential, or a wrong one: refused. The team's credential: served.
    assert _post(url, "/deployments/filter", None) == 401
    assert _post(url, "/deployments/filter", "admin:guess") == 401
    assert _post(url, "/deployments/filter", auth) == 200
    outsider = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}
    refused = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT],
        cwd=project,
        env=outsider,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0

    # The pool's template exposes no job variable: asking for another command is refused by the server.
    pool = _client_call(url, auth, lambda c: c.read_work_pool(POOL))
    assert "command" not in json.dumps(pool.base_job_template)
    marker = tmp / "pwned"
    forged = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT, "--job-variable", f"command=touch {marker}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert forged.returncode != 0, forged.stdout + forged.stderr
    runs = _client_call(url, auth, lambda c: c.read_flow_runs())
    assert all("command" not in (r.job_variables or {}) for r in runs)
    time.sleep(5)  # a worker polls every few seconds: had it taken such a run, the file would be there by now
    assert not marker.exists()


def test_worker_on_postgres_runs_the_deployment_one_run_at_a_time(team):
    project, url, env, tmp, auth = team

    # the server really is on PostgreSQL, and the deployment is on the pool with its schedule and limit
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    deployment = _client_call(url, auth, lambda c: c.read_deployment_by_name(DEPLOYMENT))
    assert deployment.work_pool_name == POOL
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    limit = deployment.global_concurrency_limit
    assert limit is not None and limit.limit == 1

    # two runs at once: one from the CLI, as the README says, one from the client
    out = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT],
        cwd=project,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    first_id = re.search(r"UUID:?\s*([0-9a-f-]{36})", out).group(1)
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth}):
        second_id = run_deployment(DEPLOYMENT, timeout=0).id

    def read(run_id):
        return _client_call(url, auth, lambda c: c.read_flow_run(run_id))

    def both_final():
        runs = [read(first_id), read(second_id)]
        return runs if all(r.state.is_final() for r in runs) else None

    start = time.perf_counter()
    first, second = wait_for(both_final, 600, "both flow runs to end", every=2)
    print(f"\ntwo runs through the worker: {time.perf_counter() - start:.1f} s")
    logs = (tmp / "worker.log").read_text()
    assert first.state.type.value == "COMPLETED", logs[-3000:]
    assert second.state.type.value == "COMPLETED", logs[-3000:]

    # one waited for the other's slot, and they did not overlap
    names = {}
    for run in (first, second):
        states = _client_call(url, auth, lambda c, r=run: c.read_flow_run_states(r.id))
        names[run.id] = [s.name for s in states]
    assert any("AwaitingConcurrencySlot" in n for n in names.values()), names
    a, b = sorted((first, second), key=lambda r: r.start_time)
    assert a.end_time <= b.start_time, "the two runs overlapped"

    # the first one to run published; the later one found nothing to do
    assert (project / "release").is_dir()
    records = history.read(project)
    assert [r["outcome"] for r in records[-2:]] == ["published", "up to date"], records

    # dvc.lock and the release agree
    venv_env = {**env, "PYTHONPATH": ""}
    status = subprocess.run(["dvc", "status"], cwd=project, env=venv_env, capture_output=True, text=True)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    audit = subprocess.run(
        [sys.executable, "-m", "tasks.publish.audit", "release"], cwd=project, env=env, capture_output=True, text=True
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
