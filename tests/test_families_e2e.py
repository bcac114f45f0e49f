"""Each family through the product's door on the CPU: `dvc exp run` with a tiny random-weight base of that
architecture and its own template, download -> publish, then the audit. The masks and renderings themselves are
tested in test_chat_template.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.common import paths
from tasks.common.chat_template import BUILT_IN
from tests.conftest import venv_env

pytestmark = pytest.mark.slow


def _run(project: Path, *args: str) -> str:
    env = venv_env()
    proc = subprocess.run(args, cwd=project, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("base", "template"), [("tiny-llama3", "llama3"), ("tiny-qwen2", "chatml"), ("tiny-mistral", "mistral")]
)
def test_a_family_base_runs_every_stage_and_its_release_serves_its_template(project_copy, base, template):
    overrides = [
        f"model.base={base}",
        f"format.template={template}",
        "train.max_steps=5",  # the door, not the fit: a few steps, and publish takes the adapter whatever its loss
        "publish.require_improvement=false",
    ]
    out = _run(project_copy, "dvc", "exp", "run", *(arg for o in overrides for arg in ("-S", o)))
    assert "Running stage 'publish'" in out
    assert "renders the trained token ids of all" in out  # publish's train/serve parity check
    release = project_copy / paths.RELEASE_DIR
    config = json.loads((release / "tokenizer_config.json").read_text())
    jinja = config.get("chat_template") or (release / "chat_template.jinja").read_text()
    assert jinja == BUILT_IN[template].jinja
    lineage = json.loads((release / paths.LINEAGE).read_text())
    assert lineage["params"]["format"]["template"] == template and lineage["params"]["model"]["base"] == base
    assert "audit passed" in _run(project_copy, sys.executable, "-m", "tasks.publish.audit", "release")
