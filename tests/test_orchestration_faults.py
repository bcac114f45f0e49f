"""Orchestration faults on the team's set-up (issue 27): real processes on a real PostgreSQL-backed Prefect server, real
SIGKILL, a real `pg_ctl restart`; nothing mocked.

One set-up for the module (tests/conftest.py `Team`): PostgreSQL, `prefect server start` on it with authentication,
the deployment on a locked process pool with the crash automation (`python -m flows.deploy --pool`), a worker. The
tests run in this order on one project, so only the first trains from scratch; each later one asserts what it needs
of its own run.

- the worker and every process of its flow run killed mid-training: the server marks the run Crashed (the heartbeat
  automation), the next run on a new worker resumes training from the last complete checkpoint and publishes;
- the server stopped and started again while a run executes, and while the worker idles: the worker carries on, the
  run ends once, and a concurrency lease (what holds a running flow's slot) outlives the restart;
- PostgreSQL restarted under the server: the server recovers and a new run completes;
- stale locks of killed processes (the workspace lock's record, DVC's per-file lock table): broken, and said.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows import history
from tasks.common import paths, run_lock
from tasks.train.checkpoints import COMPLETE
from tests.conftest import Team, wait_for

pytestmark = pytest.mark.slow

# The test's crash window: two missed heartbeats (the product's default, flows.deploy.CRASH_AFTER_S, is three), so
# that the killed run is found out sooner. (The worker polls, and a run waiting for the slot retries, every 2 s:
# tests/conftest.py Team.)
CRASH_AFTER_S = 60


@pytest.fixture(scope="module")
def team(postgres, new_project, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    setup = Team(postgres.url, new_project(tmp / "project"), tmp)
    try:
        setup.start_server()
        said = setup.deploy("--crash-after", str(CRASH_AFTER_S))
        assert f"silent for {CRASH_AFTER_S} s is marked Crashed (automation made)" in said, said
        assert "WARNING" not in said, said  # the server keeps its leases on disk, as docs/team.md starts it
        setup.start_worker()
        yield setup
    finally:
        setup.close()


def _trigger(team: Team):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: team.url, PREFECT_API_AUTH_STRING: team.auth}):
        return run_deployment(Team.DEPLOYMENT, timeout=0).id


def _read(team: Team, run_id):
    return team.call(lambda c: c.read_flow_run(run_id))


def _ended(team: Team, run_id, timeout: float):
    """The flow run once in a final state (Completed, Failed, Crashed, Cancelled)."""
    return wait_for(lambda: (r := _read(team, run_id)).state.is_final() and r, timeout, f"flow run {run_id} to end")


def _logs(team: Team, run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
    return "\n".join(log.message for log in team.call(lambda c: c.read_logs(log_filter=flt)))


def _records(project: Path, run_id) -> list[dict]:
    return [r for r in history.read(project) if r["flow_run_id"] == str(run_id)]


def _kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a process and every process under it as a machine that dies would: all stopped first (SIGSTOP), so
    that none sees another go and reacts (a flow reporting its dvc's death as a failure), then all killed. Returns the
    pids; each is gone (or a zombie, which holds no file and no lock) when this returns."""
    root = psutil.Process(proc.pid)
    tree: dict[int, psutil.Process] = {}
    for _ in range(3):  # stop, and look again for a child started meanwhile
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.suspend()
                tree[p.pid] = p
    for p in tree.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()

    def gone(p: psutil.Process) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(gone(p) for p in tree.values()), 30, "the killed processes to be gone", every=0.2)
    return list(tree)


def _audit(team: Team) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tasks.publish.audit", "release"],
        cwd=team.project,
        env=team.env,
        capture_output=True,
        text=True,
    )


