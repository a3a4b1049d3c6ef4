"""What the kernel tests share: seeded shards with poisoned padding, random optimizer state,
assertions that report the first differing elements, the exact-mode selection over several
ranks, and subprocess/rank runners. Imported by the tests as `helpers` (pytest puts this folder
on sys.path: tests/ has no __init__.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from dsforget.kernels import (
    DENSE,
    NO_ROWSCALE,
    NUM_LEVELS,
    RadixState,
    SegmentTable,
    abs_histogram,
    level_bins,
    masked_adamw,
    refine,
    update_moments,
)
from dsforget.kernels._triton import INTERPRET, triton, triton_usable

REPO = Path(__file__).resolve().parents[2]
POISON = (math.nan, 1e30, -1e30)
BETA1, BETA2 = 0.9, 0.999
# fp32 state: a fused kernel may round differently from ATen (FMA, sqrt) by an ulp or two.
RTOL, ATOL = 1e-5, 1e-7


def fused_backends(include_large: bool = False) -> list:
    """(backend, device, size) cases that can run in this process."""
    cases = [pytest.param("cpu", "cpu", "small", id="cpu-small")]
    if include_large:
        cases.append(pytest.param("cpu", "cpu", "large", id="cpu-large"))
    if triton_usable(torch.device("cuda")):
        cases.append(pytest.param("triton", "cuda", "small", id="triton-cuda-small"))
        if include_large:
            cases.append(pytest.param("triton", "cuda", "large", id="triton-cuda-large"))
    if INTERPRET and triton is not None:
        cases.append(pytest.param("triton", "cpu", "small", id="triton-interpret-small"))
    return cases


def triton_backends() -> list:
    """("triton", device) cases of tests that only the Triton kernels concern: CUDA where usable,
    and the interpreter, listed in every process (a process without TRITON_INTERPRET=1 deselects
    it, tests/conftest.py; tests/kernels/test_triton.py runs it under the interpreter)."""
    cases = []
    if triton_usable(torch.device("cuda")):
        cases.append(pytest.param("triton", "cuda", id="triton-cuda-small"))
    no_triton = pytest.mark.skipif(triton is None, reason="Triton is not installed")
    cases.append(pytest.param("triton", "cpu", id="triton-interpret-small", marks=no_triton))
    return cases


# ---------------------------------------------------------------------------- shard builders


@dataclass
class Shard:
    """A flat shard: its table, its length and which elements belong to a segment."""

    table: SegmentTable
    numel: int
    covered: torch.Tensor  # bool [numel]


# (length, param_offset, row_len, block, rowscaled): odd lengths, mid-row starts, a second
# piece of block 0, a one-element block, an empty segment, DENSE and row-scaled DENSE pieces.
SMALL_LAYOUT = [
    (1037, 5, 7, 0, False),
    (33, 0, 1, DENSE, False),
    (1501, 13, 10, 1, True),
    (0, 0, 4, 2, False),
    (500, 2000, 7, 0, False),
    (1, 0, 1, 3, False),
    (203, 9, 16, DENSE, True),
]
# > 2 x 64K elements so the CPU backend splits the work over threads mid-segment and mid-block.
LARGE_LAYOUT = [
    (70001, 100, 333, 0, False),
    (4097, 0, 1, DENSE, False),
    (90000, 777, 1000, 1, True),
    (30011, 3, 17, 0, False),
    (9000, 5, 64, DENSE, True),
]
LAYOUTS = {"small": SMALL_LAYOUT, "large": LARGE_LAYOUT}


def build_shard(layout: list[tuple[int, int, int, int, bool]], device: str, seed: int = 0) -> Shard:
    """Segments in layout order with 3..9 poisoned padding elements before each and at the end."""
    generator = torch.Generator().manual_seed(seed)
    rows, scales, offset = [], [], 0
    for index, (length, param_offset, row_len, block, rowscaled) in enumerate(layout):
        offset += 3 + (index * 5) % 7
        rowscale_start = NO_ROWSCALE
        if rowscaled:
            rowscale_start = sum(s.numel() for s in scales)
            num_rows = (param_offset + length - 1) // row_len + 1
            scales.append(torch.rand(num_rows, generator=generator) * 1.5 + 0.25)
        rows.append((offset, length, param_offset, row_len, block, rowscale_start))
        offset += length
    numel = offset + 4
    num_blocks = max(row[4] for row in rows) + 1
    block_sizes = [sum(row[1] for row in rows if row[4] == block) for block in range(num_blocks)]
    block_k = [max(1, int(0.15 * n)) for n in block_sizes]
    rowscale = torch.cat(scales) if scales else None
    covered = torch.zeros(numel, dtype=torch.bool)
    for shard_offset, length, *_ in rows:
        covered[shard_offset : shard_offset + length] = True
    table = SegmentTable.build(rows, rowscale, block_k, device=device)
    return Shard(table, numel, covered.to(device))


def random_state(shard: Shard, seed: int, grad_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """param, grad, exp_avg, exp_avg_sq: random on segments, poisoned on padding."""
    generator = torch.Generator().manual_seed(seed)
    n = shard.numel
    state = {
        "param": torch.randn(n, generator=generator),
        "grad": torch.randn(n, generator=generator).to(grad_dtype),
        "exp_avg": torch.randn(n, generator=generator) * 0.1,
        "exp_avg_sq": torch.rand(n, generator=generator) * 0.01 + 1e-4,
    }
    padding = (~shard.covered).nonzero().flatten().cpu()
    for tensor in state.values():
        tensor[padding] = torch.tensor(POISON, dtype=tensor.dtype).repeat(len(padding) // 3 + 1)[
            : len(padding)
        ]
    return {name: tensor.to(shard.covered.device) for name, tensor in state.items()}


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in state.items()}


def masked_adamw_on(state: dict[str, torch.Tensor], table, thresholds, scalars, backend: str, **options):
    """``masked_adamw`` on a `random_state` dict's param and moments; returns what it returns."""
    return masked_adamw(
        state["param"],
        state["exp_avg"],
        state["exp_avg_sq"],
        table,
        thresholds,
        scalars,
        backend=backend,
        **options,
    )


