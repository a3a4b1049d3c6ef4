"""Benchmark one optimizer step on a flat fp32 shard: MoFO implementations against AdamW.

    python -m dsforget.kernels.bench                       # default sizes for the device
    python -m dsforget.kernels.bench --sizes 1M,4M --csv bench.csv
    python -m dsforget.kernels.bench --tiny                # smoke run (the tests run it)
    python -m dsforget.kernels.bench --triton-sweep        # Triton launch parameters (sweep.py)

The shard looks like a ZeRO partition of a transformer: square weight matrices (one top-k block
each, fraction 0.15) and norm vectors (DENSE) back to back with a few padding elements after
each segment, the first matrix entering mid-row. Implementations, all on the same shard:

- mofo-reference:  the MoFO reference code's step (per parameter: lerp/addcmul, torch.topk of
                   |m| for the threshold, torch.where mask, addcdiv);
- dsforget-torch:  kernels.step.topk_adamw_step on the plain-PyTorch references;
- dsforget-cpu / dsforget-triton: the fused backend of the device (on the CPU the one-pass
                   step, kernels/speculative.py);
- dsforget-cpu-two-pass: the CPU backend's two-pass step (moments, then the update), which the
                   one-pass step replaces with the same result bit for bit;
- torch-adamw-fused / -foreach: torch.optim.AdamW on the whole flat tensor (dense baselines;
                   "x AdamW" is relative to the fused one);
- deepspeed-cpu-adam / deepspeed-fused-adam: DeepSpeed's own dense Adam for the device, as
                   ZeRO(-Offload) runs it.

Columns: median step time with p20/p80; GB/s counts 28 B per element for every row (read p, g,
m, v; write p, m, v: the least any Adam-family step moves), so GB/s ranks speed on one scale;
the two-pass exact-mode MoFO step needs at least 36 B (moments 20, update 16) in a step whose
threshold hints hit, and 44-48 B when a threshold leaves its hint's window (extra passes over
m), so at most 28/36 = 78% of AdamW's GB/s at equal efficiency, and 16/24 = 67% on a machine
whose time goes to reads (it reads 24 B, Adam 16). The one-pass step moves Adam's 28 B when
hints hit, plus its lists (~28 B per window entry, 0.3-1% of the entries). The timed steps carry
their hints from step to step as the optimizer does (dsforget's after SETTLE_STEPS untimed ones
per turn, when its threshold windows have narrowed as in a long run), and every step gets a
fresh gradient (drawn untimed; m starts stationary, see initial_state), so thresholds jitter as
in a long fine-tune. The implementations take turns in rounds (run_rounds), so that the ratios
hold on a shared machine whose speed varies. "% copy" relates that to a measured copy (8 B per
element). Peak extra memory: on GPU
torch.cuda.max_memory_allocated above the live state; on CPU the peak of live torch allocations
during one step, from the profiler's per-op memory records (allocations inside C++ extensions
are not seen; dsforget's are 64 KiB of counters and digit scratch per thread, and 24 B per
deferred entry: index, block, m, v); the one-pass step's list buffers, kept between steps
(~0.75 B per element, kernels/speculative.py), are allocated before the timed steps and not
counted here. Max error: largest |p - p_ref| after one step from the same
state; p_ref is dsforget-torch (fp32) for the MoFO rows and torch.optim.AdamW(foreach=False) for
the dense rows.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from .._cpu import wait_for_extension_lock
from ..backends import default_backend
from ..segments import DENSE, NO_ROWSCALE, SegmentTable
from ..step import topk_adamw_step

LR, BETA1, BETA2, EPS, WEIGHT_DECAY, FRACTION = 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.15
FIRST_STEP = 10  # the state has taken 9 steps: bias corrections away from their step-1 extremes
GRAD_SCALE = 1e-3  # standard deviation of every gradient entry
GRADIENT_SEEDS = 1000  # the rounds' fresh gradients: not the initial state's seed (0), whose
# first draws they would repeat, correlated with m
STEP_BYTES_PER_ELEMENT = 28
COPY_BYTES_PER_ELEMENT = 8
PADDING = 5  # elements after each segment, never touched by the MoFO implementations
ROUNDS = 5  # turns the implementations take (see run_rounds)
# untimed steps before dsforget's timed ones in every turn: its threshold windows start wide (a
# turn's first step has none) and narrow over ~10 steps, as at the start of any run (16 Mi here:
# steps 2-10 ~9% slower than steps 21-60); the dense steps need one, for caches
SETTLE_STEPS = 20

Step = Callable[[], None]


@dataclass
class Shard:
    numel: int
    table: SegmentTable
    rows: list[tuple[int, int, int, int, int, int]]
    block_k: list[int]


@dataclass
class State:
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int

    def clone(self) -> State:
        tensors = (t.clone() for t in (self.param, self.grad, self.exp_avg, self.exp_avg_sq))
        return State(*tensors, step=self.step)


def build_shard(numel: int, device: torch.device) -> Shard:
    """Square matrices (top-k blocks) and norms (DENSE), each followed by PADDING elements."""
    row_len = 1024 if numel >= 1 << 20 else 32
    rows: list[tuple[int, int, int, int, int, int]] = []
    block_k: list[int] = []
    offset, kind = 0, 0
    param_offset = row_len // 2 + 1  # the shard enters its first matrix mid-row, as ZeRO cuts it
    while offset < numel - PADDING:
        is_matrix = kind % 2 == 0
        length = min((row_len * row_len if is_matrix else row_len) - param_offset, numel - PADDING - offset)
        block = len(block_k) if is_matrix else DENSE
        rows.append((offset, length, param_offset, row_len, block, NO_ROWSCALE))
        if is_matrix:
            block_k.append(max(1, math.floor(FRACTION * length)))
        offset += length + PADDING
        kind, param_offset = kind + 1, 0
    return Shard(numel, SegmentTable.build(rows, None, block_k, device=device), rows, block_k)


def initial_state(numel: int, device: torch.device, seed: int = 0) -> State:
    """A state as Adam leaves it after many steps of noisy gradients: m drawn from its stationary
    distribution for i.i.d. N(0, GRAD_SCALE^2) gradients (variance (1 - beta1) / (1 + beta1) of
    theirs), so that |m|'s quantiles, the thresholds, only jitter from step to step."""
    generator = torch.Generator().manual_seed(seed)

    def normal(scale: float) -> torch.Tensor:
        return (torch.randn(numel, generator=generator) * scale).to(device)

    exp_avg = normal(GRAD_SCALE * math.sqrt((1 - BETA1) / (1 + BETA1)))
    # v >= m^2, as in training (v averages g^2, m averages g): |m|/sqrt(v) <= 1, no update blows
    # up from an independent, near-zero v
    exp_avg_sq = exp_avg.square() + normal(GRAD_SCALE).square_()
    return State(normal(0.02), normal(GRAD_SCALE), exp_avg, exp_avg_sq, step=FIRST_STEP - 1)


