#!/usr/bin/env bash
# The real recipe on a GPU machine, through the product's own doors, from a fresh clone (issue 10):
#   setup   git clone of the carried bundle; the README's install (make install TORCH=skip) against a local
#           wheelhouse; a base of SHAPE (default llama2-7b; llama3-8b, qwen2.5-7b, mistral-7b) with random weights
#           and the real Llama-2 tokenizer, or the family's stand-in tokenizer (benchmarks/build_random_base.py)
#   accept  dvc exp run -S preset=$PRESET (default llama2_7b_guanaco; local guanaco-llama2-1k, the random base as
#           model.base): all six stages; then the audit; then (unless FLOW=0) one run of the Prefect flow against a
#           local prefect server
#   base    only the random base of SHAPE (setup builds it too)
#   layouts the memory planner's layouts timed against recomputation pinned on (benchmarks/train_throughput.py);
#           LAYOUTS picks the configurations (e.g. plain_trl,ours_same,ours_16gib), REPEATS the turns; RESUME=1
#           keeps the runs already in $OUT/$RESULT.json and runs the missing turns (one schedule over two commands)
#   prepare the formatted rows for layouts/profile without a full run (benchmarks/prepare_bench.py into
#           $CLONE/.bench/recipe); layouts and profile then take BENCH=$CLONE/.bench/recipe
#   profile torch.profiler over a few steps of each PROFILE configuration (benchmarks/profile_train.py),
#           with its timeline (profile_<config>.json and .trace.json.gz in $OUT); PROFILE_ARGS adds arguments
#           (e.g. --with-stack: idle time by Python function)
#   unsloth Unsloth's own venv beside ours, for layouts' unsloth, unsloth_nogc and unsloth_recipe configurations
#           (benchmarks/unsloth_trl.py): UNSLOTH_VENV (default /tmp/unsloth-venv) from the machine's python3 (its
#           torch), the wheels of UNSLOTH_WHEELS (default $KIT/unsloth-wheels) over it, bitsandbytes from there or
#           from $KIT/wheels; then `import unsloth` and the versions it runs with. layouts finds it there (or at
#           UNSLOTH_PYTHON); without it those configurations are recorded as skipped
#
#   bash benchmarks/gpu_acceptance.sh setup accept [layouts]      run from the repository root
#
# Inputs, prepared on the workstation in an ignored, carried folder GPU_KIT (default .gpu):
#   wheels/      the wheelhouse from the lock: `make wheelhouse` (requirements/gpu.lock for CPython 3.12)
#   unsloth-wheels/  Unsloth 2026.10.9 and what it needs beyond the machine's torch python, one version of each
#                (xformers left out: no build for torch 2.11 / CUDA 13, and Unsloth then uses PyTorch's attention)
#   repo.bundle  `git bundle create .gpu/repo.bundle HEAD`: the commit under test
#   data/train.parquet, tokenizer/tokenizer.model   the guanaco-llama2-1k rows and Llama-2's tokenizer
# Outputs (logs, metrics, dvc.lock, the lineage record) go to $OUT (default /tmp/gpu-out).
set -euo pipefail
KIT=$(realpath "${GPU_KIT:-.gpu}")
CLONE=${CLONE:-/tmp/guanaco-clone}
SHAPE=${SHAPE:-llama2-7b}
MODEL=${MODEL:-/tmp/random-$SHAPE}
PRESET=${PRESET:-llama2_7b_guanaco}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if [ -d "$KIT/wheels" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="$KIT/wheels"; fi  # offline: the wheelhouse only
export PIP_DISABLE_PIP_VERSION_CHECK=1
export GIT_AUTHOR_NAME=gpu GIT_AUTHOR_EMAIL=gpu@localhost GIT_COMMITTER_NAME=gpu GIT_COMMITTER_EMAIL=gpu@localhost
export HF_HUB_OFFLINE=1 GX_ANALYTICS_ENABLED=False PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# Each output line stamped with seconds since the phase began: per-stage wall times come from these.
stamp() { python3 -u -c 'import sys, time
t0 = time.time()
for line in sys.stdin: print(f"[{time.time() - t0:8.1f}s] {line}", end="", flush=True)'; }

setup() {
  if [ ! -d "$CLONE/.git" ]; then git clone -q "$KIT/repo.bundle" "$CLONE"; fi
  cd "$CLONE"
  git log -1 --format='commit under test: %H %s'
  start=$SECONDS
  make install TORCH="${TORCH:-skip}"
  echo "make install: $((SECONDS - start)) s"
  .venv/bin/python -c 'import importlib.metadata as md, torch
print("venv torch", torch.__version__, "from", torch.__file__)
print(", ".join(f"{p} {md.version(p)}" for p in ("transformers", "trl", "peft", "bitsandbytes", "prefect", "dvc", "great_expectations")))
if torch.version.cuda: print("liger-kernel", md.version("liger-kernel"))'
  base
}

base() {
  cd "$CLONE"
  if [ ! -f "$MODEL/config.json" ]; then
    .venv/bin/python -m benchmarks.build_random_base --out "$MODEL" --shape "$SHAPE" --tokenizer "$KIT/tokenizer" \
      --data "$KIT/data/train.parquet"
  fi
}

accept() {
  cd "$CLONE"
  . .venv/bin/activate
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU"
  { time dvc exp run -S "preset=$PRESET" -S download.source=local \
      -S "download.path=$KIT/data/train.parquet" -S "model.base=$MODEL" ${EXTRA_S:-}; } 2>&1 | stamp | tee "$OUT/exp_run.log"
  dvc metrics show 2>&1 | tee "$OUT/metrics_show.txt"
  python -m tasks.publish.audit release 2>&1 | tee "$OUT/audit.txt"
  cp reports/training.json "$OUT/training.json" 2>/dev/null || true
  if [ "${FLOW:-1}" = 0 ]; then return; fi
  # The Prefect flow, as a scheduled run would start it, against a real local server: expected "up to date".
  prefect server start --host 127.0.0.1 --port 4200 > "$OUT/prefect_server.log" 2>&1 &
  server=$!
  export PREFECT_API_URL=http://127.0.0.1:4200/api
  for _ in $(seq 120); do python -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:4200/api/health")' 2>/dev/null && break; sleep 1; done
  { time python -m flows.pipeline; } 2>&1 | stamp | tee "$OUT/prefect_flow.log"
  python -m flows.history | tail -3 | tee -a "$OUT/prefect_flow.log"
  kill "$server"; wait "$server" 2>/dev/null || true
  tar czf "$OUT/records.tgz" dvc.lock params.yaml metrics reports/validation/result.json reports/lengths.png \
    release/lineage.json release/README.md 2>/dev/null || true
}

layouts() {
  cd "$CLONE"
  export UNSLOTH_PYTHON=${UNSLOTH_PYTHON:-${UNSLOTH_VENV:-/tmp/unsloth-venv}/bin/python}
  .venv/bin/python -m benchmarks.train_throughput --model-dir "$MODEL" --work "${WORK:-/tmp/layouts}" --bench "${BENCH:-$CLONE}" \
    --out "$OUT/${RESULT:-layouts}.json" --configs "${LAYOUTS:-recipe_auto,recipe_gc,recipe_16gib}" --repeats "${REPEATS:-2}" \
    ${RESUME:+--resume} ${EXTRA_S:-} 2>&1 | stamp | tee -a "$OUT/${RESULT:-layouts}.log"
}

prepare() {
  cd "$CLONE"
  .venv/bin/python -m benchmarks.prepare_bench --data "$KIT/data/train.parquet" --tokenizer "$KIT/tokenizer" \
    --bench "$CLONE/.bench/recipe" 2>&1 | tail -3
}

profile() {
  cd "$CLONE"
  for config in $(echo "${PROFILE:-ours_same,ours_16gib}" | tr , ' '); do
    .venv/bin/python -m benchmarks.profile_train --model-dir "$MODEL" --work /tmp/profile --bench "${BENCH:-$CLONE}" \
      --config "$config" --out "$OUT/profile_$config.json" --trace "$OUT/profile_$config.trace.json.gz" ${EXTRA_S:-} ${PROFILE_ARGS:-} \
      > "$OUT/profile_$config.log" 2>&1 || echo "profile $config failed: see $OUT/profile_$config.log"
    grep -v "it/s\]" "$OUT/profile_$config.log" | tail -45
  done
}

unsloth() {
  # Its own venv: Unsloth caps transformers (<=5.17), trl (<=1.15) and datasets (<5) below the pipeline's lock. Made
  # from the machine's python3 as `make install TORCH=skip` makes ours: --system-site-packages, and where python3 is
  # itself a venv (/opt/torch/.venv), a .pth adding that venv's site-packages after the venv's own, so the kit's
  # wheels shadow the machine's copies and everything else (torch, triton, transformers, accelerate) is the machine's.
  local venv=${UNSLOTH_VENV:-/tmp/unsloth-venv} wheels=${UNSLOTH_WHEELS:-$KIT/unsloth-wheels} bnb host
  python3 -m venv --system-site-packages "$venv"
  host=$(python3 -c 'import sys, sysconfig; print(sysconfig.get_paths()["purelib"] if sys.prefix != sys.base_prefix else "")')
  if [ -n "$host" ]; then echo "$host" > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/host-python.pth"; fi
  bnb=$(ls "$wheels"/bitsandbytes-*.whl 2>/dev/null || ls "$KIT"/wheels/bitsandbytes-*.whl 2>/dev/null | head -1) ||
    { echo "no bitsandbytes wheel in $wheels or $KIT/wheels" >&2; return 1; }
  start=$SECONDS
  "$venv/bin/python" -m pip install -q --no-index --no-deps "$wheels"/*.whl $bnb
  echo "unsloth venv $venv: $((SECONDS - start)) s"
  # what pip check misses: xformers, diffusers and hf_transfer, left out of the kit on purpose (none imported on
  # this path; xformers has no build for this torch)
  "$venv/bin/python" -m pip check || true
  HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 "$venv/bin/python" -c 'import unsloth, sys
import importlib.metadata as md, torch
print("import unsloth: ok,", unsloth.__version__, "backend", "cpu" if getattr(unsloth, "_IS_CPU_BACKEND", False) else "gpu")
from unsloth import FastLanguageModel
import trl, datasets, transformers, peft, bitsandbytes
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for m in ("unsloth_zoo", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "triton", "torchao"):
    print(" ", m, md.version(m), __import__(m).__file__)
print("  xformers", "loaded" if "xformers" in sys.modules else "absent (PyTorch attention)")' 2>&1 | tee "$OUT/unsloth_venv.txt" ||
    echo "import unsloth FAILED (above; $OUT/unsloth_venv.txt): the unsloth configurations of layouts will fail"
}

for phase in "$@"; do
  echo "=== $phase"
  (cd "$(dirname "$0")/.." && "$phase")
done
