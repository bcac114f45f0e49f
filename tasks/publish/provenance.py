"""The release's provenance as a standard statement: an in-toto Statement v1 with a SLSA provenance v1 predicate,
signed in a DSSE envelope (https://github.com/secure-systems-lab/dsse) with the release's signing key.

lineage.json says the same in this project's own words; this file says it in the form supply-chain tools read
(https://slsa.dev/spec/v1.0/provenance), and the envelope lets them verify it on its own (in-toto, sigstore's and
securesystemslib's DSSE verifiers take the release's public key). `guanaco-audit` verifies the envelope
and checks every claim of the statement against the lineage and the workspace (check_claims). The statement:

- subject: each released file with its sha256 (the files written before this one: adapter, tokenizer, card,
  public key; lineage.json then records this file's hash, and model.sig covers them all);
- buildDefinition: buildType (this pipeline), externalParameters (params.yaml, as the stages read it),
  internalParameters (each stage's command in dvc.yaml), resolvedDependencies (the data source at its revision or
  sha256, the raw, validated and formatted data, the base model, the code commit and each module a stage ran,
  the lock files, the training environment's installed set and each of its distributions);
- runDetails: builder (local or a Prefect flow run), metadata (when publish started, and when it had written the
  subjects; the Prefect flow run id as invocationId when there is one), byproducts (the training run record,
  with its hardware).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path

from tasks.common import paths
from tasks.common.artifacts import sha256_file

FILE = "provenance.intoto.jsonl"  # one DSSE envelope (in-toto's attestation bundle form) holding the statement
PAYLOAD_TYPE = "application/vnd.in-toto+json"  # DSSE payloadType of an in-toto statement
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
# The project has no published home to resolve these to yet: README's "Audit a release" section documents them.
BUILD_TYPE = "urn:guanaco-qlora-pipeline:buildtype:dvc-stages:v1"
BUILDER_LOCAL = "urn:guanaco-qlora-pipeline:builder:local"  # dvc repro, or the stages run by hand
BUILDER_PREFECT = "urn:guanaco-qlora-pipeline:builder:prefect"  # a Prefect flow run (flows/pipeline.py)


def now() -> str:
    """An RFC 3339 UTC timestamp, as the statement's times are written."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def flow_run_id() -> str | None:
    """The Prefect flow run this publish belongs to: its context in a flow, else PREFECT__FLOW_RUN_ID, which a
    deployment's flow process sets and the DVC stage it starts inherits; None outside Prefect."""
    if "prefect" not in sys.modules and not os.environ.get("PREFECT__FLOW_RUN_ID"):
        return None  # neither in a flow nor started by one: spare the stage prefect's import (about 1.2 s)
    from prefect.runtime import flow_run

    return flow_run.id or None


def stage_commands(root: Path | str = ".") -> dict[str, str]:
    """Each stage's command as dvc.yaml runs it ({} when the stages were called without a dvc.yaml)."""
    import yaml

    dvc_yaml = Path(root) / "dvc.yaml"
    if not dvc_yaml.is_file():
        return {}
    return {name: stage["cmd"] for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items()}


def _source(src: dict) -> dict:
    if src.get("source") == "hub":
        entry = {
            "uri": f"https://huggingface.co/datasets/{src['hub_id']}",
            "name": "source",
            "annotations": {"split": src.get("split"), "requested_revision": src.get("requested_revision")},
        }
        if src.get("revision"):  # the commit the Hub served
            entry["digest"] = {"gitCommit": src["revision"]}
        return entry
    return {"name": src["path"], "digest": {"sha256": src["file_sha256"]}, "annotations": {"source": "local"}}


def _base_model(base: dict) -> list[dict]:
    if base.get("files_sha256"):  # a local directory: every file by its hash
        return [{"name": f"{base['id']}/{f}", "digest": {"sha256": h}} for f, h in sorted(base["files_sha256"].items())]
    entry = {"uri": f"https://huggingface.co/{base['id']}", "name": "base model"}
    if base.get("revision"):
        entry["annotations"] = {"revision": base["revision"]}
    if base.get("commit"):  # the commit the Hugging Face cache held for that revision: what was loaded
        entry["digest"] = {"gitCommit": base["commit"]}
    return [entry]


