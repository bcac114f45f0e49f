"""Launching the train stage on several processes through accelerate's launcher (saving an FSDP run's adapter is
tasks/train/fsdp_adapter.py's job).

`python -m tasks.train` with train.distributed.mode ddp or fsdp does not train in its own process: it
re-runs the same module as train.distributed.num_processes workers under `accelerate launch` (torchrun
underneath) and exits with their status. A worker finds WORLD_SIZE/LOCAL_RANK in its environment and
trains; so does a process started by the user's own `accelerate launch` or `torchrun`, which is never
re-launched.

  ddp   one full 4-bit base per process, LoRA gradients all-reduced. On a CUDA box, one GPU per process
        (NCCL); on a CPU-only box, gloo (the Trainer runs with use_cpu, and accelerate picks gloo for a
        CPU process group; `accelerate launch --cpu` would start one process only, without mpirun).
  fsdp  FSDP-QLoRA as bitsandbytes, PEFT and accelerate document it: FSDP1 wrapping each decoder layer
        (the model's _no_split_modules; PEFT wraps the LoRA layers apart), use_orig_params false,
        cpu_ram_efficient_loading with sync_module_states; the 4-bit weights are stored in a float dtype
        (base_model.load_base_model sets bnb_4bit_quant_storage). CUDA only.

`launch_command(params)` is pure (params in, argv out) so tests can read what would run.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Mapping
from typing import NamedTuple

from tasks.common.config import Params

log = logging.getLogger(__name__)

MODULE = "tasks.train"
LAUNCHER = "accelerate.commands.launch"  # `accelerate launch`, through this interpreter (the venv's accelerate)
# Set by torchrun (and so by accelerate launch) in every worker; their presence means "already launched".
WORKER_ENV = ("WORLD_SIZE", "LOCAL_RANK")
LAUNCHER_PID_ENV = "TASKS_TRAIN_LAUNCHER_PID"  # set by launch(): the process whose death ends the workers

_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

# FSDP-QLoRA, as in PEFT's docs (accelerate/fsdp, "Use PEFT QLoRA and FSDP") and bitsandbytes' fsdp_qlora guide.
FSDP_FLAGS = (
    "--use_fsdp",
    "--fsdp_version",
    "1",  # use_orig_params is an FSDP1 setting; the documented QLoRA recipe is FSDP1
    "--fsdp_auto_wrap_policy",
    "TRANSFORMER_BASED_WRAP",  # decoder layers, from the model's _no_split_modules
    "--fsdp_sharding_strategy",
    "FULL_SHARD",
    "--fsdp_state_dict_type",
    "SHARDED_STATE_DICT",  # checkpoints; the adapter is saved from a full gather
    "--fsdp_use_orig_params",
    "false",  # needed for the memory savings with frozen 4-bit + trainable LoRA
    "--fsdp_cpu_ram_efficient_loading",
    "true",  # rank 0 reads the checkpoint, the others get empty weights
    "--fsdp_sync_module_states",
    "true",  # ... and receive rank 0's (required by cpu_ram_efficient_loading)
    "--fsdp_offload_params",
    "false",
    "--fsdp_backward_prefetch",
    "BACKWARD_PRE",
    "--fsdp_forward_prefetch",
    "false",
)


class World(NamedTuple):
    rank: int
    local_rank: int
    size: int


def world(env: Mapping[str, str] = os.environ) -> World:
    """This process's place in the job, from the launcher's environment (a lone process is rank 0 of 1)."""
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def is_worker(env: Mapping[str, str] = os.environ) -> bool:
    return any(k in env for k in WORKER_ENV)


def needs_launch(params: Params, env: Mapping[str, str] = os.environ) -> bool:
    return params.train.distributed.mode != "single" and not is_worker(env)


def launch_command(params: Params, module: str = MODULE) -> list[str]:
    """The command that runs the train stage as params.train.distributed asks (pure)."""
    d = params.train.distributed
    if d.mode == "single":
        return [sys.executable, "-m", module]
    cmd = [
        sys.executable,
        "-m",
        LAUNCHER,
        "--num_processes",
        str(d.num_processes),  # the whole job's: accelerate starts num_processes/num_machines here
        "--num_machines",
        str(d.num_machines),
        # The same precision the Trainer is configured with, so launcher and Trainer agree.
        "--mixed_precision",
        _MIXED_PRECISION[params.train.precision],
        "--dynamo_backend",
        "no",
    ]
    if d.num_machines > 1:  # every host runs this same command with its own rank; they meet at the main host
        cmd += [
            "--machine_rank",
            str(d.machine_rank),
            "--main_process_ip",
            d.main_process_ip,
            "--main_process_port",
            str(d.main_process_port),
        ]
    else:
        cmd += ["--main_process_port", "0"]  # a free port: two jobs (or tests) on one host do not collide on 29500
    # --multi_gpu means "torchrun workers" to accelerate; on a CPU-only box the workers' Trainer runs with
    # use_cpu and joins a gloo group. (--cpu would use the simple launcher: one process unless mpirun is set up.)
    cmd += list(FSDP_FLAGS) if d.mode == "fsdp" else ["--multi_gpu"]
    return cmd + ["-m", module]


def one_gpu_env(params: Params, gpu_count: int, env: Mapping[str, str] = os.environ) -> dict[str, str] | None:
    """For mode single with several GPUs visible: this environment with only the first of them visible, else None.

    A lone process that sees several GPUs gets wrapped in nn.DataParallel by the Trainer, which SFTTrainer refuses
    (and a 4-bit model cannot be replicated that way). Single means one GPU: the first visible one.
    """
    if params.train.distributed.mode != "single" or is_worker(env) or gpu_count < 2:
        return None
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    return {**env, "CUDA_VISIBLE_DEVICES": visible.split(",")[0].strip() if visible else "0"}


def die_with_launcher(env: Mapping[str, str] = os.environ) -> None:
    """In a worker started by launch(): end when the launcher process ends, even by SIGKILL (Linux).

    torchrun's workers outlive a SIGKILLed launcher: they would go on training and writing checkpoints while the
    next `python -m tasks.train` resumes from those same checkpoints. A killed run must stop, as a single run does.
    """
    launcher = env.get(LAUNCHER_PID_ENV)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(launcher):  # the launcher died before the line above
        os._exit(1)


def launch(params: Params, module: str = MODULE) -> int:
    """Run launch_command(params) in this process (accelerate's launcher, in-process) and return the
    workers' exit status: the first failed worker's code (2 for a PipelineError, as a single run), else 0."""
    from accelerate.commands.launch import launch_command as accelerate_launch
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    cmd = launch_command(params, module)
    log.info(
        "launching %d processes (%s): %s",
        params.train.distributed.num_processes,
        params.train.distributed.mode,
        shlex.join(cmd),
    )
    args = launch_command_parser().parse_args(cmd[3:])  # what follows `python -m accelerate.commands.launch`
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # torchrun starts the workers from this process
    try:
        accelerate_launch(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        log.error("worker rank %d failed with exit code %s; its message is above", rank, code)
        return code if code > 0 else 128 - code if code < 0 else 1  # a signal -N reads as 128+N, as a shell does
    return 0
