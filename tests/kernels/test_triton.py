"""The Triton kernels without a GPU: every triton case of tests/kernels re-run under the
interpreter in a subprocess, and every specialisation compiled for sm_90.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from dsforget.kernels import NUM_LEVELS, level_bins
from dsforget.kernels._triton import INTERPRET, triton
from dsforget.kernels.masked_update import DEFER_SHIFT
from dsforget.kernels.moments import HINT_SHIFT, HINT_WINDOW
from dsforget.kernels.radix import LEVELS
from helpers import run_python


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
@pytest.mark.skipif(INTERPRET, reason="already running under the interpreter")
def test_triton_kernels_under_the_interpreter():
    """Runs every triton case of tests/kernels (and the optimizer's multi-tensor step on Triton)
    with TRITON_INTERPRET=1 (Triton reads it when
    kernels are decorated, i.e. when dsforget.kernels is first imported, so it cannot be switched
    on inside this process): catches kernels that only a GPU machine would otherwise ever execute."""
    result = run_python(
        [
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "triton-interpret",
            str(Path(__file__).parent),
            str(Path(__file__).parents[1] / "optim" / "test_multi_tensor.py"),
        ],
        env={"TRITON_INTERPRET": "1"},
    )
    assert " passed" in result.stdout and "failed" not in result.stdout, result.stdout[-3000:]


FP32_POINTERS = {
    "grad_ptr",
    "exp_avg_ptr",
    "exp_avg_sq_ptr",
    "rowscale_ptr",
    "param_ptr",
    "deferred_exp_avg_ptr",
    "deferred_exp_avg_sq_ptr",
    "corrections_ptr",
}
INT_SCALARS = {"defer_capacity", "n_tensors"}


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
@pytest.mark.skipif(INTERPRET, reason="interpreted kernels cannot be compiled")
def test_triton_kernels_compile_for_h100():
    """Catches kernels that run in the interpreter but not compiled (a runtime `if` whose
    branches disagree on types, int64 atomics, sqrt_rn/div_rn, pointer arithmetic): every
    specialisation the launchers use is compiled ahead of time for sm_90 down to a cubin with
    Triton's bundled ptxas; no GPU needed."""
    from dsforget.kernels import histogram as histogram_op
    from dsforget.kernels import masked_update as masked_op
    from dsforget.kernels import moments as moments_op
    from dsforget.kernels import radix as radix_op
    from dsforget.kernels._triton import LAUNCH_OPTIONS
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_kernel(kernel, constexprs: dict, grad_type: str = "*fp32") -> None:
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name == "grad_ptr":
                signature[name] = grad_type
            elif name.endswith("_ptr"):
                signature[name] = "*fp32" if name in FP32_POINTERS else "*i64"
            elif name in INT_SCALARS:
                signature[name] = "i64"
            else:
                signature[name] = "fp32"
        indexed = {(i,): constexprs[name] for i, name in enumerate(kernel.arg_names) if name in constexprs}
        source = ASTSource(kernel, signature, constexprs=indexed)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=LAUNCH_OPTIONS)
        assert compiled.asm["cubin"], kernel

    level0 = dict(DIGIT_SHIFT=LEVELS[0][0], BINS=level_bins(0), TILE=moments_op.TRITON_TILE)
    hints = dict(HINT_SHIFT=HINT_SHIFT, HINT_WINDOW=HINT_WINDOW)
    lists = (False, True)  # flat shards, TensorLists (the multi-tensor step)
    for grad_type in ("*fp32", "*bf16"):
        for with_histogram, hinted in ((True, True), (True, False), (False, True), (False, False)):
            for nonzero, listed in itertools.product((True, False), lists):
                constexprs = dict(
                    level0, **hints, HISTOGRAM=with_histogram, HINT=hinted, NONZERO=nonzero, LIST=listed
                )
                compile_kernel(moments_op._update_moments_kernel, constexprs, grad_type)
    for (level, (shift, width)), listed in itertools.product(enumerate(LEVELS), lists):
        constexprs = dict(
            DIGIT_SHIFT=shift,
            BINS=level_bins(level),
            PREFIX_SHIFT=shift + width,
            LIST=listed,
            TILE=histogram_op.TRITON_TILE,
        )
        compile_kernel(histogram_op._abs_histogram_kernel, constexprs)
    for defer, per_counter, listed in itertools.product((False, True), (False, True), lists):
        constexprs = dict(
            DEFER_SHIFT=DEFER_SHIFT,
            DEFER=defer,
            PER_COUNTER=per_counter,
            LIST=listed,
            TILE=masked_op.TRITON_TILE,
        )
        compile_kernel(masked_op._masked_adamw_kernel, constexprs)
    for per_counter, listed in itertools.product((False, True), lists):
        constexprs = dict(PER_COUNTER=per_counter, LIST=listed, SEARCH_STEPS=9, SLOTS=masked_op.APPLY_SLOTS)
        compile_kernel(masked_op._apply_deferred_kernel, constexprs)
    for level, (shift, _) in enumerate(LEVELS):
        for masked in (False, True):
            constexprs = dict(
                BINS=level_bins(level), SHIFT=shift, LAST=level == NUM_LEVELS - 1, MASKED=masked
            )
            compile_kernel(radix_op._advance_kernel, constexprs)
