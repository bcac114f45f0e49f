"""params.yaml is loaded once into typed config that names every bad key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.common.compose import compose_params
from tasks.common.config import load_params
from tasks.common.errors import PipelineError
from tests.conftest import ROOT


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_committed_params_load(params):
    assert params.model.base == "tiny-llama"
    assert params.lora.r == 64 and params.lora.alpha == 16 and params.lora.dropout == 0.1
    assert params.train.optimizer == "adamw_torch" and params.train.liger_kernels is False  # the CPU preset


def test_unknown_key_is_named(tmp_path):
    path = _write(tmp_path, lambda d: d["train"].update(learnig_rate=1.0))
    with pytest.raises(PipelineError, match=r"train\.learnig_rate: unknown key"):
        load_params(path)


def test_wrong_type_is_named(tmp_path):
    path = _write(tmp_path, lambda d: d["lora"].update(r="sixty-four"))
    with pytest.raises(PipelineError, match=r"lora\.r: .*sixty-four"):
        load_params(path)


def test_a_setting_of_several_types_is_one_problem_named_plainly(tmp_path):
    # train.memory_budget_gib takes a number or 'auto': pydantic reports one error per type, each with its own
    # tag in the path ("constrained-float", "literal['auto']"); the user set one thing wrong.
    path = _write(tmp_path, lambda d: d["train"].update(memory_budget_gib="lots"))
    with pytest.raises(PipelineError) as err:
        load_params(path)
    message = str(err.value)
    assert "has 1 invalid setting(s)" in message and "constrained" not in message and "literal[" not in message
    assert "train.memory_budget_gib: should be a valid number" in message and "or 'auto' (got 'lots')" in message


def test_missing_key_is_named(tmp_path):
    path = _write(tmp_path, lambda d: d["publish"].pop("name"))
    with pytest.raises(PipelineError, match=r"publish\.name: missing"):
        load_params(path)


def test_inconsistent_combination_fails_before_loading(tmp_path):
    path = _write(tmp_path, lambda d: d["validate"].update(max_tokens_hard_limit=10))
    with pytest.raises(PipelineError, match="max_tokens_hard_limit"):
        load_params(path)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def _project_with_conf(tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_params_yaml_is_the_default_composition(tmp_path):
    """The committed params.yaml is exactly what conf/ composes to, so the two never drift."""
    project = _project_with_conf(tmp_path)
    compose_params(project, [])
    assert yaml.safe_load((project / "params.yaml").read_text()) == yaml.safe_load((ROOT / "params.yaml").read_text())


def test_real_recipe_preset_is_one_switch(tmp_path):
    project = _project_with_conf(tmp_path)
    compose_params(project, ["preset=llama2_7b_guanaco"])
    p = load_params(project / "params.yaml")
    assert p.model.base == "NousResearch/Llama-2-7b-chat-hf"
    assert (p.download.source, p.download.hub_id) == ("hub", "mlabonne/guanaco-llama2-1k")
    assert (p.lora.r, p.lora.alpha, p.lora.dropout) == (64, 16, 0.1)
    assert p.train.optimizer == "paged_adamw_32bit" and p.train.learning_rate == 2e-4 and p.train.epochs == 1
    assert p.quant.quant_type == "nf4" and p.quant.load_in_4bit


@pytest.mark.parametrize(
    ("preset", "base", "template"),
    [
        ("llama3_8b_guanaco", "NousResearch/Meta-Llama-3.1-8B-Instruct", "llama3"),
        ("qwen_7b_guanaco", "Qwen/Qwen2.5-7B-Instruct", "chatml"),
        ("mistral_7b_guanaco", "mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
    ],
)
def test_each_family_preset_is_the_recipe_on_that_base_with_its_template(tmp_path, preset, base, template):
    project = _project_with_conf(tmp_path)
    compose_params(project, [f"preset={preset}"])
    p = load_params(project / "params.yaml")
    assert (p.model.base, p.format.template) == (base, template)
    assert (p.lora.r, p.lora.alpha, p.lora.dropout, p.lora.target_modules) == (64, 16, 0.1, ["q_proj", "v_proj"])
    assert p.train.optimizer == "paged_adamw_32bit" and p.train.learning_rate == 2e-4 and p.train.epochs == 1
    assert p.quant.quant_type == "nf4" and p.download.hub_id == "mlabonne/guanaco-llama2-1k"


def test_bad_override_leaves_params_intact(tmp_path):
    project = _project_with_conf(tmp_path)
    before = (project / "params.yaml").read_bytes()
    with pytest.raises(PipelineError):
        compose_params(project, ["train.batch_size=zero"])
    assert (project / "params.yaml").read_bytes() == before


def test_an_unquoted_path_with_parentheses_is_told_to_quote(tmp_path):
    project = _project_with_conf(tmp_path)
    before = (project / "params.yaml").read_bytes()
    with pytest.raises(PipelineError, match=r"must be quoted for Hydra: key='value'"):
        compose_params(project, ["download.path=/data/my (copy).jsonl"])
    assert (project / "params.yaml").read_bytes() == before
    compose_params(project, ["download.path='/data/my (copy).jsonl'"])  # the quoting the message gives works
    assert load_params(project / "params.yaml").download.path == "/data/my (copy).jsonl"


@pytest.mark.parametrize("value", ["/data/guanaco é.jsonl", "/data/a–b.jsonl"])
def test_an_unquoted_non_ascii_value_is_told_to_quote_and_the_cli_prints_no_traceback(tmp_path, value):
    project = _project_with_conf(tmp_path)
    before = (project / "params.yaml").read_bytes()
    with pytest.raises(PipelineError, match=r"which Hydra reads only inside quotes: download.path='"):
        compose_params(project, [f"download.path={value}"])
    assert (project / "params.yaml").read_bytes() == before
    compose_params(project, [f"download.path='{value}'"])  # quoted, it composes
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.common.compose", f"download.path={value}"],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "inside quotes" in proc.stderr


def test_hydra_lists_and_interpolations_pass_the_quoting_check(tmp_path):
    project = _project_with_conf(tmp_path)
    compose_params(project, ["lora.target_modules=[q_proj,k_proj,v_proj]"])
    assert load_params(project / "params.yaml").lora.target_modules == ["q_proj", "k_proj", "v_proj"]
