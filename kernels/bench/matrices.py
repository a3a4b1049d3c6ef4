"""Benchmark the drop-in optimizer over several separate weight matrices, each implementation in
its own process: the multi-tensor step against torch's fused AdamW.

    python -m dsforget.kernels.bench_model --matrices 6x2048              # issue 19's configuration
    python -m dsforget.kernels.bench_model --matrices 6x2048 --fraction 0.1 --steps 40 --timed 15
    python -m dsforget.kernels.bench_model --matrices 3x64 --tiny         # smoke run (the tests run it)
    python -m dsforget.kernels.bench_model --matrices 6x2048 --paired     # one process, steps alternate

The parameters are N matrices of D x D fp32 (an nn.ParameterList, no ZeRO, no DeepSpeed); every
implementation steps all of them: ``MoFOAdamW(model.named_parameters(), fraction=...)`` with its
multi-tensor step (mofo-<backend>) and, for comparison, one call per tensor (mofo-<backend>-per-
tensor); ``torch.optim.AdamW(fused=True)``. Each implementation runs in a process of its own
(a fresh allocator and thread pool: no implementation inherits another's memory or cache
state), taking --steps steps of which the last --timed are timed (by default steps 26-40). The
gradient stream is stationary: g = mean + noise, the mean fixed per matrix and the noise (same
scale) drawn fresh, untimed, before every step, so |m| and the MoFO thresholds settle and then
jitter as in a long fine-tune.

With --paired every implementation runs in this one process instead, on its own copy of the
matrices, and their steps alternate (the order rotated every step) with the same gradients: the
ratio then compares steps timed within milliseconds of each other, where the separate processes
can land in different phases of a shared machine (kernels/RESULTS.md, session 13: one process of
AdamW took 12.1 ms and the next 15.8 ms). Peak memory is not measured in that mode.

Columns: median step time with p20/p80 over the timed steps; the ratio to torch's fused AdamW;
peak extra memory in fp32 copies of the parameters beyond the Adam moments: the process's peak
resident memory over the steps (VmHWM, reset through /proc/self/clear_refs once the model, its
gradients and the optimizer's kernels are loaded) minus what was resident then, minus the two
moments (exp_avg, exp_avg_sq), divided by the parameters' bytes. It counts everything the
optimizer allocates, C++ buffers included (the one-pass step's list buffers are ~0.19 copies).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from ..backends import default_backend
from .flat import device_name, quantile, versions

LR, GRAD_SCALE = 1e-4, 1e-3
RESULT_PREFIX = "RESULT "  # the line a measuring process prints its result on


Factory = Callable[[list[tuple[str, torch.Tensor]]], torch.optim.Optimizer]


def implementations(fraction: float) -> dict[str, Factory]:
    import dsforget

    fused = default_backend(torch.device("cpu"))

    def mofo(multi_tensor: bool) -> Factory:
        return lambda named: dsforget.MoFOAdamW(
            named, lr=LR, fraction=fraction, backend=fused, multi_tensor=multi_tensor
        )

    return {
        f"mofo-{fused}": mofo(True),
        f"mofo-{fused}-per-tensor": mofo(False),
        "torch-adamw-fused": lambda named: torch.optim.AdamW([p for _, p in named], lr=LR, fused=True),
    }


def _resident_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _matrices(
    count: int, dim: int, generator: torch.Generator
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The initial weights and the fixed gradient means of the benchmark's matrices."""
    weights = [torch.randn(dim, dim, generator=generator) * 0.02 for _ in range(count)]
    return weights, [torch.randn(dim, dim, generator=generator) * GRAD_SCALE for _ in weights]


