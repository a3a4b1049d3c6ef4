"""The CPU backend's C++ extension: builds kernels/csrc/*.cpp with torch.utils.cpp_extension.load
and loads it (torch.ops.dsforget_cpu.<op>). Imports no op module: each op's .cpp registers its
own ops (`TORCH_LIBRARY_FRAGMENT`), and the op modules call them by keyword.

The build takes about 60 s on 2 cores, once per machine: it is cached under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). A compiler error names a real file
and line in kernels/csrc/.

Threads: `at::parallel_for`, i.e. PyTorch's own OpenMP pool (torch.get_num_threads()). The
extension is compiled with -fopenmp; without it at::parallel_for silently runs on one thread.
Vectorisation: plain loops that GCC vectorises at -O3. On x86-64 CPUs the library is built for
the ISA level torch uses (AVX-512 or AVX2+FMA), with flags the machine's compiler accepts, and
named by that level, so a cache shared by machines of different ISA levels never hands one a
binary it cannot run.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
# One .cpp per op; each compiles on its own (shared code lives in the headers).
SOURCES = ("moments.cpp", "histogram.cpp", "masked_update.cpp", "speculative.cpp", "radix.cpp", "hints.cpp")

# A build lock (torch's FileBaton, <build_dir>/lock) that stays this long is taken for the
# leftover of a killed build: torch itself would wait for it forever.
LOCK_TIMEOUT_ENV = "DSFORGET_BUILD_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 600.0
LOCK_POLL_S = 0.5

# -fno-math-errno and -fno-trapping-math (as PyTorch itself is built) let GCC vectorise sqrt and
# the branch-free selects; neither changes a result. -ffp-contract=off: no FMA the source does not
# ask for, so m and v round like ATen's lerp_/addcmul_ kernels (bit for bit on torch 2.13, AVX2).
FP_FLAGS = ["-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]


class CpuBuildError(RuntimeError):
    """The CPU extension cannot be built or loaded here; the message says why and what to do."""


def compiler() -> str:
    """The compiler torch.utils.cpp_extension calls: $CXX, default c++."""
    return os.environ.get("CXX", "c++")


@functools.cache
def _compiler_on_path(command: str) -> bool:
    return shutil.which(command) is not None


def no_compiler_message() -> str:
    return (
        f"no C++ compiler: {compiler()!r} ($CXX, default c++) is not on PATH. Install one (g++) "
        'or set CXX, or pass backend="torch" to use the plain PyTorch references'
    )


def compiler_available() -> bool:
    """Whether the compiler torch.utils.cpp_extension will call ($CXX, default c++) is on PATH.

    Cached per compiler: every op call checks its backend, and a PATH search costs ~30 us."""
    return _compiler_on_path(compiler())


@functools.cache
def compiler_accepts(command: str, flags: tuple[str, ...]) -> bool:
    """Whether `command` compiles an empty C++ file with `flags` (GCC < 11 rejects
    -march=x86-64-v4, for one). Cached per compiler and flags: one ~20 ms run each."""
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "empty.cpp"
        source.write_text("int main() { return 0; }\n")
        try:
            done = subprocess.run(
                [command, *flags, "-c", str(source), "-o", str(Path(scratch) / "empty.o")],
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
    return done.returncode == 0


def _isa_flags() -> tuple[str, list[str]]:
    # One binary per ISA level, named by it, keeps a shared build cache simple. AVX-512 where torch
    # uses it: the one-pass step's loop is compute-heavy enough for the width to show (16 Mi:
    # 17.6 -> 15.7 ms with 512-bit vectors); results are the same bit for bit (no FMA contraction,
    # and IEEE sqrt and division round alike at every width). Each level lists its spellings,
    # preferred first: the first one the compiler accepts is used, and a level none of whose
    # spellings it accepts falls to the next lower one.
    levels: list[tuple[str, list[list[str]]]] = []
    if platform.machine() in ("x86_64", "AMD64"):
        capability = torch.backends.cpu.get_cpu_capability()
        if capability == "AVX512":
            levels.append(
                (
                    "avx512",
                    [
                        ["-march=x86-64-v4", "-mprefer-vector-width=512"],
                        # GCC < 11: the same instruction sets by name
                        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"]
                        + ["-mprefer-vector-width=512"],
                    ],
                )
            )
        if capability in ("AVX512", "AVX2"):
            levels.append(("avx2", [["-mavx2", "-mfma"]]))
    for isa, spellings in levels:
        for flags in spellings:
            if compiler_accepts(compiler(), tuple(flags)):
                return isa, flags
    return "baseline", []


def extension_name(isa: str) -> str:
    """The extension's name, and so its build directory: by ISA level and by checkout. torch
    rebuilds an extension whose sources or include paths differ from its last build, so two
    checkouts (or installs) sharing one cache under a single name would rebuild it, ~1 min each,
    every time a process of the other one loads it."""
    checkout = hashlib.sha1(str(CSRC).encode()).hexdigest()[:8]
    return f"dsforget_cpu_{isa}_{checkout}"


def build_directory(name: str) -> Path:
    """Where torch.utils.cpp_extension builds the extension `name` (created if missing)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def lock_timeout_s() -> float:
    value = os.environ.get(LOCK_TIMEOUT_ENV, str(DEFAULT_LOCK_TIMEOUT_S))
    try:
        return float(value)
    except ValueError:
        raise CpuBuildError(f"{LOCK_TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def wait_for_build_lock(directory: Path, timeout_s: float) -> None:
    """Return once `directory`/lock is gone (another process's build finished); CpuBuildError
    naming the lock if it stays longer than `timeout_s` (a killed build left it, and torch's
    own wait for it never ends)."""
    lock = directory / "lock"
    deadline = time.monotonic() + timeout_s
    while lock.exists():
        if time.monotonic() >= deadline:
            raise CpuBuildError(
                f"the build lock {lock} has been held for more than {timeout_s:g} s: most likely a "
                f"killed build left it. If no other process is building the dsforget CPU kernels, "
                f"remove it (rm {lock}); {LOCK_TIMEOUT_ENV} sets how long to wait"
            )
        time.sleep(LOCK_POLL_S)


def wait_for_extension_lock(name: str) -> None:
    """The bounded wait of `wait_for_build_lock` for another JIT-built extension, e.g. DeepSpeed's
    `cpu_adam` (the benchmarks build it): torch's own wait for a lock a killed build left behind
    never ends (seen: a benchmark killed mid-build left cpu_adam's lock and every later one hung)."""
    wait_for_build_lock(build_directory(name), lock_timeout_s())


def compiler_error_summary(message: str, lines: int = 6) -> str:
    """The lines of a failed build's output that say what went wrong: from the compiler's first
    diagnostic (`file:line:column: error: ...`, or `fatal error:`) on, else the output's last lines
    (the command lines before it are long and say nothing)."""
    text = [line.rstrip() for line in message.splitlines() if line.strip()]
    first = next((i for i, line in enumerate(text) if "error:" in line), None)
    chosen = text[-lines:] if first is None else text[first : first + lines]
    return "\n".join(chosen)


_OPS: Any = None
_FAILURE: CpuBuildError | None = None


def cpu_ops() -> Any:
    """torch.ops.dsforget_cpu, building and loading the extension on first call; CpuBuildError
    (remembered: the build is not retried in this process) if that is not possible here."""
    global _OPS, _FAILURE
    if _OPS is not None:
        return _OPS
    if _FAILURE is not None:
        raise _FAILURE
    try:
        _OPS = _build_and_load()
    except CpuBuildError as error:
        _FAILURE = error
        raise
    return _OPS


def _build_and_load() -> Any:
    from torch.utils.cpp_extension import load

    if not compiler_available():
        raise CpuBuildError(no_compiler_message())
    isa, flags = _isa_flags()
    name = extension_name(isa)
    wait_for_build_lock(build_directory(name), lock_timeout_s())
    try:
        load(
            name=name,
            sources=[str(CSRC / source) for source in SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", *FP_FLAGS, "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (RuntimeError, OSError) as error:
        raise CpuBuildError(
            f"building the dsforget CPU kernels failed:\n{compiler_error_summary(str(error))}\n"
            'Fix the error above (or the compiler setup: g++ >= 9), or pass backend="torch" to use '
            "the plain PyTorch references"
        ) from error
    return torch.ops.dsforget_cpu
