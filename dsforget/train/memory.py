"""Peak memory of every rank over the whole run, for report.json: what a run needed, so that a
user sizing a larger one (and launch/memory_bench.py) can read it off; and glibc's malloc kept
from hoarding freed tensors on CPU ranks (``return_freed_memory``).

Host memory is the process's peak resident set (``getrusage``: it covers loading, training,
evaluation and export, and nothing the process did not touch); accelerator memory is the peak
of tensors allocated on the rank's device (DeepSpeed's accelerator API), absent on CPU ranks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import sys
from typing import Any

import torch

logger = logging.getLogger("dsforget")

_M_MMAP_THRESHOLD = -3  # mallopt parameter, glibc's malloc.h
_GLIBC_DEFAULT_MMAP_THRESHOLD = 128 * 1024


def return_freed_memory() -> bool:
    """On CPU ranks with glibc: keep malloc's mmap threshold at its default 128 KiB, so that every
    larger block (tensors) is its own mapping and goes back to the system when freed. Returns
    whether it was set.

    glibc raises the threshold each time such a block is freed (up to 32 MiB), after which
    blocks of the sizes training frees and allocates again every step (gathered ZeRO-3
    parameters, per-module gradients) come from the heap, which fragments and only grows:
    measured with launch/memory_bench.py on 2 CPU ranks under ZeRO-3, the training peak was
    21.7 B/param with the threshold moving and 11.7 B/param with it fixed. A user's own
    ``MALLOC_MMAP_THRESHOLD_`` (read by glibc at start-up) is left as it is.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        done = (
            ctypes.CDLL(ctypes.util.find_library("c")).mallopt(
                _M_MMAP_THRESHOLD, _GLIBC_DEFAULT_MMAP_THRESHOLD
            )
            == 1
        )
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        done = False
    if done:
        logger.info(
            "malloc: mmap threshold fixed at 128 KiB on this CPU rank (freed tensors go back to the system)"
        )
    return done


def peak_memory() -> tuple[int, int | None]:
    """(peak host resident bytes, peak accelerator bytes or None on CPU) of this process so far."""
    from deepspeed.accelerator import get_accelerator

    kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    host = kib_or_bytes if sys.platform == "darwin" else kib_or_bytes * 1024  # bytes on macOS, KiB elsewhere
    accelerator = get_accelerator()
    device = None if accelerator.device_name() == "cpu" else int(accelerator.max_memory_allocated())
    return host, device


class PeakMarks:
    """The host peak reached by the end of each phase of the run (``mark`` after each): the peak
    is a high-water mark, so the first phase whose mark reaches the final peak is where it was."""

    def __init__(self) -> None:
        self.marks: dict[str, int] = {}

    def mark(self, phase: str) -> None:
        self.marks[phase] = peak_memory()[0]


def peak_memory_of_ranks(world: int, marks: PeakMarks | None = None) -> dict[str, Any]:
    """Every rank's `peak_memory` in rank order, and with `marks` the host peak by the end of each
    phase (one all-gather). Collective."""
    from deepspeed.accelerator import get_accelerator

    host, device = peak_memory()
    phases = dict(marks.marks) if marks is not None else {}
    mine = torch.tensor([host, -1 if device is None else device, *phases.values()], dtype=torch.int64)
    mine = mine.to(get_accelerator().current_device_name())
    everyone = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(everyone, mine)
    rows = [row.tolist() for row in everyone]
    result: dict[str, Any] = {
        "host_peak_bytes": [row[0] for row in rows],
        "accelerator_peak_bytes": None if device is None else [row[1] for row in rows],
    }
    if phases:
        result["host_peak_bytes_by_end_of"] = {
            phase: [row[2 + index] for row in rows] for index, phase in enumerate(phases)
        }
    return result