def _code(code: dict) -> list[dict]:
    entries = []
    if code.get("git_commit"):
        entries.append(
            {
                "name": "code",
                "digest": {"gitCommit": code["git_commit"]},
                "annotations": {"code_sha256": code.get("code_sha256"), "dirty": code.get("code_dirty")},
            }
        )
    ran: dict[tuple[str, str], list[str]] = {}  # (module, md5 as dvc.lock recorded it) -> the stages that ran it
    for stage, files in code.get("stages", {}).items():
        for module, md5 in files.items():
            ran.setdefault((module, md5), []).append(stage)
    entries += [
        {"name": module, "digest": {"md5": md5}, "annotations": {"stages": stages}}
        for (module, md5), stages in sorted(ran.items())
    ]
    return entries


def _environment(training: dict) -> list[dict]:
    """The lock files (by sha256), the installed set (the sha256 of its name==version list), and every installed
    distribution as a package URL. A lineage from before the environment was recorded names its libraries only."""
    env = training.get("environment")
    if not env:
        return [
            {"uri": f"pkg:pypi/{name.lower().replace('_', '-')}@{version}", "name": name}
            for name, version in sorted(training.get("libraries", {}).items())
            if version
        ]
    locks = [
        {"name": path, "digest": {"sha256": sha}, "annotations": {"installed": path == env.get("lock")}}
        for path, sha in sorted(env.get("locks_sha256", {}).items())
    ]
    installed = {
        "name": "python environment",
        "digest": {"sha256": env["distributions_sha256"]},
        "annotations": {
            "python": env.get("python"),
            "lock": env.get("lock"),
            "distributions": len(env["distributions"]),
        },
    }
    packages = [
        {"uri": f"pkg:pypi/{name}@{version}", "name": name}
        for name, version in (entry.split("==", 1) for entry in env["distributions"])
    ]
    return [*locks, installed, *packages]


def dvc_lock_outputs(root: Path | str = ".") -> dict[str, dict[str, str]]:
    """{stage: {output path: md5}} as dvc.lock records each stage's outputs ({} without a dvc.lock); publish's own
    entry is its previous run's, so it is left out."""
    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = yaml.safe_load(lock.read_text()).get("stages", {})
    return {
        stage: {out["path"]: out.get("md5") for out in entry.get("outs", [])}
        for stage, entry in stages.items()
        if stage != "publish"
    }


def _dvc_lock(outputs: dict[str, dict[str, str]]) -> list[dict]:
    return [
        {"name": f"dvc.lock:{stage}:{path}", "digest": {"md5": md5.removesuffix(".dir")}, "annotations": {"md5": md5}}
        for stage, outs in sorted(outputs.items())
        for path, md5 in sorted(outs.items())
        if md5
    ]


def resolved_dependencies(lineage: dict) -> list[dict]:
    val, fmt = lineage["validation"], lineage["formatted_data"]
    data = [
        (lineage["raw_data"]["path"], lineage["raw_data"]["sha256"]),
        (val["result_path"], val["result_sha256"]),
        (str(paths.CONVERSATIONS), val["conversations_sha256"]),
        (fmt["train_path"], fmt["train_sha256"]),
        (fmt["eval_path"], fmt["eval_sha256"]),
    ]
    return (
        [_source(lineage["source"])]
        + [{"name": name, "digest": {"sha256": sha}} for name, sha in data]
        + _base_model(lineage["base_model"])
        + _code(lineage["code"])
        + _environment(lineage["training"])
        + _dvc_lock(lineage.get("dvc_lock", {}))
    )


