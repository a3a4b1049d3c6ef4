"""Peak memory per model parameter of launch/finetune.py through a whole run, rank by rank.

    DS_ACCELERATOR=cpu .venv/bin/python launch/memory_bench.py         # 2 CPU ranks, ~50M and ~150M
    .venv/bin/python launch/memory_bench.py --num_gpus 8 --sizes 2048x16,4096x16 -- \\
        --deepspeed configs/zero3.json

Builds randomly initialised Llama checkpoints of two sizes (HIDDENxLAYERS, the lab's tokenizer),
runs launch/finetune.py on each for --steps steps with evaluation and export on (the lab's task
data, task evaluation and held-out text; flags after `--` go to every run), and reads every
rank's peaks from the run's report.json (dsforget.train.memory: host resident memory and, on
GPUs, accelerator memory, as separate columns). The cost per parameter is the slope between the
two sizes, which removes what does not grow with the model (Python, torch, DeepSpeed, the C++
build): (peak(large) - peak(small)) / (params(large) - params(small)). What is constant at scale
is kept constant here too: DeepSpeed's bucket and prefetch sizes (defaults of 5e7 to 1e9 entries,
small beside an 8B model but larger than these) are set to --bucket_entries in a copy of the
run's DeepSpeed config, and hf_model/ is written in shards of --export_max_shard_size; left at
their defaults they would cover the whole test model and read as memory per parameter.
Target on CPU ranks under ZeRO-3 (fp32: 4 B weights + 4 master + 4 gradients + 8 moments, over
2 ranks = 10 B/param, plus the optimizer step's temporaries): every rank at most 12 B/param, and
ranks within 1 B/param of each other.
Writes <output_dir>/memory_bench.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from dsforget.errors import ConfigError, run_main
from dsforget.experiments.subruns import finetune_command, local_accelerator, split_passthrough, subrun_env
from dsforget.strict_json import dumps

TARGET_B_PER_PARAM = 12.0  # CPU ranks, ZeRO-3
TARGET_SPREAD_B_PER_PARAM = 1.0


def parse_size(text: str) -> tuple[int, int]:
    try:
        hidden, layers = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--sizes: {text!r} is not HIDDENxLAYERS (e.g. 512x16)") from None
    if hidden % 64 or layers < 1:
        raise ConfigError(f"--sizes: {text!r}: hidden must be a multiple of 64 (heads of 64), layers >= 1")
    return hidden, layers


def build_checkpoint(hidden: int, layers: int, tokenizer_dir: Path, directory: Path, shard_size: str) -> int:
    """A randomly initialised Llama of this size with the lab's tokenizer, in shards of
    `shard_size` as real checkpoints come (≤ 5 GB); returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if not (directory / "config.json").exists():
        model.save_pretrained(directory, max_shard_size=shard_size)
        tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


BUCKET_KEYS = (
    "stage3_prefetch_bucket_size",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "reduce_bucket_size",
    "allgather_bucket_size",
)


def scaled_deepspeed_config(passthrough: list[str], entries: int, directory: Path) -> list[str]:
    """`passthrough` with --deepspeed pointing at a copy of the run's DeepSpeed config (the
    job's default, or the one passed) whose bucket and prefetch sizes are `entries`."""
    from dsforget.integration.ds_config import load_deepspeed_config
    from dsforget.train.run_config import RunConfig

    flags = list(passthrough)
    source = RunConfig().deepspeed
    if "--deepspeed" in flags:
        at = flags.index("--deepspeed")
        source = flags[at + 1]
        del flags[at : at + 2]
    config = load_deepspeed_config(source)
    config.setdefault("zero_optimization", {}).update(dict.fromkeys(BUCKET_KEYS, entries))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "deepspeed.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return [*flags, "--deepspeed", str(path)]


def run_size(size: str, args: argparse.Namespace, passthrough: list[str], lab) -> dict:
    hidden, layers = parse_size(size)
    root = Path(args.output_dir) / size
    params = build_checkpoint(hidden, layers, lab.model_dir, root / "model", args.export_max_shard_size)
    flags = [
        "--model", str(root / "model"),
        "--data", str(lab.task_train),
        "--eval_data", str(lab.task_eval),
        "--general_text", str(lab.general_heldout),
        "--eval_max_examples", str(args.eval_examples),
        "--max_steps", str(args.steps),
        "--output_dir", str(root / "run"),
        "--resume", "never",
        "--export_max_shard_size", args.export_max_shard_size,
        *passthrough,
    ]  # fmt: skip
    print(f"{size}: {params / 1e6:.1f}M parameters, running launch/finetune.py ...", flush=True)
    result = subprocess.run(
        finetune_command(args.num_gpus, *flags), env=subrun_env(), capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"{size}: launch/finetune.py failed with status {result.returncode}")
    memory = json.loads((root / "run" / "report.json").read_text())["memory"]
    return {"size": size, "parameters": params, **memory}


