"""Time each Triton kernel over a grid of (TILE, num_warps), to fill tiles.TRITON_LAUNCH.

    python -m dsforget.kernels.bench --triton-sweep                   # default sizes, CUDA only
    python -m dsforget.kernels.bench --triton-sweep --sizes 64K,16M --repeats 50

The shard is flat.py's (square matrices as top-k blocks, norms DENSE, padding after each
segment), fp32 state and gradient. Kernels, each launched through its op (backend "triton",
aligned tiles) with every (TILE, num_warps) forced in turn (tiles.forced_triton_launch):

- update_moments:            no counts (20 B per element: read g, m, v; write m, v);
- update_moments+histogram:  the level-0 histogram and nonzero counts, as a step without hints
                             counts (20 B);
- masked_adamw:              the thresholds an exact selection found, no deferral (16 B: read p,
                             m, v; write p);
- abs_histogram:             level 1 at those blocks' level-0 prefixes (4 B: read m).

A cell is the median over rounds of one launch's device time (CUDA events around `repeats`
launches back to back, so the time is the GPU's as long as a launch takes longer than Python
needs to issue it), and GB/s counts the bytes above. `*` marks the row tiles.TRITON_LAUNCH
chooses now for that size; the best cell of each table is reported below it. Copy the best
(TILE, num_warps) per size range into TRITON_LAUNCH, with the card and date, and rerun the
tests (tests/kernels/test_triton.py compiles every row the table can choose).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..histogram import abs_histogram
from ..masked_update import AdamWScalars, masked_adamw
from ..moments import update_moments
from ..radix import NUM_LEVELS, RadixState, level_bins, refine
from ..tiles import forced_triton_launch, triton_launch
from .flat import BETA1, BETA2, EPS, LR, WEIGHT_DECAY, build_shard, initial_state

SWEEP_TILES = (256, 512, 1024, 2048, 4096, 8192)
SWEEP_WARPS = (1, 2, 4, 8, 16)
SWEEP_ROUNDS = 3
# TILE / (32 * num_warps) elements a thread: below 2 a warp's lanes idle, above 32 registers spill
MIN_PER_THREAD, MAX_PER_THREAD = 2, 32


def sweep_grid() -> list[tuple[int, int]]:
    """The (TILE, num_warps) pairs the sweep times."""
    return [
        (tile_size, num_warps)
        for tile_size in SWEEP_TILES
        for num_warps in SWEEP_WARPS
        if MIN_PER_THREAD <= tile_size // (32 * num_warps) <= MAX_PER_THREAD
    ]


@dataclass
class Cell:
    kernel: str
    numel: int
    tile_size: int
    num_warps: int
    microseconds: float
    gb_per_s: float


# kernel name -> (op name in TRITON_LAUNCH, bytes moved per covered element)
KERNELS = {
    "update_moments": ("update_moments", 20),
    "update_moments+histogram": ("update_moments", 20),
    "masked_adamw": ("masked_adamw", 16),
    "abs_histogram": ("abs_histogram", 4),
}


def kernel_calls(numel: int, device: torch.device) -> tuple[dict[str, Callable[[], None]], int]:
    """One launch of each kernel of KERNELS on a fresh shard of `numel` elements, and the number
    of elements its segments cover."""
    shard = build_shard(numel, device)
    state = initial_state(numel, device)
    table, blocks = shard.table, shard.table.num_blocks
    grad, exp_avg, exp_avg_sq, param = state.grad, state.exp_avg, state.exp_avg_sq, state.param
    histogram = torch.zeros(blocks, level_bins(0), dtype=torch.int64, device=device)
    nonzero = torch.zeros(blocks, dtype=torch.int64, device=device)
    # an exact selection (default launches) for realistic prefixes and thresholds
    radix = RadixState.start(table.block_k)
    update_moments(
        grad, exp_avg, exp_avg_sq, table, beta1=BETA1, beta2=BETA2, histogram=histogram, backend="triton"
    )
    refine(radix, histogram, 0)
    level1_prefix = radix.prefix.clone()
    for level in range(1, NUM_LEVELS):
        if radix.done:
            break
        counts = torch.zeros(blocks, level_bins(level), dtype=torch.int64, device=device)
        abs_histogram(exp_avg, table, radix.prefix, level, counts, backend="triton")
        refine(radix, counts, level)
    thresholds = radix.threshold
    level1_counts = torch.zeros(blocks, level_bins(1), dtype=torch.int64, device=device)
    scalars = AdamWScalars.at_step(
        10, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WEIGHT_DECAY, decay_selected_only=False
    )
    moments = (grad, exp_avg, exp_avg_sq, table)
    calls = {
        "update_moments": lambda: update_moments(*moments, beta1=BETA1, beta2=BETA2, backend="triton"),
        "update_moments+histogram": lambda: update_moments(
            *moments, beta1=BETA1, beta2=BETA2, histogram=histogram, nonzero=nonzero, backend="triton"
        ),
        "masked_adamw": lambda: masked_adamw(
            param, exp_avg, exp_avg_sq, table, thresholds, scalars, backend="triton"
        ),
        "abs_histogram": lambda: abs_histogram(
            exp_avg, table, level1_prefix, 1, level1_counts, backend="triton"
        ),
    }
    covered = sum(row[1] for row in shard.rows)
    return calls, covered


def time_launches(call: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median over SWEEP_ROUNDS of the mean microseconds of `repeats` launches back to back."""
    for _ in range(3):  # compiles the specialisation, warms caches
        call()
    rounds = []
    for _ in range(SWEEP_ROUNDS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                call()
            end.record()
            end.synchronize()
            rounds.append(start.elapsed_time(end) * 1e3 / repeats)
        else:  # (the interpreter: only the tests run the sweep here)
            began = time.perf_counter()
            for _ in range(repeats):
                call()
            rounds.append((time.perf_counter() - began) * 1e6 / repeats)
    return statistics.median(rounds)


def sweep(
    sizes: list[int], device: torch.device, repeats: int, grid: list[tuple[int, int]] | None = None
) -> list[Cell]:
    """Every kernel at every (TILE, num_warps) of `grid` (default sweep_grid()) and size."""
    cells = []
    for numel in sizes:
        calls, covered = kernel_calls(numel, device)
        for kernel, call in calls.items():
            for tile_size, num_warps in grid or sweep_grid():
                with forced_triton_launch(tile_size, num_warps):
                    microseconds = time_launches(call, device, repeats)
                rate = KERNELS[kernel][1] * covered / microseconds / 1e3
                cells.append(Cell(kernel, numel, tile_size, num_warps, microseconds, rate))
    return cells


def format_sweep(cells: list[Cell], device_name: str) -> str:
    """One table per (size, kernel): TILE rows, num_warps columns, 'us (GB/s)' cells."""
    lines = []
    for numel in dict.fromkeys(cell.numel for cell in cells):
        for kernel in dict.fromkeys(cell.kernel for cell in cells if cell.numel == numel):
            own = [cell for cell in cells if cell.numel == numel and cell.kernel == kernel]
            warps = sorted({cell.num_warps for cell in own})
            tiles = sorted({cell.tile_size for cell in own})
            by_key = {(cell.tile_size, cell.num_warps): cell for cell in own}
            chosen = triton_launch(KERNELS[kernel][0], numel)
            lines += [
                f"### {kernel}, {numel:,} elements ({numel / 2**20:g} Mi) on {device_name}",
                "",
                "| TILE | " + " | ".join(f"{w} warps" for w in warps) + " |",
                "| ---: |" + " ---: |" * len(warps),
            ]
            for tile_size in tiles:
                row = []
                for num_warps in warps:
                    cell = by_key.get((tile_size, num_warps))
                    mark = "*" if (tile_size, num_warps) == chosen else ""
                    row.append(
                        "" if cell is None else f"{mark}{cell.microseconds:.1f} us ({cell.gb_per_s:.0f})"
                    )
                lines.append(f"| {tile_size} | " + " | ".join(row) + " |")
            best = min(own, key=lambda cell: cell.microseconds)
            now = by_key.get(chosen)
            now_text = "not in the grid" if now is None else f"{now.gb_per_s:.0f} GB/s"
            lines += [
                "",
                f"best: TILE {best.tile_size}, {best.num_warps} warps, {best.gb_per_s:.0f} GB/s; "
                f"the table's ({chosen[0]}, {chosen[1]}): {now_text}",
                "",
            ]
    return "\n".join(lines)


def run(sizes: list[int] | None, device: torch.device, repeats: int, device_name: str) -> int:
    """The --triton-sweep command: 0 when it ran, 2 (with the reason) where it cannot."""
    from .._triton import TRITON_IMPORT_ERROR, triton

    if triton is None:
        print(f"--triton-sweep needs Triton, which did not import: {TRITON_IMPORT_ERROR}")
        return 2
    if device.type != "cuda" or not torch.cuda.is_available():
        print(
            f"--triton-sweep times the Triton kernels on a CUDA GPU; this run has device {device} "
            f"(torch.cuda.is_available() is {torch.cuda.is_available()}): nothing timed"
        )
        return 2
    sizes = sizes or [1 << 16, 1 << 20, 16 << 20, 128 << 20]
    grid = sweep_grid()
    print(f"# Triton launch sweep: {device_name}; {len(grid)} (TILE, num_warps) pairs, sizes {sizes}")
    print("# cells: us per launch (GB/s); * = tiles.TRITON_LAUNCH's choice now\n")
    for numel in sizes:
        print(format_sweep(sweep([numel], device, repeats, grid), device_name), flush=True)
    return 0
