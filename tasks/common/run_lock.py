"""One pipeline run at a time in a workspace: a lock held for a whole run, by the Prefect flow or by a stage.

Why DVC's own locks are not enough: a `dvc` command holds DVC's repo lock (`.dvc/tmp/lock`) while it works out
what to run and records it, but lets go of it while a stage's command runs (only that stage's files stay locked),
and the flow runs one `dvc repro --single-item` per stage, so between two of its stages nothing of DVC's is held
and a second flow, or a user's `dvc repro`, could slip in and interleave stages. So:

- the flow takes this lock before it touches anything and keeps it to its end (`hold_for_flow`); the `dvc`
  processes it starts get an environment variable naming it (`child_env`), so the stages they run know they are
  part of the holder's run;
- every stage entry (`tasks.common.runner.run_main`) takes it unless its run already holds it (`hold_for_stage`), so a
  stage of a user's `dvc repro` refuses while a flow runs; and a flow refuses to start while a dvc command is at
  work in the workspace, which DVC's own lock files tell (`_dvc_at_work`).

The lock is `fcntl.flock` on `.dvc/tmp/pipeline-run.lock`: the kernel releases it when the last process holding
its descriptor ends, so a killed run never blocks the next one. Beside it, `pipeline-run.json` says who holds it
(pid, start, command); it is read only by a process the flock has just refused, so a stale one left by a killed
run is never trusted. (Just after a new holder takes the flock, for the instant before it rewrites the file, a
refused process may still read the previous holder's details; the refusal itself is right either way.) A new
holder that finds one says so (`RunLock.stale`): the run it names was killed, or its machine went down.

A killed `dvc repro` also leaves its entries in DVC's per-file lock table (`.dvc/tmp/rwlock`, pid and command line).
DVC drops an entry whose pid is gone, but trusts a pid that lives: once the system has given the dead dvc's pid to
another program, DVC calls the stage's files "busy" for as long as that program runs, and a flow would take it for
a dvc at work and skip. An entry whose pid is gone or runs another command line is provably dead: the flow removes
it (under DVC's own guard lock, as DVC does) and says which.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.common.artifacts import write_json
from tasks.common.errors import PipelineError

# Under DVC's own tmp folder: ignored by git (.dvc/.gitignore) and never part of any output.
# The lock file is never deleted: a process could lock the deleted file while another locks its replacement.
LOCK_FILE = Path(".dvc/tmp/pipeline-run.lock")
HOLDER_FILE = Path(".dvc/tmp/pipeline-run.json")
DVC_LOCK = Path(".dvc/tmp/lock")  # DVC's repo lock (zc.lockfile: a flock too; with core.hardlink_lock it is not)
DVC_RWLOCK, DVC_RWLOCK_GUARD = Path(".dvc/tmp/rwlock"), Path(".dvc/tmp/rwlock.lock")  # DVC's per-file lock table
COVER_ENV = "GUANACO_PIPELINE_RUN"  # the holder's token, in the environment of the processes its run starts

_held: dict[Path, RunLock] = {}  # the locks this process holds, by workspace root
log = logging.getLogger(__name__)


class RunInProgress(PipelineError):
    """Another run holds this workspace; the refused run changed nothing."""


@dataclass
class RunLock:
    root: Path
    fd: int
    token: str
    stale: str | None = None  # what a holder that never let go (killed) left behind, for the new holder to say

    def release(self) -> None:
        if self.fd < 0:
            return
        (self.root / HOLDER_FILE).unlink(missing_ok=True)  # ours: written after we took the flock
        os.close(self.fd)  # the flock goes with the last descriptor
        self.fd = -1
        _held.pop(self.root, None)
        if os.environ.get(COVER_ENV) == self.token:
            del os.environ[COVER_ENV]

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _holder(root: Path) -> dict:
    """Who holds the lock, per its sidecar; {} when it cannot be read (a holder between flock and write)."""
    for _ in range(10):
        try:
            return json.loads((root / HOLDER_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
    return {}


def refusal(root: Path, when_pid: str, what: str) -> str:
    return (
        f"another run is in progress ({when_pid}): {what}, in {root}. This run changed nothing. Let that run "
        "finish, then run again (`python -m flows.history` lists finished flow runs). A killed run frees the "
        "lock by itself: there is nothing to delete."
    )


def _taken(path: Path) -> bool:
    """Whether another process holds a flock on `path`: a shared flock tried and dropped at once (a dvc command
    wanting it in that instant retries, for 3 s by default)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _cmdline(pid: int | str) -> str:
    try:  # Linux; elsewhere we only know it is some dvc command
        return Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, ValueError):
        return "a dvc command"


