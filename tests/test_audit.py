"""Lineage you can check: the audit command, tampering caught at the right link, no secrets in any output,
and artifacts that survive the machine through the DVC remote.

One real pipeline run (the Prefect flow, through DVC) with a planted Hub token and a planted signing key feeds
every test here; each test works on its own copy of that project.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.common import paths
from tasks.common.artifacts import read_json, sha256_file, sha256_tree, write_json
from tasks.publish import signing
from tasks.publish.audit import audit
from tasks.publish.audit import main as audit_main
from tests.test_signing import ec_key_pem, fingerprint_of, key_secrets

pytestmark = pytest.mark.slow
PLANTED = "hf_" + "PLANTED" + "secret0123456789abcdefTOKEN"  # built here so this file does not hold it
KEY_PASSWORD = "planted-" + "signing-password-0451"
OUTS = (
    "data/raw",
    "data/validated",
    "reports/validation",
    "data/formatted",
    "artifacts/adapter",
    "reports/generations.jsonl",
    "reports/eval_run.json",
    "release",
)


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory) -> Path:
    """An encrypted EC key outside the project, as a CI secret would be; its password is KEY_PASSWORD."""
    key = tmp_path_factory.mktemp("secrets") / "release.pem"
    key.write_bytes(ec_key_pem(KEY_PASSWORD))
    return key


@pytest.fixture(scope="module")
def published(tmp_path_factory, prefect_harness, new_project, signing_key):
    """A fresh project taken through the whole flow with HF_TOKEN and a signing key set, as a scheduled run would be."""
    from flows.pipeline import pipeline

    project = new_project(tmp_path_factory.mktemp("audit") / "project")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", PLANTED)
        mp.setenv(signing.KEY_ENV, str(signing_key))
        mp.setenv(signing.PASSWORD_ENV, KEY_PASSWORD)
        result = pipeline(project_dir=str(project))
    assert result["outcome"] == "published"
    return project


@pytest.fixture
def project(published, tmp_path) -> Path:
    """This test's own copy of the published project (git history, DVC cache and all)."""
    dest = tmp_path / "project"
    shutil.copytree(published, dest, symlinks=True)
    return dest


