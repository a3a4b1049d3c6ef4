"""Which implementation of the fused ops runs where.

- "torch":  the plain-PyTorch references (any device; one Python iteration per segment);
- "cpu":    the C++ extension for CPU tensors (ZeRO-Offload, CPU runs), built on first use;
- "triton": the Triton kernels, for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

A fused backend that is wanted but cannot run is never dropped silently: `resolve_backend("auto")`
and `default_backend` log a WARNING (logger "dsforget", once per process and reason) naming the
backend wanted, the one used instead ("torch") and why (the compiler's or importer's message).
A backend the caller asked for by name is honoured or refused with that reason, never replaced.
"""

from __future__ import annotations

import logging

import torch

from ._cpu import CpuBuildError, compiler_available, cpu_ops, no_compiler_message
from ._triton import TRITON_IMPORT_ERROR, triton, triton_usable

BACKENDS = ("torch", "cpu", "triton")

logger = logging.getLogger("dsforget")

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def _falling_back(device: torch.device, backend: str, reason: str) -> None:
    # Once per process and reason: every optimizer (and every step) resolves its backend again,
    # and one line per construction would bury the reason under repeats.
    _warn_once(
        f'dsforget kernels: backend "auto" wanted {backend!r} for {device.type} tensors, but it cannot '
        f"run here ({reason}); the slower plain-PyTorch references (backend 'torch') run instead"
    )


def _triton_missing_reason(device: torch.device) -> str:
    """Why the Triton kernels cannot run on `device` (only asked when `triton_usable` is False)."""
    if triton is None:
        return f"Triton cannot be imported ({TRITON_IMPORT_ERROR}): pip install dsforget[triton]"
    if device.type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"CUDA is not available: torch {torch.__version__} was built without CUDA"
        return f"CUDA is not available: torch (CUDA {torch.version.cuda}) finds no usable device or driver"
    return f"Triton kernels do not run on {device.type} tensors (set TRITON_INTERPRET=1 for the interpreter)"


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on tensors of `device`, references first ("cpu": a compiler is
    there; whether the extension builds is known once `resolve_backend` or an op tried)."""
    device = torch.device(device)
    names = ["torch"]
    if device.type == "cpu" and compiler_available():
        names.append("cpu")
    if triton_usable(device):
        names.append("triton")
    return names


def default_backend(device: torch.device | str) -> str:
    """The fused backend of the device if usable ("triton" on CUDA, "cpu" on CPU; never the slow
    Triton interpreter), else the "torch" references (with a WARNING saying why, once)."""
    device = torch.device(device)
    available = available_backends(device)
    preferred = "cpu" if device.type == "cpu" else "triton"
    if preferred in available:
        return preferred
    if device.type == "cpu":
        _falling_back(device, "cpu", no_compiler_message())
    elif device.type == "cuda":
        _falling_back(device, "triton", _triton_missing_reason(device))
    return "torch"


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """The backend the ops will run with for tensors of `device`, decided (and, for "cpu", the C++
    extension built and loaded) now, before any step, where a failure is visible.

    requested "auto": the device's fused backend ("cpu" on CPU, "triton" on CUDA) if it can run,
    else "torch" with a WARNING (logger "dsforget", once per process and reason) that names the
    reason: no compiler, the compiler's error, Triton missing.
    requested "cpu": "cpu", or RuntimeError with the reason and the fix if the extension cannot
    be built here. "torch", "triton": returned if usable on `device`, else ValueError naming the
    usable backends (as every op does).
    """
    device = torch.device(device)
    if requested == "auto":
        if device.type == "cpu":
            try:
                cpu_ops()
            except CpuBuildError as error:
                _falling_back(device, "cpu", str(error))
                return "torch"
            return "cpu"
        return default_backend(device)
    if requested == "cpu" and device.type == "cpu":
        try:
            cpu_ops()
        except CpuBuildError as error:
            raise RuntimeError(f'backend "cpu" was requested, but {error}') from error
        return "cpu"
    check_backend("resolve_backend", requested, device)
    return requested


def check_backend(op: str, backend: str, device: torch.device) -> None:
    """Raise ValueError naming the op and the usable backends unless `backend` can run on `device`."""
    available = available_backends(device)
    if backend not in available:
        known = "" if backend in BACKENDS else f" (known backends: {list(BACKENDS)})"
        why = f" ({_triton_missing_reason(device)})" if backend == "triton" else ""
        raise ValueError(
            f"{op}: backend {backend!r} is not available for {device.type} tensors{known}{why}; "
            f"available here: {available}"
        )
