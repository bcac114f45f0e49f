"""Load-and-generate check: the release, loaded as a user loads it, generates what the evaluate stage generated.

In a fresh process (no state of publish's own: what a user's process sees), the base is loaded as evaluate loaded
it (tasks/common/base_model.py: the same quantization and compute dtype), the release's adapter put on it with
`PeftModel.from_pretrained`, and each eval prompt, rendered by the release tokenizer's own chat_template, continued
greedily; the new token ids must equal the ones evaluate recorded (reports/generations.jsonl), every one. With a
merged model (publish.merged), the merged folder loaded alone must generate what the adapter generates on the same
unquantized base it was merged into. Same process, dtype and device as evaluate's, so the comparison is exact.

The parent side (check_release) runs `python -m tasks.publish.generation_check REQUEST RESULT` and compares; the
child side (main) loads and generates. Request and result are JSON files, so no library's printing is parsed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.common import paths
from tasks.common.artifacts import read_json, read_jsonl, sha256_file, write_json
from tasks.common.config import Params
from tasks.common.errors import PipelineError

log = logging.getLogger(__name__)

SKIPPED = "skipped"  # the lineage's generation_check record when publish.generation_check is false: {SKIPPED: why}
RECORDED_KEY = "tuned_token_ids"  # in reports/generations.jsonl: the adapter's greedy new tokens, per prompt


# -- the child: load, render, generate -------------------------------------------------------------------------------
def _load(kind: str, params: Params, release: Path, merged: Path | None):
    """The model a user gets: `adapter` on the base as evaluate loaded it, `adapter_unquantized` on the base in its
    compute dtype (what the merge started from), or the `merged` folder alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.common.base_model import compute_dtype, load_base_model

    if kind == "merged":
        return AutoModelForCausalLM.from_pretrained(
            merged, dtype=compute_dtype(params.quant), device_map=_device_map(), use_kernels=False
        )
    quant = params.quant if kind == "adapter" else params.quant.model_copy(update={"load_in_4bit": False})
    return PeftModel.from_pretrained(load_base_model(params.model, quant), release)


def _device_map():
    import torch

    return {"": 0} if torch.cuda.is_available() else "cpu"


def run_child(request: dict) -> dict:
    """For each model named in the request, the rendered prompt ids and the greedy new token ids of every prompt."""
    import torch
    from transformers import AutoTokenizer

    from tasks.common.chat_template import chat_template
    from tasks.common.generation import greedy_new_tokens

    params = Params.model_validate(request["params"])
    release = Path(request["release"])
    merged = Path(request["merged"]) if request.get("merged") else None
    tokenizer = AutoTokenizer.from_pretrained(release)  # the release's own: its chat_template is what serves
    template = chat_template(params.format.template, tokenizer)
    stop = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    system = params.format.system_prompt
    head = [{"role": "system", "content": system}] if system else []
    served, evaluated = [], []
    for prompt in params.evaluate.prompts:
        messages = [*head, {"role": "user", "content": prompt}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        served.append(list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered))
        evaluated.append(tokenizer(template.prompt(prompt, system), add_special_tokens=False)["input_ids"])
    result = {"served_prompt_ids": served, "evaluated_prompt_ids": evaluated, "tokens": {}}
    for kind in request["models"]:
        model = _load(kind, params, release, merged)
        model.eval()
        result["tokens"][kind] = [
            greedy_new_tokens(model, ids, stop, tokenizer.pad_token_id, params.evaluate.max_new_tokens)
            for ids in served
        ]
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next model gets the memory back
    return result


def main(argv: list[str]) -> None:
    request_path, result_path = argv
    write_json(result_path, run_child(read_json(request_path)))


# -- the parent: run the child, compare --------------------------------------------------------------------------------
def recorded_tokens(params: Params, generations: Path = paths.GENERATIONS) -> list[list[int]]:
    """evaluate's greedy new token ids of the tuned model, one list per eval prompt, in params order."""
    if not generations.is_file():
        raise PipelineError(f"cannot publish: {generations} is missing. Run `dvc repro evaluate` first.")
    rows = read_jsonl(generations)
    if [r.get("prompt") for r in rows] != list(params.evaluate.prompts):
        raise PipelineError(
            f"cannot publish: {generations} holds generations of other prompts than evaluate.prompts. "
            "Run `dvc repro evaluate` again."
        )
    missing = [i for i, r in enumerate(rows) if not isinstance(r.get(RECORDED_KEY), list)]
    if missing:
        raise PipelineError(
            f"cannot publish: {generations} row {missing[0]} has no {RECORDED_KEY} (an evaluate run older than the "
            "load-and-generate check wrote it). Run `dvc repro evaluate` again."
        )
    return [r[RECORDED_KEY] for r in rows]


