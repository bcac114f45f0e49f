"""Stage 5, evaluate: base vs tuned on the same held-out rows, and a few greedy generations.

Loss is the mean over answer tokens only (the same labels training used), so base and tuned are
compared on exactly what the adapter was taught. Generations use the chat template and report
stop rate (ended with the template's end-of-turn token, e.g. </s> or <|eot_id|>, before max_new_tokens) and template
leakage (a template's markers, [INST] or <|im_start|>, in the output).
The base is loaded once; its score is taken with the adapter disabled. Standard benchmarks (lm-evaluation-harness,
evaluate.benchmarks) run on that same model object, base then tuned (tasks/evaluate/benchmarks.py).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from tasks.common import paths
from tasks.common.artifacts import sha256_file, write_json, write_jsonl
from tasks.common.base_model import load_base_model, load_tokenizer
from tasks.common.chat_template import ChatTemplate, chat_template
from tasks.common.config import Params, load_params
from tasks.common.conversation import FORM_MARKERS
from tasks.common.errors import PipelineError
from tasks.common.formatted import load_rows
from tasks.common.generation import greedy_new_tokens
from tasks.common.tokens import IGNORE, tokenize_rendered, truncate
from tasks.evaluate import benchmarks

log = logging.getLogger(__name__)


@torch.no_grad()
def answer_loss(model, batches: list[dict]) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over answer tokens, and how many tokens it covers."""
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        total += nll.item()
        count += int((labels != IGNORE).sum())
    return total / max(count, 1), count


def make_batches(tokenizer, rows, max_length: int, batch_size: int) -> list[dict]:
    toks = truncate(tokenize_rendered(tokenizer, rows), max_length)  # the cut train makes, the same rows dropped
    batches = []
    for k in range(0, len(toks), batch_size):
        chunk = toks[k : k + batch_size]
        width = max(len(t.input_ids) for t in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        labels = torch.full((len(chunk), width), IGNORE)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, t in enumerate(chunk):
            n = len(t.input_ids)
            ids[i, :n] = torch.tensor(t.input_ids)
            labels[i, :n] = torch.tensor(t.labels)
            mask[i, :n] = 1
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return batches


@torch.no_grad()
def generate(
    model, tokenizer, template: ChatTemplate, prompts: list[str], system: str | None, max_new_tokens: int
) -> list[dict]:
    # Generation stops at the token that ends a turn (Llama-3's <|eot_id|>, not its <|end_of_text|>)
    stop = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    leaks = tuple(dict.fromkeys(FORM_MARKERS + template.markers))
    out = []
    for prompt in prompts:
        text_in = template.prompt(prompt, system)
        prompt_ids = tokenizer(text_in, add_special_tokens=False)["input_ids"]
        new = greedy_new_tokens(model, prompt_ids, stop, tokenizer.pad_token_id, max_new_tokens)
        stopped = stop in new
        text = tokenizer.decode(new, skip_special_tokens=True)
        out.append(
            {
                "prompt": prompt,
                "output": text,
                "stopped": stopped,
                "new_tokens": len(new),
                "token_ids": new,
                "leaked_template": any(m in text for m in leaks),
            }
        )
    return out


def _summary(loss: float, tokens: int, gens: list[dict]) -> dict:
    return {
        "loss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 50)), 4),
        "answer_tokens": tokens,
        "stop_rate": round(sum(g["stopped"] for g in gens) / len(gens), 4),
        "template_leak_rate": round(sum(g["leaked_template"] for g in gens) / len(gens), 4),
    }


def headline(metrics: dict) -> dict:
    """metrics/eval.json, the evaluate row of `dvc metrics show`: the tuned model's held-out answer loss (in the
    column it shares with the training loss) and the share of its generations it ends itself. Short names and
    rounded figures, so that the one table of every stage fits an 80-column terminal; every figure, the base's
    among them, at full precision, is in reports/evaluation.json."""
    out = {"loss": round(metrics["tuned"]["loss"], 3), "stops": metrics["tuned"]["stop_rate"]}
    if "benchmarks" in metrics:  # only when evaluate.benchmarks.tasks names some
        out["benchmarks"] = benchmarks.headline(metrics["benchmarks"])
    return out


def evaluate(
    params: Params,
    eval_rows: Path = paths.EVAL_ROWS,
    adapter_dir: Path = paths.ADAPTER_DIR,
    metrics_path: Path = paths.EVAL_METRICS,
    figures_path: Path = paths.EVALUATION,
    generations_path: Path = paths.GENERATIONS,
    run_path: Path = paths.EVAL_RUN,
) -> dict:
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").exists():
        raise PipelineError(f"no adapter in {adapter_dir}: run the train stage first (dvc repro train).")
    rows = load_rows(eval_rows)[: params.evaluate.max_rows]
    tokenizer = load_tokenizer(params.model)
    template = chat_template(params.format.template, tokenizer)
    batches = make_batches(tokenizer, rows, params.model.max_length, params.evaluate.batch_size)
    if not batches:
        raise PipelineError(f"{eval_rows} has no row with an answer token inside model.max_length to evaluate on.")
    # the benchmarks' tasks and data before the model: one whose data cannot be had stops the stage here
    prepared = benchmarks.prepare(params.evaluate.benchmarks.tasks, rows) if params.evaluate.benchmarks.tasks else None

    model = PeftModel.from_pretrained(load_base_model(params.model, params.quant), adapter_dir)
    model.eval()
    e = params.evaluate
    with model.disable_adapter():
        base_loss, tokens = answer_loss(model, batches)
        base_gens = generate(model, tokenizer, template, e.prompts, params.format.system_prompt, e.max_new_tokens)
    tuned_loss, _ = answer_loss(model, batches)
    tuned_gens = generate(model, tokenizer, template, e.prompts, params.format.system_prompt, e.max_new_tokens)

    metrics = {
        "eval_rows": len(rows),
        "base": _summary(base_loss, tokens, base_gens),
        "tuned": _summary(tuned_loss, tokens, tuned_gens),
        "loss_improvement": round(base_loss - tuned_loss, 6),
    }
    if prepared is not None:
        metrics["benchmarks"] = benchmarks.run(model, tokenizer, prepared, params)
    # What was evaluated, beside the metrics (not in them: `dvc metrics show` is for numbers).
    write_json(
        run_path,
        {
            "adapter_sha256": sha256_file(adapter_dir / paths.ADAPTER_WEIGHTS),
            "eval_rows_sha256": sha256_file(eval_rows),
            "metrics_file": str(metrics_path),
        },
    )
    write_jsonl(
        generations_path,
        (
            {
                "prompt": b["prompt"],
                "base": b["output"],
                "tuned": t["output"],
                "base_stopped": b["stopped"],
                "tuned_stopped": t["stopped"],
                # the ids themselves: publish's load-and-generate check compares the release's, token for token
                "tuned_token_ids": t["token_ids"],
            }
            for b, t in zip(base_gens, tuned_gens)
        ),
    )
    write_json(figures_path, metrics)
    write_json(metrics_path, headline(metrics))
    log.info("eval loss base %.4f -> tuned %.4f on %d answer tokens", base_loss, tuned_loss, tokens)
    return metrics


def main() -> None:
    evaluate(load_params())