def fresh_gradients(state: State, seed: int) -> Callable[[], None]:
    """Refills state.grad with new noise in place (run between timed steps, untimed): every
    implementation sees the same sequence for the same seed."""
    generator = torch.Generator(state.grad.device).manual_seed(seed)
    return lambda: state.grad.normal_(0.0, GRAD_SCALE, generator=generator)


def bias_corrections(step: int) -> tuple[float, float]:
    return 1 - BETA1**step, 1 - BETA2**step


def mofo_reference_step(shard: Shard, state: State) -> Step:
    """The MoFO reference code's step, one parameter (segment) at a time."""
    views = []
    for shard_offset, length, _, _, block, _ in shard.rows:
        span = slice(shard_offset, shard_offset + length)
        k = None if block == DENSE else shard.block_k[block]
        views.append((state.param[span], state.grad[span], state.exp_avg[span], state.exp_avg_sq[span], k))

    def step() -> None:
        state.step += 1
        bias_correction1, bias_correction2 = bias_corrections(state.step)
        step_size = LR / bias_correction1
        for p, g, m, v, k in views:
            p.mul_(1 - LR * WEIGHT_DECAY)
            m.lerp_(g, 1 - BETA1)
            v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
            denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(EPS)
            if k is None:
                p.addcdiv_(m, denom, value=-step_size)
                continue
            threshold = torch.topk(m.abs(), k)[0].min()
            p.addcdiv_(torch.where(m.abs() >= threshold, m, 0), denom, value=-step_size)

    return step