def statement(
    lineage: dict, subjects: dict[str, str], started_on: str, finished_on: str, root: Path | str = "."
) -> dict:
    """The in-toto Statement for the files `subjects` ({name: sha256}) made as `lineage` records."""
    training = lineage["training"]
    invocation = flow_run_id()
    metadata = {"startedOn": started_on, "finishedOn": finished_on}
    if invocation:
        metadata["invocationId"] = invocation
    internal = {"stages": commands} if (commands := stage_commands(root)) else {}
    run_record = Path(root) / paths.ADAPTER_DIR / "training_run.json"
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": sha}} for name, sha in sorted(subjects.items())],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": lineage["params"],
                "internalParameters": internal,
                "resolvedDependencies": resolved_dependencies(lineage),
            },
            "runDetails": {
                "builder": {"id": BUILDER_PREFECT if invocation else BUILDER_LOCAL},
                "metadata": metadata,
                "byproducts": [
                    {
                        "name": str(paths.ADAPTER_DIR / "training_run.json"),
                        "digest": {"sha256": sha256_file(run_record)},
                        "annotations": {
                            "hardware": training.get("hardware"),
                            "distributed": training.get("distributed"),
                            "seed": training.get("seed"),
                        },
                    }
                ],
            },
        },
    }


class EnvelopeError(ValueError):
    """The provenance envelope is not a DSSE envelope of an in-toto statement that the given key signed."""


def sign_envelope(statement: dict, private_key=None, keyid: str | None = None) -> dict:
    """The statement in a DSSE envelope signed with `private_key` (a cryptography EC key; keyid: its fingerprint),
    or with no signature when there is no key (a Sigstore release: model.sig covers the envelope)."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner, SSlibKey

    envelope = Envelope(
        payload=json.dumps(statement, sort_keys=True).encode(), payload_type=PAYLOAD_TYPE, signatures={}
    )
    if private_key is not None:
        envelope.sign(CryptoSigner(private_key, SSlibKey.from_crypto(private_key.public_key(), keyid=keyid)))
    return envelope.to_dict()


def open_envelope(envelope: dict, public_pem: bytes | None, keyid: str | None) -> dict:
    """The statement inside `envelope`, after checking its signature with the public key (None: an envelope that
    a Sigstore-signed release carries unsigned, covered by model.sig alone)."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    try:
        parsed = Envelope.from_dict(envelope)
    except (KeyError, TypeError, ValueError) as e:
        raise EnvelopeError(f"{FILE} is not a DSSE envelope ({type(e).__name__})") from None
    if parsed.payload_type != PAYLOAD_TYPE:
        raise EnvelopeError(f"{FILE} holds a {parsed.payload_type!r} payload, not an in-toto statement")
    if public_pem is not None:
        from cryptography.hazmat.primitives import serialization

        key = SSlibKey.from_crypto(serialization.load_pem_public_key(public_pem), keyid=keyid)
        try:
            parsed.verify([key], 1)
        except VerificationError:
            raise EnvelopeError(f"{FILE}: no signature of the release's key (sha256 {keyid}) verifies") from None
    return json.loads(parsed.payload)


def check_claims(statement: dict, lineage: dict, files: dict[str, str]) -> list[str]:
    """Each claim of the statement that the lineage (and the released files' hashes) does not back, in order."""
    problems = []
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        problems.append("not an in-toto v1 statement with a SLSA provenance v1 predicate")
    subjects = {s["name"]: s["digest"].get("sha256") for s in statement.get("subject", [])}
    for name in sorted(set(subjects) | set(files)):
        if subjects.get(name) != files.get(name):
            problems.append(
                f"subject {name}: the statement claims sha256 {str(subjects.get(name))[:12]}, "
                f"the release holds {str(files.get(name))[:12]}"
            )
    build = statement.get("predicate", {}).get("buildDefinition", {})
    if build.get("externalParameters") != lineage["params"]:
        problems.append("externalParameters: the statement's params are not the lineage's")
    claimed = {(d.get("name"), d.get("uri")): d for d in build.get("resolvedDependencies", [])}
    expected = {(d.get("name"), d.get("uri")): d for d in resolved_dependencies(lineage)}
    for key in [*expected, *(k for k in claimed if k not in expected)]:
        if claimed.get(key) != expected.get(key):
            what, theirs, ours = key[1] or key[0], claimed.get(key) or {}, expected.get(key) or {}
            problems.append(
                f"resolvedDependencies {what}: the statement claims {json.dumps(theirs.get('digest'))}, "
                f"the lineage records {json.dumps(ours.get('digest'))}"
            )
    return problems
