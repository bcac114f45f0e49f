"""Data-stage speed and memory at scale: download -> validate -> format against the tokenizer floor.

The rows (--rows-kind diverse, the default) are all different: the sentences of the 1k real guanaco rows (raw
guanaco form), each role's apart, redrawn into new conversations of as many turns as a real row drawn at random, each
turn as many sentences as the real turn it stands for, so turn counts and lengths follow the real rows' while no two
rows repeat (a seeded draw: every run writes the same rows). --rows-kind repeated is the older set: the 1k rows
repeated with a variant tag in the first human turn and alternate rows with Windows newlines and stray spaces. For
each size in --rows, in a scratch project with the recipe's params (max_length 1024, truncate) and the real Llama-2
tokenizer, the script:

  1. times the floor, in a process of its own: the fast tokenizer alone, batched as a user calls it
     (`tokenizer(texts)`, 1,000 texts a call), on the exact texts validate tokenizes (the rendered conversations);
     the bare Rust backend (`backend_tokenizer.encode_batch`) is timed too and printed beside it; its peak RSS is
     reported apart from the stages';
  2. runs each stage as `dvc repro` does (`python -m tasks.download`, `tasks.validate`, `tasks.format`), each its
     own process, timing it and reading that process's own peak RSS (VmHWM, /proc/<pid>/status, read while it
     runs: the kernel's wait4 figure starts a child at its parent's size, so it cannot tell a stage from the
     process that started it);
  3. prints seconds, the ratio of the three stages to the floor and each stage's peak RSS, and saves it as JSON.

    python -m benchmarks.data_stages --rows 10000,100000,1000000 [--rows-kind diverse] [--raw ...] [--tokenizer ...]

--validate-workers N sets validate.workers for the stage (0: the one-process scan; N: N worker processes; default
the params' auto, which uses the pool only on more than 2 usable cores): the same invocation with 0 and with the
machine's core count compares the two scans on one machine.

Targets (issue 12, 2-core machine): 1M rows in at most 1.3x the floor, peak RSS at most 3 GB, cost linear in rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.common import ROOT, save

STAGES = ("download", "validate", "format")
FLOOR_BATCH = 1000


def iter_perturbed_rows(raw: Path, n: int) -> Iterator[dict]:
    base = [json.loads(line) for line in raw.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i in range(n):
        k, text = divmod(i, len(base))[0], base[i % len(base)]["text"]
        if k:
            text = text.replace("### Human: ", f"### Human: (variant {k}) ", 1)
            if k % 2:
                text = "  " + text.replace("\n", "\r\n") + " "  # Windows newlines and stray spaces
        yield {"text": text}


def perturbed_rows(raw: Path, n: int) -> list[dict]:
    return list(iter_perturbed_rows(raw, n))


SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")
DIVERSE_SEED = 12


def iter_diverse_rows(raw: Path, n: int, seed: int = DIVERSE_SEED) -> Iterator[dict]:
    """n rows, all different, shaped like the real ones: see the module docstring."""
    from tasks.common.conversation import ASSISTANT, USER, parse_text

    marker = {USER: "### Human: ", ASSISTANT: "### Assistant: "}
    shapes: list[list[tuple[str, int]]] = []  # per real row, per turn: (role, sentences)
    pool: dict[str, list[str]] = {USER: [], ASSISTANT: []}
    for line in raw.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        shape = []
        for role, text in parse_text(json.loads(line)["text"]).turns:
            sentences = [x for x in SENTENCE_END.split(text.strip()) if x]
            pool[role].extend(sentences)
            shape.append((role, max(len(sentences), 1)))
        shapes.append(shape)
    rng = random.Random(seed)
    for _ in range(n):
        turns = (f"{marker[role]}{' '.join(rng.choices(pool[role], k=k))}" for role, k in rng.choice(shapes))
        yield {"text": "".join(turns)}


ROW_KINDS = {"diverse": iter_diverse_rows, "repeated": iter_perturbed_rows}


def write_rows(raw: Path, n: int, path: Path, kind: str = "diverse") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in ROW_KINDS[kind](raw, n):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _rendered_batches(data_file: Path, system_prompt: str | None) -> Iterator[list[str]]:
    """The texts validate tokenizes (renderable rows, rendered), FLOOR_BATCH at a time, never all in memory."""
    from tasks.common.chat_template import BUILT_IN
    from tasks.common.conversation import ParseError, detect_form, parse_row
    from tasks.validate.expectations import conversation_features
    from tasks.validate.scan import renderable

    llama2 = BUILT_IN["llama2"]

    batch: list[str] = []
    with open(data_file, encoding="utf-8") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            try:
                conv = parse_row(row)
            except ParseError:
                continue
            if not renderable(conversation_features(i, conv, detect_form(row), None)):
                continue
            batch.append(llama2.render(conv, system_prompt).text)
            if len(batch) == FLOOR_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def tokenizer_floor(data_file: Path, tokenizer_dir: Path, system_prompt: str | None, backend_too: bool = True) -> dict:
    """Seconds the fast tokenizer alone takes on the texts (parsing and rendering them is not timed). backend_too
    also times the Rust backend's encode_batch on the same batches: a second full pass, which doubles the floor's
    cost (at ten million rows about an hour of the 2-core machine), so a long run may leave it out."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    backend = tokenizer.backend_tokenizer
    call = bare = 0.0
    tokens = texts = 0
    for batch in _rendered_batches(data_file, system_prompt):
        start = time.perf_counter()
        enc = tokenizer(batch, add_special_tokens=False)
        call += time.perf_counter() - start
        if backend_too:
            start = time.perf_counter()
            backend.encode_batch(batch, add_special_tokens=False)
            bare += time.perf_counter() - start
        tokens += sum(len(ids) for ids in enc["input_ids"])
        texts += len(batch)
    backend_seconds = round(bare, 2) if backend_too else None
    return {"seconds": round(call, 2), "backend_seconds": backend_seconds, "texts": texts, "tokens": tokens}


