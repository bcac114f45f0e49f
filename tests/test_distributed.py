"""Multi-process training: the launch command per mode, its checks, and a real 2-process DDP run on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.common import paths
from tasks.common.config import with_overrides
from tasks.common.errors import PipelineError
from tasks.train.checkpoints import COMPLETE
from tasks.train.distributed import LAUNCHER, launch_command, needs_launch, world
from tests.conftest import ROOT


def _mode(params, mode: str, n: int, **more):
    return with_overrides(params, **{"train.distributed.mode": mode, "train.distributed.num_processes": n, **more})


def _flags(cmd: list[str]) -> dict[str, str | bool]:
    """accelerate launch's options as {flag: value}, a bare flag as True (the command ends with -m tasks.train)."""
    out, args = {}, cmd[3:-2]
    i = 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]], i = args[i + 1], i + 2
        else:
            out[args[i]], i = True, i + 1
    return out


def test_single_runs_the_stage_in_this_process(params):
    assert params.train.distributed.mode == "single"  # the committed default
    assert launch_command(params) == [sys.executable, "-m", "tasks.train"]
    assert not needs_launch(params)


def test_ddp_launches_n_torchrun_workers_of_the_same_module(params):
    p = _mode(params, "ddp", 2)
    cmd = launch_command(p)
    assert cmd[:3] == [sys.executable, "-m", LAUNCHER] and cmd[-2:] == ["-m", "tasks.train"]
    flags = _flags(cmd)
    assert flags == {
        "--num_processes": "2",
        "--num_machines": "1",
        "--mixed_precision": "no",
        "--dynamo_backend": "no",
        "--main_process_port": "0",
        "--multi_gpu": True,
    }
    assert _flags(launch_command(with_overrides(p, **{"train.precision": "bf16"})))["--mixed_precision"] == "bf16"
    assert needs_launch(p, env={}) and not needs_launch(p, env={"WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert world({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == (1, 1, 2) and world({}) == (0, 0, 1)


def test_fsdp_launch_is_the_documented_fsdp_qlora_setup(params):
    flags = _flags(launch_command(_mode(params, "fsdp", 4)))
    assert "--multi_gpu" not in flags and flags["--use_fsdp"] is True and flags["--num_processes"] == "4"
    assert flags["--fsdp_version"] == "1"
    assert flags["--fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # decoder layers (_no_split_modules)
    assert flags["--fsdp_use_orig_params"] == "false"
    assert flags["--fsdp_cpu_ram_efficient_loading"] == "true" and flags["--fsdp_sync_module_states"] == "true"


def test_accelerate_reads_the_fsdp_command_as_intended(params):
    """accelerate's own parser takes the argv, and the workers would get these FSDP settings (nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(launch_command(_mode(params, "fsdp", 2))[3:])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert (args.nproc_per_node, args.module, args.training_script) == ("2", True, "tasks.train")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    assert env["FSDP_USE_ORIG_PARAMS"] == "false" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


def test_distributed_params_are_checked(params):
    for mode, n, message in (
        ("ddp", 1, "num_processes >= 2"),
        ("fsdp", 1, "num_processes >= 2"),
        ("single", 2, "set num_processes to 1"),
    ):
        with pytest.raises(PipelineError, match=message):
            _mode(params, mode, n)
    with pytest.raises(PipelineError, match="global batch"):
        _mode(params, "ddp", 3)  # batch_size 4 x grad_accum 1 does not split over 3 processes


def test_the_global_batch_is_split_over_the_ranks():
    from tasks.train.stage import per_rank_batch

    assert per_rank_batch(4, 1, 1) == (4, 1)
    assert per_rank_batch(4, 1, 2) == (2, 1)  # each rank half the micro-batch
    assert per_rank_batch(2, 4, 2) == (2, 2)  # the planner's micro-batch kept, accumulation halved
    assert per_rank_batch(3, 4, 2) == (3, 2)
    with pytest.raises(PipelineError, match="does not divide"):
        per_rank_batch(3, 1, 2)


def test_fsdp_on_the_cpu_stops_in_preflight(params):
    from tasks.train.preflight import preflight

    with pytest.raises(PipelineError, match="fsdp \\(FSDP-QLoRA\\) needs CUDA GPUs"):
        preflight(_mode(params, "fsdp", 2))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _train(root: Path, params) -> tuple[subprocess.CompletedProcess, float]:
    (root / "params.yaml").write_text(yaml.safe_dump(params.as_dict(), sort_keys=False))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.train"], cwd=root, env=_env(), capture_output=True, text=True, timeout=900
    )
    return proc, time.perf_counter() - start


def test_fsdp_on_the_cpu_exits_2_before_launching(workdir, params):
    proc, _ = _train(workdir, _mode(params, "fsdp", 2))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "needs CUDA GPUs" in proc.stderr and "launching" not in proc.stderr


def test_a_failing_ddp_worker_fails_the_stage_with_its_message_and_keeps_the_last_adapter(workdir, params):
    """No formatted rows: each worker stops with the stage's own message, the launcher exits 2 as a single run
    does, and the adapter of the last good run is untouched."""
    adapter = workdir / paths.ADAPTER_DIR
    adapter.mkdir(parents=True)
    (adapter / paths.ADAPTER_WEIGHTS).write_bytes(b"last good adapter")
    proc, _ = _train(workdir, _mode(params, "ddp", 2))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train.jsonl not found: run the format stage first" in proc.stderr
    assert "failed with exit code 2" in proc.stderr
    assert (adapter / paths.ADAPTER_WEIGHTS).read_bytes() == b"last good adapter"
    assert sorted(p.name for p in (workdir / "artifacts").iterdir()) == ["adapter"]  # no staging folder left


def _tensors(adapter: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(adapter / paths.ADAPTER_WEIGHTS, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_two_process_ddp_on_the_cpu_matches_a_single_process_run(workdir, params):
    """A real 2-process DDP run (gloo) through `python -m tasks.train`, against one process on the same params.

    The two runs share the global batch (4 rows an optimizer step: 4 on one process, 2 on each of two ranks), the
    steps and the learning-rate schedule, so the losses are close, not identical: the distributed sampler deals
    the rows to the ranks in another order than the single run's sampler (other rows make up each step's batch),
    LoRA dropout draws differ per rank, and the gradient is an all-reduced mean of two halves.
    """
    from tasks.download.stage import download
    from tasks.format.stage import format_rows
    from tasks.validate.stage import validate

    base = with_overrides(params, **{"train.max_steps": 4})
    download(base.download)
    validate(base)
    format_rows(base.format, base.model)

    single, single_s = _train(workdir, base)
    assert single.returncode == 0, single.stderr[-3000:]
    one = _train_figures(workdir)
    one_tensors = _tensors(workdir / paths.ADAPTER_DIR)

    ddp, ddp_s = _train(workdir, _mode(base, "ddp", 2))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "launching 2 processes (ddp)" in ddp.stderr
    two = _train_figures(workdir)
    run = json.loads((workdir / paths.ADAPTER_DIR / "training_run.json").read_text())
    print(f"\nsingle: loss {one['train_loss']} in {single_s:.1f} s; ddp x2: loss {two['train_loss']} in {ddp_s:.1f} s")

    assert _tensors(workdir / paths.ADAPTER_DIR) == one_tensors  # same adapter tensor names and shapes
    assert abs(two["train_loss"] - one["train_loss"]) / one["train_loss"] < 0.10
    assert (two["world_size"], two["distributed_mode"]) == (2, "ddp") and two["steps"] == one["steps"] == 4
    assert (two["micro_batch"], two["grad_accum"]) == (2, 1) and (one["micro_batch"], one["world_size"]) == (4, 1)
    assert run["distributed"] == {"mode": "ddp", "world_size": 2, "backend": "gloo"}
    # tokens are counted over both ranks: about the single run's count for the same global batch, not half of it
    assert 0.7 < two["tokens_seen"] / one["tokens_seen"] < 1.4, (one["tokens_seen"], two["tokens_seen"])
    # only rank 0 wrote: one adapter, no staging directory left by another rank, checkpoints removed
    assert sorted(p.name for p in (workdir / "artifacts").iterdir()) == ["adapter"]


@pytest.mark.slow
def test_a_killed_ddp_run_stops_all_workers_and_resumes(workdir, params):
    """SIGKILL on `python -m tasks.train` (the launcher) ends its workers too, and the next run resumes from the
    last checkpoint under DDP (each rank's RNG state is in it). Without the workers' death signal they would train
    on, orphaned, writing checkpoints and the adapter beside the resumed run."""
    import psutil

    from tasks.download.stage import download
    from tasks.format.stage import format_rows
    from tasks.validate.stage import validate

    p = _mode(params, "ddp", 2, **{"train.max_steps": 30, "train.save_steps": 10, "train.logging_steps": 5})
    download(p.download)
    validate(p)
    format_rows(p.format, p.model)
    (workdir / "params.yaml").write_text(yaml.safe_dump(p.as_dict(), sort_keys=False))
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tasks.train"],
        cwd=workdir,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = workdir / paths.CHECKPOINT_DIR / "checkpoint-10" / COMPLETE  # the checkpoint whole, then the kill
    workers: list = []
    deadline = time.time() + 600
    while not ckpt.exists() and launcher.poll() is None and time.time() < deadline:
        workers = psutil.Process(launcher.pid).children(recursive=True) or workers
        time.sleep(0.05)
    launcher.kill()
    assert launcher.wait() < 0, "training ended before it could be killed"
    assert len(workers) >= 2  # the two ranks (torchrun starts them from the launcher process)
    _, alive = psutil.wait_procs(workers, timeout=5)  # the death signal is immediate; orphans would train ~20 steps on
    alive = [w for w in alive if _running(w)]  # a dead worker may stay a zombie until its new parent reaps it
    assert not alive, "workers outlived their killed launcher"
    assert not (workdir / paths.ADAPTER_DIR).exists(), "orphaned workers finished the run and wrote the adapter"

    proc, _ = _train(workdir, p)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((workdir / paths.TRAINING).read_text())
    assert figures["resumed"] is True and figures["steps"] == 30 and figures["world_size"] == 2


def _train_figures(project) -> dict:
    """Every figure of the run, as train() returns them."""
    return json.loads((project / paths.TRAINING).read_text())


def _running(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_single_mode_on_a_multi_gpu_box_trains_on_one_gpu(params):
    """A lone process seeing several GPUs would be wrapped in nn.DataParallel (SFTTrainer refuses it): `python -m
    tasks.train` restarts itself with only the first visible GPU."""
    from tasks.train.distributed import one_gpu_env

    assert one_gpu_env(params, 2, env={})["CUDA_VISIBLE_DEVICES"] == "0"
    assert one_gpu_env(params, 2, env={"CUDA_VISIBLE_DEVICES": "3, 1"})["CUDA_VISIBLE_DEVICES"] == "3"
    assert one_gpu_env(params, 1, env={}) is None  # one GPU (or none): nothing to do
    assert one_gpu_env(params, 2, env={"WORLD_SIZE": "2", "LOCAL_RANK": "0"}) is None  # a worker keeps its GPU
    assert one_gpu_env(_mode(params, "ddp", 2), 2, env={}) is None  # ddp/fsdp launch one process per GPU instead


def test_fsdp_adapter_is_saved_with_the_weights_and_names_peft_gives(tmp_path):
    """FSDP1 on 2 CPU processes (gloo) wrapping a tiny LoRA model as accelerate wraps FSDP-QLoRA: the adapter that
    tasks/train/fsdp_adapter.py gathers and saves on rank 0 equals, key for key and value for value, what PEFT saves
    from the same trained weights on a plain model, and its config is PEFT's. (PEFT's own save under FSDP wrote no
    weights.)"""
    import torch
    from safetensors.torch import load_file

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "fsdp_adapter_worker.py"),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, peft = (
        load_file(tmp_path / "ours" / paths.ADAPTER_WEIGHTS),
        load_file(tmp_path / "peft" / paths.ADAPTER_WEIGHTS),
    )
    assert sorted(ours) == sorted(peft) and len(ours) == 8  # 2 layers x (q, v) x (A, B)
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) and "_fsdp" not in k for k in ours)
    assert all(torch.equal(ours[k], peft[k]) for k in ours)
    assert max(float(ours[k].abs().max()) for k in ours if "lora_B" in k) > 0  # the trained weights, not the init
    # PEFT keeps target_modules as a set: its order in the JSON follows each process's string hashing
    configs = [json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "peft")]
    ours_config, peft_config = ({**c, "target_modules": sorted(c["target_modules"])} for c in configs)
    assert ours_config == peft_config
    # Why FSDP runs write no checkpoints (train/stage.py sft_config): the Trainer's FSDP checkpoint of a PEFT
    # model holds none of the adapter. When this fails, PEFT/accelerate fixed it: FSDP checkpoints can come back.
    assert (tmp_path / "checkpoint_adapter_keys.txt").read_text() == "0", "FSDP checkpoints now hold the adapter"


def test_fsdp_writes_no_checkpoints(params):
    from tasks.train.memory import Estimate
    from tasks.train.stage import sft_config

    est = Estimate(
        base_weights_gib=0,
        lora_state_gib=0,
        activations_gib=0,
        workspace_gib=0,
        peak_gib=1.0,
        micro_batch=4,
        grad_accum=1,
        tokens_per_micro_batch=2048,
        recompute_layers=0,
        layers=2,
    )
    # world_size stays 1 here: building a multi-process SFTConfig needs a process group; the mode alone decides this
    assert sft_config(_mode(params, "fsdp", 2), Path("ckpt"), est).save_strategy == "no"
    assert sft_config(_mode(params, "ddp", 2), Path("ckpt"), est).save_strategy == "steps"
    assert sft_config(params, Path("ckpt"), est).save_strategy == "steps"


def test_fsdp_loading_stores_the_4bit_weights_in_a_float_dtype(params):
    """FSDP can only flatten and shard the 4-bit weights with the rest when they are stored in a float dtype
    (bnb_4bit_quant_storage, as FSDP-QLoRA requires); a plain load keeps bitsandbytes' packed uint8."""
    import bitsandbytes as bnb
    import torch

    from tasks.common.base_model import load_base_model

    def first_4bit_weight(model):
        return next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight

    fsdp_weight = first_4bit_weight(load_base_model(params.model, params.quant, fsdp=True))
    assert fsdp_weight.dtype == getattr(torch, params.quant.compute_dtype)
    assert first_4bit_weight(load_base_model(params.model, params.quant)).dtype.is_floating_point is False


def test_multi_machine_launch_command(params):
    p = _mode(
        params,
        "ddp",
        4,
        **{
            "train.distributed.num_machines": 2,
            "train.distributed.machine_rank": 1,
            "train.distributed.main_process_ip": "10.0.0.1",
            "train.distributed.main_process_port": 29555,
        },
    )
    flags = _flags(launch_command(p))
    assert (flags["--num_processes"], flags["--num_machines"], flags["--machine_rank"]) == ("4", "2", "1")
    assert (flags["--main_process_ip"], flags["--main_process_port"]) == ("10.0.0.1", "29555")
    for bad, message in (
        ({"train.distributed.main_process_ip": None}, "main_process_ip"),
        ({"train.distributed.machine_rank": 2}, "below num_machines"),
        ({"train.distributed.num_processes": 3, "train.batch_size": 6}, "divide evenly"),
    ):
        with pytest.raises(PipelineError, match=message):
            with_overrides(p, **bad)


@pytest.mark.slow
def test_two_machines_as_two_launchers_match_a_two_process_ddp_run(tmp_path, params, monkeypatch):
    """Two "hosts": two project folders, each running `python -m tasks.train` as its own host would (machine_rank 0
    and 1, one process each, meeting at 127.0.0.1 over gloo). The main host's adapter equals the adapter of a
    two-process single-host DDP run of the same global batch, value for value: same ranks, same data, same math."""
    import socket

    import torch
    from safetensors.torch import load_file

    from tasks.download.stage import download
    from tasks.format.stage import format_rows
    from tasks.validate.stage import validate

    hosts = [tmp_path / "host0", tmp_path / "host1", tmp_path / "onehost"]
    base = with_overrides(params, **{"train.max_steps": 3})
    first = hosts[0]
    shutil.copytree(ROOT / "data" / "sample", first / "data" / "sample")
    if (ROOT / paths.TINY_BASE_DIR).exists():
        shutil.copytree(ROOT / paths.TINY_BASE_DIR, first / paths.TINY_BASE_DIR)
    with monkeypatch.context() as mp:
        mp.chdir(first)
        download(base.download)
        validate(base)
        format_rows(base.format, base.model)
    for other in hosts[1:]:
        shutil.copytree(first, other)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, host in enumerate(hosts[:2]):
        p = _mode(
            base,
            "ddp",
            2,
            **{
                "train.distributed.num_machines": 2,
                "train.distributed.machine_rank": rank,
                "train.distributed.main_process_ip": "127.0.0.1",
                "train.distributed.main_process_port": port,
            },
        )
        (host / "params.yaml").write_text(yaml.safe_dump(p.as_dict(), sort_keys=False))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tasks.train"],
                cwd=host,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [proc.communicate(timeout=900)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    single_host, _ = _train(hosts[2], _mode(base, "ddp", 2))
    assert single_host.returncode == 0, single_host.stderr[-3000:]

    two_hosts = load_file(hosts[0] / paths.ADAPTER_DIR / paths.ADAPTER_WEIGHTS)
    one_host = load_file(hosts[2] / paths.ADAPTER_DIR / paths.ADAPTER_WEIGHTS)
    assert two_hosts.keys() == one_host.keys() and len(two_hosts) > 0
    assert any(v.abs().sum() > 0 for k, v in two_hosts.items() if "lora_B" in k)  # trained: LoRA B starts at zero
    for name in two_hosts:
        torch.testing.assert_close(two_hosts[name], one_host[name], rtol=1e-5, atol=1e-6)
    assert not (hosts[1] / paths.ADAPTER_DIR).exists()  # only the main host's rank 0 writes
    figures = json.loads((hosts[0] / paths.TRAINING).read_text())
    assert figures["world_size"] == 2 and figures["steps"] == 3


FAMILIES = [("tiny-llama3", "llama3"), ("tiny-qwen2", "chatml"), ("tiny-mistral", "mistral")]


@pytest.mark.slow
@pytest.mark.parametrize("base,template", FAMILIES)
def test_two_process_ddp_trains_each_family_on_the_cpu(workdir, params, base, template):
    """Issue 26's levers per family: a 2-process DDP run (gloo) of each other family's tiny base and template."""
    from tasks.download.stage import download
    from tasks.format.stage import format_rows
    from tasks.validate.stage import validate

    p = with_overrides(params, **{"model.base": base, "format.template": template, "train.max_steps": 2})
    download(p.download)
    validate(p)
    format_rows(p.format, p.model)
    ddp, _ = _train(workdir, _mode(p, "ddp", 2))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    figures = _train_figures(workdir)
    assert (figures["world_size"], figures["distributed_mode"], figures["steps"]) == (2, "ddp", 2)
    assert sorted(p.name for p in (workdir / "artifacts").iterdir()) == ["adapter"]


@pytest.mark.parametrize("base,template", FAMILIES)
def test_fsdp_loading_stores_each_familys_4bit_weights_in_a_float_dtype(workdir, params, base, template):
    """FSDP-QLoRA's storage dtype for every family's 4-bit layers (FSDP itself needs CUDA GPUs: preflight says so)."""
    import bitsandbytes as bnb
    import torch

    from tasks.common.base_model import load_base_model

    p = with_overrides(params, **{"model.base": base, "format.template": template})
    model = load_base_model(p.model, p.quant, fsdp=True)
    weights = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert weights and all(w.dtype == getattr(torch, p.quant.compute_dtype) for w in weights)