def test_a_run_whose_worker_is_killed_is_marked_crashed_and_the_next_resumes_from_its_checkpoint(team):
    project = team.project
    first = _trigger(team)
    checkpoints = project / paths.CHECKPOINT_DIR
    wait_for((checkpoints / "checkpoint-10" / COMPLETE).exists, 400, "the first complete checkpoint", every=0.1)
    killed = _kill_tree(team.worker)  # the worker, the flow run's engine, its dvc, the train stage
    last = max(int(c.name.split("-")[1]) for c in checkpoints.glob("checkpoint-*") if (c / COMPLETE).exists())

    # what the kill left: a run the server still thinks Running, no adapter, the dead flow's workspace-lock record,
    # and DVC's per-file lock table naming the killed `dvc repro` of the train stage
    assert _read(team, first).state.type.value == "RUNNING"
    assert not (project / paths.ADAPTER_DIR).exists()
    assert json.loads((project / run_lock.HOLDER_FILE).read_text())["pid"] in killed
    rwlock = json.loads((project / run_lock.DVC_RWLOCK).read_text())
    assert {e["pid"] for e in rwlock.get("write", {}).values()} & set(killed), rwlock
    assert history.read(project) == []  # the killed run wrote no record

    # A new worker, and a new run at once: it waits for the deployment's one slot, which the dead run holds until the
    # server marks it Crashed (no heartbeat for CRASH_AFTER_S); then it runs and resumes training.
    start = time.perf_counter()
    team.start_worker()
    second = _trigger(team)
    crashed = _ended(team, first, CRASH_AFTER_S + 60)
    print(f"\nkilled run marked {crashed.state.name} {time.perf_counter() - start:.0f} s after the kill")
    assert crashed.state.type.value == "CRASHED", crashed.state
    resumed = _ended(team, second, 600)
    assert resumed.state.type.value == "COMPLETED", (resumed.state, (team.tmp / "worker.log").read_text()[-3000:])
    assert resumed.state.name == "Completed"  # not "Skipped": the dead run's lock blocked nothing

    training = json.loads((project / paths.TRAINING).read_text())
    assert training["resumed"] is True and training["resumed_from_step"] == last > 0, training
    assert training["steps"] == 30  # the whole run's steps, as an uninterrupted run
    assert f"resumed at step {last} of 30" in (project / paths.LOG_DIR / "train.log").read_text()

    (record,) = history.read(project)
    assert record["flow_run_id"] == str(second) and record["outcome"] == "published", record
    # the new run said what the killed one left: its workspace lock (named by its flow run) and its dvc's entries
    assert f"Prefect flow run {crashed.name!r}" in record["stale_lock"], record
    assert "DVC's per-file lock" in record["stale_lock"], record
    assert record["stale_lock"] in _logs(team, second)
    audit = _audit(team)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def _probe_lease(team: Team):
    """A lease on a concurrency limit of its own (limit 1, 300 s), taken as the engine takes the deployment's slot."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    async def take(c):
        await c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="restart-probe", limit=1))
        response = await c.increment_concurrency_slots_with_lease(["restart-probe"], 1, "concurrency", 300)
        return response.json()["lease_id"]

    return team.call(take)


def test_the_server_restarted_while_a_run_executes_and_while_the_worker_polls(team):
    worker = team.worker.pid
    lease = _probe_lease(team)
    run = _trigger(team)
    wait_for(lambda: _read(team, run).state.type.value == "RUNNING", 120, "the run to start", every=0.2)
    team.stop_server()  # the run's stages go on without the server; its end waits for it (Prefect's client retries)
    time.sleep(3)
    team.start_server()
    # A running flow holds the deployment's slot through a lease its engine renews every 225 s, and cancels itself
    # when the server answers that it knows no such lease (410): a lease must outlive the server's restart, as this
    # one taken before it does. With the server's default, in-memory lease storage this renewal fails.
    team.call(lambda c: c.renew_concurrency_lease(lease, lease_duration=300))
    ended = _ended(team, run, 300)
    assert ended.state.type.value == "COMPLETED", ended.state

    # recorded once: one final state on the server, one line in the history
    states = team.call(lambda c: c.read_flow_run_states(run))
    assert [s.type.value for s in states if s.is_final()] == ["COMPLETED"], [s.name for s in states]
    assert len(_records(team.project, run)) == 1

    # the worker idles, polling, while the server is gone; it picks up the next run once the server is back
    team.stop_server()
    time.sleep(5)  # a few of the worker's polls (every 2 s here) meet no server
    team.start_server()
    after = _ended(team, _trigger(team), 300)
    assert after.state.type.value == "COMPLETED", after.state
    assert team.worker.poll() is None and team.worker.pid == worker  # the same worker, never restarted


def _persisted(team: Team, run_id, event: str) -> bool:
    """Whether the server has stored an event of this name for the flow run."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    flt = EventFilter(
        event=EventNameFilter(name=[event]), resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"])
    )
    return bool(team.call(lambda c: c.read_events(filter=flt, limit=50)).events)


