"""Stage 4, train: QLoRA SFT (bitsandbytes 4-bit base, peft LoRA, trl SFTTrainer).

`python -m tasks.train` runs __main__.py, which runs stage.py's main() through the stage runner
(tasks/common/runner.py).

  stage.py             train(): the recipe, top to bottom
  preflight.py         what cannot run here, before anything loads
  memory.py            the memory planner: the fastest same-math layout that fits
  checkpoints.py       resuming a killed run
  callbacks.py         NaN stop, throughput and memory meter, layer recomputation switch, dvclive
  attention.py         padding-free attention
  step_overlap.py      train.sync_free_step: the optimizer step and loss without host waits
  gemm_warmup.py       train.gemm_warmup: cuBLAS's GEMM kernels loaded before the first step
  choice.py            a setting that may be auto, resolved for one run, and why
  dequantized_base.py  train.dequantized_base: the frozen base dequantized once, where the planner finds room
  fp8_base.py          train.fp8_base: the frozen base's matmuls in float8 (opt-in)
  distributed.py       re-launching the stage on several processes (accelerate)
  fsdp_adapter.py      saving an FSDP run's adapter
  loss_curve.py        the loss curve PNG
"""
