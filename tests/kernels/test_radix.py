"""Radix selection: `advance`, `advance_within` and `refine` of every backend against the torch reference.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import pytest
import torch
from dsforget.kernels import NUM_LEVELS, RadixState, level_bins, refine
from dsforget.kernels.radix import RESOLVED, advance, advance_within
from helpers import assert_bitwise, fused_backends


@pytest.mark.parametrize(
    ("backend", "device"), [pytest.param(*case.values[:2], id=case.id) for case in fused_backends()]
)
def test_radix_advance_matches_torch(backend, device):
    """Catches a C++ or Triton bin search that takes the wrong bin at empty bins, at the top or
    bottom bin, or when fewer entries than wanted exist, a wrong early resolution, blocks outside
    the mask or already resolved touched, a window base or skipped count applied wrongly, a
    refine that derives the wrong base, and a window that claims (or misses) the wrong blocks."""
    generator = torch.Generator().manual_seed(8)
    outcomes = set()
    for trial in range(200 if backend == "cpu" else 30):  # the Triton interpreter is slow
        n = int(torch.randint(1, 9, (1,), generator=generator))
        level = trial % NUM_LEVELS
        bins = level_bins(level)
        sparse = torch.rand(n, bins, generator=generator) < (0.002 if trial % 3 else 0.05)
        histogram = torch.randint(1, 4, (n, bins), generator=generator) * sparse
        wanted = (histogram.sum(1).float() * torch.rand(n, generator=generator) * 1.1).long()
        skipped = torch.randint(0, 3, (n,), generator=generator)
        start = RadixState.start(wanted.clamp(min=0) + skipped)
        start.prefix = torch.randint(-1, 50, (n,), generator=generator)  # -1: resolved already
        base = torch.randint(0, 1000, (n,), generator=generator)
        blocks = torch.rand(n, generator=generator) < 0.7 if trial % 2 else None
        variant = ("advance", "within", "refine")[trial // NUM_LEVELS % 3]
        results, moved_masks = [], []
        for name in ("torch", backend):
            tensors = (start.prefix, start.remaining, start.threshold, start.matching)
            state = RadixState(*(t.clone().to(device) for t in tensors))
            on_device = [None if t is None else t.to(device) for t in (histogram, base, skipped, blocks)]
            if variant == "advance":
                advance(state, on_device[0], level, *on_device[1:], backend=name)
            elif variant == "within":
                moved_masks.append(
                    advance_within(state, on_device[0], level, *on_device[1:3], backend=name).cpu()
                )
            else:
                refine(state, on_device[0], level, blocks=on_device[3], backend=name)
            results.append(
                RadixState(
                    *(t.cpu() for t in (state.prefix, state.remaining, state.threshold, state.matching))
                )
            )
        for name in ("prefix", "remaining", "threshold", "matching"):
            assert_bitwise(
                getattr(results[1], name), getattr(results[0], name), f"trial {trial} {variant} {name}"
            )
        if variant == "within":
            assert_bitwise(moved_masks[1], moved_masks[0], f"trial {trial} moved blocks")
            outcomes.update(("hit" if hit else "miss") for hit in moved_masks[0][start.unresolved].tolist())
            continue
        moved = start.unresolved if blocks is None else start.unresolved & blocks
        outcomes.update(("resolved" if p == RESOLVED else "open") for p in results[0].prefix[moved].tolist())
    assert outcomes == {"resolved", "open", "hit", "miss"}, outcomes
