"""Backends: the choice per device, errors for unknown or unusable backends and wrong buffers,
imports without Triton or a GPU, the top-level `kernels` name, and the CPU extension's build
(`resolve_backend`: missing compiler, failing build, stale build lock), and the fallbacks of
"auto" on CUDA tensors without Triton or CUDA.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from dsforget.kernels import (
    abs_histogram,
    available_backends,
    default_backend,
    level_bins,
    masked_adamw,
    resolve_backend,
    update_moments,
)
from dsforget.kernels._triton import INTERPRET, triton, triton_usable
from dsforget.kernels.masked_update import AdamWScalars
from helpers import BETA1, BETA2, UPDATE, build_shard, random_state, run_python


def test_backend_choice_per_device():
    """Catches the slow interpreter or the references being picked by default, and a CPU
    default that depends on Triton being installed."""
    cpu = available_backends("cpu")
    assert cpu[:2] == ["torch", "cpu"]
    assert default_backend("cpu") == "cpu"
    assert ("triton" in cpu) == (INTERPRET and triton is not None)
    expected_cuda = "triton" if triton_usable(torch.device("cuda")) else "torch"
    assert default_backend("cuda") == expected_cuda


@pytest.mark.parametrize("op", ["update_moments", "abs_histogram", "masked_adamw"])
def test_unknown_or_unusable_backend_is_a_clear_error(op):
    """Catches a typo silently running the slow reference, or Triton launched on CPU tensors
    without the interpreter; the message must name the op and the usable backends."""
    shard = build_shard([(100, 0, 10, 0, False)], "cpu")
    state = random_state(shard, seed=15)
    calls = {
        "update_moments": lambda backend: update_moments(
            state["grad"],
            state["exp_avg"],
            state["exp_avg_sq"],
            shard.table,
            beta1=BETA1,
            beta2=BETA2,
            backend=backend,
        ),
        "abs_histogram": lambda backend: abs_histogram(
            state["exp_avg"],
            shard.table,
            torch.zeros(1, dtype=torch.int64),
            0,
            torch.zeros(1, level_bins(0), dtype=torch.int64),
            backend=backend,
        ),
        "masked_adamw": lambda backend: masked_adamw(
            state["param"],
            state["exp_avg"],
            state["exp_avg_sq"],
            shard.table,
            torch.zeros(1, dtype=torch.int64),
            AdamWScalars(**UPDATE, weight_decay=0.0, decay_selected_only=False),
            backend=backend,
        ),
    }
    with pytest.raises(ValueError, match=rf"{op}: backend 'cuda' is not available .*\['torch', 'cpu'"):
        calls[op]("cuda")
    if not INTERPRET:
        with pytest.raises(ValueError, match=rf"{op}: backend 'triton' is not available for cpu tensors"):
            calls[op]("triton")


def test_wrong_buffers_are_refused():
    """Catches float64 state, non-contiguous views and wrong histogram shapes reaching the C++
    kernels, which read raw memory as fp32/int64."""
    shard = build_shard([(100, 0, 10, 0, False)], "cpu")
    state = random_state(shard, seed=16)
    common = dict(beta1=BETA1, beta2=BETA2, backend="cpu")
    with pytest.raises(ValueError, match="exp_avg has dtype torch.float64"):
        update_moments(state["grad"], state["exp_avg"].double(), state["exp_avg_sq"], shard.table, **common)
    with pytest.raises(ValueError, match="exp_avg_sq has shape"):
        strided = torch.rand(2 * shard.numel)[::2]
        update_moments(state["grad"], state["exp_avg"], strided, shard.table, **common)
    with pytest.raises(ValueError, match=r"histogram must be a contiguous int64 tensor of shape \(1, 2048\)"):
        histogram = torch.zeros(1, 1024, dtype=torch.int64)
        update_moments(
            state["grad"], state["exp_avg"], state["exp_avg_sq"], shard.table, histogram=histogram, **common
        )


def test_import_needs_neither_triton_nor_a_gpu():
    """Catches a module that imports triton unguarded: dsforget must import, pick the CPU
    backend and run it where Triton is absent."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, dsforget.kernels as k\n"
        "assert k.available_backends('cpu') == ['torch', 'cpu'], k.available_backends('cpu')\n"
        "assert k.default_backend('cuda') == 'torch'\n"
        "t = k.SegmentTable.build([(1, 5, 0, 1, k.DENSE, k.NO_ROWSCALE)], None, [])\n"
        "m, v = torch.zeros(7), torch.zeros(7)\n"
        "k.update_moments(torch.ones(7), m, v, t, beta1=0.9, beta2=0.999, backend='cpu')\n"
        "assert m[1:6].eq(0.1).all() and m[0] == 0 and m[6] == 0, m\n"
    )
    run_python(["-c", code], env={"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""})


def test_top_level_kernels_name_is_left_to_its_package():
    """Catches the checkout's kernels/ folder shadowing Hugging Face's `kernels` package when
    the checkout's root is on sys.path (python -m from it): transformers >= 5.25 imports that
    package while loading any model, and every model load from the root failed."""
    code = (
        "import importlib.metadata as metadata, pathlib, sys\n"
        "try:\n"
        "    metadata.version('kernels')\n"
        "except metadata.PackageNotFoundError:\n"
        "    try:\n"
        "        import kernels\n"
        "    except ModuleNotFoundError as error:\n"
        "        assert 'dsforget.kernels' in str(error), error\n"
        "    else:\n"
        "        raise AssertionError(f'imported {kernels.__file__}')\n"
        "else:\n"
        "    import kernels\n"
        "    assert pathlib.Path(sys.path[0] or '.').resolve() == pathlib.Path.cwd(), sys.path[0]\n"
        "    folder = pathlib.Path(kernels.__file__).resolve().parent\n"
        "    assert folder != pathlib.Path.cwd() / 'kernels', folder\n"
        "    import transformers.modeling_utils\n"
        "import dsforget.kernels as ours\n"
        "assert ours.topk_adamw_step.__module__ == 'dsforget.kernels.step', ours.topk_adamw_step.__module__\n"
    )
    run_python(["-c", code])


# -------------------------------------------------------------- building the CPU extension
# Each runs in a subprocess: the loader remembers a build (or its failure) for the process, and
# TORCH_EXTENSIONS_DIR points at a temporary folder so the real build cache is never touched.

CAPTURE_WARNINGS = (
    "import logging\n"
    "import dsforget.kernels as k\n"
    "from dsforget.kernels import _cpu\n"
    "warnings = []\n"
    "class Capture(logging.Handler):\n"
    "    def emit(self, record):\n"
    "        if record.levelno == logging.WARNING:\n"
    "            warnings.append(record.getMessage())\n"
    "logging.getLogger('dsforget').addHandler(Capture())\n"
)


def test_missing_compiler_is_a_warning_for_auto_and_an_error_for_cpu(tmp_path):
    """Catches a CPU run without a compiler silently taking the slow references (it was INFO at
    best, nothing at all in default_backend), a warning repeated every step, and backend="cpu"
    failing late, inside the first step, or without saying which compiler is missing."""
    code = CAPTURE_WARNINGS + (
        "assert k.resolve_backend('auto', 'cpu') == 'torch'\n"
        "assert k.resolve_backend('auto', 'cpu') == 'torch'\n"
        "assert k.default_backend('cpu') == 'torch'\n"
        "assert len(warnings) == 1, warnings\n"
        "assert 'no C++ compiler' in warnings[0] and 'no-such-c++' in warnings[0], warnings\n"
        "assert 'plain-PyTorch references' in warnings[0], warnings\n"
        "try:\n"
        "    k.resolve_backend('cpu', 'cpu')\n"
        "except RuntimeError as error:\n"
        "    assert 'no C++ compiler' in str(error) and 'backend=\"torch\"' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('backend cpu without a compiler must raise')\n"
        "assert k.resolve_backend('torch', 'cpu') == 'torch'\n"
    )
    run_python(["-c", code], env={"CXX": "/nonexistent/no-such-c++", "TORCH_EXTENSIONS_DIR": str(tmp_path)})


def test_failing_build_warns_with_the_compiler_error(tmp_path):
    """Catches a failed build of the CPU kernels being swallowed (auto quietly running the slow
    references) or reported without the compiler's message, which must name the real source
    file and line (the sources were once Python strings compiled as one main.cpp)."""
    code = CAPTURE_WARNINGS + (
        "import pathlib, shutil, sys\n"
        "csrc = pathlib.Path(sys.argv[1]) / 'csrc'\n"
        "shutil.copytree(_cpu.CSRC, csrc)\n"
        "with open(csrc / 'radix.cpp', 'a') as source:\n"
        "    source.write('int broken_on_purpose = name_that_is_not_declared;\\n')\n"
        "_cpu.CSRC, _cpu.SOURCES = csrc, ('radix.cpp',)\n"
        "assert k.resolve_backend('auto', 'cpu') == 'torch'\n"
        "assert len(warnings) == 1, warnings\n"
        "assert 'name_that_is_not_declared' in warnings[0] and 'radix.cpp:' in warnings[0], warnings\n"
        "try:\n"
        "    k.resolve_backend('cpu', 'cpu')\n"
        "except RuntimeError as error:\n"
        "    assert 'name_that_is_not_declared' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('backend cpu with a failing build must raise')\n"
    )
    run_python(["-c", code, str(tmp_path)], env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")})


def test_stale_build_lock_is_an_error_naming_the_lock(tmp_path):
    """Catches the first step hanging forever: torch's build waits without limit on the lock a
    killed build left behind. With a 1 s limit the loader must raise within seconds, naming the
    lock file to remove."""
    code = CAPTURE_WARNINGS + (
        "import pathlib, sys, time\n"
        "lock = pathlib.Path(sys.argv[1]) / _cpu.extension_name(_cpu._isa_flags()[0]) / 'lock'\n"
        "lock.parent.mkdir(parents=True)\n"
        "lock.touch()\n"
        "started = time.monotonic()\n"
        "try:\n"
        "    k.resolve_backend('cpu', 'cpu')\n"
        "except RuntimeError as error:\n"
        "    assert str(lock) in str(error) and 'rm ' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('a stale lock must raise')\n"
        "assert time.monotonic() - started < 10, time.monotonic() - started\n"
        "assert k.resolve_backend('auto', 'cpu') == 'torch'\n"
        "assert len(warnings) == 1 and str(lock) in warnings[0], warnings\n"
    )
    extensions = tmp_path / "extensions"
    env = {"TORCH_EXTENSIONS_DIR": str(extensions), "DSFORGET_BUILD_LOCK_TIMEOUT_S": "1"}
    run_python(["-c", code, str(extensions)], env=env, timeout=60)


def test_resolve_backend_on_a_working_machine():
    """Catches "auto" not choosing the fused CPU backend where it builds, and "torch"/"triton"
    not following the ops' own backend check."""
    if "cpu" not in available_backends("cpu"):
        pytest.skip("no C++ compiler: the cpu backend is unavailable here")
    assert resolve_backend("auto", "cpu") == "cpu"
    assert resolve_backend("cpu", "cpu") == "cpu"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="resolve_backend: backend 'cuda' is not available"):
        resolve_backend("cuda", "cpu")


def _triton_not_importable(monkeypatch) -> str:
    from dsforget.kernels import backends

    monkeypatch.setattr(backends, "triton", None)
    monkeypatch.setattr(backends, "TRITON_IMPORT_ERROR", "No module named 'triton'")
    return "Triton cannot be imported (No module named 'triton'): pip install dsforget[triton]"


def _cuda_absent(monkeypatch) -> str:
    from dsforget.kernels import backends

    monkeypatch.setattr(backends, "triton", object())  # imported fine; CUDA is what is missing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return "CUDA is not available"


@pytest.mark.parametrize("break_triton", [_triton_not_importable, _cuda_absent], ids=["no-triton", "no-cuda"])
def test_auto_on_cuda_falls_back_with_one_warning_and_explicit_triton_names_the_reason(
    monkeypatch, caplog, break_triton
):
    """Catches "auto" on CUDA tensors dropping to the references with an INFO line or a WARNING
    without the importer's message, repeated per resolution, and an explicit backend="triton"
    being replaced instead of refused with the same reason."""
    from dsforget.kernels import backends

    reason = break_triton(monkeypatch)
    monkeypatch.setattr(backends, "triton_usable", lambda device: False)
    monkeypatch.setattr(backends, "_WARNED", set())
    with caplog.at_level(logging.INFO, logger="dsforget"):
        for _ in range(3):
            assert resolve_backend("auto", "cuda") == "torch"
        assert default_backend("cuda") == "torch"
        with pytest.raises(ValueError, match=re.escape(reason)):
            resolve_backend("triton", "cuda")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert reason in warnings[0], warnings
    assert "backend \"auto\" wanted 'triton' for cuda tensors" in warnings[0], warnings
    assert "(backend 'torch') run instead" in warnings[0], warnings
