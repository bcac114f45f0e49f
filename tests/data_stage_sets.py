"""Data sets and fingerprints for checking that the data stages' results never change by accident.

`fingerprint(...)` runs download -> validate -> format on one input through their public functions, exactly as
`dvc repro` calls them, in a scratch project, and returns what a user sees of the run: the verdict, every rule's
status and failing rows, the rows left out and why, the length report, the validate metrics and the formatted
train/eval files and report, as sha256s with a few readable counts beside them. tests/golden/data_stages.json
holds these fingerprints as the stages gave them before they were rebuilt for scale (issue 12); the test in
tests/test_data_scale.py compares today's with them.

    python -m tests.data_stage_sets --write     re-record the golden file (only for an intended change)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from benchmarks.data_stages import perturbed_rows
from tasks.common import paths

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
GOLDEN = ROOT / "tests" / "golden" / "data_stages.json"
RAW_1K = SHARED_DATA / "guanaco-raw-1k" / "train.jsonl"
LLAMA2_1K = SHARED_DATA / "guanaco-llama2-1k" / "train.parquet"
TOKENIZER = SHARED_DATA / "llama-2-tokenizer"


def _bad_rows(rng: random.Random) -> list[dict]:
    """One row for each way a row can break a rule, and rows in the other forms (messages, Alpaca)."""
    ctl, bad = "\x07", "\ufffd"
    many = "".join(f"### Human: question {i}### Assistant: answer {i}" for i in range(10))
    return [
        {"text": "no markers at all, just prose that the parser cannot read"},
        {"text": None},
        {"text": "### Human: ### Assistant: an answer to nothing"},
        {"text": "### Human: first### Human: second### Assistant: one answer"},
        {"text": "### Human: a question left open### Assistant: sure### Human: and then?"},
        {"text": "### Human: what does </s> mean here?### Assistant: it ends a sequence"},
        {"text": f"### Human: caf{bad} au lait?### Assistant: a coffee with milk"},
        {"text": f"### Human: ring the bell{ctl}### Assistant: ding"},
        {"text": many},
        {"text": "### Human: hi### Assistant: yo"},
        {"text": "preamble ### Human: q### Assistant: a"},
        {"text": "<s>[INST] broken llama template without a close"},
        {
            "messages": [
                {"role": "system", "content": f"You are terse. ({rng.random():.6f})"},
                {"role": "user", "content": "Name a prime number above ten."},
                {"role": "assistant", "content": "Eleven."},
            ]
        },
        {"messages": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there, friend."}]},
        {"messages": [{"role": "wizard", "content": "unknown role"}]},
        {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"},
        {"instruction": "List two colours.", "input": "", "output": "Red and blue, for a start."},
        {"instruction": "No output here", "output": 5},
    ]


def messy_rows(n: int, seed: int = 7, bad_share: float = 0.004, dup_share: float = 0.02) -> list[dict]:
    """The benchmark's perturbed rows with bad rows, other forms and exact duplicates mixed in at fixed places."""
    rng = random.Random(seed)
    rows = [dict(r) for r in perturbed_rows(RAW_1K, n)]
    bad = _bad_rows(rng)
    for k in range(int(n * bad_share)):
        rows[rng.randrange(n)] = dict(bad[k % len(bad)])
    for _ in range(int(n * dup_share)):
        rows[rng.randrange(n)] = dict(rows[rng.randrange(n)])
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def input_sets(work: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (input file, extra param overrides). The 10k sets are made here, deterministically."""
    return {
        "guanaco_llama2_1k": (LLAMA2_1K, []),
        "guanaco_raw_1k": (RAW_1K, []),
        "bench_10k": (write_jsonl(work / "bench_10k.jsonl", perturbed_rows(RAW_1K, 10_000)), []),
        "messy_10k": (write_jsonl(work / "messy_10k.jsonl", messy_rows(10_000)), []),
        "messy_10k_drop_512": (
            work / "messy_10k.jsonl",
            [
                "format.length_policy=drop",
                "format.duplicates=keep",
                "model.max_length=512",
                "validate.min_share_within_max_length=0.5",
            ],
        ),
        "messy_2k_failing": (write_jsonl(work / "messy_2k.jsonl", messy_rows(2_000, seed=3, bad_share=0.05)), []),
    }


def _sha(obj) -> str:
    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str | None:
    return _sha(path.read_bytes()) if path.exists() else None


def _conversations_sha(path: Path) -> str | None:
    """sha256 of the validated conversations as written before validate carried each one's content_key: the
    file's own sha256 for a file without that key."""
    if not path.exists():
        return None
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        row.pop("content_key", None)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    return _sha("".join(lines).encode("utf-8"))


def fingerprint(input_path: Path, overrides: list[str], project: Path) -> dict:
    """Run the three data stages on input_path in a scratch project at `project`; what they produced, hashed."""
    from tasks.common.compose import compose_params
    from tasks.common.config import load_params
    from tasks.common.errors import ValidationFailed
    from tasks.download.stage import download
    from tasks.format.stage import format_rows
    from tasks.validate.stage import validate

    if project.exists():
        shutil.rmtree(project)
    shutil.copytree(ROOT / "conf", project / "conf")
    base = [
        "preset=llama2_7b_guanaco",
        "download.source=local",
        f"download.path={input_path.resolve()}",
        f"model.tokenizer={TOKENIZER.resolve()}",
    ]
    compose_params(project, base + overrides)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        params = load_params("params.yaml")
        download(params.download)
        try:
            validate(params)
            passed = True
        except ValidationFailed:
            passed = False
        if passed:
            format_rows(params.format, params.model)
    finally:
        os.chdir(cwd)
    return _summarize(project, passed)


def _portable(lengths: dict) -> dict:
    """The length report with the tokenizer's absolute path made relative to shared/data: the report records the
    path the params name, which differs between this machine and a CI checkout."""
    tokenizer = Path(lengths["tokenizer"])
    return lengths | {"tokenizer": str(tokenizer.relative_to(SHARED_DATA.resolve()))}


def _summarize(project: Path, passed: bool) -> dict:
    result = json.loads((project / "reports/validation/result.json").read_text(encoding="utf-8"))
    # row_rules_together (added after the recording) is the union of the row rules' rows, all recorded here: it adds
    # no new fact about the stages' results, only a verdict on them, which `passed` records
    rules = {
        r["rule"]: {"status": r["status"], "count": r["unexpected_count"], "rows": r["rows"]}
        for r in result["rules"]
        if r["rule"] != "row_rules_together"
    }
    out = {
        "passed": passed,
        "rows_sha256": _file_sha(project / "data/raw/rows.jsonl"),
        "rules": {
            name: {"status": r["status"], "count": r["count"], "rows_sha256": _sha(r["rows"])}
            for name, r in rules.items()
        },
        "excluded_rows": _sha(result["excluded_rows"]),
        "parse_errors": _sha(result["parse_errors"]),
        "lengths": _sha(_portable(json.loads((project / "reports/validation/lengths.json").read_text("utf-8")))),
        "validate_metrics": json.loads((project / paths.VALIDATION_SUMMARY).read_text(encoding="utf-8")),
        "conversations_sha256": _conversations_sha(project / "data/validated/conversations.jsonl"),
    }
    if passed:
        report = json.loads((project / "data/formatted/report.json").read_text(encoding="utf-8"))
        out |= {
            "train_sha256": _file_sha(project / "data/formatted/train.jsonl"),
            "eval_sha256": _file_sha(project / "data/formatted/eval.jsonl"),
            "format_report": {k: v for k, v in report.items() if k != "input_sha256"},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="re-record tests/golden/data_stages.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/data-golden"))
    ap.add_argument("--only", default="", help="comma-separated set names")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sets = input_sets(args.work)
    names = [n for n in sets if not args.only or n in args.only.split(",")]
    prints = {name: fingerprint(*sets[name], args.work / "project" / name) for name in names}
    print(json.dumps(prints, indent=2))
    if args.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(prints, indent=2, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
