"""Benchmark optimizer steps over a whole model's parameters: MoFO against AdamW.

    python -m dsforget.kernels.bench_model                           # Llama, 8 x 512, vocab 32000
    python -m dsforget.kernels.bench_model --layers 16 --hidden 1024
    python -m dsforget.kernels.bench_model --tiny                    # smoke run (the tests run it)
    python -m dsforget.kernels.bench_model --matrices 6x2048         # N separate D x D matrices,
                                                                     # one process each: matrices.py
    python -m dsforget.kernels.bench_model --matrices 6x2048 --paired  # the same, steps alternating
                                                                       # in one process

Where `python -m dsforget.kernels.bench` times one flat shard (what ZeRO hands the optimizer),
this times `optimizer.step()` over every parameter tensor of a LlamaForCausalLM built from a
config (random weights, nothing downloaded), as a single process without ZeRO steps them: one
multi-tensor call for dsforget on the "cpu" backend (one call per tensor on the others), one for
torch's fused AdamW. Implementations:

- mofo-<backend>: dsforget.MoFOAdamW(model.named_parameters(), fraction=0.15) (norms and
  biases dense, as the MoFO reference code); exact top-k per parameter;
- torch-adamw-fused / -foreach: torch.optim.AdamW over the same parameters;
- deepspeed-cpu-adam / deepspeed-fused-adam: DeepSpeed's own Adam for the device.

Every step gets fresh gradients (drawn untimed); the implementations take turns in rounds as in
flat.py, each round from a new optimizer whose first --warmup steps are not timed: m starts at
zero, and over its first ~20 steps the thresholds of |m| grow fast enough that MoFO's threshold
windows miss (each miss costs one or two extra passes over m), as at the start of any run.
Columns: median step time with p20/p80, and the ratio to torch's fused AdamW.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from .._cpu import wait_for_extension_lock
from ..backends import default_backend
from .flat import ROUNDS, device_name, quantile, synchronize, take_turns, versions

LR, FRACTION, GRAD_SCALE = 1e-4, 0.15, 1e-3


def build_model(layers: int, hidden: int, vocab: int, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
    )
    return LlamaForCausalLM(config).to(device)


def make_optimizers(
    model: torch.nn.Module, device: torch.device
) -> list[tuple[str, Callable[[], torch.optim.Optimizer]]]:
    """(name, factory) per implementation; each factory builds a fresh optimizer."""
    import dsforget

    params = list(model.parameters())
    fused = default_backend(device)

    def deepspeed_adam() -> torch.optim.Optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        if device.type == "cpu":
            wait_for_extension_lock("cpu_adam")  # DeepSpeed JIT-builds it under an unbounded lock
        kind = DeepSpeedCPUAdam if device.type == "cpu" else FusedAdam
        mode = {"adamw_mode": True} if device.type == "cpu" else {"adam_w_mode": True}
        return kind(params, lr=LR, **mode)

    return [
        (
            f"mofo-{fused}",
            lambda: dsforget.MoFOAdamW(model.named_parameters(), lr=LR, fraction=FRACTION, backend=fused),
        ),
        ("torch-adamw-fused", lambda: torch.optim.AdamW(params, lr=LR, fused=True)),
        ("torch-adamw-foreach", lambda: torch.optim.AdamW(params, lr=LR, foreach=True)),
        ("deepspeed-cpu-adam" if device.type == "cpu" else "deepspeed-fused-adam", deepspeed_adam),
    ]


def fresh_gradients(params: list[torch.Tensor], generator: torch.Generator) -> None:
    """New noise in every gradient, in place (before every step, warm-up ones too: a gradient
    held fixed pulls m, and the thresholds, along until the timed steps start)."""
    for param in params:
        param.grad.normal_(0.0, GRAD_SCALE, generator=generator)
    synchronize(params[0].device)


def time_rounds(
    model: torch.nn.Module,
    implementations: list[tuple[str, Callable[[], torch.optim.Optimizer]]],
    repeats: int,
    warmup: int,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Milliseconds per timed step of each implementation (bench.take_turns: each turn from a new
    optimizer), and why any could not run."""
    params = list(model.parameters())
    device = params[0].device
    per_round = max(1, -(-repeats // ROUNDS))
    factories = dict(implementations)

    def run_turn(name: str, round_index: int) -> list[float]:
        generator = torch.Generator(device).manual_seed(1000 + round_index)
        for param in params:
            param.grad = torch.empty_like(param)
        optimizer = factories[name]()
        for _ in range(warmup):  # state allocated, kernels built, m past its first steps
            fresh_gradients(params, generator)
            optimizer.step()
        times = []
        for _ in range(per_round):
            fresh_gradients(params, generator)
            start = time.perf_counter()
            optimizer.step()
            synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
        return times

    return take_turns(list(factories), run_turn)


def format_table(title: str, times: dict[str, list[float]], failures: dict[str, str]) -> str:
    adamw = times.get("torch-adamw-fused")
    reference = statistics.median(adamw) if adamw else float("nan")
    lines = [
        title,
        "",
        "| implementation | median ms | p20–p80 ms | × AdamW fused |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, measured in times.items():
        if name in failures:
            lines.append(f"| {name} | {failures[name]} | | |")
            continue
        median = statistics.median(measured)
        lines.append(
            f"| {name} | {median:.2f} | {quantile(measured, 0.2):.2f}–{quantile(measured, 0.8):.2f} | "
            f"{median / reference:.2f} |"
        )
    return "\n".join(lines)


# the command line that runs this module (what --help prints in its usage line)
PROG = "python -m dsforget.kernels.bench_model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--repeats", type=int, default=20, help=f"timed steps per implementation, over {ROUNDS} rounds"
    )
    parser.add_argument(
        "--warmup", type=int, default=20, help="untimed steps per round before the timed ones"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a 2-layer, 64-wide model, 1 step a round: a smoke run"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    matrices = parser.add_argument_group("separate matrices, one process per implementation (matrices.py)")
    matrices.add_argument("--matrices", help="N x D: N matrices of D x D fp32, not a Llama; e.g. 6x2048")
    matrices.add_argument("--fraction", type=float, default=0.1, help="MoFO's fraction (with --matrices)")
    matrices.add_argument("--steps", type=int, default=40, help="steps per process (with --matrices)")
    matrices.add_argument("--timed", type=int, default=15, help="the last steps, timed (with --matrices)")
    matrices.add_argument(
        "--paired",
        action="store_true",
        help="every implementation in one process, steps alternating (with --matrices; no peak memory)",
    )
    matrices.add_argument("--only", help=argparse.SUPPRESS)  # a measuring child process's implementation
    args = parser.parse_args(argv)
    if args.matrices:
        from . import matrices as separate

        if args.tiny:
            args.steps, args.timed = 3, 2
        child_argv = [
            "--matrices", args.matrices, "--fraction", str(args.fraction),
            "--steps", str(args.steps), "--timed", str(args.timed),
        ]  # fmt: skip
        return separate.main(
            args.matrices, args.fraction, args.steps, args.timed, args.only, child_argv, paired=args.paired
        )
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU ops, before it is imported
    if args.tiny:
        args.layers, args.hidden, args.vocab, args.repeats, args.warmup = 2, 64, 128, 1, 1
    model = build_model(args.layers, args.hidden, args.vocab, device)
    params = list(model.parameters())
    name = device_name(device)
    print(f"# dsforget optimizer benchmark: {name}; " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    title = (
        f"### Llama {args.layers} x {args.hidden}, vocab {args.vocab}: "
        f"{sum(p.numel() for p in params) / 1e6:.1f} M parameters in {len(params)} tensors, on {name}"
    )
    times, failures = time_rounds(model, make_optimizers(model, device), args.repeats, args.warmup)
    print("\n" + format_table(title, times, failures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
