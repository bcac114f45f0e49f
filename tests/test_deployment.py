"""A real local Prefect server, the served deployment with its cron schedule, and retraining only on change."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows import history
from tasks.common import paths
from tests.conftest import free_port, venv_env, wait_for

pytestmark = pytest.mark.slow
DEPLOYMENT = "guanaco-qlora-pipeline/guanaco-scheduled"


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = venv_env(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, 120, "the Prefect server")
        yield url, env
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _trigger(url: str) -> str:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        run = run_deployment(DEPLOYMENT, timeout=900, poll_interval=2)
    return run.state.type.value


def _deployment(url: str):
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name(DEPLOYMENT)

    with temporary_settings({PREFECT_API_URL: url}):
        return anyio.run(read)


def test_scheduled_deployment_retrains_only_when_the_data_changes(reproduced_project, prefect_server, tmp_path):
    """From a project whose last run is good: a scheduled run with nothing changed runs no stage; after the data
    changes, the next one runs every stage and publishes."""
    url, env = prefect_server
    served = subprocess.Popen(
        [sys.executable, "-m", "flows.deploy", "--project-dir", str(reproduced_project), "--cron", "0 3 * * *"],
        cwd=reproduced_project,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deployment = wait_for(lambda: _deployment(url), 120, "the deployment to be registered")
        crons = [s.schedule.cron for s in deployment.schedules]
        assert crons == ["0 3 * * *"]

        start = time.perf_counter()
        assert _trigger(url) == "COMPLETED"
        no_change_seconds = time.perf_counter() - start
        first = history.read(reproduced_project)[-1]
        assert first["stages_ran"] == [] and first["outcome"] == "up to date"
        print(f"\nno-change scheduled run: {no_change_seconds:.1f} s end to end")

        sample = reproduced_project / paths.SAMPLE_DATA
        sample.write_text(
            sample.read_text()
            + json.dumps({"text": "### Human: Name a prime number above 90.### Assistant: 97 is a prime number."})
            + "\n"
        )
        assert _trigger(url) == "COMPLETED"
        second = history.read(reproduced_project)[-1]
        assert second["stages_ran"] == list(paths.STAGES) and second["outcome"] == "published"
        assert second["release_id"] is not None
    finally:
        served.terminate()
        served.wait(timeout=60)


def test_the_history_table_keeps_each_outcome_whole():
    from flows.pipeline import SKIPPED

    runs = [
        {"finished_at": "2026-11-28T17:16:20+00:00", "flow_run": "cunning-spider", "outcome": SKIPPED},
        {
            "finished_at": "2026-11-28T18:00:00+00:00",
            "flow_run": "x",
            "outcome": "failed at validate",
            "stages_ran": ["download"],
            "release_id": "guanaco-llama2-qlora-2cd63112f4df",
        },
    ]
    lines = history.format_table(runs).splitlines()
    assert lines[1].endswith(SKIPPED) and lines[2].endswith("failed at validate")  # cut at 28 characters before
    assert "guanaco-llama2-qlora-2cd63112f4df" in lines[2]