def _first_difference(got: list[int], want: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def _token(tokenizer, ids: list[int], at: int) -> str:
    return f"{ids[at]} {tokenizer.convert_ids_to_tokens(ids[at])!r}" if at < len(ids) else "(the end)"


def compare(
    tokenizer, prompts: list[str], got: list[list[int]], want: list[list[int]], what: str, against: str
) -> str | None:
    """None when every prompt's tokens are equal, else the first difference in words: prompt, position, tokens."""
    for i, (prompt, g, w) in enumerate(zip(prompts, got, want)):
        if g != w:
            at = _first_difference(g, w)
            return (
                f"eval prompt {i} ({prompt!r}): {what} gives token {_token(tokenizer, g, at)} at position {at} where "
                f"{against} has {_token(tokenizer, w, at)} ({len(g)} vs {len(w)} tokens)"
            )
    return None


def _child_env() -> dict[str, str]:
    """The child imports the same `tasks` code as this process, wherever it was imported from."""
    import tasks

    code_root = str(Path(tasks.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (code_root, env.get("PYTHONPATH")) if p)
    return env


def run_in_fresh_process(params: Params, release: Path, merged: Path | None, models: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="generation-check-") as work:
        request, result = Path(work) / "request.json", Path(work) / "result.json"
        write_json(
            request,
            {
                "params": params.as_dict(),
                "release": str(release.resolve()),
                "merged": str(merged.resolve()) if merged else None,
                "models": models,
            },
        )
        done = subprocess.run(
            [sys.executable, "-m", "tasks.publish.generation_check", str(request), str(result)],
            env=_child_env(),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 or not result.is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise PipelineError(
                f"cannot publish: loading the release in a fresh process to generate failed (exit {done.returncode}):"
                f"\n{tail}\n{paths.RELEASE_DIR}/ is unchanged."
            )
        return read_json(result)


def check_release(params: Params, release: Path, merged: Path | None, generations: Path = paths.GENERATIONS) -> dict:
    """Raise PipelineError naming the prompt and first differing token if the release (or the merged model) does not
    generate what evaluate recorded; return the check's record for the lineage."""
    from transformers import AutoTokenizer

    want = recorded_tokens(params, generations)
    started = time.monotonic()
    models = ["adapter"] + (["adapter_unquantized", "merged"] if merged else [])
    result = run_in_fresh_process(params, release, merged, models)
    tokenizer = AutoTokenizer.from_pretrained(release)
    prompts = list(params.evaluate.prompts)
    base = "4-bit " + params.quant.quant_type if params.quant.load_in_4bit else "unquantized"
    loaded = f"the base ({base}, {params.quant.compute_dtype}) + the release via PeftModel.from_pretrained"
    reference = f"the adapter on the unquantized base ({params.quant.compute_dtype})"
    checks = [  # (what failed, got, wanted, what got is, what wanted is)
        (
            "the release renders the eval prompts otherwise than evaluate",
            result["served_prompt_ids"],
            result["evaluated_prompt_ids"],
            "the release's chat_template",
            "evaluate's prompt",
        ),
        (
            "the release does not generate what was evaluated",
            result["tokens"]["adapter"],
            want,
            loaded,
            f"evaluate's record ({generations})",
        ),
    ]
    if merged:
        checks.append(
            (
                "the merged model does not generate what the adapter does",
                result["tokens"]["merged"],
                result["tokens"]["adapter_unquantized"],
                "the merged model",
                reference,
            )
        )
    for failed, got, wanted, what, against in checks:
        if problem := compare(tokenizer, prompts, got, wanted, what, against):
            raise PipelineError(f"cannot publish: {failed}: {problem}. {paths.RELEASE_DIR}/ is unchanged.")
    record = {
        "recorded": str(generations),
        "recorded_sha256": sha256_file(generations),
        "prompts": len(prompts),
        "tokens_compared": sum(map(len, want)),
        "adapter": f"{loaded}: the same greedy tokens as evaluate recorded",
        "seconds": round(time.monotonic() - started, 1),
    }
    if merged:
        record["merged"] = f"the same greedy tokens as {reference}"
        record["merged_matches_evaluated_prompts"] = sum(
            g == w for g, w in zip(result["tokens"]["merged"], want)
        )  # informational: a 4-bit evaluation differs from an unquantized merge by the quantization itself
    log.info("load-and-generate check: %d prompts, %d tokens, as evaluated", len(prompts), record["tokens_compared"])
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
