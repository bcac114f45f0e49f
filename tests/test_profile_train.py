"""The profiler benchmark's idle-time attribution (benchmarks/profile_train.py), on hand-made timelines."""

from __future__ import annotations

from benchmarks.profile_train import busy_time_us, idle_by_cpu_op, idle_gaps, kind_of


def test_gaps_between_overlapping_kernels():
    kernels = [(0, 10), (5, 12), (20, 30), (31, 40), (100, 110)]
    assert busy_time_us(kernels) == 12 + 10 + 9 + 10
    assert idle_gaps(kernels) == [(12, 20), (30, 31), (40, 100)]


def test_idle_goes_to_the_innermost_cpu_range_open_at_the_gap():
    gaps = [(12, 20), (30, 31), (40, 100), (150, 160)]
    cpu = [
        (1, 0, 140, "train step"),
        (1, 12, 19, "aten::mm"),
        (1, 40, 100, "Optimizer.step#AdamW.step"),
        (1, 50, 60, "aten::add"),  # ended before the gap's middle
        (2, 29, 32, "autograd::engine::evaluate_function: MulBackward0"),  # the backward thread, began last
    ]
    assert idle_by_cpu_op(gaps, cpu) == {
        "aten::mm": 8,
        "autograd::engine::evaluate_function: MulBackward0": 1,
        "Optimizer.step#AdamW.step": 60,
        "(python)": 10,
    }


def test_kernel_kinds():
    assert kind_of("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>") == "dequant_4bit"
    assert kind_of("nvjet_sm90_tst_256x160_64x4_2x1_v_bz_coopA_NNT") == "gemm"
    assert kind_of("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert kind_of("_rms_norm_forward_kernel") == "liger_triton"
    # inductor's fused kernels are named after their nodes: this one is elementwise work, not a GEMM
    assert kind_of("triton_red_fused__to_copy_add_gemm_4bit_mean_mul_native_dropout_pow_rsqrt_0") == "liger_triton"


def test_syncs_are_counted_per_step_by_op():
    from benchmarks.profile_train import syncs_per_step

    names = ["aten::mm", "aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize"] * 3 + ["aten::item"]
    assert syncs_per_step(names, 3) == {
        "aten::_local_scalar_dense": 1.0,
        "aten::nonzero": 1.0,
        "cudaStreamSynchronize": 1.0,
    }
    assert syncs_per_step(["aten::mm"], 2) == {}


def test_with_stack_idle_also_goes_to_the_innermost_python_function():
    """A gap with no op open is "(python)" by op; with Python frames recorded it goes to the function the CPU was in,
    builtins and ops inside it counting as that function. Without frames there is nothing to attribute."""
    from benchmarks.profile_train import idle_by_python_frame

    gaps = [(10, 20), (40, 50)]
    cpu = [
        (1, 0, 100, "transformers/trainer.py(1598): _inner_training_loop"),
        (1, 5, 30, "dvclive/serialize.py(17): load_yaml"),
        (1, 12, 18, "<built-in method read of _io.TextIOWrapper object>"),
        (1, 44, 46, "aten::copy_"),
    ]
    assert idle_by_cpu_op(gaps, cpu) == {"<built-in method read of _io.TextIOWrapper object>": 10, "aten::copy_": 10}
    assert idle_by_python_frame(gaps, cpu) == {
        "dvclive/serialize.py(17): load_yaml": 10,
        "transformers/trainer.py(1598): _inner_training_loop": 10,
    }
    assert idle_by_python_frame(gaps, [c for c in cpu if ".py(" not in c[3]]) == {}


def test_python_frames_are_read_from_the_exported_trace():
    """torch.profiler keeps a with_stack run's Python frames in its Chrome trace only: the attribution reads them
    (and the kernels) from there, in ms a step."""
    from benchmarks.profile_train import trace_idle_by_python_frame

    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0, "dur": 1000},
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 3000, "dur": 1000},
            {"ph": "X", "cat": "gpu_memcpy", "name": "copy", "ts": 4000, "dur": 500},
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 6500, "dur": 1000},
            {
                "ph": "X",
                "cat": "python_function",
                "tid": 1,
                "name": "trainer.py(2088): training_step",
                "ts": 0,
                "dur": 8000,
            },
            {"ph": "X", "cat": "python_function", "tid": 1, "name": "module.py(2886): train", "ts": 1500, "dur": 1000},
            {"ph": "X", "cat": "cpu_op", "tid": 1, "name": "aten::mm", "ts": 4600, "dur": 1000},
        ]
    }
    assert trace_idle_by_python_frame(trace, steps=2) == {
        "module.py(2886): train": 1.0,  # the gap 1000..3000, its middle inside train()
        "trainer.py(2088): training_step": 1.0,  # the gap 4500..6500: an op, not a frame, is open inside it
    }