def _entry_dead(entry: dict) -> bool:
    """Whether the dvc command of an rwlock entry is provably gone: its pid is not running, or runs another command
    line (the pid was given to another program). DVC records `" ".join(sys.argv)`; the process's command line starts
    with the interpreter and names dvc its own way (`.../bin/dvc`, `-m dvc`), so only the arguments after argv[0] are
    compared. Where the command line cannot be read, the entry is taken as alive. (A dvc run inside a program that
    rewrites its own command line, setproctitle, would read as another program: none of this pipeline's does.)"""
    pid = int(entry["pid"])
    if not _alive(pid):
        return True
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return False
    return not " ".join(a.decode(errors="replace") for a in argv).endswith(entry["cmd"].partition(" ")[2])


def _drop_dead_dvc_entries(root: Path) -> list[str]:
    """Remove the provably dead entries (`_entry_dead`) from DVC's per-file lock table, under DVC's guard lock as DVC
    edits it; returns a line for each removed. DVC removes those of gone pids itself, at the next command that wants
    their files; one whose pid lives on in another program it never removes."""
    try:
        guard = os.open(root / DVC_RWLOCK_GUARD, os.O_RDWR)
    except FileNotFoundError:
        return []
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)  # DVC rewrites the table in place under this lock
        try:
            table = json.loads((root / DVC_RWLOCK).read_text())
        except FileNotFoundError:
            return []
        dropped: list[str] = []
        for path, entry in list(table.get("write", {}).items()):
            if _entry_dead(entry):
                del table["write"][path]
                dropped.append(f"pid {entry['pid']} (`{entry['cmd']}`) writing {path}")
        for path, entries in list(table.get("read", {}).items()):
            for entry in [e for e in entries if _entry_dead(e)]:
                entries.remove(entry)
                dropped.append(f"pid {entry['pid']} (`{entry['cmd']}`) reading {path}")
            if not entries:
                del table["read"][path]
        if dropped:
            write_json(root / DVC_RWLOCK, {k: v for k, v in table.items() if v})
        return dropped
    finally:
        os.close(guard)