def dsforget_step(backend: str, speculate: bool = True) -> Callable[[Shard, State], Step]:
    """dsforget's step (kernels.step.topk_adamw_step), carrying its threshold hints between steps."""

    def setup(shard: Shard, state: State) -> Step:
        hint: list[torch.Tensor | None] = [None]

        def step() -> None:
            state.step += 1
            hint[0] = topk_adamw_step(
                state.param,
                state.grad,
                state.exp_avg,
                state.exp_avg_sq,
                shard.table,
                step=state.step,
                lr=LR,
                betas=(BETA1, BETA2),
                eps=EPS,
                weight_decay=WEIGHT_DECAY,
                decay_selected_only=False,
                hint=hint[0],
                backend=backend,
                speculate=speculate,
            )

        return step

    return setup


def torch_adamw_step(**flavour: bool) -> Callable[[Shard, State], Step]:
    """torch.optim.AdamW over the whole flat tensor, its state seeded with ours."""

    def setup(shard: Shard, state: State) -> Step:
        param = torch.nn.Parameter(state.param)  # shares storage with state.param
        param.grad = state.grad
        optimizer = torch.optim.AdamW(
            [param], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WEIGHT_DECAY, **flavour
        )
        step_dtype_device = {
            "dtype": torch.float32,
            "device": param.device if flavour.get("fused") else "cpu",
        }
        optimizer.state[param] = {
            "step": torch.tensor(float(state.step), **step_dtype_device),
            "exp_avg": state.exp_avg,
            "exp_avg_sq": state.exp_avg_sq,
        }
        return optimizer.step

    return setup


