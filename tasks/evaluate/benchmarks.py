"""Standard benchmarks in evaluate (evaluate.benchmarks): EleutherAI's lm-evaluation-harness, base vs tuned.

The tasks are lm-eval task, group or tag names, and `heldout_answers`, built in: the held-out rows' answers scored
given the conversation before each of them, rendered through the run's chat template (the text format wrote), in
bits per byte and byte perplexity. Its data is the run's own rows, so it runs offline.

A harness task reads its data through `datasets`, which offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) never reads
the Hugging Face hub cache (what `hf download` or an online run leaves), only its own Arrow cache. So offline, a task
whose Hub dataset the hub cache holds is pointed at that snapshot folder (a task config that includes the harness's
own and sets dataset_path), and the snapshot's commit is recorded. A task whose data cannot be had stops the stage
with a PipelineError naming it, before the model is loaded: whether the cache holds a dataset is asked of
huggingface_hub (a typed exception), never read from an error message.

Both runs score the same model object: the base with the adapter disabled, then the tuned model, on the same tasks
(built once, data loaded once).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from tasks.common import paths
from tasks.common.config import Params
from tasks.common.conversation import Rendered
from tasks.common.errors import PipelineError

log = logging.getLogger(__name__)

HELDOUT = "heldout_answers"
# Standard errors: closed-form for means (accuracy); a few metrics are bootstrapped, in this process.
BOOTSTRAP_ITERS = 1000


def answer_docs(rows: list[Rendered]) -> list[dict]:
    """One document per answer turn: everything before the answer (its prompt through the chat template, and the
    earlier turns) and the answer with the template's end-of-turn token (the span the adapter was trained on)."""
    return [{"context": r.text[:start], "answer": r.text[start:end]} for r in rows for start, end in r.answer_spans]


def _answer_scores(doc: dict, results: list) -> dict:
    loglikelihood, _greedy = results[0]
    size = len(doc["answer"].encode("utf-8"))
    return {"bits_per_byte": (loglikelihood, size), "byte_perplexity": (loglikelihood, size)}


def heldout_task(rows: list[Rendered]) -> dict:
    """The built-in task as an lm-eval task config (loglikelihood of the answer given its context)."""
    import datasets

    docs = answer_docs(rows)
    if not docs:
        raise PipelineError(
            f"evaluate.benchmarks.tasks names {HELDOUT}, but the held-out rows have no answer to score: check "
            f"{paths.EVAL_ROWS} (dvc repro format)."
        )
    data = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
    return {
        "task": HELDOUT,
        "custom_dataset": lambda **_: data,
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "context",
        "doc_to_target": "answer",
        "target_delimiter": "",  # the answer follows its context exactly as the template renders it
        "num_fewshot": 0,  # 0 in the config: evaluate.benchmarks.num_fewshot leaves it alone
        "process_results": _answer_scores,
        "metric_list": [
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
        ],
        "metadata": {"version": 1},
    }