def slopes(small: dict, large: dict, key: str) -> list[float] | None:
    if not small.get(key) or not large.get(key):
        return None
    extra = large["parameters"] - small["parameters"]
    return [(b - a) / extra for a, b in zip(small[key], large[key], strict=True)]


def table(runs: list[dict], per_param: dict[str, list[float] | None]) -> str:
    columns = [("host", "host_peak_bytes"), ("accelerator", "accelerator_peak_bytes")]
    columns = [(title, key) for title, key in columns if per_param[key]]
    titles = [f"{title} GiB @{run['parameters'] / 1e6:.0f}M" for title, _ in columns for run in runs]
    head = f"{'rank':<6}" + "".join(f"{text:>20}" for text in titles)
    head += "".join(f"{title + ' B/param':>20}" for title, _ in columns)
    lines = [head]
    for rank in range(len(runs[0]["host_peak_bytes"])):
        cells = "".join(f"{run[key][rank] / 2**30:>20.2f}" for _, key in columns for run in runs)
        cells += "".join(f"{per_param[key][rank]:>20.1f}" for _, key in columns)
        lines.append(f"{rank:<6}" + cells)
    return "\n".join(lines)


def phase_table(runs: list[dict]) -> str | None:
    """Host peak reached by the end of each phase, as B/param (slope): where the peak comes from."""
    small, large = (run.get("host_peak_bytes_by_end_of") for run in runs)
    if not small or not large:
        return None
    extra = runs[1]["parameters"] - runs[0]["parameters"]
    lines = [
        f"{'host peak by the end of':<26}"
        + "".join(f"{f'rank {r} B/param':>16}" for r in range(len(small[next(iter(small))])))
    ]
    for phase in small:
        cells = "".join(f"{(b - a) / extra:>16.1f}" for a, b in zip(small[phase], large[phase], strict=True))
        lines.append(f"{phase:<26}{cells}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    own, passthrough = split_passthrough(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="512x16,1024x12", help="two model sizes, HIDDENxLAYERS,HIDDENxLAYERS"
    )
    parser.add_argument(
        "--num_gpus", type=int, default=None, help="ranks per run (default: all GPUs, or 2 CPU ranks)"
    )
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--eval_examples", type=int, default=16, help="evaluation records/texts per metric")
    parser.add_argument("--output_dir", default="runs/memory_bench")
    parser.add_argument(
        "--bucket_entries",
        type=int,
        default=1_000_000,
        help="DeepSpeed's bucket and prefetch sizes for the runs (0: as the DeepSpeed config has them)",
    )
    parser.add_argument(
        "--export_max_shard_size",
        default="20MB",
        help="shard size of the test checkpoints and of their hf_model/",
    )
    args = parser.parse_args(own)
    if args.bucket_entries:
        passthrough = scaled_deepspeed_config(passthrough, args.bucket_entries, Path(args.output_dir))
    sizes = args.sizes.split(",")
    if len(sizes) != 2:
        raise ConfigError(
            f"--sizes takes two sizes (the slope between them is the cost per parameter), got {args.sizes!r}"
        )
    from dsforget.lab import LabConfig, build_lab

    lab = build_lab(LabConfig.preset("tiny"))  # its tokenizer and data; built once and cached
    runs = sorted(
        (run_size(size, args, passthrough, lab) for size in sizes), key=lambda run: run["parameters"]
    )
    per_param = {key: slopes(*runs, key) for key in ("host_peak_bytes", "accelerator_peak_bytes")}
    print(table(runs, per_param))
    phases = phase_table(runs)
    if phases:
        print(phases)
    host = per_param["host_peak_bytes"]
    verdict = None
    if local_accelerator() == "cpu":
        ok = max(host) <= TARGET_B_PER_PARAM and max(host) - min(host) <= TARGET_SPREAD_B_PER_PARAM
        verdict = "met" if ok else "missed"
        print(
            f"target on CPU ranks (every rank <= {TARGET_B_PER_PARAM:g} B/param, ranks within "
            f"{TARGET_SPREAD_B_PER_PARAM:g} B/param): {verdict} "
            f"(max {max(host):.1f}, spread {max(host) - min(host):.1f})"
        )
    out = Path(args.output_dir) / "memory_bench.json"
    out.write_text(
        dumps({"runs": runs, "bytes_per_parameter": per_param, "cpu_target": verdict}, indent=2) + "\n"
    )
    print(f"written: {out}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