# ------------------------------------------------------------------------------ assertions


def _report(what: str, bad: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor, rule: str) -> str:
    where = bad.nonzero().flatten()[:8].tolist()
    first = ", ".join(f"[{i}] {actual[i].item()!r} vs expected {expected[i].item()!r}" for i in where)
    return f"{what}: {int(bad.sum())} of {bad.numel()} elements differ ({rule}); first: {first}"


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL, atol: float = ATOL
):
    actual, expected = actual.float().cpu(), expected.float().cpu()
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    assert not bad.any(), _report(what, bad, actual, expected, f"rtol={rtol}, atol={atol}")


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """Floats as integers of their width, so NaN == NaN and -0.0 != +0.0."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str):
    actual, expected = actual.cpu(), expected.cpu()
    bad = as_bits(actual) != as_bits(expected)
    assert not bad.any(), _report(what, bad, actual, expected, "bit for bit")


def assert_padding_untouched(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor], shard: Shard):
    padding = ~shard.covered
    for name in after:
        assert_bitwise(after[name][padding], before[name][padding], f"{name} padding")


# ------------------------------------------------------------------------------- the step


def select_thresholds(shards, states, backend: str, levels_seen: list[int] | None = None) -> RadixState:
    """Exact-mode selection over several shards (ranks) of the same blocks: the histograms of
    every shard are summed before each refinement, as the all-reduce does."""
    table = shards[0].table
    radix = RadixState.start(table.block_k)
    for level in range(NUM_LEVELS):
        if radix.done:
            break
        total = torch.zeros(
            table.num_blocks, level_bins(level), dtype=torch.int64, device=table.block_k.device
        )
        for shard, state in zip(shards, states, strict=True):
            histogram = torch.zeros_like(total)
            if level == 0:
                update_moments(
                    state["grad"],
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    shard.table,
                    beta1=BETA1,
                    beta2=BETA2,
                    histogram=histogram,
                    backend=backend,
                )
            else:
                abs_histogram(state["exp_avg"], shard.table, radix.prefix, level, histogram, backend=backend)
            total += histogram
        refine(radix, total, level)
        if levels_seen is not None:
            levels_seen.append(level)
    return radix


UPDATE = {"lr": 1e-2, "bias_correction1": 1 - BETA1**5, "bias_correction2": 1 - BETA2**5, "eps": 1e-8}


def run_python(args: list[str], env: dict[str, str] | None = None, timeout: int = 240):
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result


def run_ranks(step_on_rank, ranks: int) -> list:
    """Run step_on_rank(rank, sum_over_ranks) on `ranks` threads whose sum_over_ranks adds the
    ranks' count tensors like the data-parallel all-reduce (results in rank order). One thread
    computes at a time (the Triton interpreter is not thread-safe); they meet in sum_over_ranks."""
    barrier = threading.Barrier(ranks)
    computing = threading.Lock()
    posted: list = [None] * ranks

    def sum_over_ranks_of(rank):
        def sum_over_ranks(tensors):
            posted[rank] = [t.clone() for t in tensors]
            computing.release()
            try:
                barrier.wait()
                total = [sum(parts) for parts in zip(*posted, strict=True)]
                barrier.wait()
            finally:  # body() releases it, on errors too
                computing.acquire()
            return total

        return sum_over_ranks

    results: list = [None] * ranks
    errors: list = []

    def body(rank):
        computing.acquire()
        try:
            results[rank] = step_on_rank(rank, sum_over_ranks_of(rank))
        except BaseException as error:  # reported below; the other rank is released
            errors.append(error)
            barrier.abort()
        finally:
            computing.release()

    threads = [threading.Thread(target=body, args=(rank,)) for rank in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def split_into_shards(params: list[tuple[torch.Tensor, int, int]], cut: int, device: str):
    """ZeRO-1/2 style: parameters concatenated, the flat vector cut at `cut` into two ranks'
    shards (a parameter straddles the cut), each shard padded by 3 elements in front and 5 at
    the end. params: (values, row_len, block). Returns the shards and, per parameter, its
    pieces as (rank, shard offset, parameter offset, length)."""
    flat_len = sum(values.numel() for values, _, _ in params)
    bounds = [(0, cut), (cut, flat_len)]
    shards, pieces = [], [[] for _ in params]
    for rank, (start, stop) in enumerate(bounds):
        rows, position = [], 0
        for index, (values, row_len, block) in enumerate(params):
            begin, end = max(start, position), min(stop, position + values.numel())
            if begin < end:
                rows.append((3 + begin - start, end - begin, begin - position, row_len, block, NO_ROWSCALE))
                pieces[index].append((rank, 3 + begin - start, begin - position, end - begin))
            position += values.numel()
        numel = 3 + stop - start + 5
        covered = torch.zeros(numel, dtype=torch.bool)
        covered[3 : 3 + stop - start] = True
        block_k = [
            max(1, math.floor(0.15 * values.numel()))
            for values, _, block in sorted(params, key=lambda p: p[2])
            if block >= 0
        ]
        shards.append(
            Shard(SegmentTable.build(rows, None, block_k, device=device), numel, covered.to(device))
        )
    return shards, pieces