def _proc_gb(pid: int | str, file: str, field: str) -> float | None:
    """A `field: <n> kB` figure of /proc/<pid>/<file> in GB; None once the process has ended."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / 1e9
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def rss_gb(pid: int | str = "self", field: str = "VmHWM") -> float | None:
    """A process's memory figure from /proc/<pid>/status in GB: its own high-water RSS (VmHWM) unless field says
    otherwise (VmRSS: now); None once the process has ended."""
    return _proc_gb(pid, "status", field)


def pss_gb(pid: int) -> float:
    """A process's proportional set size in GB (/proc/<pid>/smaps_rollup): its private pages plus its share of the
    pages it shares, so the PSS of processes that share libraries (a fork server's workers) adds up to what they hold
    together, where their RSS would count each shared page once a process. 0 once it has ended."""
    return _proc_gb(pid, "smaps_rollup", "Pss") or 0.0


def _descendants(pid: int) -> list[int]:
    """The pids of a process's children, theirs, and so on (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            found += children
            todo += children
    return found


def run_process(cmd: list[str], cwd: Path, what: str) -> dict:
    """Run cmd (a stage as dvc runs it, or the floor) in its own process: wall seconds and that process's own peak
    RSS, sampled every 50 ms (VmHWM only grows, so the last sample before it ends is its peak, give or take what it
    allocated in its last 50 ms). A stage with worker processes (validate.workers) also gets tree_peak_pss_gb: the
    largest sum, at one sample, of the proportional set size of it and all its descendants (what they hold together,
    shared pages counted once)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GX_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    peak = tree_peak = 0.0
    most_processes = 1
    while proc.poll() is None:
        peak = max(peak, rss_gb(proc.pid) or 0.0)
        children = _descendants(proc.pid)
        if children:
            most_processes = max(most_processes, 1 + len(children))
            tree = pss_gb(proc.pid) + sum(pss_gb(c) for c in children)
            tree_peak = max(tree_peak, tree)
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{what} failed (exit {proc.returncode}) in {cwd}")
    result = {"seconds": round(seconds, 2), "peak_rss_gb": round(peak, 3)}
    if most_processes > 1:
        result |= {"tree_peak_pss_gb": round(tree_peak, 3), "processes": most_processes}
    return result


def run_stage(name: str, project: Path) -> dict:
    return run_process([sys.executable, "-m", f"tasks.{name}"], project, f"stage {name}")


def run_floor(data_file: Path, tokenizer_dir: Path, system_prompt: str | None, work: Path, backend_too: bool) -> dict:
    """tokenizer_floor in a process of its own, so its memory is neither the stages' nor this script's."""
    out = work / "floor.json"
    args = [str(data_file), str(tokenizer_dir), json.dumps(system_prompt), str(out), json.dumps(backend_too)]
    process = run_process([sys.executable, "-m", "benchmarks.data_stages", "--floor-only", *args], work, "the floor")
    return {**json.loads(out.read_text()), "process_seconds": process["seconds"], "peak_rss_gb": process["peak_rss_gb"]}


def make_project(work: Path, data_file: Path, tokenizer_dir: Path, overrides: list[str] = ()) -> Path:
    """A scratch project with the recipe's params on data_file, plus `overrides` (e.g. validate.workers=16)."""
    from tasks.common.compose import compose_params

    project = work / "project"
    shutil.copytree(ROOT / "conf", project / "conf")
    compose_params(
        project,
        [
            "preset=llama2_7b_guanaco",
            "download.source=local",
            f"download.path={data_file}",
            f"model.tokenizer={tokenizer_dir.resolve()}",
            *overrides,
        ],
    )
    return project


def stage_overrides(args) -> list[str]:
    """The params the options set for the stages: validate.workers when --validate-workers is given."""
    return [] if args.validate_workers is None else [f"validate.workers={args.validate_workers}"]


def measure(rows: int, args, progress: Callable[[dict], None]) -> dict:
    """One size: the floor, then each stage. progress gets the figures so far after each step, so a run stopped
    part-way (ten million rows take hours) still leaves what it measured."""
    from tasks.common.config import load_params

    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"data-bench-{rows}-", dir=args.work))
    start = time.perf_counter()
    data_file = write_rows(args.raw, rows, work / "input" / "rows.jsonl", args.rows_kind)
    generate_seconds = round(time.perf_counter() - start, 1)
    partial: dict = {
        "rows": rows,
        "rows_kind": args.rows_kind,
        "generate_seconds": generate_seconds,
        "input_gb": round(data_file.stat().st_size / 1e9, 3),
    }
    project = make_project(work, data_file, args.tokenizer, stage_overrides(args))
    params = load_params(project / "params.yaml")
    if args.stages:  # the setting and what it gives on this machine (0: the one-process scan)
        from tasks.validate.scan_pool import pool_workers

        setting = params.validate_.workers
        partial["validate_workers"] = {"setting": setting, "processes": pool_workers(setting)}
    partial["floor"] = floor = run_floor(
        data_file, args.tokenizer, params.format.system_prompt, work, args.floor_backend
    )
    progress(partial)
    if not args.stages:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return partial
    from tasks.common import paths

    # What no later step reads, deleted as soon as it is spent when asked: ten million rows are about 17 GB in each
    # of the input, data/raw, data/validated and data/formatted, more than this machine's disk holds at once.
    spent_after = {"download": data_file, "validate": project / paths.RAW_ROWS} if args.drop_spent else {}
    stages: dict = {}
    for name in STAGES:
        stages[name] = run_stage(name, project)
        progress({**partial, "stages": stages})
        if name in spent_after:
            spent_after[name].unlink()
    total = sum(s["seconds"] for s in stages.values())
    metrics = json.loads((project / paths.VALIDATION_SUMMARY).read_text(encoding="utf-8"))
    report = json.loads((project / "data/formatted/report.json").read_text(encoding="utf-8"))
    result = {
        **partial,
        "stages": stages,
        "total_seconds": round(total, 2),
        "ratio_to_floor": round(total / floor["seconds"], 3),
        "ratio_to_backend_floor": round(total / floor["backend_seconds"], 3) if floor["backend_seconds"] else None,
        "peak_rss_gb": max(s["peak_rss_gb"] for s in stages.values()),  # the largest stage's own; the floor's apart
        "seconds_per_1k_rows": round(total / rows * 1000, 3),
        "validated": {k: metrics[k] for k in ("success", "rows_excluded", "tokens_p50", "tokens_max")},
        "formatted": {k: report[k] for k in ("train_rows", "eval_rows")},
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _print(r: dict) -> None:
    if "stages" not in r:  # --no-stages: the floor alone
        f = r["floor"]
        print(
            f"{r['rows']:>9,d} rows  floor {f['seconds']:7.1f}s ({f['tokens']:,d} tokens)"
            f"  peak RSS {f['peak_rss_gb']:.2f} GB"
        )
        return
    s = r["stages"]
    print(
        f"{r['rows']:>9,d} rows  "
        + "  ".join(f"{n} {s[n]['seconds']:7.1f}s" for n in STAGES)
        + f"  total {r['total_seconds']:7.1f}s  floor {r['floor']['seconds']:7.1f}s"
        + (f" (backend {r['floor']['backend_seconds']:.1f}s)" if r["floor"]["backend_seconds"] else "")
        + f"  ratio {r['ratio_to_floor']:.2f}"
        + (f" (to backend {r['ratio_to_backend_floor']:.2f})" if r["ratio_to_backend_floor"] else "")
        + "  peak RSS "
        + " ".join(
            f"{n} {s[n]['peak_rss_gb']:.2f}"
            + (f" (tree of {s[n]['processes']} {s[n]['tree_peak_pss_gb']:.2f} PSS)" if "processes" in s[n] else "")
            for n in STAGES
        )
        + f" GB (floor {r['floor']['peak_rss_gb']:.2f})"
        f"  {r['seconds_per_1k_rows']:.3f} s/1k rows"
        f"  validate workers {r['validate_workers']['processes']} ({r['validate_workers']['setting']})",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, default=ROOT.parent / "shared/data/guanaco-raw-1k/train.jsonl")
    ap.add_argument("--tokenizer", type=Path, default=ROOT.parent / "shared/data/llama-2-tokenizer")
    ap.add_argument("--rows", default="10000", help="comma-separated sizes, e.g. 10000,100000,1000000")
    ap.add_argument("--work", type=Path, default=None, help="where the scratch projects go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch projects")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/data_stages_cpu.json")
    ap.add_argument("--rows-kind", choices=ROW_KINDS, default="diverse")
    ap.add_argument(
        "--no-floor-backend",
        dest="floor_backend",
        action="store_false",
        help="leave out the floor's second pass through the bare Rust backend (halves the floor's cost)",
    )
    ap.add_argument(
        "--no-stages",
        dest="stages",
        action="store_false",
        help="time the floor alone, no stage (to measure it again, e.g. on an idle machine, beside an earlier run)",
    )
    ap.add_argument(
        "--drop-spent",
        action="store_true",
        help="delete the input once download ran and data/raw once validate ran (to fit ten million rows on disk)",
    )
    ap.add_argument(
        "--validate-workers",
        default=None,
        help="validate.workers for the stage: auto (the params' default: one worker process a usable core on more "
        "than 2 cores, else none), 0 (the one-process scan) or a number of worker processes",
    )
    ap.add_argument("--floor-only", nargs=5, help=argparse.SUPPRESS)  # run_floor's own process
    args = ap.parse_args()
    if args.floor_only:
        data_file, tokenizer_dir, system_prompt, out, backend_too = args.floor_only
        system_prompt, backend_too = json.loads(system_prompt), json.loads(backend_too)
        floor = tokenizer_floor(Path(data_file), Path(tokenizer_dir), system_prompt, backend_too)
        save(Path(out), floor)
        return
    for path in (args.raw, args.tokenizer):
        if not path.exists():
            sys.exit(f"{path} not found: pass --raw / --tokenizer (the reference data lives in ../shared/data)")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = {"cpus": os.cpu_count(), "usable_cores": usable, "platform": platform.platform()}
    results: list[dict] = []
    for rows in (int(n) for n in args.rows.split(",")):

        def progress(partial: dict) -> None:
            save(args.out, {"runs": results, "unfinished": partial, "machine": machine})

        results.append(measure(rows, args, progress))
        _print(results[-1])
        save(args.out, {"runs": results, "machine": machine})


if __name__ == "__main__":
    main()
