"""Run several methods on the same data and seed, then compare task gain against forgetting.

    python launch/compare.py --methods full,mofo                          # the lab, 2 CPU ranks or all GPUs
    python launch/compare.py --methods full,mofo --num_gpus 8 -- --model /ckpt/llama --data sft.jsonl

Each method runs launch/finetune.py under DeepSpeed's launcher into <output_dir>/<method>/ with
the flags after `--`; the side-by-side table is printed and written to compare.json and
compare.png (task gain against forgetting, one point per method). A method whose folder already
holds a finished run with exactly these settings (its config.json) is reused and says so; one
made with other settings is refused, naming the keys that differ, before anything runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from dsforget.errors import run_main
from dsforget.experiments.subruns import finetune_command, previous_run, split_passthrough, subrun_env
from dsforget.strict_json import dumps
from dsforget.train.run_config import parse_run_config

COLUMNS = (  # (title, report path, format)
    ("task gain", ("summary", "task_gain"), "{:+.3f}"),
    ("recall lost", ("summary", "fact_recall_lost"), "{:+.3f}"),
    ("ppl increase", ("summary", "perplexity_increase"), "{:+.2%}"),
    ("drift L2", ("drift", "all", "relative_l2"), "{:.4f}"),
    ("changed", ("drift", "all", "changed_fraction"), "{:.1%}"),
    ("ms/step", ("train", "median_step_ms"), "{:.1f}"),
    ("opt MiB/rank", ("train", "optimizer_state_mib_per_rank"), "{:.2f}"),
)


def lookup(report: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def comparison_table(reports: dict[str, dict]) -> str:
    lines = [f"{'method':<14}" + "".join(f"{title:>14}" for title, _, _ in COLUMNS)]
    for method, report in reports.items():
        cells = []
        for _, path, fmt in COLUMNS:
            value = lookup(report, path)
            cells.append(f"{'-' if value is None else fmt.format(value):>14}")
        lines.append(f"{method:<14}" + "".join(cells))
    return "\n".join(lines)


def plot(reports: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4))
    for method, report in reports.items():
        gain = lookup(report, ("summary", "task_gain")) or 0.0
        forgetting = lookup(report, ("summary", "perplexity_increase")) or 0.0
        axis.scatter([forgetting], [gain])
        axis.annotate(method, (forgetting, gain), textcoords="offset points", xytext=(5, 5))
    axis.set_xlabel("general perplexity increase (relative)")
    axis.set_ylabel("task exact-match gain")
    axis.set_title("task gain against forgetting")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str]) -> None:
    ours, finetune_flags = split_passthrough(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="full,mofo", help="comma-separated methods (default: full,mofo)")
    parser.add_argument("--output_dir", default="runs/compare", help="one sub-directory per method")
    parser.add_argument(
        "--num_gpus", type=int, default=None, help="ranks per run (default: all GPUs, or 2 CPU ranks)"
    )
    args = parser.parse_args(ours)
    if "--output_dir" in finetune_flags or "--method" in finetune_flags:
        parser.error("--output_dir and --method are set per run by compare.py; pass them before `--`")
    output = Path(args.output_dir)
    runs = {}
    for method in args.methods.split(","):  # every run's flags are checked before the first one starts
        flags = ["--method", method, "--output_dir", str(output / method), *finetune_flags]
        parse_run_config(flags)
        runs[method] = (flags, previous_run(output / method, flags))
    reports = {}
    for method, (flags, previous) in runs.items():
        run_dir = output / method
        if previous == "finished":
            print(f"== {method}: reusing the finished run in {run_dir} (same settings)", flush=True)
        else:
            command = finetune_command(args.num_gpus, *flags)
            resuming = f" (resuming the run in {run_dir})" if previous == "started" else ""
            print(f"== {method}{resuming}: {' '.join(command)}", flush=True)
            status = subprocess.run(command, env=subrun_env()).returncode
            if status != 0:  # the run printed its own error above; its status says which kind
                print(f"compare: the {method} run ended with status {status}", file=sys.stderr, flush=True)
                sys.exit(status if status > 0 else 1)
        reports[method] = json.loads((run_dir / "report.json").read_text())
    table = comparison_table(reports)
    (output / "compare.json").write_text(dumps(reports, indent=2) + "\n")
    plot(reports, output / "compare.png")
    print(f"\n{table}\n\n{output / 'compare.json'}, {output / 'compare.png'}", flush=True)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])  # a user error: one line, status 2