def _first_failure(project: Path) -> str | None:
    links = audit(project / paths.RELEASE_DIR)
    return next((link.name for link in links if not link.ok), None)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_audit_passes_on_an_untouched_release_and_prints_the_chain(project, capsys):
    assert audit_main([str(project / paths.RELEASE_DIR)]) == 0
    out = capsys.readouterr().out
    for name in (
        "source",
        "raw data",
        "validation",
        "formatted data",
        "params",
        "code",
        "training",
        "evaluation",
        "release",
        "signature",
    ):
        assert "OK   " in out and f". {name}" in out, name
    assert "audit passed" in out
    assert audit_main([str(project / paths.RELEASE_DIR), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [link["name"] for link in report["links"]][0] == "source"


def test_the_code_link_records_what_each_stage_ran_and_names_a_module_changed_since(project):
    from tasks.publish.stage_code import STAGES, stage_code

    lineage = json.loads((project / paths.RELEASE_DIR / paths.LINEAGE).read_text())
    ran = lineage["code"]["stages"]
    assert tuple(ran) == STAGES and all(sorted(ran[s]) == stage_code(s, project) for s in STAGES)
    assert "tasks/train/attention.py" in ran["train"] and "tasks/train/attention.py" not in ran["download"]
    code = next(link for link in audit(project / paths.RELEASE_DIR) if link.name == "code")
    assert not code.warnings and any("matches dvc.lock and the files here" in f for f in code.facts)

    # An edit to a module train imports only indirectly (train -> attention) is named, for train and not download.
    with open(project / "tasks" / "train" / "attention.py", "a") as f:
        f.write("\n# an edit after the release\n")
    code = next(link for link in audit(project / paths.RELEASE_DIR) if link.name == "code")
    assert any("stage train ran" in w and "tasks/train/attention.py" in w for w in code.warnings), code.warnings
    assert not any("stage download" in w for w in code.warnings)


def test_one_flipped_byte_in_the_released_adapter_fails_at_the_release_link(project, capsys):
    _flip_last_byte(project / paths.RELEASE_DIR / paths.ADAPTER_WEIGHTS)
    assert _first_failure(project) == "release"
    assert audit_main([str(project / paths.RELEASE_DIR)]) == 1
    assert "audit FAILED at link 'release': adapter_model.safetensors" in capsys.readouterr().out


def test_the_signature_link_names_the_signers_key_and_catches_a_card_edited_behind_the_lineage(project, signing_key):
    release = project / paths.RELEASE_DIR
    link = next(link for link in audit(release) if link.name == "signature")
    assert link.ok and not link.warnings  # signed with a key of its own, not the machine-local one
    assert any(fingerprint_of(signing_key.read_bytes(), KEY_PASSWORD) in fact for fact in link.facts)
    verify = signing.verify_command("release").split()
    cli = [str(Path(sys.executable).parent / verify[0]), *verify[1:]]
    assert subprocess.run(cli, cwd=project, capture_output=True).returncode == 0

    # The card edited and its hash rewritten in lineage.json: every lineage link holds, the signature does not.
    card = release / "README.md"
    card.write_text(card.read_text().replace("LoRA adapter", "Safe, audited LoRA adapter", 1))
    lineage = read_json(release / paths.LINEAGE)
    lineage["files_sha256"]["README.md"] = sha256_file(card)
    write_json(release / paths.LINEAGE, lineage)
    assert _first_failure(project) == "signature"
    assert subprocess.run(cli, cwd=project, capture_output=True).returncode == 1


def test_an_edited_formatted_row_fails_at_the_formatted_data_link(project):
    train = project / paths.TRAIN_ROWS
    lines = train.read_text(encoding="utf-8").splitlines(keepends=True)
    row = json.loads(lines[3])
    row["text"] = row["text"].replace("[/INST]", "[/INST] Sure!", 1)
    lines[3] = json.dumps(row, ensure_ascii=False) + "\n"
    train.write_text("".join(lines), encoding="utf-8")
    assert _first_failure(project) == "formatted data"


def test_edited_raw_data_fails_at_the_raw_data_link(project, capsys):
    raw = project / paths.RAW_ROWS
    raw.write_text(raw.read_text(encoding="utf-8").replace("Assistant", "Assistent", 1), encoding="utf-8")
    assert _first_failure(project) == "raw data"
    # What a user meets after a later run rewrote data/raw (say a new download whose validation then failed):
    # the failure says how to audit the release as published.
    assert audit_main([str(project / paths.RELEASE_DIR)]) == 1
    out = capsys.readouterr().out
    assert "FAILED at link 'raw data'" in out and "--release-only" in out and "dvc checkout" in out
    assert audit_main([str(project / paths.RELEASE_DIR), "--release-only"]) == 0
    # The source file is here; --release-only skips it and says so, rather than calling it missing.
    out = capsys.readouterr().out
    assert "not re-checked with --release-only" in out and "is not here" not in out


def test_a_rewritten_lineage_still_fails_where_the_stage_records_disagree(project):
    """Someone swaps the adapter AND rewrites its hash in lineage.json: the training record still disagrees."""
    release = project / paths.RELEASE_DIR
    _flip_last_byte(release / paths.ADAPTER_WEIGHTS)
    lineage = json.loads((release / paths.LINEAGE).read_text())
    lineage["files_sha256"] = {k: v for k, v in sha256_tree(release).items() if k != paths.LINEAGE}
    (release / paths.LINEAGE).write_text(json.dumps(lineage))
    links = {link.name: link for link in audit(release)}
    assert not links["release"].ok
    assert any("released adapter vs adapter trained" in p for p in links["release"].problems)


def test_a_missing_artifact_is_named_with_what_to_do(project, capsys):
    shutil.rmtree(project / paths.FORMATTED_DIR)
    assert audit_main([str(project / paths.RELEASE_DIR)]) == 1
    out = capsys.readouterr().out
    assert "FAILED at link 'formatted data'" in out and "dvc pull" in out
    # The release on its own still checks out.
    assert audit_main([str(project / paths.RELEASE_DIR), "--release-only"]) == 0


def test_the_audit_says_when_the_folder_is_not_a_release(tmp_path, capsys):
    assert audit_main([str(tmp_path)]) == 2
    assert "lineage.json not found" in capsys.readouterr().err


def test_the_planted_hub_token_and_signing_key_are_in_no_output_log_or_prefect_artifact(
    published, prefect_harness, signing_key
):
    """Every file the run wrote (DVC cache, release, metrics, history, lock...) and everything Prefect stored."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    planted = [PLANTED, *key_secrets(signing_key.read_bytes(), KEY_PASSWORD)]
    written = [p for p in published.rglob("*") if p.is_file() and ".git" not in p.parts]
    assert {"params.yaml", paths.LINEAGE, "README.md", "provenance.intoto.json"} <= {p.name for p in written}
    leaks = [str(p) for p in written for secret in planted if secret.encode() in p.read_bytes()]
    assert leaks == []

    async def stored() -> str:
        async with get_client() as client:
            artifacts = await client.read_artifacts()
            logs = await client.read_logs(log_filter=LogFilter(), limit=200)
            runs = await client.read_flow_runs()
        return json.dumps(
            [a.model_dump(mode="json") for a in artifacts]
            + [entry.model_dump(mode="json") for entry in logs]
            + [r.model_dump(mode="json") for r in runs]
        )

    text = anyio.run(stored)
    assert "guanaco-pipeline-summary" in text  # the run's artifact is there to be searched
    assert [secret for secret in planted if secret in text] == []


def test_artifacts_survive_the_machine_through_the_dvc_remote(project):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def dvc(*args: str) -> str:
        proc = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    before = {out: sha256_tree(project / out) for out in OUTS}
    dvc("push")
    remote = project.parent / "guanaco-dvc-storage"  # the default remote: beside the project, outside it
    assert remote.is_dir() and any(remote.rglob("*"))
    # A new machine: no outputs, no cache.
    for out in OUTS:
        target = project / out
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(project / ".dvc" / "cache")
    dvc("pull")
    assert {out: sha256_tree(project / out) for out in OUTS} == before
    assert _first_failure(project) is None


def test_publish_records_its_own_code_as_it_runs_not_its_last_lock_entry(tmp_path):
    """While publish runs, dvc.lock still holds publish's previous run: the record must not take that code for
    the code running now (else the audit of a fresh release warns that the workspace moved on)."""
    import yaml

    from tasks.publish.stage_code import _md5, stage_code, stage_code_hashes

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "tasks", tmp_path / "tasks")
    stale = {
        "stages": {
            s: {"deps": [{"path": f, "md5": "0" * 32} for f in stage_code(s, root)]} for s in ("train", "publish")
        }
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(stale))
    record = stage_code_hashes(tmp_path, running="publish")
    assert set(record["train"].values()) == {"0" * 32}  # a stage DVC ran: the code of that run
    assert record["publish"] == {f: _md5(tmp_path / f) for f in stage_code("publish", tmp_path)}