def _offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _hub_snapshot(dataset: str, revision: str | None) -> Path | None:
    """The hub cache's snapshot folder of a dataset at a revision (None: main), or None when the cache has none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(dataset, repo_type="dataset", revision=revision, local_files_only=True))
    except IncompleteSnapshotError as e:  # an interrupted download: the files it lists are not all there
        log.warning("the hub cache's snapshot of %s is incomplete (%s): not used", dataset, e)
        return None
    except (LocalEntryNotFoundError, ValueError):  # not cached, or not a repo id (a packaged builder such as json)
        return None


def _leaves(manager, name: str, seen: set[str] | None = None) -> list[str]:
    """The registered tasks a task, group or tag name runs (a group's members, a tag's tasks, recursively)."""
    seen = set() if seen is None else seen
    if name in seen or name not in manager.task_index:  # a group's inline task: its config is in the group's
        return []
    seen.add(name)
    entry = manager.task_index[name]
    if name in manager.all_tags:
        return [leaf for task in sorted(entry.tags) for leaf in _leaves(manager, task, seen)]
    if name in manager.all_groups:
        members = (entry.cfg or {}).get("task") or []
        names = [m if isinstance(m, str) else m.get("task") or m.get("group") for m in members]
        return [leaf for member in names if isinstance(member, str) for leaf in _leaves(manager, member, seen)]
    return [name]


def _not_available(name: str, task: str, dataset: str, error: Exception | None = None) -> PipelineError:
    from huggingface_hub import constants

    where = f"lm-eval task {name!r}" + (f" (its task {task!r})" if task != name else "")
    why = f" ({type(error).__name__}: {error})" if error is not None else ""
    return PipelineError(
        f"{where} needs the dataset {dataset!r}, which cannot be had: it is not in the Hugging Face hub cache "
        f"({constants.HF_HUB_CACHE}) and offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) fetches nothing{why}. "
        f"Download it once online (`hf download --repo-type dataset {dataset}`), point HF_HOME or HF_HUB_CACHE at a "
        f"cache holding it, or remove {name!r} from evaluate.benchmarks.tasks."
    )


def _point_at_cache(manager, name: str, overrides: Path) -> dict[str, dict]:
    """Offline: point each task `name` runs at the hub cache's snapshot of its Hub dataset. Returns, by task, the
    dataset and the snapshot's commit."""
    used = {}
    for task in _leaves(manager, name):
        entry = manager.task_index[task]
        cfg = entry.cfg or {}
        dataset = cfg.get("dataset_path")
        if entry.yaml_path is None or "class" in cfg or not isinstance(dataset, str) or Path(dataset).exists():
            continue  # a Python task (its data is its own), or a local dataset
        revision = (cfg.get("dataset_kwargs") or {}).get("revision")
        snapshot = _hub_snapshot(dataset, revision)
        if snapshot is None:
            continue  # datasets' own Arrow cache may still hold it: the build below says if not
        override = overrides / f"{task}.yaml"
        override.write_text(
            yaml.safe_dump({"include": str(entry.yaml_path), "task": task, "dataset_path": str(snapshot)}),
            encoding="utf-8",
        )
        manager.task_index[task] = dataclasses.replace(entry, yaml_path=override)
        used[task] = {"dataset": dataset, "revision": revision, "commit": snapshot.name}
    return used


@dataclasses.dataclass
class Prepared:
    """The tasks, built and with their data loaded, before any model work."""

    objects: list  # lm-eval Task and Group objects, one or more for each name (a tag gives its tasks)
    manager: object
    hub_snapshots: dict[str, dict]


def prepare(names: list[str], rows: list[Rendered]) -> Prepared:
    """Build every task named, its data loaded now: a task whose data cannot be had stops before the model loads."""
    with tempfile.TemporaryDirectory(prefix="benchmarks-") as scratch:  # the configs pointing tasks at the cache
        return _build(names, rows, Path(scratch))


def _build(names: list[str], rows: list[Rendered], scratch: Path) -> Prepared:
    from lm_eval.tasks import TaskManager

    harness = [n for n in dict.fromkeys(names) if n != HELDOUT]
    manager = TaskManager(include_defaults=bool(harness))  # indexing lm-eval's ~15k task configs takes ~10 s
    unknown = [n for n in harness if n not in manager.all_tasks]
    if unknown:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        raise PipelineError(
            f"evaluate.benchmarks.tasks names {', '.join(map(repr, unknown))}, which lm-eval does not know "
            f"(close names: {hints}). Use a name `lm-eval ls tasks` lists, or {HELDOUT!r} for the held-out rows."
        )
    snapshots: dict[str, dict] = {}
    objects: list = []
    for name in dict.fromkeys(names):
        if name == HELDOUT:
            objects.append(manager.load([heldout_task(rows)])["tasks"][HELDOUT])
            continue
        used = _point_at_cache(manager, name, scratch) if _offline() else {}
        snapshots |= used
        try:
            loaded = manager.load([name])
        except Exception as e:  # whatever datasets raises for data it cannot reach; the check is ours
            raise _failed(manager, name, e, used) from None
        if name in loaded["groups"]:
            objects.append(loaded["groups"][name])
        else:  # a task, or a tag's tasks
            objects.extend(loaded["tasks"].values())
    return Prepared(objects, manager, snapshots)


def _failed(manager, name: str, error: Exception, used: dict[str, dict]) -> PipelineError:
    """Why task `name` could not be built: offline, the first of its Hub datasets the hub cache lacks; else the
    error itself, with the hub cache snapshots its tasks were pointed at."""
    for task in _leaves(manager, name):
        cfg = manager.task_index[task].cfg or {}
        dataset = cfg.get("dataset_path")
        if _offline() and task not in used and isinstance(dataset, str) and not Path(dataset).exists():
            return _not_available(name, task, dataset, error)
    read = "; ".join(f"{t} read {u['dataset']!r} from the hub cache's snapshot {u['commit']}" for t, u in used.items())
    return PipelineError(
        f"lm-eval task {name!r} could not be built: {type(error).__name__}: {error}"
        + (f" ({read}: the snapshot may lack the config or split the task reads)" if read else "")
        + ". Check its name and data (download it once online with `hf download --repo-type dataset <id>`), or "
        "remove it from evaluate.benchmarks.tasks."
    )


