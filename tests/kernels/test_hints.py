"""Threshold hints: the C++ `ThresholdHint.after` against the torch reference.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import pytest
import torch
from dsforget.kernels import ThresholdHint, available_backends
from dsforget.kernels.moments import HINT_SHIFT
from helpers import assert_bitwise


def test_next_hint_in_cpp_matches_torch():
    """Catches a C++ hint whose center rounds a negative move towards zero instead of down, a
    reach that ignores the last reach or the cap, or a window not cut at prefix 0."""
    if "cpu" not in available_backends("cpu"):
        pytest.skip("no C++ compiler: the cpu backend is unavailable here")
    generator = torch.Generator().manual_seed(9)
    n = 500
    threshold = torch.randint(0, 1 << 31, (n,), generator=generator)
    threshold[:20] = torch.randint(0, 1 << 14, (20,), generator=generator)  # windows reaching below 0
    previous = ThresholdHint.around(
        (threshold >> HINT_SHIFT) + torch.randint(-300, 300, (n,), generator=generator),
        (threshold >> HINT_SHIFT) + torch.randint(-300, 300, (n,), generator=generator),
        torch.randint(-5, 700, (n,), generator=generator),
    )
    for before in (None, previous):
        expected = ThresholdHint.after(threshold, before, backend="torch")
        got = ThresholdHint.after(threshold, before, backend="cpu")
        for name in ("prefix", "center", "reach", "start", "width"):
            assert_bitwise(getattr(got, name), getattr(expected, name), name)
    assert bool((expected.start == 0).any() and (expected.width < 2 * expected.reach).any())