def _stepping(
    factory: Factory, weights: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """Parameters on `weights`, with zero gradients written now (their pages resident before a
    memory baseline: an empty tensor's are not, and the first step would count them), and the
    factory's optimizer over them with its kernels loaded."""
    params = [torch.nn.Parameter(weight) for weight in weights]
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer = factory([(f"layers.{i}.weight", param) for i, param in enumerate(params)])
    if hasattr(optimizer, "prepare_kernels"):
        optimizer.prepare_kernels()  # the C++ extension loaded before the first step
    return params, optimizer


def measure(name: str, count: int, dim: int, fraction: float, steps: int, timed: int, seed: int) -> dict:
    """One implementation in this process: times of its last `timed` steps, and its peak extra
    memory (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    weights, means = _matrices(count, dim, generator)
    noise = torch.zeros(dim, dim)  # written now, as the gradients (see _stepping)
    params, optimizer = _stepping(implementations(fraction)[name], weights)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    peak_reset = _reset_peak()
    baseline_kib = _resident_kib("VmRSS")
    times = []
    for step in range(1, steps + 1):
        for grad, mean in zip((p.grad for p in params), means, strict=True):
            noise.normal_(0.0, GRAD_SCALE, generator=generator)
            torch.add(mean, noise, out=grad)
        start = time.perf_counter()
        optimizer.step()
        elapsed = (time.perf_counter() - start) * 1e3
        if step > steps - timed:
            times.append(elapsed)
    peak_kib = _resident_kib("VmHWM")
    extra = (peak_kib - baseline_kib) * 1024 - 2 * param_bytes
    return {
        "name": name,
        "times": times,
        "peak_extra_copies": extra / param_bytes if peak_reset else None,
        "threads": torch.get_num_threads(),
    }


def measure_paired(count: int, dim: int, fraction: float, steps: int, timed: int, seed: int) -> list[dict]:
    """Every implementation in this process, each on its own copy of the matrices, their steps
    alternating (the order rotated every step) with the same gradients: times of the last
    `timed` steps of each (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    weights, means = _matrices(count, dim, generator)
    runs = []
    for name, factory in implementations(fraction).items():
        params, optimizer = _stepping(factory, [weight.clone() for weight in weights])
        runs.append((name, params, optimizer, []))
    noise = torch.zeros(dim, dim)
    for step in range(1, steps + 1):
        for index, mean in enumerate(means):
            noise.normal_(0.0, GRAD_SCALE, generator=generator)
            for _, params, _, _ in runs:
                torch.add(mean, noise, out=params[index].grad)
        for turn in range(len(runs)):
            _, _, optimizer, times = runs[(step + turn) % len(runs)]
            start = time.perf_counter()
            optimizer.step()
            if step > steps - timed:
                times.append((time.perf_counter() - start) * 1e3)
    threads = torch.get_num_threads()
    return [
        {"name": name, "times": times, "peak_extra_copies": None, "threads": threads}
        for name, *_, times in runs
    ]


def run_isolated(name: str, argv: list[str]) -> dict:
    """`measure` of `name` in a child process (the same command with --only NAME)."""
    command = [sys.executable, "-m", "dsforget.kernels.bench_model", *argv, "--only", name]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=os.environ.copy())
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"name": name, "failure": f"unavailable: exit {done.returncode}: {tail[0]}"[:200]}


def format_table(title: str, results: list[dict]) -> str:
    adamw = next((r for r in results if r["name"] == "torch-adamw-fused" and "times" in r), None)
    reference = statistics.median(adamw["times"]) if adamw else float("nan")
    lines = [
        title,
        "",
        "| implementation | median ms | p20–p80 ms | × AdamW fused | peak extra (fp32 copies) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        if "failure" in result:
            lines.append(f"| {result['name']} | {result['failure']} | | | |")
            continue
        times = result["times"]
        median = statistics.median(times)
        extra = result["peak_extra_copies"]
        lines.append(
            f"| {result['name']} | {median:.2f} | {quantile(times, 0.2):.2f}–{quantile(times, 0.8):.2f} | "
            f"{median / reference:.2f} | {'n/a' if extra is None else f'{extra:.3f}'} |"
        )
    return "\n".join(lines)


def main(
    matrices: str,
    fraction: float,
    steps: int,
    timed: int,
    only: str | None,
    argv: list[str],
    paired: bool = False,
) -> int:
    count, dim = (int(part) for part in matrices.lower().split("x"))
    if only is not None:
        result = measure(only, count, dim, fraction, steps, timed, seed=0)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    device = torch.device("cpu")
    print(
        f"# dsforget optimizer benchmark: {device_name(device)}; "
        + ", ".join(f"{k} {v}" for k, v in versions().items())
        + f"; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if paired:
        results = measure_paired(count, dim, fraction, steps, timed, seed=0)
        how = "all implementations in one process, their steps alternating (peak memory not measured)"
    else:
        results = [run_isolated(name, argv) for name in implementations(fraction)]
        how = "each implementation in its own process"
    title = (
        f"### {count} matrices of {dim} x {dim} fp32 ({count * dim * dim / 1e6:.1f} M parameters), "
        f"fraction {fraction}, no ZeRO; steps {steps - timed + 1}-{steps} timed, {how}"
    )
    print("\n" + format_table(title, results), flush=True)
    return 0
