"""Which implementation of the fused ops runs where.

- "torch":  the plain-PyTorch references (any device; one Python iteration per segment);
- "cpu":    the C++ extension for CPU tensors (ZeRO-Offload, CPU runs), built on first use;
- "triton": the Triton kernels, for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from ._cpu import compiler_available
from ._triton import triton_usable

BACKENDS = ("torch", "cpu", "triton")


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on tensors of `device`, references first."""
    device = torch.device(device)
    names = ["torch"]
    if device.type == "cpu" and compiler_available():
        names.append("cpu")
    if triton_usable(device):
        names.append("triton")
    return names


def default_backend(device: torch.device | str) -> str:
    """The fused backend of the device if usable ("triton" on CUDA, "cpu" on CPU; never the slow
    Triton interpreter), else the "torch" references."""
    device = torch.device(device)
    available = available_backends(device)
    preferred = "cpu" if device.type == "cpu" else "triton"
    return preferred if preferred in available else "torch"


def check_backend(op: str, backend: str, device: torch.device) -> None:
    """Raise ValueError naming the op and the usable backends unless `backend` can run on `device`."""
    available = available_backends(device)
    if backend not in available:
        known = "" if backend in BACKENDS else f" (known backends: {list(BACKENDS)})"
        raise ValueError(
            f"{op}: backend {backend!r} is not available for {device.type} tensors{known}; "
            f"available here: {available}"
        )
