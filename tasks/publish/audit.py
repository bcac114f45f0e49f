"""Audit a published release: walk its lineage link by link and recompute every hash that can be.

    python -m tasks.publish.audit                  # the project's release/ folder
    python -m tasks.publish.audit path/to/release  # any release folder (its project is the folder's parent)
    python -m tasks.publish.audit release --json   # the same, machine-readable
    guanaco-audit release                  # the console script

The chain: source -> raw data -> validation -> formatted data -> params -> code -> training ->
evaluation -> release -> signature. Each stage recorded the hash of what it read, so every link is
checked twice: the file on disk against the release's lineage.json, and the lineage against what the
next stage says it consumed; the last link verifies the release's OpenSSF model signature as
`model_signing verify key` does, and names the key that made it. Exit 0 when every link holds; 1 naming
the first link that does not; 2 when the release cannot be read at all. `--release-only` checks only the
release folder and its own records (for a release downloaded without its project); otherwise the
project's artifacts must be present (`dvc pull`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tasks.common import paths
from tasks.common.artifacts import read_json, sha256_file, sha256_text, sha256_tree
from tasks.common.config import PARAMS_FILE
from tasks.common.errors import PipelineError
from tasks.publish import generation_check, signing


@dataclass
class Link:
    name: str
    facts: list[str] = field(default_factory=list)  # what the link says, for the reader
    problems: list[str] = field(default_factory=list)  # hashes or records that do not match: the link fails
    warnings: list[str] = field(default_factory=list)  # worth knowing, not a broken link

    @property
    def ok(self) -> bool:
        return not self.problems


class Audit:
    """The checks, in chain order; each returns one Link."""

    def __init__(self, release_dir: Path, project: Path, release_only: bool, trust: list[str] | None = None):
        self.release, self.root, self.release_only = release_dir, project, release_only
        self.trust = trust or []
        self.lineage = read_json(release_dir / paths.LINEAGE)

    # -- helpers --------------------------------------------------------------------------------
    def _file_hash(self, link: Link, rel: str | Path, recorded: str | None, what: str) -> str | None:
        """Recompute a workspace file's sha256 and compare; missing files fail unless --release-only."""
        if self.release_only:
            return recorded
        path = self.root / rel
        if not path.is_file():
            link.problems.append(
                f"{what} {rel} is missing: restore the project's artifacts "
                f"(git checkout {self._commit_short()} && dvc pull) or audit with --release-only"
            )
            return None
        actual = sha256_file(path)
        if recorded is not None and actual != recorded:
            # Usually not tampering but a workspace that moved on: a later run (even one that failed at a later
            # stage) rewrote the file after this release was made. Say how to audit the release as published.
            link.problems.append(
                f"{what} {rel}: sha256 {actual[:16]}... but the lineage records {recorded[:16]}... The workspace "
                "no longer holds what this release was made from (a later dvc repro or exp run rewrote it): audit "
                f"the release alone with --release-only, or restore its inputs (git checkout {self._commit_short()} "
                "&& dvc checkout) and audit again"
            )
        else:
            link.facts.append(f"{what} {rel} sha256 {actual[:16]}... matches")
        return actual

    def _same(self, link: Link, a: str | None, b: str | None, what: str) -> None:
        if a is None or b is None:
            link.warnings.append(f"{what}: not recorded by the stage that made this release (older release?)")
        elif a != b:
            link.problems.append(f"{what}: {a[:16]}... != {b[:16]}...")

    def _commit_short(self) -> str:
        return (self.lineage.get("code", {}).get("git_commit") or "<commit>")[:12]

    def _workspace_json(self, link: Link, rel: Path, what: str) -> dict | None:
        if self.release_only:
            return None
        path = self.root / rel
        if not path.is_file():
            link.problems.append(f"{what} {rel} is missing: restore it with dvc pull, or audit with --release-only")
            return None
        return read_json(path)

    # -- the links ------------------------------------------------------------------------------
    def source(self) -> Link:
        link, src = Link("source"), self.lineage["source"]
        if src.get("source") == "hub":
            link.facts.append(
                f"Hub dataset {src.get('hub_id')} split {src.get('split')} at revision {src.get('revision')}"
            )
            if not src.get("requested_revision"):
                link.warnings.append("download.revision was not pinned: the Hub may serve different rows today")
        else:
            link.facts.append(f"local file {src.get('path')} (sha256 {str(src.get('file_sha256'))[:16]}...)")
            path = Path(src.get("path", ""))
            path = path if path.is_absolute() else self.root / path
            if self.release_only:
                link.facts.append("the source file itself is not re-checked with --release-only")
            elif path.is_file():
                actual = sha256_file(path)
                if actual != src.get("file_sha256"):
                    link.problems.append(
                        f"{path} has changed since the release was made (sha256 {actual[:16]}...): "
                        "its data is not what this adapter was trained on"
                    )
            else:
                link.warnings.append(f"{path} is not here: the source file itself was not re-checked")
        link.facts.append(f"{src.get('row_count')} rows, downloaded {src.get('downloaded_at')}")
        return link

    def raw_data(self) -> Link:
        link, raw = Link("raw data"), self.lineage["raw_data"]
        self._file_hash(link, raw["path"], raw["sha256"], "raw rows")
        self._same(link, self.lineage["source"].get("rows_sha256"), raw["sha256"], "source record vs lineage raw hash")
        return link

    def validation(self) -> Link:
        link, val = Link("validation"), self.lineage["validation"]
        if not val["success"]:
            link.problems.append("the lineage records a FAILED validation")
        link.facts.append(
            f"suite {'passed' if val['success'] else 'failed'}; rules failed: {val['rules_failed'] or 'none'}"
        )
        self._file_hash(link, val["result_path"], val["result_sha256"], "validation result")
        result = self._workspace_json(link, Path(val["result_path"]), "validation result")
        if result is not None:
            self._same(
                link,
                result.get("input", {}).get("sha256"),
                self.lineage["raw_data"]["sha256"],
                "raw rows the suite read vs the release's raw rows",
            )
            if result.get("excluded_rows"):
                link.facts.append(f"rows left out for breaking a row rule: {', '.join(result['excluded_rows'])}")
        self._file_hash(link, paths.CONVERSATIONS, val["conversations_sha256"], "validated conversations")
        return link

    def formatted_data(self) -> Link:
        link, fmt = Link("formatted data"), self.lineage["formatted_data"]
        link.facts.append(
            f"{fmt['train_rows']} train / {fmt['eval_rows']} eval rows, length policy {fmt['length_policy']}"
        )
        self._file_hash(link, fmt["train_path"], fmt["train_sha256"], "train rows")
        self._file_hash(link, fmt["eval_path"], fmt["eval_sha256"], "eval rows")
        report = self._workspace_json(link, paths.FORMAT_REPORT, "format report")
        if report is not None:
            self._same(
                link,
                report.get("input_sha256"),
                self.lineage["validation"]["conversations_sha256"],
                "conversations the format stage read vs the validated conversations",
            )
        return link

    def params(self) -> Link:
        link, params = Link("params"), self.lineage["params"]
        self._same(
            link,
            sha256_text(json.dumps(params, sort_keys=True)),
            self.lineage["params_sha256"],
            "params in lineage.json vs their recorded hash",
        )
        t, lo, base = params["train"], params["lora"], self.lineage.get("base_model", {})
        at = f" at commit {base['commit']}" if base.get("commit") else ""  # a Hub base, as the cache held it
        if base.get("commit") and not base.get("revision"):
            link.warnings.append("model.revision was not pinned: the Hub may serve other weights today")
        link.facts.append(
            f"base {params['model']['base']}{at}, max_length {params['model']['max_length']}, "
            f"LoRA r={lo['r']} alpha={lo['alpha']}, {t['optimizer']} lr {t['learning_rate']}, "
            f"{t['epochs']} epoch(s), seed {t['seed']}"
        )
        if not self.release_only:
            from tasks.common.config import load_params

            signer = (self.lineage.get("signing") or {}).get("public_key_sha256")
            here = signing.recorded_params(load_params(self.root / "params.yaml").as_dict(), signer)
            differ = sorted(
                f"{section}.{k}"
                for section in params
                for k in params[section]
                if here.get(section, {}).get(k) != params[section][k]
            )
            if differ:
                link.problems.append(
                    f"{self.root / 'params.yaml'} differs from the release's params at "
                    f"{', '.join(differ[:8])}: the workspace moved on (dvc status shows what is stale)"
                )
        return link

    def code(self) -> Link:
        from tasks.publish.stage_code import code_sha256

        link, code = Link("code"), self.lineage["code"]
        commit = code.get("git_commit")
        link.facts.append(f"git commit {commit}")
        if code.get("code_dirty"):
            changed = code.get("dirty_files") or []
            link.warnings.append(
                "the release was made from a working tree with uncommitted changes"
                + (f" ({', '.join(changed[:8])})" if changed else "")
            )
        if commit and not self.release_only:
            known = (
                subprocess.run(
                    ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=self.root, capture_output=True
                ).returncode
                == 0
            )
            if not known:
                link.problems.append(
                    f"commit {commit} is not in the repository at {self.root}: the code is not recoverable"
                )
        if code.get("code_sha256") and not self.release_only:
            if code_sha256(self.root) != code["code_sha256"]:
                link.warnings.append(
                    f"the code here differs from the release's (git checkout {commit[:12] if commit else '?'} "
                    "to reproduce it)"
                )
            else:
                link.facts.append("the code here is the release's code (same code hash)")
        if code.get("stages") and not self.release_only:
            self._stage_code(link, code["stages"], commit)
        return link

    def _stage_code(self, link: Link, ran: dict[str, dict[str, str]], commit: str | None) -> None:
        """Per stage, the code it ran (recorded from dvc.lock at publish) against dvc.lock now and the files here."""
        from tasks.publish.stage_code import stage_code_hashes

        def differing(a: dict[str, str], b: dict[str, str]) -> list[str]:
            return sorted(set(a) ^ set(b) | {f for f in set(a) & set(b) if a[f] != b[f]})

        locked, files = stage_code_hashes(self.root), stage_code_hashes(self.root, from_lock=False)
        warned_before = len(link.warnings)
        for stage, code in ran.items():
            if off := differing(code, locked.get(stage, {})):
                link.warnings.append(
                    f"dvc.lock now records other code for stage {stage} than the release ran "
                    f"({', '.join(off[:6])}): the workspace moved on since this release"
                )
            elif off := differing(code, files.get(stage, {})):
                link.warnings.append(
                    f"the code here differs from what stage {stage} ran ({', '.join(off[:6])}): "
                    f"git checkout {commit[:12] if commit else '?'} to reproduce it"
                )
        if len(link.warnings) == warned_before:
            link.facts.append(
                f"each stage's code as it ran ({len(ran)} stages, "
                f"{len({f for c in ran.values() for f in c})} modules) matches dvc.lock and the files here"
            )

    def training(self) -> Link:
        from tasks.common.config import Params
        from tasks.train.checkpoints import run_fingerprint

        link, tr = Link("training"), self.lineage["training"]
        libs, hw = tr.get("libraries", {}), tr.get("hardware", {})
        link.facts.append(
            "libraries "
            + ", ".join(
                f"{k} {libs.get(k)}" for k in ("torch", "transformers", "peft", "trl", "bitsandbytes") if k in libs
            )
        )
        link.facts.append(
            f"hardware {hw.get('gpu') or hw.get('cpu')} ({hw.get('platform')}), seed {tr.get('seed')}, "
            f"{tr['metrics'].get('steps')} steps, final loss {tr['metrics'].get('train_loss')}"
        )
        self._same(
            link,
            tr.get("train_rows_sha256"),
            self.lineage["formatted_data"]["train_sha256"],
            "train rows the trainer read vs the release's train rows",
        )
        train_path = self.root / self.lineage["formatted_data"]["train_path"]
        if not self.release_only and train_path.is_file():
            self._same(
                link,
                run_fingerprint(Params.model_validate(self.lineage["params"]), train_path),
                tr.get("fingerprint"),
                "training fingerprint (params + train rows) recomputed vs recorded",
            )
        if not self.release_only:
            self._file_hash(
                link, paths.ADAPTER_DIR / paths.ADAPTER_WEIGHTS, tr.get("adapter_sha256"), "trained adapter"
            )
        here = self._workspace_json(link, paths.TRAINING, "training figures")
        if here is not None and here != tr["metrics"]:
            link.problems.append(f"{paths.TRAINING} differs from the training figures recorded in the release")
        return link

    def environment(self) -> Link:
        """The lock the release claims against the lock at its commit (a claim the commit cannot back fails), and
        the installed set it recorded against the one auditing (a difference warns, naming the packages)."""
        from tasks.common.environment import environment, listing_sha256

        link, env = Link("environment"), self.lineage["training"].get("environment")
        if not env:
            link.warnings.append("the release records no environment (made before the lock): libraries only")
            return link
        link.facts.append(
            f"Python {env.get('python')}, {len(env['distributions'])} distributions "
            f"(sha256 {env['distributions_sha256'][:12]}), "
            + (f"exactly {env['lock']}" if env.get("lock") else "matching no lock file")
        )
        if not env.get("lock"):
            link.warnings.append("the release's environment matched no lock file: " + _first_differences(env))
        commit = self.lineage["code"].get("git_commit")
        dirty = set(self.lineage["code"].get("dirty_files") or [])
        if commit and not self.release_only:
            for path, claimed in sorted(env.get("locks_sha256", {}).items()):
                at_commit = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=self.root, capture_output=True)
                if at_commit.returncode != 0:
                    link.problems.append(
                        f"the release claims {path} (sha256 {claimed[:12]}), but commit {commit[:12]} has no such file"
                    )
                elif (actual := hashlib.sha256(at_commit.stdout).hexdigest()) != claimed and path not in dirty:
                    link.problems.append(
                        f"the release claims {path} with sha256 {claimed[:12]}, but commit {commit[:12]} holds "
                        f"{actual[:12]}: the environment record does not belong to that code"
                    )
                elif actual != claimed:
                    link.warnings.append(f"{path} was edited and not committed when the release was made")
        listed = listing_sha256(env["distributions"])
        if listed != env["distributions_sha256"]:
            link.problems.append(
                f"the release's list of distributions hashes to {listed[:12]}, not the "
                f"{env['distributions_sha256'][:12]} it records: the list was edited"
            )
        here = environment(self.root)
        if sorted(here["distributions"]) != sorted(env["distributions"]):
            theirs = dict(entry.split("==", 1) for entry in env["distributions"])
            ours = dict(entry.split("==", 1) for entry in here["distributions"])
            differ = [
                f"{name} {theirs.get(name, 'absent')} -> {ours.get(name, 'absent')}"
                for name in sorted(set(theirs) | set(ours))
                if theirs.get(name) != ours.get(name)
            ]
            link.warnings.append(
                f"this environment differs from the one that made the release in {len(differ)} package(s): "
                + ", ".join(differ[:10])
                + (" ..." if len(differ) > 10 else "")
            )
        else:
            link.facts.append("this environment is the release's (same installed set)")
        return link

    def evaluation(self) -> Link:
        link, ev = Link("evaluation"), self.lineage["evaluation"]
        link.facts.append(
            f"{ev['eval_rows']} held-out rows: loss base {ev['base']['loss']} -> tuned {ev['tuned']['loss']}, "
            f"stop rate {ev['tuned']['stop_rate']}"
        )
        inputs = ev.get("inputs", {})
        self._same(
            link,
            inputs.get("adapter_sha256"),
            self.lineage["training"].get("adapter_sha256"),
            "adapter evaluated vs adapter trained",
        )
        self._same(
            link,
            inputs.get("eval_rows_sha256"),
            self.lineage["formatted_data"]["eval_sha256"],
            "eval rows evaluated vs the release's eval rows",
        )
        here = self._workspace_json(link, paths.EVALUATION, "eval metrics")
        if here is not None and here != {k: v for k, v in ev.items() if k != "inputs"}:
            link.problems.append(f"{paths.EVALUATION} differs from the metrics recorded in the release")
        checked = self.lineage.get("generation_check")  # releases made before publish's load-and-generate check lack it
        if checked and generation_check.SKIPPED in checked:
            why = checked[generation_check.SKIPPED]
            link.facts.append(f"publish did not load the release in a fresh process: {why}")
        elif checked:
            link.facts.append(
                f"publish loaded the release in a fresh process: {checked['tokens_compared']} greedy tokens of "
                f"{checked['prompts']} eval prompts as evaluated"
                + (", the merged model as the adapter" if "merged" in checked else "")
            )
            self._file_hash(link, checked["recorded"], checked["recorded_sha256"], "generations evaluated")
        return link

    def release_files(self) -> Link:
        link, rel = Link("release"), self.lineage["release"]
        link.facts.append(f"release {rel['id']} created {rel['created_at']} in {self.release}")
        recorded = self.lineage["files_sha256"]
        # model.sig is written after lineage.json, over it: the lineage cannot list it (the signature link checks it)
        actual = {
            k: v
            for k, v in sha256_tree(self.release, include_hidden=True).items()
            if k not in (paths.LINEAGE, signing.SIGNATURE)
        }
        for name in sorted(set(recorded) | set(actual)):
            if name not in actual:
                link.problems.append(f"{name} is listed in the lineage but missing from the release")
            elif name not in recorded:
                link.problems.append(f"{name} is in the release but not in its lineage (added afterwards?)")
            elif actual[name] != recorded[name]:
                link.problems.append(
                    f"{name}: sha256 {actual[name][:16]}... but the lineage records {recorded[name][:16]}..."
                )
        adapter = actual.get(paths.ADAPTER_WEIGHTS)
        self._same(link, adapter, self.lineage["training"].get("adapter_sha256"), "released adapter vs adapter trained")
        if adapter and not rel["id"].endswith(adapter[:12]):
            link.problems.append(f"release id {rel['id']} does not name the released adapter ({adapter[:12]})")
        if link.ok:
            link.facts.append(f"{len(actual)} files, every sha256 matches")
            self._serving_parity(link)
        return link

    def _serving_parity(self, link: Link) -> None:
        """The released tokenizer's chat_template renders the trained ids of the eval rows (publish checked it)."""
        from transformers import AutoTokenizer

        from tasks.common.chat_template import chat_template
        from tasks.publish.parity import first_mismatch

        eval_rows = self.root / self.lineage["formatted_data"]["eval_path"]
        conversations = self.root / paths.CONVERSATIONS
        if self.release_only or not (eval_rows.is_file() and conversations.is_file()):
            return
        fmt = self.lineage["params"]["format"]
        name = fmt.get("template", "llama2")  # releases made before format.template are llama2
        template = chat_template(name, AutoTokenizer.from_pretrained(self.release) if name == "tokenizer" else None)
        compared, mismatch = first_mismatch(self.release, template, fmt.get("system_prompt"), eval_rows, conversations)
        if mismatch:
            link.problems.append(f"the release's tokenizer serves another template than the one trained: {mismatch}")
        else:
            link.facts.append(f"its chat_template ({name}) renders the trained token ids of all {compared} eval rows")

    def signature(self) -> Link:
        """The release's OpenSSF model signature over every file, verified as the standard CLI verifies it."""
        link, signed = Link("signature"), self.lineage.get("signing")
        if signed is None:
            link.problems.append(
                "the lineage records no signature: the release's files are tied to no signer "
                "(made before releases were signed? publish again to sign it)"
            )
            return link
        if signed["method"] == "sigstore":
            link.facts.append(f"signed keyless with Sigstore ({signed['signature']})")
            link.warnings.append(
                "a Sigstore signature is checked against the signer's identity, which needs the "
                "network: model_signing verify sigstore <release> --signature <release>/model.sig "
                "--identity <signer> --identity_provider <issuer>"
            )
            return link
        try:
            key = signing.verify(self.release)
        except signing.SignatureError as e:
            link.problems.append(str(e))
            return link
        link.facts.append(
            f"every file matches {signed['signature']}, signed by the key in {signed['public_key']}: sha256 {key}"
        )
        self._same(link, key, signed.get("public_key_sha256"), "signer's key vs the key the lineage records")
        try:
            trusted = signing.trusted_keys(self.trust, self.root)
        except signing.SignatureError as e:
            link.problems.append(str(e))
            return link
        if not trusted:
            link.warnings.append(
                f"the signer is unverified: the files match the key shipped in the release, but no trusted key was "
                f"given (--trust <key.pub or sha256>, or the team's keys in {paths.TRUSTED_KEYS_DIR}/), so anyone "
                "who re-signed the release with their own key would pass this check"
            )
            link.facts.append(f"anyone can check the files against it: {signing.verify_command(str(self.release))}")
        elif key in trusted:
            link.facts.append(f"the signer is trusted: its key is {trusted[key]}")
            if trusted[key].endswith(".pub"):
                link.facts.append(
                    f"check it with the standard tool: {signing.verify_command(str(self.release), trusted[key])}"
                )
        else:
            link.problems.append(
                f"signed by key sha256 {key}, which is none of the {len(trusted)} trusted key(s) "
                f"({', '.join(sorted(set(trusted.values())))}): not a release of a signer you trust"
            )
            return link
        if signed.get("key_source") == signing.PROJECT_KEY:
            link.warnings.append(
                f"signed with the key publish made in {paths.SIGNING_KEY.parent}/ on its machine: "
                f"for releases others rely on, sign with your own key (publish.signing_key or "
                f"${signing.KEY_ENV}) and publish its fingerprint"
            )
        return link

    def provenance(self) -> Link:
        """The DSSE envelope verified with the release's key, and every claim of its statement checked against the
        lineage, the released files and (unless --release-only) dvc.lock here."""
        from tasks.publish import provenance

        link, path = Link("provenance"), self.release / provenance.FILE
        if not path.is_file():
            link.problems.append(f"{provenance.FILE} is missing from the release (made before provenance was signed?)")
            return link
        signed = self.lineage.get("signing") or {}
        key_signed = signed.get("method") == "key"
        try:
            envelope = json.loads(path.read_text())
            public = (self.release / signing.PUBLIC_KEY).read_bytes() if key_signed else None
            statement = provenance.open_envelope(envelope, public, signed.get("public_key_sha256"))
        except (json.JSONDecodeError, OSError, provenance.EnvelopeError) as e:
            link.problems.append(str(e))
            return link
        if key_signed:
            link.facts.append(
                f"DSSE envelope signed by the release's key (sha256 {signed['public_key_sha256'][:16]}...)"
            )
        else:
            link.warnings.append("the envelope is unsigned: a Sigstore release's provenance is covered by model.sig")
        files = {
            k: v
            for k, v in sha256_tree(self.release, include_hidden=True).items()
            if k not in (paths.LINEAGE, signing.SIGNATURE, provenance.FILE)
        }
        link.problems += provenance.check_claims(statement, self.lineage, files)
        if not self.release_only and self.lineage.get("dvc_lock"):
            here = provenance.dvc_lock_outputs(self.root)
            for stage, outs in self.lineage["dvc_lock"].items():
                for out, md5 in outs.items():
                    if here.get(stage, {}).get(out) != md5:
                        link.problems.append(
                            f"dvc.lock here records {stage}'s {out} as {here.get(stage, {}).get(out)}, the release's "
                            f"provenance claims {md5}: the workspace moved on, or the claim is false"
                        )
        if link.ok:
            deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
            link.facts.append(
                f"every claim holds: {len(statement['subject'])} subjects, the params, {len(deps)} resolved "
                "dependencies (source, data, base model, code, environment, dvc.lock outputs)"
            )
        return link

    def run(self) -> list[Link]:
        return [
            self.source(),
            self.raw_data(),
            self.validation(),
            self.formatted_data(),
            self.params(),
            self.code(),
            self.training(),
            self.environment(),
            self.evaluation(),
            self.release_files(),
            self.signature(),
            self.provenance(),
        ]


