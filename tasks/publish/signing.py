"""Sign a release folder with OpenSSF model signing (PyPI `model-signing`), and verify it as its CLI does.

The signature (`model.sig`, a Sigstore bundle holding an in-toto statement over every file's sha256) and the
public key (`signing_key.pub`) ship in the release, so anyone with the folder and the standard tool can check it:

    model_signing verify key release --signature release/model.sig --public_key release/signing_key.pub

The private key is named by `publish.signing_key` (a path), else by $GUANACO_SIGNING_KEY (a path), else it is the
project's own key in .keys/, an EC P-256 pair made on first use (git-ignored), so the CPU demo signs too. An
encrypted key's password comes from $GUANACO_SIGNING_KEY_PASSWORD only. The key and its password are read when
signing and never written to params, logs, lineage or the model card. `publish.signing: sigstore` signs keyless
instead (Sigstore's OIDC identity and transparency log; needs the network).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from tasks.common import paths
from tasks.common.artifacts import write_bytes
from tasks.common.config import PublishParams
from tasks.common.errors import PipelineError

SIGNATURE = "model.sig"  # model_signing's own default name
PUBLIC_KEY = "signing_key.pub"
KEY_ENV = "GUANACO_SIGNING_KEY"
PASSWORD_ENV = "GUANACO_SIGNING_KEY_PASSWORD"
PROJECT_KEY = "project key"  # the key_source of the key made in .keys/: the audit warns about it


class SignatureError(ValueError):
    """The folder does not verify against its signature (a changed, added or missing file, or another key)."""


def fingerprint(public_pem: bytes) -> str:
    """sha256 of the public key's DER (SubjectPublicKeyInfo): `openssl pkey -pubin -outform DER | sha256sum`."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_pem)
    return hashlib.sha256(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).hexdigest()


def verify_command(release: str = "release", public_key: str | None = None) -> str:
    """The standard CLI line that verifies a key-signed release against `public_key` (a trusted copy of the signer's
    key; the release's own copy proves only that the files match whoever signed them)."""
    key = public_key or f"{release}/{PUBLIC_KEY}"
    # --no-ignore-git-paths: the CLI skips .git*, .github and .gitattributes by default, so a file added under such
    # a name would pass unseen; every file of a release is signed, dotfiles included.
    return (
        f"model_signing verify key {release} --signature {release}/{SIGNATURE} --public_key {key} --no-ignore-git-paths"
    )


def recorded_params(params: dict, key_sha256: str | None) -> dict:
    """Params as a release records them: publish.signing_key, a path on the publishing machine, becomes the key's
    fingerprint, so nothing machine-local is published; the audit records params.yaml the same way to compare."""
    if params["publish"].get("signing_key"):
        params = {**params, "publish": {**params["publish"], "signing_key": f"sha256:{key_sha256}"}}
    return params


def trusted_keys(given: list[str], project: Path) -> dict[str, str]:
    """{fingerprint: where it came from} for the keys an auditor trusts: each `given` item a PEM public key file or a
    64-hex fingerprint (`--trust`), and every *.pub in the project's trusted_keys/ folder (a team's committed list)."""
    found: dict[str, str] = {}
    for item in given:
        text = item.strip().lower().removeprefix("sha256:")
        if re.fullmatch(r"[0-9a-f]{64}", text):
            found[text] = "--trust fingerprint"
        elif Path(item).is_file():
            found[fingerprint(Path(item).read_bytes())] = str(item)
        else:
            raise SignatureError(f"--trust {item}: neither a public key file nor a sha256 fingerprint (64 hex digits)")
    folder = project / paths.TRUSTED_KEYS_DIR
    for pem in sorted(folder.glob("*.pub")) if folder.is_dir() else []:
        try:
            found.setdefault(fingerprint(pem.read_bytes()), str(paths.TRUSTED_KEYS_DIR / pem.name))
        except ValueError as e:
            raise SignatureError(f"{pem}: not a PEM public key ({e})") from None
    return found


