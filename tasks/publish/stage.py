"""Stage 6, publish: gate on evaluation, then write the release folder (and optionally push it to the Hub).

release/ holds the adapter (safetensors + config), the tokenizer, a model card (README.md),
lineage.json (source and hashes, validation verdict, params, code commit, training environment,
metrics, and the sha256 of every released file, so `python -m tasks.publish.audit release` can check it),
the same provenance as an in-toto/SLSA statement (provenance.intoto.json, tasks/publish/provenance.py), and an
OpenSSF model signature over all of them with its public key (model.sig, signing_key.pub, tasks/publish/signing.py).
Publishing refuses an adapter that is worse than its base, or whose record is incomplete.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
from pathlib import Path

from tasks.common import paths
from tasks.common.artifacts import read_json, sha256_file, sha256_text, sha256_tree, staged_dir, write_json, write_text
from tasks.common.base_model import cached_commit, load_tokenizer, resolve_base
from tasks.common.chat_template import ChatTemplate, chat_template
from tasks.common.config import Params, load_params
from tasks.common.errors import PipelineError
from tasks.publish import generation_check, merge, provenance, serving, signing
from tasks.publish.parity import first_mismatch
from tasks.publish.stage_code import code_version

log = logging.getLogger(__name__)
ADAPTER_FILES = (paths.ADAPTER_WEIGHTS, "adapter_config.json")


def _require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise PipelineError(
            f"cannot publish: {path} is missing, so the release record would be incomplete. "
            f"Run `dvc repro {stage}` first."
        )
    return path


def check_parity(release_dir: Path, template: ChatTemplate, system_prompt: str | None) -> None:
    """The release's tokenizer must render, through its chat_template, exactly the ids trained (parity.py)."""
    compared, mismatch = first_mismatch(release_dir, template, system_prompt)
    if mismatch:
        raise PipelineError(
            f"cannot publish: the release's tokenizer would serve another template than the one trained "
            f"(format.template {template.name}): {mismatch}. {paths.RELEASE_DIR}/ is unchanged."
        )
    log.info("the release's chat_template renders the trained token ids of all %d eval rows", compared)


def check_gate(eval_metrics: dict, require_improvement: bool) -> None:
    base, tuned = eval_metrics["base"]["loss"], eval_metrics["tuned"]["loss"]
    if require_improvement and not tuned < base:
        raise PipelineError(
            f"refusing to publish: the adapter's held-out loss {tuned:.4f} is not below the base's {base:.4f}. "
            "Check the training metrics (dvc plots show) or set publish.require_improvement: false to publish anyway."
        )


