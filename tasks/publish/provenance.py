"""The release's provenance as a standard statement: an in-toto Statement v1 with a SLSA provenance v1 predicate.

lineage.json says the same in this project's own words (and `guanaco-audit` checks it); this file says it
in the form supply-chain tools read (https://slsa.dev/spec/v1.0/provenance). It is plain JSON built from the
lineage record publish assembles, so no attestation library is needed:

- subject: each released file with its sha256 (the files written before this one: adapter, tokenizer, card,
  public key; lineage.json then records this file's hash, and model.sig covers them all);
- buildDefinition: buildType (this pipeline), externalParameters (params.yaml, as the stages read it),
  internalParameters (each stage's command in dvc.yaml), resolvedDependencies (the data source at its revision or
  sha256, the raw, validated and formatted data, the base model, the code commit and each module a stage ran,
  the training libraries);
- runDetails: builder (local or a Prefect flow run), metadata (when publish started, and when it had written the
  subjects; the Prefect flow run id as invocationId when there is one), byproducts (the training run record,
  with its hardware).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from tasks.common import paths
from tasks.common.artifacts import sha256_file

FILE = "provenance.intoto.json"
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


def _libraries(libraries: dict[str, str | None]) -> list[dict]:
    return [
        {"uri": f"pkg:pypi/{name.lower().replace('_', '-')}@{version}", "name": name}
        for name, version in sorted(libraries.items())
        if version
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
        + _libraries(lineage["training"].get("libraries", {}))
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