def _make_project_key(path: Path) -> None:
    """An EC P-256 key pair for a project that names none, readable by its owner only."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # a link, not a rename: never replaces a key another publish made meanwhile
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def _key_path(publish: PublishParams) -> tuple[Path, str]:
    if publish.signing_key:
        return Path(publish.signing_key).expanduser(), "publish.signing_key"
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser(), f"${KEY_ENV}"
    if not paths.SIGNING_KEY.exists():
        _make_project_key(paths.SIGNING_KEY)
    return paths.SIGNING_KEY, PROJECT_KEY


def _password() -> bytes | None:
    password = os.environ.get(PASSWORD_ENV)
    return password.encode() if password else None


def _public_pem(key_path: Path, source: str) -> bytes:
    """The public half of the private key, checked to be a curve model-signing signs with."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not key_path.is_file():
        raise PipelineError(
            f"cannot sign the release: the signing key {key_path} (from {source}) is not a file. "
            f"Point {source} at a PEM private key, or unset it to use the project's own key in "
            f"{paths.SIGNING_KEY.parent}/."
        )
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), _password())
    except (ValueError, TypeError) as e:  # their messages name the problem, never the key's bytes
        raise PipelineError(
            f"cannot sign the release: cannot read the signing key {key_path} (from {source}): {e} "
            f"An encrypted key's password goes in ${PASSWORD_ENV}."
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise PipelineError(
            f"cannot sign the release: {key_path} (from {source}) is not an EC P-256/P-384/P-521 key, "
            "the kinds model-signing signs with. Make one with "
            "`openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt`."
        )
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Signer:
    """How this release is signed: the method, and for a key its path (read only when signing) and public half."""

    method: str
    key_path: Path | None = None
    key_source: str | None = None
    public_pem: bytes | None = None

    def record(self) -> dict:
        """What the lineage says about the signature: no key path, no key."""
        if self.method == "sigstore":
            return {"method": "sigstore", "signature": SIGNATURE}
        return {
            "method": "key",
            "signature": SIGNATURE,
            "public_key": PUBLIC_KEY,
            "public_key_sha256": fingerprint(self.public_pem),
            "key_source": self.key_source,
        }

    def envelope(self, statement: dict) -> dict:
        """The provenance statement in a DSSE envelope signed with this key. Keyless (Sigstore) releases carry it
        unsigned: model.sig covers it with every other file."""
        from tasks.publish import provenance

        if self.method == "sigstore":
            return provenance.sign_envelope(statement)
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(self.key_path.read_bytes(), _password())
        return provenance.sign_envelope(statement, key, fingerprint(self.public_pem))

    def write_public_key(self, folder: Path) -> None:
        if self.public_pem is not None:
            write_bytes(folder / PUBLIC_KEY, self.public_pem)

    def sign(self, folder: Path, name: str) -> None:
        """Write folder/model.sig over every other file in the folder: call it after the last file is written.

        model-signing names the signed model (the in-toto subject) after its folder; the release is built under a
        temporary name, so it is signed under `name` (the release id) instead, by a rename there and back.
        """
        from model_signing import hashing, signing

        config = signing.Config()
        if self.method == "sigstore":
            config.use_sigstore_signer(use_ambient_credentials=True)
        else:
            # bytes, though model-signing 1.1.1 hints str: it hands the password to cryptography, which takes bytes
            config.use_elliptic_key_signer(private_key=self.key_path, password=_password())
        # As `model_signing sign` does: the signature is not part of its own manifest.
        config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False))
        holder = folder.parent / f".{folder.name}.signing"
        holder.mkdir()
        named = holder / name
        os.rename(folder, named)
        try:
            config.sign(named, named / SIGNATURE)
        finally:
            os.rename(named, folder)
            holder.rmdir()


def signer(publish: PublishParams) -> Signer:
    """The release's signer from the params (and, for a key, the environment); made before any file is signed."""
    if publish.signing == "sigstore":
        return Signer("sigstore")
    key_path, source = _key_path(publish)
    return Signer("key", key_path, source, _public_pem(key_path, source))


def verify(folder: Path) -> str:
    """Verify a key-signed folder exactly as `model_signing verify key` does; return the signer key's fingerprint.

    Raises SignatureError naming what differs (a file changed, added or removed, or a signature of another key).
    """
    from model_signing import hashing, verifying

    signature, public_key = folder / SIGNATURE, folder / PUBLIC_KEY
    for required in (signature, public_key):
        if not required.is_file():
            raise SignatureError(f"{required.name} is missing from the release")
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public_key).set_hashing_config(
            hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)
        ).verify(folder, signature)
    except Exception as e:  # any failure to verify (mismatch, bad signature, unreadable bundle) fails the check
        message = str(e) or type(e).__name__
        # model-signing lists changed files with their digests' byte reprs: name the files, leave the bytes out
        if changed := re.findall(r"Hash mismatch for \\?'([^'\\]+)", message):
            message = f"changed since they were signed: {', '.join(changed)}"
        raise SignatureError(f"{SIGNATURE} does not verify with {PUBLIC_KEY}: {message}") from e
    return fingerprint(public_key.read_bytes())
