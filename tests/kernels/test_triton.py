"""The Triton kernels without a GPU: every triton case of tests/kernels re-run under the
interpreter in a subprocess, and every specialisation compiled for sm_90.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from dsforget.kernels import NUM_LEVELS, level_bins
from dsforget.kernels._triton import INTERPRET, triton
from dsforget.kernels.masked_update import DEFER_SHIFT
from dsforget.kernels.moments import HINT_SHIFT, HINT_WINDOW
from dsforget.kernels.radix import LEVELS
from dsforget.kernels.tiles import TRITON_LAUNCH
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
# a 16-byte global access of fp32 (ld.global.v4.b32, possibly with cache qualifiers before .v4)
VECTOR_LOAD = re.compile(r"\bld\.global(?:\.[\w:]+)*?\.v4\.")
VECTOR_STORE = re.compile(r"\bst\.global(?:\.[\w:]+)*?\.v4\.")


def compile_for_h100(kernel, constexprs: dict, grad_type: str = "*fp32", num_warps: int = 4):
    """`kernel` compiled for sm_90 down to a cubin (Triton's bundled ptxas, no GPU), its pointer
    arguments declared 16-byte aligned as Triton specialises them at a launch on torch's
    allocations (data_ptr() % 16 == 0); returns the compiled kernel (asm["ptx"], asm["cubin"])."""
    from dsforget.kernels._triton import LAUNCH_OPTIONS
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
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
        if name.endswith("_ptr"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    indexed = {(i,): constexprs[name] for i, name in enumerate(kernel.arg_names) if name in constexprs}
    source = ASTSource(kernel, signature, constexprs=indexed, attrs=attrs)
    options = dict(LAUNCH_OPTIONS, num_warps=num_warps)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"], kernel
    return compiled


def assert_vectorised(compiled, what: str, stores: bool) -> None:
    """Catches streaming kernels whose tile accesses the compiler cannot vectorise (offsets of
    unknown alignment, or only masked accesses): their fp32 loads (and stores) must be 16-byte."""
    ptx = compiled.asm["ptx"]
    assert VECTOR_LOAD.search(ptx), f"{what}: no 16-byte vector load (ld.global.v4) in the PTX"
    if stores:
        assert VECTOR_STORE.search(ptx), f"{what}: no 16-byte vector store (st.global.v4) in the PTX"


def launches_of(kernel: str) -> list[tuple[int, int]]:
    """Every (TILE, num_warps) the launch table can choose for `kernel`."""
    return sorted({(tile_size, num_warps) for _, tile_size, num_warps in TRITON_LAUNCH[kernel]})


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
@pytest.mark.skipif(INTERPRET, reason="interpreted kernels cannot be compiled")
def test_triton_kernels_compile_for_h100():
    """Catches kernels that run in the interpreter but not compiled (a runtime `if` whose
    branches disagree on types, int64 atomics, sqrt_rn/div_rn, pointer arithmetic), and streaming
    kernels that lost their vector accesses: every specialisation the launchers use, at every
    (TILE, num_warps) of the launch table, is compiled ahead of time for sm_90 down to a cubin;
    the fp32 variants of the three streaming kernels must load (and store) 16 bytes at a time.
    No GPU needed."""
    from dsforget.kernels import histogram as histogram_op
    from dsforget.kernels import masked_update as masked_op
    from dsforget.kernels import moments as moments_op
    from dsforget.kernels import radix as radix_op

    hints = dict(HINT_SHIFT=HINT_SHIFT, HINT_WINDOW=HINT_WINDOW)
    for tile_size, num_warps in launches_of("update_moments"):
        level0 = dict(DIGIT_SHIFT=LEVELS[0][0], BINS=level_bins(0), TILE=tile_size)
        for grad_type in ("*fp32", "*bf16"):
            for with_histogram, hinted in ((True, True), (True, False), (False, True), (False, False)):
                for nonzero in (True, False):
                    constexprs = dict(
                        level0, **hints, HISTOGRAM=with_histogram, HINT=hinted, NONZERO=nonzero, LIST=False
                    )
                    compiled = compile_for_h100(
                        moments_op._update_moments_kernel, constexprs, grad_type, num_warps
                    )
                    if grad_type == "*fp32":
                        assert_vectorised(compiled, f"update_moments {constexprs}, {num_warps} warps", True)
            # a TensorList (the multi-tensor step): each tile's tensor from an address whose
            # alignment the compiler cannot know (compiled, not required to vectorise)
            listed = dict(level0, **hints, HISTOGRAM=True, HINT=True, NONZERO=True, LIST=True)
            compile_for_h100(moments_op._update_moments_kernel, listed, grad_type, num_warps)
    for tile_size, num_warps in launches_of("abs_histogram"):
        for (level, (shift, width)), listed in itertools.product(enumerate(LEVELS), (False, True)):
            constexprs = dict(
                DIGIT_SHIFT=shift,
                BINS=level_bins(level),
                PREFIX_SHIFT=shift + width,
                LIST=listed,
                TILE=tile_size,
            )
            compiled = compile_for_h100(histogram_op._abs_histogram_kernel, constexprs, num_warps=num_warps)
            if not listed:
                assert_vectorised(compiled, f"abs_histogram {constexprs}, {num_warps} warps", False)
    for tile_size, num_warps in launches_of("masked_adamw"):
        for defer, per_counter, listed in itertools.product((False, True), (False, True), (False, True)):
            constexprs = dict(
                DEFER_SHIFT=DEFER_SHIFT, DEFER=defer, PER_COUNTER=per_counter, LIST=listed, TILE=tile_size
            )
            compiled = compile_for_h100(masked_op._masked_adamw_kernel, constexprs, num_warps=num_warps)
            if not listed:
                assert_vectorised(compiled, f"masked_adamw {constexprs}, {num_warps} warps", True)
    for per_counter, listed in itertools.product((False, True), (False, True)):
        constexprs = dict(PER_COUNTER=per_counter, LIST=listed, SEARCH_STEPS=9, SLOTS=masked_op.APPLY_SLOTS)
        compile_for_h100(masked_op._apply_deferred_kernel, constexprs)
    for level, (shift, _) in enumerate(LEVELS):
        for masked in (False, True):
            constexprs = dict(
                BINS=level_bins(level), SHIFT=shift, LAST=level == NUM_LEVELS - 1, MASKED=masked
            )
            compile_for_h100(radix_op._advance_kernel, constexprs)