@contextmanager
def _bootstrap_in_process():
    """lm-eval bootstraps standard errors in a multiprocessing pool unless DISABLE_MULTIPROC is set; forking a
    process that holds a model is neither needed nor safe."""
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def _score(lm, prepared: Prepared, params: Params) -> dict:
    from lm_eval import simple_evaluate

    b = params.evaluate.benchmarks
    with _bootstrap_in_process():
        out = simple_evaluate(
            model=lm,
            tasks=prepared.objects,
            task_manager=prepared.manager,
            num_fewshot=b.num_fewshot,
            limit=b.limit,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,  # seeds: lm-eval's defaults, so that figures compare with other lm-eval runs
        )
    return out


def _figures(result: dict) -> dict[str, dict[str, float | None]]:
    """{metric: {"value", "stderr"}} of one task's result row ("acc,none": 0.5, "acc_stderr,none": 0.1, ...);
    a metric under a filter other than lm-eval's "none" is named metric/filter."""
    figures: dict[str, dict] = {}
    for key, value in result.items():
        metric, sep, filt = key.partition(",")
        if not sep or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        stderr = metric.endswith("_stderr")
        metric = metric.removesuffix("_stderr")
        name = metric if filt == "none" else f"{metric}/{filt}"
        value = float(value) if math.isfinite(value) else None
        figures.setdefault(name, {"value": None, "stderr": None})["stderr" if stderr else "value"] = value
    return figures


def compare(base: dict, tuned: dict) -> dict:
    """Base and tuned side by side, for every task and group lm-eval reported."""
    tasks = {}
    for task, result in tuned["results"].items():
        b, t = _figures(base["results"][task]), _figures(result)
        tasks[task] = {
            "n_samples": (tuned.get("n-samples") or {}).get(task, {}).get("effective"),
            "num_fewshot": (tuned.get("n-shot") or {}).get(task),
            "version": (tuned.get("versions") or {}).get(task),
            "higher_is_better": (tuned.get("higher_is_better") or {}).get(task),
            "metrics": {
                m: {
                    "base": b[m]["value"],
                    "tuned": t[m]["value"],
                    "base_stderr": b[m]["stderr"],
                    "tuned_stderr": t[m]["stderr"],
                }
                for m in t
                if m in b
            },
        }
    return tasks


def run(model, tokenizer, prepared: Prepared, params: Params) -> dict:
    """Every prepared task on the base (adapter disabled) and on the tuned model: reports/evaluation.json's
    `benchmarks`."""
    from importlib.metadata import version

    from lm_eval.models.huggingface import HFLM

    # An already-loaded model: HFLM takes the PeftModel as it is (its device, its 4-bit layers), with our tokenizer
    # (the template's <s> is already in the held-out text, and HFLM adds no BOS by default).
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=params.evaluate.batch_size,
        max_length=params.model.max_length,
    )
    with model.disable_adapter():
        base = _score(lm, prepared, params)
    tuned = _score(lm, prepared, params)
    tasks = compare(base, tuned)
    for task, figures in tasks.items():
        for metric, pair in figures["metrics"].items():
            log.info("benchmark %s %s: base %s -> tuned %s", task, metric, pair["base"], pair["tuned"])
    return {
        "lm_eval_version": version("lm-eval"),
        "requested": list(dict.fromkeys(params.evaluate.benchmarks.tasks)),
        "limit": params.evaluate.benchmarks.limit,
        "num_fewshot": params.evaluate.benchmarks.num_fewshot,
        "hub_snapshots": prepared.hub_snapshots,
        "tasks": tasks,
    }


def headline(benchmarks: dict) -> dict:
    """metrics/eval.json's `benchmarks`: each requested task's (or group's) metrics, base and tuned, rounded."""
    out = {}
    for task in benchmarks["requested"]:
        if task in benchmarks["tasks"]:
            metrics = benchmarks["tasks"][task]["metrics"]
            out[task] = {m: {k: _round(pair[k]) for k in ("base", "tuned")} for m, pair in metrics.items()}
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