def test_postgres_restarted_under_the_server(team, postgres):
    server = team.server.pid
    postgres.pg_ctl("-m", "fast", "-w", "-t", "60", "restart")
    wait_for(team.healthy, 60, "the server's health after the database restart")
    run = _ended(team, _trigger(team), 300)
    assert run.state.type.value == "COMPLETED", run.state
    assert len(_records(team.project, run.id)) == 1
    assert team.server.poll() is None and team.server.pid == server  # the same server recovered, not restarted
    # its event pipeline too: the run's heartbeat, which the crash automation listens for, and its end are stored
    stored = ("prefect.flow-run.heartbeat", "prefect.flow-run.Completed")
    wait_for(lambda: all(_persisted(team, run.id, e) for e in stored), 60, "the run's events to be stored")


# A run's stage killed while it held the workspace lock (run_lock.hold_for_stage, as every stage entry takes it).
HOLD_AS_STAGE = "import sys, time; from tasks.common import run_lock; run_lock.hold_for_stage('train'); print('held', flush=True); time.sleep(600)"  # noqa: E501
# A dvc command that listed the download stage's files in DVC's per-file lock table (through DVC's own rwlock) and
# then lost its process while its pid lives on in another program: os.execv keeps the pid and drops the rest, as a
# dvc killed mid-stage whose pid the system has since given to `sleep`.
DVC_PID_REUSED = """
import os
from dvc.fs import localfs
from dvc.rwlock import rwlock
os.makedirs('.dvc/tmp', exist_ok=True)
with rwlock('.dvc/tmp', localfs, 'dvc repro --single-item download', [], [os.path.abspath('data/raw')], False):
    print('held', flush=True)
    os.execv('/bin/sleep', ['sleep', '600'])
"""


def _holder(project: Path, code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(project)}
    env.pop(run_lock.COVER_ENV, None)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=project, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_stale_locks_of_killed_processes_are_broken_with_a_message(team):
    project = team.project
    stage = _holder(project, HOLD_AS_STAGE)
    stage.send_signal(signal.SIGKILL)
    stage.wait()
    reused = _holder(project, DVC_PID_REUSED)
    try:
        assert json.loads((project / run_lock.HOLDER_FILE).read_text())["pid"] == stage.pid
        table = json.loads((project / run_lock.DVC_RWLOCK).read_text())
        assert [e["pid"] for e in table["write"].values()] == [reused.pid]  # its pid, now `sleep`'s

        run = _ended(team, _trigger(team), 300)
        assert run.state.type.value == "COMPLETED" and run.state.name == "Completed", run.state  # not skipped
        (record,) = _records(project, run.id)
        said = record["stale_lock"]
        assert f"pid {stage.pid}" in said and "stage 'train'" in said, said
        assert f"pid {reused.pid} (`dvc repro --single-item download`)" in said, said
        assert said in _logs(team, run.id)
        assert json.loads((project / run_lock.DVC_RWLOCK).read_text()).get("write", {}) == {}
        assert not (project / run_lock.HOLDER_FILE).exists()  # the run let go of the workspace at its end
        assert reused.poll() is None  # the program that has the pid now was left alone
    finally:
        reused.kill()
        reused.wait()