def deepspeed_adam_step(shard: Shard, state: State) -> Step:
    """DeepSpeed's own dense Adam for the device: DeepSpeedCPUAdam, or FusedAdam on GPU."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    param = torch.nn.Parameter(state.param)
    param.grad = state.grad
    hyper = {"lr": LR, "betas": (BETA1, BETA2), "eps": EPS, "weight_decay": WEIGHT_DECAY}
    if param.device.type == "cpu":
        wait_for_extension_lock("cpu_adam")  # DeepSpeed JIT-builds it under torch's unbounded lock
        optimizer = DeepSpeedCPUAdam([param], adamw_mode=True, **hyper)
    else:
        optimizer = FusedAdam([param], adam_w_mode=True, **hyper)
    optimizer.state[param] = {"step": state.step, "exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq}
    return optimizer.step


@dataclass
class Result:
    implementation: str
    status: str = "ok"
    median_ms: float = math.nan
    p20_ms: float = math.nan
    p80_ms: float = math.nan
    peak_extra_mb: float = math.nan
    max_abs_error: float = math.nan


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    step: Step,
    device: torch.device,
    repeats: int,
    between: Callable[[], object] | None = None,
    warmup: int = 1,
) -> list[float]:
    """Milliseconds of each of `repeats` steps after `warmup` untimed ones; `between` runs
    untimed before each step (warm-up steps included)."""
    times = []
    for index in range(warmup + repeats):
        if between is not None and index > 0:
            between()
            synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def peak_extra_mb(step: Step, device: torch.device) -> float:
    """MiB allocated above the live state at the peak of one step (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with kineto_banner_hidden(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    live = peak = 0
    # an op's self memory is what it left allocated; "[memory]" records are frees outside ops
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


@contextlib.contextmanager
def kineto_banner_hidden() -> Iterator[None]:
    """Kineto writes two "profiler_start/stop" lines straight to fd 2 per profile: hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quantile(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def take_turns(
    names: list[str], run_turn: Callable[[str, int], list[float]]
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Times of `run_turn(name, round)` for every implementation over ROUNDS rounds, the
    implementations taking turns within each round: a slow spell of a shared machine (other
    jobs, memory bandwidth lent to other VMs) then hits all of them alike and the ratios between
    them stay meaningful. An implementation that raises is reported (why) and not run again."""
    times: dict[str, list[float]] = {name: [] for name in names}
    failures: dict[str, str] = {}
    for round_index in range(ROUNDS):
        for name in names:
            if name in failures:
                continue
            try:
                times[name] += run_turn(name, round_index)
            except Exception as failure:  # a baseline that cannot build or run here is reported, not fatal
                message = str(failure).strip().splitlines()
                first_line = message[0] if message else ""
                failures[name] = f"unavailable: {type(failure).__name__}: {first_line}"[:200]
    return times, failures


def run_rounds(
    implementations: list[tuple[str, Callable[[Shard, State], Step], torch.Tensor]],
    shard: Shard,
    initial: State,
    repeats: int,
) -> list[Result]:
    """Time `repeats` steps of every implementation (take_turns); each turn starts from a fresh
    copy of the initial state, and one copy is alive at a time."""
    device = initial.param.device
    per_round = max(1, math.ceil(repeats / ROUNDS))
    setups = {name: (setup, reference) for name, setup, reference in implementations}
    errors: dict[str, float] = {}
    peaks: dict[str, float] = {}

    def run_turn(name: str, round_index: int) -> list[float]:
        setup, reference = setups[name]
        state = initial.clone()
        step = setup(shard, state)
        if round_index == 0:
            step()
            synchronize(device)
            errors[name] = (state.param - reference).abs().max().item()
        times = time_step(
            step,
            device,
            per_round,
            between=fresh_gradients(state, GRADIENT_SEEDS + round_index),
            warmup=SETTLE_STEPS if name.startswith("dsforget-") else 1,  # the steps with hints
        )
        if round_index == ROUNDS - 1:
            peaks[name] = peak_extra_mb(step, device)
        return times

    times, failures = take_turns(list(setups), run_turn)
    results = []
    for name, _, _ in implementations:
        if name in failures:
            results.append(Result(name, status=failures[name]))
            continue
        results.append(
            Result(
                name,
                median_ms=statistics.median(times[name]),
                p20_ms=quantile(times[name], 0.2),
                p80_ms=quantile(times[name], 0.8),
                peak_extra_mb=peaks[name],
                max_abs_error=errors[name],
            )
        )
    return results


def reference_param(setup: Callable[[Shard, State], Step], shard: Shard, initial: State) -> torch.Tensor:
    state = initial.clone()
    setup(shard, state)()
    return state.param


def copy_gb_per_s(numel: int, device: torch.device, repeats: int) -> float:
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    times = time_step(lambda: target.copy_(source), device, repeats)
    return COPY_BYTES_PER_ELEMENT * numel / statistics.median(times) / 1e6


def bench_size(numel: int, device: torch.device, repeats: int) -> tuple[list[Result], float]:
    shard = build_shard(numel, device)
    initial = initial_state(numel, device)
    mofo_reference = reference_param(dsforget_step("torch"), shard, initial)
    dense_reference = reference_param(torch_adamw_step(foreach=False), shard, initial)
    fused = default_backend(device)
    implementations: list[tuple[str, Callable[[Shard, State], Step], torch.Tensor]] = [
        ("mofo-reference", mofo_reference_step, mofo_reference),
        ("dsforget-torch", dsforget_step("torch"), mofo_reference),
    ]
    if fused != "torch":
        implementations.append((f"dsforget-{fused}", dsforget_step(fused), mofo_reference))
    if fused == "cpu":  # the step the one-pass step replaces (results identical)
        implementations.append(
            ("dsforget-cpu-two-pass", dsforget_step(fused, speculate=False), mofo_reference)
        )
    implementations += [
        ("torch-adamw-fused", torch_adamw_step(fused=True), dense_reference),
        ("torch-adamw-foreach", torch_adamw_step(foreach=True), dense_reference),
        (
            "deepspeed-cpu-adam" if device.type == "cpu" else "deepspeed-fused-adam",
            deepspeed_adam_step,
            dense_reference,
        ),
    ]
    return run_rounds(implementations, shard, initial, repeats), copy_gb_per_s(numel, device, repeats)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "deepspeed"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            found[module] = "not installed"
    return found


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def default_sizes(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return [1 << 20, 4 << 20, 16 << 20]
    # ~48 B per element alive at once: initial and working state (2 x 16 B), two reference
    # parameters, and the MoFO reference's per-parameter temporaries.
    budget = torch.cuda.get_device_properties(device).total_memory * 0.9
    return [n for n in (16 << 20, 128 << 20, 1 << 30) if 48 * n <= budget]


def format_table(numel: int, results: list[Result], copy_rate: float, device: str) -> str:
    adamw = next((r.median_ms for r in results if r.implementation == "torch-adamw-fused"), math.nan)
    lines = [
        f"### {numel:,} elements ({numel / 2**20:g} Mi) on {device}; copy {copy_rate:.1f} GB/s",
        "",
        "| implementation | median ms | p20–p80 ms | GB/s | % copy | × AdamW | peak extra MiB "
        "| max abs err |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.implementation} | {r.status} | | | | | | |")
            continue
        rate = STEP_BYTES_PER_ELEMENT * numel / r.median_ms / 1e6
        lines.append(
            f"| {r.implementation} | {r.median_ms:.2f} | {r.p20_ms:.2f}–{r.p80_ms:.2f} | {rate:.1f} | "
            f"{100 * rate / copy_rate:.0f}% | {r.median_ms / adamw:.2f} | {r.peak_extra_mb:.1f} | "
            f"{r.max_abs_error:.1e} |"
        )
    return "\n".join(lines)


def csv_rows(numel: int, results: list[Result], copy_rate: float, device: str) -> list[dict[str, object]]:
    adamw = next((r.median_ms for r in results if r.implementation == "torch-adamw-fused"), math.nan)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for r in results:
        rate = STEP_BYTES_PER_ELEMENT * numel / r.median_ms / 1e6
        rows.append(
            {
                "date": stamp,
                "device": device,
                **versions(),
                "numel": numel,
                "implementation": r.implementation,
                "status": r.status,
                "median_ms": r.median_ms,
                "p20_ms": r.p20_ms,
                "p80_ms": r.p80_ms,
                "gb_per_s": rate,
                "copy_gb_per_s": copy_rate,
                "fraction_of_copy": rate / copy_rate,
                "ratio_to_adamw": r.median_ms / adamw,
                "peak_extra_mib": r.peak_extra_mb,
                "max_abs_error": r.max_abs_error,
            }
        )
    return rows


# the command line that runs this module (what --help prints in its usage line)
PROG = "python -m dsforget.kernels.bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help="comma-separated element counts, K/M/G suffixes allowed (e.g. 1M,4M)")
    parser.add_argument("--tiny", action="store_true", help="one small size, 1 step a round: a smoke run")
    parser.add_argument(
        "--repeats",
        type=int,
        default=30,
        help=f"timed steps per implementation, over {ROUNDS} rounds (default 30)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", help="append one row per result to this CSV file")
    parser.add_argument(
        "--triton-sweep",
        action="store_true",
        help="instead: time each Triton kernel over a grid of (TILE, num_warps) at --sizes "
        "(CUDA only; see kernels/bench/sweep.py), to fill tiles.TRITON_LAUNCH",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.triton_sweep:
        from . import sweep  # (it imports this module)

        sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else None
        return sweep.run(sizes, device, args.repeats, device_name(device))
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU ops, before it is imported
    sizes = [5003] if args.tiny else [parse_size(s) for s in args.sizes.split(",")] if args.sizes else None
    sizes = sizes or default_sizes(device)
    repeats = 1 if args.tiny else args.repeats
    name = device_name(device)
    print(f"# dsforget kernel benchmark: {name}; " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        # other processes on these cores show up as noise (wide p20-p80): say how busy they were
        print(f"# load average at start (1/5/15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for numel in sizes:
        results, copy_rate = bench_size(numel, device, repeats)
        print("\n" + format_table(numel, results, copy_rate, name), flush=True)
        if args.csv:
            rows = csv_rows(numel, results, copy_rate, name)
            new_file = not os.path.exists(args.csv) or os.path.getsize(args.csv) == 0
            with open(args.csv, "a", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                if new_file:
                    writer.writeheader()
                writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
