"""Train, evaluate and publish on the tiny model, on the CPU, through real bitsandbytes 4-bit layers."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.common import paths
from tasks.common.artifacts import read_json, sha256_file, write_json
from tasks.common.config import with_overrides
from tasks.common.errors import PipelineError
from tasks.publish import provenance, signing
from tasks.train.loss_curve import read_loss
from tests.conftest import ROOT, scratch_project

# For tests whose subject is not the release's load-and-generate check (tested in its own tests and by every publish
# of the end-to-end tests): publish.generation_check off spares each publish a second load of the base in a fresh
# process (the lineage then records it as skipped).
UNCHECKED = {"publish.generation_check": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, params):
    """download -> validate -> format -> train (a few steps) -> evaluate, once for the module."""
    from tasks.download.stage import download
    from tasks.evaluate.stage import evaluate
    from tasks.format.stage import format_rows
    from tasks.train.stage import train
    from tasks.validate.stage import validate

    root = scratch_project(tmp_path_factory.mktemp("project"))
    with pytest.MonkeyPatch.context() as mp:  # the stages use paths relative to the project root
        mp.chdir(root)
        p = with_overrides(params, **{"train.max_steps": 6, "train.save_steps": 3, "train.logging_steps": 1})
        download(p.download)
        validate(p)
        format_rows(p.format, p.model)
        metrics = train(p)
        evaluation = evaluate(p)
    return root, p, metrics, evaluation


def test_base_loads_as_bitsandbytes_4bit(trained, params, monkeypatch):
    import bitsandbytes as bnb

    from tasks.common.base_model import load_base_model

    root, *_ = trained
    monkeypatch.chdir(root)
    model = load_base_model(params.model, params.quant)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    # no layer swapped for a Hub kernel: code fetched at load time (and, offline on a GPU, a crash)
    assert model.use_kernels is False


def test_train_writes_adapter_and_metrics(trained):
    root, p, metrics, _ = trained
    adapter = root / paths.ADAPTER_DIR
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter / paths.ADAPTER_WEIGHTS).stat().st_size > 0
    assert config["r"] == p.lora.r and config["lora_alpha"] == p.lora.alpha
    assert sorted(config["target_modules"]) == sorted(p.lora.target_modules)
    assert metrics["steps"] == 6 and metrics["tokens_seen"] > 0 and metrics["train_loss"] > 0
    assert read_json(root / paths.TRAINING) == metrics
    # the headline row of `dvc metrics show`: short names, rounded; the peak is null on the CPU
    assert read_json(root / paths.TRAIN_METRICS) == {
        "loss": round(metrics["train_loss"], 3),
        "tok/s": round(metrics["tokens_per_second"]),
        "peak_GiB": None,
    }
    run = read_json(adapter / "training_run.json")
    assert run["train_rows_sha256"] == sha256_file(root / paths.TRAIN_ROWS) and run["libraries"]["bitsandbytes"]
    assert not (root / paths.CHECKPOINT_DIR).exists(), "a finished run leaves nothing to resume"
    assert (root / paths.DVCLIVE_DIR / "plots" / "metrics" / "train" / "loss.tsv").exists()
    # The plots' x axis is the optimizer step (transformers' dvclive callback counted log lines from 0), and the
    # curve is also a PNG that reads offline.
    steps, _ = read_loss(root / paths.LOSS_TSV)
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (root / paths.LOSS_CURVE).read_bytes().startswith(b"\x89PNG")


def test_evaluate_compares_base_and_tuned_on_same_rows(trained):
    root, p, _, ev = trained
    assert ev["base"]["answer_tokens"] == ev["tuned"]["answer_tokens"] > 0
    assert ev["base"]["loss"] != ev["tuned"]["loss"]
    assert ev["loss_improvement"] == pytest.approx(ev["base"]["loss"] - ev["tuned"]["loss"], abs=1e-5)
    gens = [json.loads(line) for line in (root / paths.GENERATIONS).read_text().splitlines()]
    assert [g["prompt"] for g in gens] == p.evaluate.prompts


def test_publish_writes_release_with_lineage(trained, monkeypatch):
    from tasks.publish.stage import publish

    root, p, _, ev = trained
    monkeypatch.chdir(root)
    if ev["tuned"]["loss"] >= ev["base"]["loss"]:
        pytest.fail(f"six steps did not improve the tiny model: {ev}")
    lineage = publish(p)
    release = root / paths.RELEASE_DIR
    for name in (paths.ADAPTER_WEIGHTS, "adapter_config.json", "tokenizer.json", "README.md", paths.LINEAGE):
        assert (release / name).exists(), name
    assert sha256_file(release / paths.ADAPTER_WEIGHTS) == sha256_file(root / paths.ADAPTER_DIR / paths.ADAPTER_WEIGHTS)
    assert lineage["files_sha256"][paths.ADAPTER_WEIGHTS] == sha256_file(release / paths.ADAPTER_WEIGHTS)
    assert lineage["raw_data"]["sha256"] == sha256_file(root / paths.RAW_ROWS)
    assert lineage["validation"]["success"] is True
    assert lineage["params"]["lora"]["r"] == p.lora.r
    assert lineage["evaluation"]["tuned"]["loss"] == ev["tuned"]["loss"]
    assert "Evaluation" in (release / "README.md").read_text()
    # the release, loaded in a fresh process, generated every token evaluate recorded (generation_check.py)
    check = lineage["generation_check"]
    assert check["prompts"] == len(p.evaluate.prompts) and check["tokens_compared"] > 0
    assert check["recorded_sha256"] == sha256_file(root / paths.GENERATIONS)


def test_publish_refuses_a_worse_adapter_and_keeps_the_last_release(trained, signed, monkeypatch, tmp_path):
    from tasks.publish.stage import publish

    _, p, _, ev = trained
    root = tmp_path / "project"  # this test rewrites the eval metrics: on its own copy, not the module's project
    shutil.copytree(signed[0], root)  # a published project: its release is the last good one
    monkeypatch.chdir(root)
    before = {f.name: f.read_bytes() for f in (root / paths.RELEASE_DIR).iterdir()}
    good = read_json(root / paths.EVALUATION)
    write_json(root / paths.EVALUATION, {**good, "tuned": {**good["tuned"], "loss": good["base"]["loss"] + 1}})
    with pytest.raises(PipelineError, match="refusing to publish"):
        publish(p)
    assert {f.name: f.read_bytes() for f in (root / paths.RELEASE_DIR).iterdir()} == before
    publish(with_overrides(p, **{"publish.require_improvement": False}, **UNCHECKED))  # the override works


def test_publish_refuses_a_release_whose_template_serves_other_ids_than_trained(trained, signed, monkeypatch, tmp_path):
    """Train/serve parity: a release tokenizer whose chat_template renders the eval rows otherwise than they were
    trained (here one space less before the answer) stops publish, naming the row and token; the release stays."""
    from tasks.common import chat_template
    from tasks.publish.stage import publish

    _, p, _, _ = trained
    root = tmp_path / "project"
    shutil.copytree(signed[0], root)  # a published project: its release is the last good one
    monkeypatch.chdir(root)
    before = {f.name: f.read_bytes() for f in (root / paths.RELEASE_DIR).iterdir()}
    llama2 = chat_template.BUILT_IN["llama2"]
    drifted = dataclasses.replace(llama2, jinja=llama2.jinja.replace("' [/INST]'", "'[/INST]'"))
    monkeypatch.setitem(chat_template.BUILT_IN, "llama2", drifted)
    with pytest.raises(PipelineError, match=r"serve another template than the one trained.*eval row \d+: .* position"):
        publish(p)
    assert {f.name: f.read_bytes() for f in (root / paths.RELEASE_DIR).iterdir()} == before


def test_publish_to_hub_uploads_privately_without_writing_the_token(trained, monkeypatch):
    """The Hub upload endpoint is the one thing mocked: it cannot be reached from here."""
    import huggingface_hub

    from tasks.publish.stage import publish

    root, p, *_ = trained
    monkeypatch.chdir(root)
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private)

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls["files"] = sorted(os.listdir(folder_path))
            return "https://hub.example/commit/1"

    secret = "hf_plantedSECRETtoken123"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    publish(with_overrides(p, **{"publish.push_to_hub": True, "publish.hub_repo_id": "me/adapter"}, **UNCHECKED))
    assert calls["token"] == secret and calls["create"] == ("me/adapter", True)
    assert paths.ADAPTER_WEIGHTS in calls["files"]
    for path in (root / paths.RELEASE_DIR).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_release_is_readable_by_other_users(trained, monkeypatch):
    """0644 files and 0755 folders (under the usual umask 022), even from an adapter folder left private."""
    from tasks.publish.stage import ADAPTER_FILES, publish

    root, p, _, _ = trained
    monkeypatch.chdir(root)
    adapter = [root / paths.ADAPTER_DIR / name for name in ADAPTER_FILES]
    modes = [f.stat().st_mode for f in adapter]
    old_umask = os.umask(0o022)
    try:
        for f in adapter:
            f.chmod(0o600)  # as tempfile left them before: the release must not inherit it
        lineage = publish(with_overrides(p, **{"publish.require_improvement": False}, **UNCHECKED))
    finally:
        os.umask(old_umask)
        for f, mode in zip(adapter, modes):
            f.chmod(mode)
    release = root / paths.RELEASE_DIR
    found = {
        p.relative_to(release).as_posix() or ".": oct(p.stat().st_mode & 0o777) for p in [release, *release.rglob("*")]
    }
    assert paths.ADAPTER_WEIGHTS in found and paths.LINEAGE in found
    assert {k: v for k, v in found.items() if v != ("0o755" if (release / k).is_dir() else "0o644")} == {}
    assert lineage["generation_check"] == {"skipped": "publish.generation_check is false"}  # said, not hidden


# -- signed releases and their provenance statement -------------------------------------------------------------
FLOW_RUN_ID = "0b6f8d2e-7c1a-4e0f-9a3b-5d2c1e4f6a70"


@pytest.fixture(scope="module")
def signed(trained, tmp_path_factory):
    """A release published in its own copy of the project, with dvc.yaml beside it and a Prefect flow run id in the
    environment (as a deployment's run sets it), signed with the project key made on first use."""
    from tasks.publish.stage import publish

    shared, p, *_ = trained
    root = tmp_path_factory.mktemp("signed") / "project"
    shutil.copytree(shared, root)
    shutil.rmtree(root / ".keys", ignore_errors=True)
    shutil.copy2(ROOT / "dvc.yaml", root / "dvc.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("PREFECT__FLOW_RUN_ID", FLOW_RUN_ID)
        mp.delenv(signing.KEY_ENV, raising=False)
        lineage = publish(p)
    return root, lineage


def standard_cli_verify(release_parent: Path) -> subprocess.CompletedProcess:
    """README's command, run by the standard CLI from this venv's bin: all a person with the folder needs."""
    command = signing.verify_command("release").split()
    return subprocess.run(
        [str(Path(sys.executable).parent / command[0]), *command[1:]],
        cwd=release_parent,
        capture_output=True,
        text=True,
    )


def test_the_release_is_signed_last_and_the_standard_cli_verifies_it(signed):
    from tasks.publish.audit import audit

    root, lineage = signed
    release = root / paths.RELEASE_DIR
    key = signing.fingerprint((release / signing.PUBLIC_KEY).read_bytes())
    assert lineage["signing"] == {
        "method": "key",
        "signature": signing.SIGNATURE,
        "public_key": signing.PUBLIC_KEY,
        "public_key_sha256": key,
        "key_source": signing.PROJECT_KEY,
    }
    assert (root / paths.SIGNING_KEY).is_file() and not (release / paths.SIGNING_KEY.name).exists()
    # lineage.json lists every file but itself and the signature, which is written after it, over it.
    assert set(lineage["files_sha256"]) | {paths.LINEAGE, signing.SIGNATURE} == {p.name for p in release.iterdir()}
    proc = standard_cli_verify(root)
    assert proc.returncode == 0 and "Verification succeeded" in proc.stdout, proc.stderr
    bundle = json.loads((release / signing.SIGNATURE).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert statement["subject"][0]["name"] == lineage["release"]["id"]  # named for the release, not its temp folder
    assert sorted(r["name"] for r in statement["predicate"]["resources"]) == sorted(
        p.name for p in release.iterdir() if p.name != signing.SIGNATURE
    )
    links = {link.name: link for link in audit(release, release_only=True)}
    assert all(link.ok for link in links.values()), [(n, link.problems) for n, link in links.items() if not link.ok]
    assert any(key in fact for fact in links["signature"].facts)
    assert any("made in .keys/" in w for w in links["signature"].warnings)
    card = (release / "README.md").read_text()
    assert key in card and signing.verify_command("<this folder>") in card


def test_the_provenance_is_an_in_toto_slsa_statement_of_the_release(signed):
    from cryptography.hazmat.primitives import serialization
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    from tasks.publish.stage_code import STAGES

    root, lineage = signed
    release = root / paths.RELEASE_DIR
    # A DSSE envelope that securesystemslib (in-toto's own DSSE implementation) verifies with the release's key
    (line,) = (release / provenance.FILE).read_text().splitlines()
    envelope = Envelope.from_dict(json.loads(line))
    public = serialization.load_pem_public_key((release / signing.PUBLIC_KEY).read_bytes())
    envelope.verify([SSlibKey.from_crypto(public, keyid=lineage["signing"]["public_key_sha256"])], 1)
    assert envelope.payload_type == "application/vnd.in-toto+json"
    statement = json.loads(envelope.payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    unlisted = {provenance.FILE, paths.LINEAGE, signing.SIGNATURE}  # itself, and the records written after it
    assert subjects == {p.name: sha256_file(p) for p in release.iterdir() if p.name not in unlisted}
    assert {paths.ADAPTER_WEIGHTS, "README.md", "tokenizer.json", signing.PUBLIC_KEY} <= set(subjects)
    assert lineage["files_sha256"][provenance.FILE] == sha256_file(release / provenance.FILE)

    build = statement["predicate"]["buildDefinition"]
    assert build["buildType"] == provenance.BUILD_TYPE and build["externalParameters"] == lineage["params"]
    assert build["internalParameters"] == {"stages": {s: f"python -m tasks.{s}" for s in STAGES}}
    deps = {d.get("name") or d.get("uri"): d for d in build["resolvedDependencies"]}
    source = lineage["source"]
    assert deps[source["path"]]["digest"] == {"sha256": source["file_sha256"]}
    for path in (paths.RAW_ROWS, paths.VALIDATION_RESULT, paths.CONVERSATIONS, paths.TRAIN_ROWS, paths.EVAL_ROWS):
        assert deps[str(path)]["digest"] == {"sha256": sha256_file(root / path)}, path
    torch_version = lineage["training"]["libraries"]["torch"]
    assert any(d.get("uri") == f"pkg:pypi/torch@{torch_version}" for d in build["resolvedDependencies"])
    assert any(name.startswith("tiny-llama/") for name in deps)  # the base model's files

    run = statement["predicate"]["runDetails"]
    assert run["builder"]["id"] == provenance.BUILDER_PREFECT and run["metadata"]["invocationId"] == FLOW_RUN_ID
    created = lineage["release"]["created_at"][:19] + "Z"  # taken while the release is built, between the two
    assert run["metadata"]["startedOn"] <= created <= run["metadata"]["finishedOn"]
    assert run["byproducts"][0]["annotations"]["hardware"] == lineage["training"]["hardware"]


@pytest.mark.parametrize("name", [paths.ADAPTER_WEIGHTS, "README.md", provenance.FILE])
def test_one_flipped_byte_in_a_signed_file_fails_the_standard_cli_and_the_audit(signed, tmp_path, name):
    from tasks.publish.audit import audit

    root, _ = signed
    release = tmp_path / "release"
    shutil.copytree(root / paths.RELEASE_DIR, release)
    data = bytearray((release / name).read_bytes())
    data[-1] ^= 0x01
    (release / name).write_bytes(bytes(data))

    proc = standard_cli_verify(tmp_path)
    assert proc.returncode != 0 and "Hash mismatch for" in proc.stderr and name in proc.stderr, proc.stderr
    links = {link.name: link for link in audit(release, release_only=True)}
    assert links["signature"].problems == [
        f"model.sig does not verify with signing_key.pub: changed since they were signed: {name}"
    ]

    # Covering the tracks in lineage.json still leaves the signature broken (and the adapter the trained one).
    lineage = read_json(release / paths.LINEAGE)
    lineage["files_sha256"][name] = sha256_file(release / name)
    write_json(release / paths.LINEAGE, lineage)
    links = audit(release, release_only=True)
    first = next(link.name for link in links if not link.ok)
    assert first == ("release" if name == paths.ADAPTER_WEIGHTS else "signature")
    assert not links[-1].ok and standard_cli_verify(tmp_path).returncode != 0


def test_a_planted_signing_key_signs_and_appears_in_no_output(trained, tmp_path, monkeypatch, caplog, capfd):
    """The key named by the environment (encrypted, its password beside it) signs; neither is written anywhere."""
    from tasks.publish.stage import publish
    from tests.test_signing import ec_key_pem, fingerprint_of, key_secrets

    shared, p, *_ = trained
    root = tmp_path / "project"
    shutil.copytree(shared, root)
    password = "planted-" + "password-4711"
    pem = ec_key_pem(password)
    key_file = tmp_path / "secrets" / "release.pem"  # outside the project, as a CI secret would be
    key_file.parent.mkdir()
    key_file.write_bytes(pem)
    monkeypatch.chdir(root)
    monkeypatch.setenv(signing.KEY_ENV, str(key_file))
    monkeypatch.setenv(signing.PASSWORD_ENV, password)
    caplog.set_level(logging.DEBUG)

    lineage = publish(p)

    assert lineage["signing"]["public_key_sha256"] == fingerprint_of(pem, password)
    assert lineage["signing"]["key_source"] == f"${signing.KEY_ENV}"
    assert standard_cli_verify(root).returncode == 0
    planted = key_secrets(pem, password)
    written = [f for f in root.rglob("*") if f.is_file()]
    assert {paths.LINEAGE, "README.md", provenance.FILE} <= {f.name for f in written}
    leaks = [str(f) for f in written for secret in planted if secret.encode() in f.read_bytes()]
    out, err = capfd.readouterr()
    leaks += [
        where
        for where, text in (("logs", caplog.text), ("stdout", out), ("stderr", err))
        for secret in planted
        if secret in text
    ]
    assert leaks == []


# -- publish settings checked first, a failed push, dotfiles, nothing machine-local -------------------------------
def _release_bytes(root: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in (root / paths.RELEASE_DIR).iterdir()}


@pytest.mark.parametrize(
    "overrides",
    [
        {"publish.push_to_hub": True, "publish.hub_repo_id": "my team/adapter"},
        {"publish.push_to_hub": True, "publish.hub_repo_id": "me/--adapter"},
        {"publish.push_to_hub": True, "publish.hub_repo_id": ""},
        {"publish.name": "../escape"},
    ],
)
def test_a_bad_publish_setting_stops_before_anything_is_written(trained, signed, monkeypatch, overrides):
    from tasks.publish.stage import publish

    _, p, *_ = trained
    root, _ = signed
    monkeypatch.chdir(root)
    before, entries = _release_bytes(root), sorted(os.listdir(root))
    (key,) = [k for k in overrides if overrides[k] is not True]
    with pytest.raises(PipelineError, match=key.split(".")[-1]):
        publish(with_overrides(p, **overrides))
    assert _release_bytes(root) == before and sorted(os.listdir(root)) == entries


def test_a_failed_push_leaves_the_last_release_whole_and_says_what_to_fix(trained, signed, monkeypatch):
    """The Hub's upload endpoint is mocked (it cannot be reached from here): it fails as a network error would."""
    import huggingface_hub

    from tasks.publish.stage import publish

    _, p, *_ = trained
    root, _ = signed
    monkeypatch.chdir(root)
    before = _release_bytes(root)

    class FailingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            pass

        def upload_folder(self, folder_path, repo_id, commit_message):
            raise ConnectionError("connection reset")

    monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi)
    params = with_overrides(
        p,
        **{"publish.push_to_hub": True, "publish.hub_repo_id": "me/adapter", "publish.require_improvement": False},
        **UNCHECKED,
    )
    with pytest.raises(PipelineError, match=r"me/adapter failed .*ConnectionError.* is unchanged"):
        publish(params)
    assert _release_bytes(root) == before


def test_a_dotfile_added_to_the_release_fails_the_standard_cli_and_the_audit(signed, tmp_path):
    from tasks.publish.audit import audit

    root, _ = signed
    copy = tmp_path / "project"
    shutil.copytree(root, copy)
    assert standard_cli_verify(copy).returncode == 0
    for name, text in ((".gitattributes", "* -text\n"), (".github/x.py", "import os\n"), (".git/x", "x\n")):
        added = copy / paths.RELEASE_DIR / name
        added.parent.mkdir(exist_ok=True)
        added.write_text(text)
        assert standard_cli_verify(copy).returncode != 0, name
        links = {link.name: link for link in audit(copy / paths.RELEASE_DIR, release_only=True)}
        assert not links["release"].ok and any(name in p for p in links["release"].problems), name
        assert not links["signature"].ok, name
        added.unlink()


def test_a_signing_key_given_by_path_is_recorded_by_its_fingerprint_only(trained, tmp_path, monkeypatch):
    from tasks.publish.stage import publish
    from tests.test_signing import ec_key_pem, fingerprint_of

    shared, p, *_ = trained
    root = tmp_path / "project"
    shutil.copytree(shared, root)
    pem = ec_key_pem()
    key_file = tmp_path / "machine-local-secrets" / "release.pem"
    key_file.parent.mkdir()
    key_file.write_bytes(pem)
    monkeypatch.chdir(root)
    lineage = publish(
        with_overrides(p, **{"publish.signing_key": str(key_file), "publish.require_improvement": False}, **UNCHECKED)
    )
    assert lineage["params"]["publish"]["signing_key"] == f"sha256:{fingerprint_of(pem)}"
    for name in ("lineage.json", provenance.FILE, "README.md"):
        assert "machine-local-secrets" not in (root / paths.RELEASE_DIR / name).read_text(), name


def test_a_release_that_generates_otherwise_than_evaluated_stops_publish(trained, signed, monkeypatch, tmp_path):
    """The load-and-generate check, real end to end: evaluate's record of one token differs from what the release
    generates (as an adapter that changed since evaluate would); publish names the prompt and the first differing
    token, and the last good release stays whole."""
    from tasks.common.artifacts import read_jsonl, write_jsonl
    from tasks.publish.stage import publish

    _, p, *_ = trained
    root = tmp_path / "project"
    shutil.copytree(signed[0], root)  # a published project: its release is the last good one
    monkeypatch.chdir(root)
    before = _release_bytes(root)
    rows = read_jsonl(paths.GENERATIONS)
    ids = rows[1]["tuned_token_ids"]
    at = min(2, len(ids) - 1)
    ids[at] = (ids[at] + 1) % 100  # another token id, inside the tiny vocabulary
    write_jsonl(paths.GENERATIONS, rows)
    with pytest.raises(PipelineError, match=rf"eval prompt 1 .*gives token .* at position {at} where evaluate"):
        publish(p)
    assert _release_bytes(root) == before


def test_generations_without_token_ids_name_the_file_and_the_stage_to_rerun(params, tmp_path):
    from tasks.common.artifacts import write_jsonl
    from tasks.publish.generation_check import recorded_tokens

    old = tmp_path / "generations.jsonl"  # as evaluate wrote it before it recorded the ids
    write_jsonl(old, [{"prompt": q, "tuned": "text"} for q in params.evaluate.prompts])
    with pytest.raises(PipelineError, match=r"generations.jsonl row 0 has no tuned_token_ids.*dvc repro evaluate"):
        recorded_tokens(params, old)


@pytest.fixture(scope="module")
def merged_release(trained, tmp_path_factory):
    """A release published with publish.merged: true, in its own copy of the project."""
    from tasks.publish.stage import publish

    shared, p, *_ = trained
    root = tmp_path_factory.mktemp("merged") / "project"
    shutil.copytree(shared, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        lineage = publish(with_overrides(p, **{"publish.merged": True}))
    return root, lineage


def test_the_merged_model_is_written_whole_signed_recorded_and_generates_as_the_adapter(merged_release, trained):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from tasks.publish.audit import audit

    root, lineage = merged_release
    _, p, *_ = trained
    release = root / paths.RELEASE_DIR
    merged = release / paths.MERGED
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert (merged / name).is_file(), name
    # 16-bit or compute-dtype weights of the whole model, no LoRA tensors left, no 4-bit storage
    with safe_open(merged / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        dtypes = {str(f.get_tensor(n).dtype) for n in names}
    assert not [n for n in names if "lora_" in n] and dtypes == {f"torch.{p.quant.compute_dtype}"}
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(release).chat_template
    record = lineage["merged"]
    assert record["base_loaded_as"] == f"unquantized, {p.quant.compute_dtype}"
    assert {f"{paths.MERGED}/{k}": v for k, v in record["files_sha256"].items()}.items() <= lineage[
        "files_sha256"
    ].items()
    assert "merged" in lineage["generation_check"]  # the merged model generated what the adapter does
    signing.verify(release)  # the release's signature covers merged/
    links = {link.name: link for link in audit(release, release_only=True)}
    assert all(link.ok for link in links.values()), [(n, link.problems) for n, link in links.items() if not link.ok]


def test_the_released_adapter_is_what_vllms_lora_loader_takes(merged_release, trained, tmp_path):
    """vLLM's requirements, from its source (vllm/lora/peft_helper.py PEFTHelper.from_dict and validate_legal;
    vllm/config/lora.py MaxLoRARanks; vllm/lora/utils.py parse_fine_tuned_lora_name), checked on the released files
    directly, then the same checker on a folder breaking each of them."""
    from safetensors import safe_open

    from tasks.publish import serving

    root, _ = merged_release
    _, p, *_ = trained
    release = root / paths.RELEASE_DIR
    config = json.loads((release / "adapter_config.json").read_text())
    assert {"r", "lora_alpha", "target_modules"} <= config.keys()  # PEFTHelper's required fields
    assert config["peft_type"] == "LORA" and not config["modules_to_save"] and not config["use_dora"]
    assert config["bias"] == "none"  # validate_legal: no adapter bias
    assert config["r"] <= 512 and serving.vllm_max_lora_rank(config["r"]) in (1, 8, 16, 32, 64, 128, 256, 320, 512)
    with safe_open(release / paths.ADAPTER_WEIGHTS, framework="pt") as f:
        names = list(f.keys())
    assert names and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names)
    assert {n.rsplit(".", 3)[-3] for n in names} == set(config["target_modules"])
    assert serving.vllm_problems(release) == []
    command = serving.serve_command(p.model.base, p.publish.name, "<this folder>", p.lora.r)
    assert command in (release / "README.md").read_text() and "--max-lora-rank 64" in command

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy2(release / paths.ADAPTER_WEIGHTS, bad / paths.ADAPTER_WEIGHTS)
    wrong = {**config, "modules_to_save": ["lm_head"], "use_dora": True, "bias": "all", "r": 1024}
    (bad / "adapter_config.json").write_text(json.dumps(wrong))
    problems = " | ".join(serving.vllm_problems(bad))
    for key in ("modules_to_save", "use_dora", "bias", "rank 1024", "has rank"):
        assert key in problems, (key, problems)
    (bad / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "lora_alpha"}))
    assert serving.vllm_problems(bad) == ["adapter_config.json has no 'lora_alpha'"]