def build_lineage(params: Params, release_files: dict[str, str], release_id: str, signed: dict) -> dict:
    source = read_json(_require(paths.SOURCE_RECORD, "download"))
    validation = read_json(_require(paths.VALIDATION_RESULT, "validate"))
    formatted = read_json(_require(paths.FORMAT_REPORT, "format"))
    training = read_json(_require(paths.ADAPTER_DIR / "training_run.json", "train"))
    base = resolve_base(params.model)
    recorded = signing.recorded_params(params.as_dict(), signed.get("public_key_sha256"))
    return {
        "release": {
            "name": params.publish.name,
            "id": release_id,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        "source": source,
        "raw_data": {"path": str(paths.RAW_ROWS), "sha256": sha256_file(_require(paths.RAW_ROWS, "download"))},
        "validation": {
            "success": validation["success"],
            "rules_failed": [r["rule"] for r in validation["rules"] if r["status"] == "failed"],
            "result_path": str(paths.VALIDATION_RESULT),
            "result_sha256": sha256_file(paths.VALIDATION_RESULT),
            "conversations_sha256": sha256_file(_require(paths.CONVERSATIONS, "validate")),
        },
        "formatted_data": {
            "train_path": str(paths.TRAIN_ROWS),
            "train_sha256": sha256_file(paths.TRAIN_ROWS),
            "eval_path": str(paths.EVAL_ROWS),
            "eval_sha256": sha256_file(paths.EVAL_ROWS),
            "train_rows": formatted["train_rows"],
            "eval_rows": formatted["eval_rows"],
            "length_policy": formatted["length_policy"],
        },
        "params": recorded,
        "params_sha256": sha256_text(json.dumps(recorded, sort_keys=True)),
        "code": code_version(running="publish"),
        "base_model": {
            "id": params.model.base,
            "revision": params.model.revision,
            "commit": cached_commit(params.model),  # a Hub base: the snapshot's commit; the revision may be a branch
            "files_sha256": sha256_tree(base) if Path(base).is_dir() else None,
        },
        "training": {
            **training,
            "metrics": read_json(_require(paths.TRAINING, "train")),  # every figure of the run, its layout included
        },
        "evaluation": {
            **read_json(_require(paths.EVALUATION, "evaluate")),
            "inputs": read_json(_require(paths.EVAL_RUN, "evaluate")),
        },
        "signing": signed,
        "dvc_lock": provenance.dvc_lock_outputs(),  # each upstream stage's outputs as dvc.lock recorded them
        "files_sha256": release_files,
    }


def _eval_row(name: str, m: dict) -> str:
    return (
        f"| {name} | {m['loss']:.4f} | {m['perplexity']:.2f} | {m['stop_rate']:.0%} | {m['template_leak_rate']:.0%} |"
    )


def benchmarks_table(bench: dict | None) -> str:
    """The card's table of standard benchmarks (evaluate.benchmarks), each requested task's metrics base and tuned;
    nothing when none ran."""
    if not bench:
        return ""
    rows = []
    for task in bench["requested"]:
        figures = bench["tasks"].get(task)
        for metric, pair in (figures or {}).get("metrics", {}).items():
            better = (figures.get("higher_is_better") or {}).get(metric)
            arrow = {True: " (higher is better)", False: " (lower is better)"}.get(better, "")
            base, tuned = (_with_stderr(pair[k], pair[f"{k}_stderr"]) for k in ("base", "tuned"))
            rows.append(f"| {task} | {metric}{arrow} | {figures['n_samples']} | {base} | {tuned} |")
    shots = bench["num_fewshot"] if bench["num_fewshot"] is not None else "each task's default"
    limit = f"at most {bench['limit']} examples a task" if bench["limit"] else "every example"
    return (
        f"\n### Standard benchmarks (lm-evaluation-harness {bench['lm_eval_version']}; {limit}, few-shot: {shots})\n\n"
        "| task | metric | examples | base | tuned |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def _with_stderr(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def model_card(params: Params, lineage: dict, prompt: str) -> str:
    ev, tr = lineage["evaluation"], lineage["training"]["metrics"]
    src = lineage["source"]
    data = src.get("hub_id") or src.get("path")
    lora, t = params.lora, params.train
    return f"""---
library_name: peft
base_model: {params.model.base}
tags: [qlora, guanaco, sft]
---
# {params.publish.name}

LoRA adapter for `{params.model.base}`, trained with QLoRA (4-bit {params.quant.quant_type}) on `{data}`
({lineage["formatted_data"]["train_rows"]} training conversations, {params.format.template} chat template).

Release `{lineage["release"]["id"]}`, code commit `{lineage["code"]["git_commit"]}`.

## Evaluation (held-out rows: {ev["eval_rows"]}, answer tokens only)

| model | loss | perplexity | stop rate | template leak rate |
|---|---|---|---|---|
{_eval_row("base", ev["base"])}
{_eval_row("tuned", ev["tuned"])}
{benchmarks_table(ev.get("benchmarks"))}
## Training

LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, modules {", ".join(lora.target_modules)};
{t.optimizer}, lr {t.learning_rate}, {t.lr_scheduler} schedule, batch {t.batch_size} x {t.grad_accum},
max_length {params.model.max_length}, seed {t.seed}. {tr["steps"]} steps, final train loss {tr["train_loss"]:.4f},
{tr["tokens_per_second"]:.0f} tokens/s on {tr["device"]}.

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base = AutoModelForCausalLM.from_pretrained("{params.model.base}")
model = PeftModel.from_pretrained(base, "<this folder or repo>")
tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")
messages = [{{"role": "user", "content": "Your question"}}]
prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
# = {prompt!r}
```

## Serve

```bash
{serving.serve_command(params.model.base, params.publish.name, "<this folder>", lora.r)}
```

Publish loaded this folder with `PeftModel.from_pretrained` in a fresh process and checked that it generates, token
for token, the greedy answers the evaluation recorded.{_merged_line(lineage)}

## Lineage

`lineage.json` records the data source and its hashes, the validation verdict, every parameter, the
code commit, library versions and hardware, and the sha256 of each file here; `{provenance.FILE}` says
the same as an in-toto statement with SLSA provenance v1. Verify the chain with
`python -m tasks.publish.audit <this folder>`.

## Signature

{_signature_section(lineage["signing"])}
"""


def _merged_line(lineage: dict) -> str:
    if "merged" not in lineage:
        return ""
    merged = lineage["merged"]
    return (
        f" `{merged['folder']}/` holds the adapter merged into the base ({merged['base_loaded_as']}), a standalone "
        f"model: `vllm serve <this folder>/{merged['folder']}`."
    )


def _signature_section(signed: dict) -> str:
    if signed["method"] == "sigstore":
        return (
            f"Every file here is signed with Sigstore (keyless) in `{signed['signature']}`. Verify it with "
            "`model_signing verify sigstore <this folder> --signature <this folder>/model.sig "
            "--identity <the signer> --identity_provider <its OIDC issuer>`."
        )
    return (
        f"Every file here is signed with OpenSSF model signing in `{signed['signature']}`, by the key "
        f"`{signed['public_key']}` (sha256 of its DER: `{signed['public_key_sha256']}`). Verify it with\n\n"
        f"```bash\npip install model-signing pyopenssl\n{signing.verify_command('<this folder>')}\n```\n\n"
        "and check that the key's fingerprint is the one its publisher announced."
    )


RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_publish_params(publish_params) -> None:
    """Every publish setting that can be wrong, checked before anything is built or written."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not RELEASE_NAME.fullmatch(publish_params.name):
        raise PipelineError(
            f"publish.name {publish_params.name!r} cannot name a release: use letters, digits, '.', '_' and '-' "
            "(at most 64, starting with a letter or digit), e.g. -S publish.name=guanaco-llama2-qlora"
        )
    if publish_params.push_to_hub:  # an empty repo id is refused with the params (tasks/common/config.py)
        try:
            validate_repo_id(publish_params.hub_repo_id)
        except HFValidationError:
            raise PipelineError(
                f"publish.hub_repo_id {publish_params.hub_repo_id!r} is not a Hub repository id: write it as "
                "'owner/name' (letters, digits, '-', '_', '.'; no spaces, '--' or '..'), e.g. "
                "-S publish.hub_repo_id=my-team/guanaco-adapter. Nothing was written."
            ) from None
        if "/" not in publish_params.hub_repo_id:
            raise PipelineError(
                f"publish.hub_repo_id {publish_params.hub_repo_id!r} names no owner: write it as 'owner/name'"
            )


def push_to_hub(release_dir: Path, repo_id: str, private: bool, revision_note: str) -> str:
    """Upload the release folder; the token comes from HF_TOKEN or `hf auth login`, never from params."""
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get("HF_TOKEN"))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(release_dir), repo_id=repo_id, commit_message=revision_note)
    except Exception as e:  # any failure of the upload: the release is not swapped in, so nothing half-published
        raise PipelineError(
            f"pushing the release to the Hub repo {repo_id} failed ({type(e).__name__}: {e}). The last release in "
            f"{paths.RELEASE_DIR}/ is unchanged. Check the token (HF_TOKEN or `hf auth login`), the repo id "
            "(publish.hub_repo_id) and the network, then run `dvc repro publish` again."
        ) from None
    return str(getattr(info, "commit_url", info))


def publish(params: Params, release_dir: Path = paths.RELEASE_DIR) -> dict:
    check_gate(read_json(_require(paths.EVALUATION, "evaluate")), params.publish.require_improvement)
    for name in ADAPTER_FILES:
        _require(paths.ADAPTER_DIR / name, "train")
    validation = read_json(_require(paths.VALIDATION_RESULT, "validate"))
    if not validation["success"]:
        raise PipelineError(f"cannot publish: {paths.VALIDATION_RESULT} records a failed validation.")

    check_publish_params(params.publish)  # before anything is built: a bad name or Hub id stops here
    started = provenance.now()
    signer = signing.signer(params.publish)  # before anything is built: a missing or bad key stops here
    with staged_dir(release_dir) as tmp:
        for name in ADAPTER_FILES:
            # contents only: the release's files get ordinary modes, whatever the adapter folder's were
            shutil.copyfile(paths.ADAPTER_DIR / name, tmp / name)
        if problems := serving.vllm_problems(tmp):
            raise PipelineError(
                f"cannot publish: vLLM's LoRA loader would refuse the adapter ({'; '.join(problems)}). "
                f"{paths.RELEASE_DIR}/ is unchanged."
            )
        tokenizer = load_tokenizer(params.model)
        template = chat_template(params.format.template, tokenizer)
        tokenizer.chat_template = template.jinja  # what a server renders conversations with: the trained template
        tokenizer.save_pretrained(tmp)
        check_parity(tmp, template, params.format.system_prompt)
        signer.write_public_key(tmp)
        release_id = f"{params.publish.name}-{sha256_file(tmp / paths.ADAPTER_WEIGHTS)[:12]}"
        merged = None
        if params.publish.merged:
            merged = merge.write_merged(params, tmp, tmp / paths.MERGED, tokenizer, release_id)
        # In a fresh process, as a user loads them: the release (and the merged model) generate what was evaluated.
        if params.publish.generation_check:
            checked = generation_check.check_release(params, tmp, tmp / paths.MERGED if merged else None)
        else:
            checked = {generation_check.SKIPPED: "publish.generation_check is false"}
            log.warning("load-and-generate check skipped (publish.generation_check: false); the lineage says so")
        lineage = build_lineage(params, {}, release_id, signer.record())
        lineage["generation_check"] = checked
        if merged:
            lineage["merged"] = merged
        write_text(tmp / "README.md", model_card(params, lineage, template.prompt("Your question")))
        # Each record covers what came before it: the statement the released files, lineage.json the statement
        # too, and the signature, written last, every file (all but itself).
        statement = provenance.statement(lineage, sha256_tree(tmp, include_hidden=True), started, provenance.now())
        write_text(tmp / provenance.FILE, json.dumps(signer.envelope(statement), sort_keys=True) + "\n")
        lineage["files_sha256"] = sha256_tree(tmp, include_hidden=True)
        write_json(tmp / paths.LINEAGE, lineage)
        signer.sign(tmp, release_id)
        if signer.method == "key":  # every file, dotfiles included, is what the signature covers: checked as the
            try:  # audit and the standard CLI check it, before the release is swapped in or pushed
                signing.verify(tmp)
            except signing.SignatureError as e:
                raise PipelineError(f"cannot publish: the release just signed does not verify: {e}") from None
        if params.publish.push_to_hub:  # before the swap: a failed push leaves the last release whole
            url = push_to_hub(tmp, params.publish.hub_repo_id, params.publish.private, f"Release {release_id}")
            log.info("pushed to the Hub: %s", url)
    log.info(
        "published %s to %s, signed (%s)",
        release_id,
        release_dir,
        f"key sha256 {signer.record()['public_key_sha256']}" if signer.method == "key" else "Sigstore",
    )
    return lineage


def main() -> None:
    publish(load_params())
