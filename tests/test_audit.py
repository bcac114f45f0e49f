"""Lineage you can check: the audit command, tampering caught at the right link, no secrets in any output,
and artifacts that survive the machine through the DVC remote.

One real pipeline run (the Prefect flow, through DVC) with a planted Hub token and a planted signing key feeds
every test here; each test works on its own copy of that project.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.common import paths
from tasks.common.artifacts import read_json, sha256_file, sha256_tree, write_json
from tasks.common.environment import listing_sha256
from tasks.publish import signing
from tasks.publish.audit import audit
from tasks.publish.audit import main as audit_main
from tests.conftest import dvc
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
        "environment",
        "evaluation",
        "release",
        "signature",
        "provenance",
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
    # dvc repro itself wrote dvc.lock during the run: the one uncommitted input the record names
    assert (
        lineage["code"]["dirty_files"] == ["dvc.lock"] and len(code.warnings) == 1 and "(dvc.lock)" in code.warnings[0]
    )
    assert any("matches dvc.lock and the files here" in f for f in code.facts)

    # An edit to a module train imports only indirectly (train -> attention) is named, for train and not download.
    with open(project / "tasks" / "train" / "attention.py", "a") as f:
        f.write("\n# an edit after the release\n")
    code = next(link for link in audit(project / paths.RELEASE_DIR) if link.name == "code")
    assert any("stage train ran" in w and "tasks/train/attention.py" in w for w in code.warnings), code.warnings
    assert not any("stage download" in w for w in code.warnings)


def test_the_release_names_its_environment_and_the_audit_sees_this_one_is_the_same(project):
    lineage = json.loads((project / paths.RELEASE_DIR / "lineage.json").read_text())
    env = lineage["training"]["environment"]
    assert env["lock"] == "requirements/cpu.lock"  # the suite runs in the venv `make install` made from the lock
    assert len(env["distributions"]) > 100 and "great-expectations==" in " ".join(env["distributions"])
    from tasks.publish import provenance

    envelope = json.loads((project / paths.RELEASE_DIR / provenance.FILE).read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert {
        "name": "requirements/cpu.lock",
        "digest": {"sha256": sha256_file(project / "requirements/cpu.lock")},
        "annotations": {"installed": True},
    } in deps
    assert sum(d.get("uri", "").startswith("pkg:pypi/") for d in deps) == len(env["distributions"])
    link = next(link for link in audit(project / paths.RELEASE_DIR) if link.name == "environment")
    assert link.ok and not link.warnings and any("same installed set" in f for f in link.facts)


def _restore_lineage(project: Path) -> None:
    path = project / paths.RELEASE_DIR / "lineage.json"
    path.write_bytes((project / "lineage.orig").read_bytes())


def _rewrite_lineage(project: Path, change) -> dict:
    path = project / paths.RELEASE_DIR / "lineage.json"
    if not (project / "lineage.orig").exists():
        (project / "lineage.orig").write_bytes(path.read_bytes())
    lineage = json.loads(path.read_text())
    change(lineage)
    path.write_text(json.dumps(lineage))
    return {link.name: link for link in audit(project / paths.RELEASE_DIR)}


def test_an_environment_that_differs_from_the_releases_is_named_package_by_package(project):
    def older_transformers(lineage):
        dists = lineage["training"]["environment"]["distributions"]
        i = next(i for i, d in enumerate(dists) if d.startswith("transformers=="))
        dists[i] = "transformers==0.0.1"
        dists.append("left-behind==1.0")

    env = _rewrite_lineage(project, older_transformers)["environment"]
    assert not env.ok and "the list was edited" in env.problems[0]  # the list no longer matches its recorded sha256

    def older_transformers_and_its_digest(lineage):
        older_transformers(lineage)
        env = lineage["training"]["environment"]
        env["distributions_sha256"] = listing_sha256(env["distributions"])

    _restore_lineage(project)  # the lineage as published, rewritten again with a digest that matches its list
    env = _rewrite_lineage(project, older_transformers_and_its_digest)["environment"]
    assert env.ok  # a different environment warns: the audit can run anywhere
    (warning,) = env.warnings
    assert "2 package(s)" in warning and "transformers 0.0.1 -> " in warning and "left-behind 1.0 -> absent" in warning


def test_a_lock_digest_the_commit_does_not_hold_fails_the_environment_link(project):
    def claim_another_lock(lineage):
        lineage["training"]["environment"]["locks_sha256"]["requirements/cpu.lock"] = "0" * 64

    env = _rewrite_lineage(project, claim_another_lock)["environment"]
    assert not env.ok
    assert any("requirements/cpu.lock" in p and "does not belong to that code" in p for p in env.problems)


def _resign_with_another_key(release: Path, key_file: Path) -> str:
    """A forger's release: its public key swapped, the lineage's fingerprints rewritten to match, signed anew."""
    forger = signing.Signer("key", key_file, "forger", signing._public_pem(key_file, "forger"))
    forger.write_public_key(release)
    lineage = read_json(release / "lineage.json")
    lineage["signing"]["public_key_sha256"] = signing.fingerprint(forger.public_pem)
    (release / signing.SIGNATURE).unlink()
    lineage["files_sha256"] = {k: v for k, v in sha256_tree(release).items() if k != "lineage.json"}
    write_json(release / "lineage.json", lineage)
    forger.sign(release, lineage["release"]["id"])
    return lineage["signing"]["public_key_sha256"]


def test_the_audit_names_the_signer_and_fails_a_release_resigned_by_a_key_it_does_not_trust(project, tmp_path):
    release = project / paths.RELEASE_DIR
    team_key = tmp_path / "team.pub"
    shutil.copyfile(release / signing.PUBLIC_KEY, team_key)
    links = {link.name: link for link in audit(release)}
    assert links["signature"].ok and any("signer is unverified" in w for w in links["signature"].warnings)
    links = {link.name: link for link in audit(release, trust=[str(team_key)])}
    assert links["signature"].ok and any("signer is trusted" in f for f in links["signature"].facts)

    other = tmp_path / "other.pem"
    other.write_bytes(ec_key_pem())
    forged = _resign_with_another_key(release, other)
    # The files match the key shipped with them, so without trust only the warning says anything ...
    links = {link.name: link for link in audit(release)}
    assert links["signature"].ok and any("signer is unverified" in w for w in links["signature"].warnings)
    # ... with the team's key, given on the command line or committed in trusted_keys/, the forger is named.
    for trust, committed in (([str(team_key)], False), ([], True)):
        if committed:
            (project / paths.TRUSTED_KEYS_DIR).mkdir(exist_ok=True)
            shutil.copyfile(team_key, project / paths.TRUSTED_KEYS_DIR / "team.pub")
        links = {link.name: link for link in audit(release, trust=trust)}
        assert not links["signature"].ok
        assert forged in links["signature"].problems[0] and "trusted" in links["signature"].problems[0]
    assert audit_main([str(release), "--trust", signing.fingerprint(team_key.read_bytes())]) == 1


def _rewrite_envelope(release: Path, key_file: Path, password: str | None, change) -> None:
    """A forger who holds a signing key rewrites the provenance statement and signs the envelope anew."""
    from cryptography.hazmat.primitives import serialization

    from tasks.publish import provenance

    envelope = json.loads((release / provenance.FILE).read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    change(statement)
    key = serialization.load_pem_private_key(key_file.read_bytes(), password.encode() if password else None)
    signed = provenance.sign_envelope(statement, key, envelope["signatures"][0]["keyid"])
    (release / provenance.FILE).write_text(json.dumps(signed) + "\n")


def test_a_resigned_statement_claiming_another_dataset_fails_at_the_provenance_link(project, signing_key):
    release = project / paths.RELEASE_DIR
    links = {link.name: link for link in audit(release)}
    assert links["provenance"].ok and any("every claim holds" in f for f in links["provenance"].facts)

    def other_dataset(statement):
        for dep in statement["predicate"]["buildDefinition"]["resolvedDependencies"]:
            if dep.get("name") == "data/raw/rows.jsonl":
                dep["digest"] = {"sha256": "0" * 64}

    _rewrite_envelope(release, signing_key, KEY_PASSWORD, other_dataset)
    link = {link.name: link for link in audit(release)}["provenance"]
    assert not link.ok and "data/raw/rows.jsonl" in link.problems[0] and "0000000000" in link.problems[0]


def test_a_statement_with_other_params_or_subjects_is_named_and_a_plain_statement_is_refused(project, signing_key):
    from tasks.publish import provenance

    release = project / paths.RELEASE_DIR

    def forge(statement):
        statement["predicate"]["buildDefinition"]["externalParameters"]["lora"]["r"] = 8
        statement["subject"][0]["digest"]["sha256"] = "f" * 64

    _rewrite_envelope(release, signing_key, KEY_PASSWORD, forge)
    problems = {link.name: link for link in audit(release)}["provenance"].problems
    assert any("externalParameters" in p for p in problems) and any("subject" in p for p in problems)

    # plain JSON where the envelope belongs, and an envelope signed by another key
    envelope = json.loads((release / provenance.FILE).read_text())
    (release / provenance.FILE).write_text(base64.b64decode(envelope["payload"]).decode())
    assert "DSSE" in {link.name: link for link in audit(release)}["provenance"].problems[0]
    other = project.parent / "other.pem"
    other.write_bytes(ec_key_pem())
    (release / provenance.FILE).write_text(json.dumps(envelope) + "\n")
    _rewrite_envelope(release, other, None, lambda statement: None)
    assert "no signature of the release's key" in {link.name: link for link in audit(release)}["provenance"].problems[0]


def test_one_flipped_byte_in_the_released_adapter_fails_at_the_release_link(project, capsys):
    _flip_last_byte(project / paths.RELEASE_DIR / paths.ADAPTER_WEIGHTS)
    assert _first_failure(project) == "release"
    assert audit_main([str(project / paths.RELEASE_DIR)]) == 1
    assert "audit FAILED at link 'release': adapter_model.safetensors" in capsys.readouterr().out


def test_the_signature_link_names_the_signers_key_and_catches_a_card_edited_behind_the_lineage(project, signing_key):
    release = project / paths.RELEASE_DIR
    trusted = fingerprint_of(signing_key.read_bytes(), KEY_PASSWORD)
    link = next(link for link in audit(release, trust=[trusted]) if link.name == "signature")
    assert link.ok and not link.warnings  # signed with a trusted key of its own, not the machine-local one
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
    assert {"params.yaml", paths.LINEAGE, "README.md", "provenance.intoto.jsonl"} <= {p.name for p in written}
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
    before = {out: sha256_tree(project / out) for out in OUTS}
    dvc(project, "push")
    remote = project.parent / "guanaco-dvc-storage"  # the default remote: beside the project, outside it
    assert remote.is_dir() and any(remote.rglob("*"))
    # A new machine: no outputs, no cache.
    for out in OUTS:
        target = project / out
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(project / ".dvc" / "cache")
    dvc(project, "pull")
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


def test_a_release_copied_out_of_its_project_is_told_how_to_audit_it(project, tmp_path, capsys):
    """A shared or downloaded release has no project beside it: a clear exit 2, then --release-only checks it."""
    copied = tmp_path / "elsewhere" / "release"
    shutil.copytree(project / paths.RELEASE_DIR, copied)
    assert audit_main([str(copied)]) == 2
    err = capsys.readouterr().err
    assert str(copied.parent) in err and "--release-only" in err and "--project" in err
    assert audit_main([str(copied), "--release-only"]) == 0
    assert audit_main([str(copied), "--project", str(project)]) == 0
