"""The stages in order, and where each reads and writes, relative to the project root.

dvc.yaml declares the same paths as deps and outs; tests/test_dvc_yaml.py checks the outputs against these.
"""

from pathlib import Path

STAGES = ("download", "validate", "format", "train", "evaluate", "publish")  # dvc.yaml's order

RAW_DIR = Path("data/raw")  # download: rows exactly as published + source.json
RAW_ROWS = RAW_DIR / "rows.jsonl"
SOURCE_RECORD = RAW_DIR / "source.json"

VALIDATED_DIR = Path("data/validated")  # validate: canonical conversations that passed the suite
CONVERSATIONS = VALIDATED_DIR / "conversations.jsonl"
VALIDATION_REPORT_DIR = Path("reports/validation")  # suite result (JSON + Data Docs), length report
VALIDATION_RESULT = VALIDATION_REPORT_DIR / "result.json"
LENGTH_REPORT = VALIDATION_REPORT_DIR / "lengths.json"
LENGTH_HISTOGRAM = Path("reports/lengths.png")  # its own file: DVC plots cannot live inside another out
VALIDATION_SUMMARY = VALIDATION_REPORT_DIR / "summary.json"  # every figure: verdict, rule counts, token lengths
VALIDATION_METRICS = Path("metrics/validate.json")  # the headline figures (`dvc metrics show`)

FORMATTED_DIR = Path("data/formatted")  # format: Llama-2 chat text + answer spans, split
TRAIN_ROWS = FORMATTED_DIR / "train.jsonl"
EVAL_ROWS = FORMATTED_DIR / "eval.jsonl"
FORMAT_REPORT = FORMATTED_DIR / "report.json"

ADAPTER_DIR = Path("artifacts/adapter")  # train: LoRA adapter + run record
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the LoRA weights in ADAPTER_DIR and RELEASE_DIR, as PEFT names them
CHECKPOINT_DIR = Path("artifacts/checkpoints")  # train: resumable checkpoints (not cached by DVC)
# train.compile: inductor's and Triton's caches, reused by the next run of the same configuration (not DVC's, not git's)
COMPILE_CACHE = Path(".cache/torch-compile")
TRAIN_METRICS = Path("metrics/train.json")  # the headline figures (`dvc metrics show`)
TRAINING = Path("reports/training.json")  # every figure of the run: loss, speed, memory plan, batch split, processes
DVCLIVE_DIR = Path("dvclive/train")
LOSS_TSV = DVCLIVE_DIR / "plots" / "metrics" / "loss.tsv"  # dvclive's loss series, one line a logged step
LOSS_CURVE = Path("reports/training_loss.png")  # the loss as a PNG (train/loss_curve.py): dvc plots' HTML needs a CDN

EVAL_METRICS = Path("metrics/eval.json")  # evaluate: the headline figures (`dvc metrics show`)
EVALUATION = Path("reports/evaluation.json")  # every figure, base and tuned (the release's lineage records these)
GENERATIONS = Path("reports/generations.jsonl")
EVAL_RUN = Path("reports/eval_run.json")  # what was evaluated (adapter and rows sha256), for the audit

RELEASE_DIR = Path("release")  # publish: the versioned release folder
LINEAGE = "lineage.json"  # in RELEASE_DIR: the release's record, which the audit checks
MERGED = "merged"  # in RELEASE_DIR when publish.merged: the adapter merged into the base, a standalone model
SIGNING_KEY = Path(".keys/release-signing.pem")  # publish: the default signing key, made on first use; git-ignored
TRUSTED_KEYS_DIR = Path("trusted_keys")  # the audit: public keys (*.pub) whose releases a team trusts; committed

MODELS_DIR = Path("models")  # the tiny bases, built locally on first use
TINY_BASE_DIR = MODELS_DIR / "tiny-llama"  # built locally on first use (see tasks/common/base_model.py)
SAMPLE_DATA = Path("data/sample/guanaco_sample.jsonl")

LOG_DIR = Path("logs")  # each stage's whole log, library messages included (common/stage_log.py); git-ignored

# Everything a stage writes through tasks/common/artifacts.py: dvc.yaml's outputs (tests/test_dvc_yaml.py), the
# checkpoints, the tiny bases, the signing key. A stage killed mid-write leaves its temporary names beside (or
# inside) these, never in their place; the next stage to start removes them (tasks/common/runner.py).
WRITTEN = (
    RAW_DIR,
    VALIDATED_DIR,
    VALIDATION_REPORT_DIR,
    VALIDATION_METRICS,
    LENGTH_HISTOGRAM,
    FORMATTED_DIR,
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    TRAIN_METRICS,
    TRAINING,
    DVCLIVE_DIR,
    LOSS_CURVE,
    EVAL_METRICS,
    EVALUATION,
    GENERATIONS,
    EVAL_RUN,
    RELEASE_DIR,
    MODELS_DIR,
    SIGNING_KEY,
)