def _dvc_at_work(root: Path) -> tuple[str, str] | None:
    """(pid, what) of a dvc command at work in this workspace, else None. Between stages a `dvc repro` holds DVC's
    repo lock; while a stage's command runs it lets go of it but lists the stage's files, with its pid, in DVC's
    per-file lock table (.dvc/tmp/rwlock): so a `dvc repro` shows in one or the other from its start to its end,
    startup of each stage included. (With `core.hardlink_lock` set DVC locks another way, which this does not see.)"""
    if _taken(root / DVC_LOCK):
        pid = (root / DVC_LOCK).read_text(errors="replace").strip() or "?"
        return pid, f"`{_cmdline(pid)}` holding DVC's lock {DVC_LOCK}"
    try:
        guard = os.open(root / DVC_RWLOCK_GUARD, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(guard, fcntl.LOCK_SH)  # DVC rewrites the table in place under this lock: read it whole
        table = json.loads((root / DVC_RWLOCK).read_text()) if (root / DVC_RWLOCK).exists() else {}
    except ValueError:  # whole under the lock, yet unreadable: its writer was killed mid-write (a traceback, before)
        raise PipelineError(
            f"DVC's lock table {DVC_RWLOCK} in {root} is cut short: a dvc command was killed while it rewrote it "
            "(DVC writes it in place), and every dvc command refuses to run until it is gone. This run changed "
            f"nothing. If no dvc command is running in this workspace, delete {DVC_RWLOCK} (it lists only the files "
            "of running dvc commands) and run again."
        ) from None
    finally:
        os.close(guard)
    entries = [*table.get("write", {}).values(), *(e for es in table.get("read", {}).values() for e in es)]
    live = next((e for e in entries if not _entry_dead(e)), None)
    return (str(live["pid"]), f"`{live['cmd']}` running a stage") if live else None


def _stale(root: Path) -> str | None:
    """What the last holder left if it never let go: its `pipeline-run.json`, read by a process that has just taken
    the flock, so that holder's processes are all gone (killed, or its machine went down)."""
    try:
        who = json.loads((root / HOLDER_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:  # cut short while it was written
        who = {}
    return (
        f"stale lock: the last run to hold {root} (pid {who.get('pid', '?')}, started {who.get('started_at', '?')}: "
        f"{who.get('command', 'holder unknown')}) ended without letting go of it: it was killed, or its machine "
        "went down. Its lock went with its processes, so this run goes on; a stage it left half done runs again "
        "(training from its last complete checkpoint)."
    )


def _acquire(root: Path, command: str, dvc_idle: bool = False) -> RunLock:
    (root / LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # never waits: a refused run ends at once
    except BlockingIOError:
        os.close(fd)
        who = _holder(root)
        raise RunInProgress(
            refusal(
                root,
                f"started {who.get('started_at', '?')}, pid {who.get('pid', '?')}",
                who.get("command", "holder unknown"),
            )
        ) from None
    try:
        dvc = _dvc_at_work(root) if dvc_idle else None
    except PipelineError:
        os.close(fd)
        raise
    if dvc:
        os.close(fd)
        raise RunInProgress(refusal(root, f"pid {dvc[0]}", dvc[1]))
    stale = _stale(root)  # before our own record replaces the dead holder's
    if dvc_idle and (dropped := _drop_dead_dvc_entries(root)):  # no dvc at work: every entry left is a dead one's
        stale = (stale + " " if stale else "") + (
            f"DVC's per-file lock ({DVC_RWLOCK}) still listed a killed dvc command, whose process is gone or whose "
            f"pid now runs another program; removed: {'; '.join(dropped)}."
        )
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    write_json(root / HOLDER_FILE, {"pid": os.getpid(), "started_at": _now(), "command": command, "token": token})
    return RunLock(root, fd, token, stale)


def hold_for_flow(root: Path, flow_run: str) -> RunLock:
    """The workspace lock for a whole flow run, taken before the flow touches anything, or RunInProgress.

    No dvc command may be at work either (`_dvc_at_work`): a user's `dvc repro` holds this lock only while one of its
    stages has reached `run_main`, so without that check a flow starting between two of its stages would get in."""
    lock = _acquire(root.resolve(), f"Prefect flow run {flow_run!r}", dvc_idle=True)
    _held[lock.root] = lock
    return lock


def child_env(root: Path) -> dict[str, str]:
    """The environment for a child process of this run: this one's, plus the lock's token when this process holds
    the lock on `root`, so the stages the child runs know they belong to this run.

    The lock's descriptor itself is not handed to `dvc`: DVC forks copies of itself that wait on its background
    daemons (analytics, updater), and those would keep the workspace locked after the run ended. The price: if the
    flow is killed while a stage runs, that stage finishes without this lock; a new flow still refuses while it
    runs (`_dvc_at_work` sees its dvc), and DVC's per-file locks keep a user's `dvc repro` off its files."""
    lock = _held.get(Path(root).resolve())
    return {**os.environ, COVER_ENV: lock.token} if lock else dict(os.environ)


def hold_for_stage(stage: str) -> RunLock | None:
    """For a stage entry (run in the project root): the workspace lock; None when the run that started this
    process holds it (the flow, or this stage before it re-executed itself); RunInProgress when another run does."""
    root = Path.cwd().resolve()
    if not (root / ".dvc").is_dir():
        return None  # not a DVC workspace (a scratch folder, a unit test): there is no pipeline run to exclude
    try:
        lock = _acquire(root, f"stage {stage!r} ({' '.join(['python', '-m', f'tasks.{stage}', *sys.argv[1:]])})")
    except RunInProgress:
        token = os.environ.get(COVER_ENV)
        if token and _holder(root).get("token") == token:
            return None  # held by our own run
        raise
    os.set_inheritable(lock.fd, True)  # the train stage re-executes itself (os.execve): keep the lock across that,
    os.environ[COVER_ENV] = lock.token  # and cover the new image and the workers it launches
    _held[root] = lock
    if lock.stale:
        log.warning("%s", lock.stale)
    return lock