def _first_differences(env: dict) -> str:
    for path, differ in env.get("lock_differences", {}).items():
        if differ:
            return f"against {path}: " + "; ".join(differ[:5]) + (" ..." if len(differ) > 5 else "")
    return "no lock file was found"


def audit(
    release_dir: Path, project: Path | None = None, release_only: bool = False, trust: list[str] | None = None
) -> list[Link]:
    release_dir = Path(release_dir)
    if not (release_dir / paths.LINEAGE).is_file():
        raise FileNotFoundError(
            f"{release_dir / paths.LINEAGE} not found: is {release_dir} a release folder made by the "
            "publish stage? (dvc repro publish, or dvc pull to restore it)"
        )
    root = Path(project) if project else release_dir.resolve().parent
    if not release_only and not (root / PARAMS_FILE).is_file():
        # A release copied out of its project (a download, a share) has no project beside it to check against.
        raise PipelineError(
            f"{root} is not this release's project (no {PARAMS_FILE} there): pass --project with the project's "
            "root, or --release-only to check the release folder and its own records"
        )
    return Audit(release_dir, root, release_only, trust).run()


def render(links: list[Link]) -> str:
    out = []
    for i, link in enumerate(links, 1):
        out.append(f"{'OK  ' if link.ok else 'FAIL'} {i}. {link.name}")
        out += [f"       {f}" for f in link.facts]
        out += [f"       warning: {w}" for w in link.warnings]
        out += [f"       MISMATCH: {p}" for p in link.problems]
    failed = next((link for link in links if not link.ok), None)
    out.append("")
    out.append(
        "audit passed: every link of the chain holds"
        if failed is None
        else f"audit FAILED at link '{failed.name}': {failed.problems[0]}"
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "release", nargs="?", type=Path, default=paths.RELEASE_DIR, help="release folder (default: release)"
    )
    ap.add_argument("--project", type=Path, default=None, help="project root (default: the release folder's parent)")
    ap.add_argument("--release-only", action="store_true", help="check the release folder and its records only")
    ap.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="KEY",
        help=f"a signer key to trust: a PEM public key file or its sha256 fingerprint (repeatable); the keys in "
        f"{paths.TRUSTED_KEYS_DIR}/*.pub are trusted too. A release signed by any other key fails",
    )
    ap.add_argument("--json", action="store_true", help="print the links as JSON")
    args = ap.parse_args(argv)
    try:
        links = audit(args.release, args.project, args.release_only, args.trust)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        print(f"audit: cannot read the release: {e}", file=sys.stderr)
        return 2
    except PipelineError as e:
        print(f"audit: {e}", file=sys.stderr)
        return 2
    failed = next((link for link in links if not link.ok), None)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": failed is None,
                    "first_failure": failed.name if failed else None,
                    "links": [
                        {
                            "name": link.name,
                            "ok": link.ok,
                            "facts": link.facts,
                            "warnings": link.warnings,
                            "problems": link.problems,
                        }
                        for link in links
                    ],
                },
                indent=2,
            )
        )
    else:
        print(render(links))
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
