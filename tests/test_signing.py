"""Release signing (tasks/publish/signing.py) and the provenance statement's pieces (tasks/publish/provenance.py),
without a model.

The signed CPU release itself, verified with the standard CLI and tampered with, is in
tests/test_train_evaluate_publish.py; the audit's signature link over a whole pipeline run in tests/test_audit.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tasks.common import paths
from tasks.common.config import with_overrides
from tasks.common.errors import PipelineError
from tasks.publish import provenance, signing
from tests.conftest import ROOT


def ec_key_pem(password: str | None = None) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    crypt = serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, crypt
    )


def fingerprint_of(private_pem: bytes, password: str | None = None) -> str:
    """The fingerprint computed here from the private key, apart from the code under test."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem, password.encode() if password else None)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def key_secrets(pem: bytes, password: str) -> list[str]:
    """What no output may hold: the password, and every base64 line of the key, as stored and decrypted."""
    from cryptography.hazmat.primitives import serialization

    clear = serialization.load_pem_private_key(pem, password.encode()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    lines = [line for key in (pem, clear) for line in key.decode().splitlines() if line and "-----" not in line]
    return [password, *lines]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty project root to sign from (the project key is made relative to it)."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def publish_params(params, monkeypatch):
    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    monkeypatch.delenv(signing.PASSWORD_ENV, raising=False)
    return params.publish


def test_the_project_key_is_made_once_private_and_git_ignored(workdir, publish_params):
    first = signing.signer(publish_params)
    key = workdir / paths.SIGNING_KEY
    assert first.key_source == signing.PROJECT_KEY and first.key_path == paths.SIGNING_KEY
    assert oct(key.stat().st_mode & 0o777) == "0o600" and oct(key.parent.stat().st_mode & 0o777) == "0o700"
    assert signing.signer(publish_params).record() == first.record()  # reused, not remade
    assert first.record()["public_key_sha256"] == fingerprint_of(key.read_bytes())
    ignored = subprocess.run(["git", "check-ignore", "-q", str(paths.SIGNING_KEY)], cwd=ROOT)
    assert ignored.returncode == 0, ".keys/ must be git-ignored: it holds a private key"


def test_the_key_comes_from_the_param_then_the_environment(workdir, publish_params, monkeypatch, tmp_path):
    by_env, by_param = tmp_path / "env.pem", tmp_path / "param.pem"
    by_env.write_bytes(ec_key_pem())
    by_param.write_bytes(ec_key_pem())
    monkeypatch.setenv(signing.KEY_ENV, str(by_env))
    env_signer = signing.signer(publish_params)
    assert env_signer.key_source == f"${signing.KEY_ENV}"
    assert env_signer.record()["public_key_sha256"] == fingerprint_of(by_env.read_bytes())
    param_signer = signing.signer(publish_params.model_copy(update={"signing_key": str(by_param)}))
    assert param_signer.record()["public_key_sha256"] == fingerprint_of(by_param.read_bytes())
    assert not (workdir / paths.SIGNING_KEY).exists(), "no project key is made when one is named"
    assert "key_path" not in param_signer.record() and str(by_param) not in str(param_signer.record())


def test_an_encrypted_key_reads_its_password_from_the_environment(workdir, publish_params, monkeypatch, tmp_path):
    key = tmp_path / "encrypted.pem"
    key.write_bytes(ec_key_pem(password="s3cret-pass"))
    monkeypatch.setenv(signing.KEY_ENV, str(key))
    with pytest.raises(PipelineError, match=re.escape(signing.PASSWORD_ENV)):
        signing.signer(publish_params)
    monkeypatch.setenv(signing.PASSWORD_ENV, "s3cret-pass")
    assert signing.signer(publish_params).record()["public_key_sha256"] == fingerprint_of(
        key.read_bytes(), "s3cret-pass"
    )


def test_a_missing_or_unusable_key_stops_publish_naming_where_it_came_from(
    workdir, params, publish_params, monkeypatch, tmp_path
):
    with pytest.raises(PipelineError, match=r"from publish\.signing_key\) is not a file"):
        signing.signer(with_overrides(params, **{"publish.signing_key": str(tmp_path / "nope.pem")}).publish)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    monkeypatch.setenv(signing.KEY_ENV, str(rsa_key))
    with pytest.raises(PipelineError, match=r"not an EC P-256/P-384/P-521 key"):
        signing.signer(publish_params)


def test_a_signed_folder_verifies_and_any_change_is_named(workdir, publish_params, tmp_path):
    folder = tmp_path / "out" / "release"
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (folder / "README.md").write_text("card\n")
    signer = signing.signer(publish_params)
    signer.write_public_key(folder)
    signer.sign(folder, "my-release-0123")
    assert [p.name for p in folder.parent.iterdir()] == ["release"], "the signing rename leaves nothing behind"
    assert signing.verify(folder) == signer.record()["public_key_sha256"]

    (folder / "README.md").write_text("card, edited\n")
    with pytest.raises(signing.SignatureError, match="changed since they were signed: README.md$"):
        signing.verify(folder)
    (folder / "README.md").write_text("card\n")
    (folder / "extra.txt").write_text("added later\n")
    with pytest.raises(signing.SignatureError, match="Extra files found"):
        signing.verify(folder)
    (folder / "extra.txt").unlink()
    # Someone else's key in place of the signer's: the bundle names the key it was made with.
    other = tmp_path / "other.pem"
    other.write_bytes(ec_key_pem())
    signing.signer(publish_params.model_copy(update={"signing_key": str(other)})).write_public_key(folder)
    with pytest.raises(signing.SignatureError, match="does not verify with signing_key.pub"):
        signing.verify(folder)


def test_the_flow_run_id_is_prefects_when_there_is_one(monkeypatch):
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    assert provenance.flow_run_id() is None
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "5f0c8a59-0c1e-4d5b-9a57-3f1f4c8d2e10")  # set in a deployment's run
    assert provenance.flow_run_id() == "5f0c8a59-0c1e-4d5b-9a57-3f1f4c8d2e10"


def test_the_stage_commands_are_dvc_yamls(tmp_path):
    from tasks.publish.stage_code import STAGES

    assert provenance.stage_commands(ROOT) == {stage: f"python -m tasks.{stage}" for stage in STAGES}
    assert provenance.stage_commands(tmp_path) == {}


def test_readme_audit_section_shows_both_verify_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Audit a release") :]
    section = section[: section.index("\n## ", 1)]
    assert "guanaco-audit release" in section
    assert signing.verify_command("release") in section
    assert "publish.signing: sigstore" in section  # the keyless switch is documented beside them
