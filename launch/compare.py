"""Run several methods on the same data and seed, then compare forgetting at matched task gain.

    python launch/compare.py --methods full,mofo                          # the lab, 2 CPU ranks or all GPUs
    python launch/compare.py --methods full,mofo --lrs full=3e-4,1e-3 mofo=1e-3,3e-3 -- --max_steps 300
    python launch/compare.py --methods full,hft --plan_seeds hft=0,2,7 -- --max_steps 300
    python launch/compare.py --methods full,freeze,l2,mofo --method_options l2='{"strength": 30}' \
        freeze='{"trainable_layers": 1}' -- --max_steps 300
    python launch/compare.py --methods full,replay,mofo,mofo+replay -- --max_steps 300  # 0.1 lab corpus
    python launch/compare.py --methods full,mofo --num_gpus 8 -- --model /ckpt/llama --data sft.jsonl
    python launch/compare.py --methods full,replay,mofo --replay_text general.jsonl --replay_ratio 0.2 \
        -- --model /ckpt/llama --data sft.jsonl --general_text heldout.jsonl

Each method (at each of its --lrs learning rates) runs launch/finetune.py under DeepSpeed's
launcher into <output_dir>/<method>/ (<method>-lr<lr>/ when it has several learning rates,
-seed<s> for each --plan_seeds draw of a method whose plan is drawn at random) with the flags after
`--` and its own --method_options, evaluating every --eval_every steps (default: a tenth of
--max_steps). An entry ``replay`` is full fine-tuning with replay of general text, ``METHOD+replay``
that method with it: the run gets --replay_ratio (default 0.1) and --replay_text (default: the
lab's pretraining corpus) of this command. Printed and written:
the end-of-run table and compare.json (each run's report), and matched.json: every run's
forgetting at the task levels all runs reach, interpolated along its trajectory (dsforget.eval.
matched), the run that forgot least at each level, and each method's best over its learning
rates, and the spread (mean, lowest, highest) over plan seeds; compare.png draws each run's
forgetting against its task score along training. A run
whose folder already holds a finished run with exactly these settings is reused and says so; one
made with other settings is refused, naming the keys that differ, before anything runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from dsforget.errors import ConfigError, run_main
from dsforget.eval.matched import (
    MEASURES,
    forgetting_along,
    format_matched,
    format_spread,
    matched_gain,
    seed_spread,
    tuned_view,
)
from dsforget.experiments.subruns import finetune_command, previous_run, split_passthrough, subrun_env
from dsforget.methods import METHODS, accepted_options
from dsforget.strict_json import dumps
from dsforget.train.run_config import parse_run_config

COLUMNS = (  # (title, report path, format)
    ("task gain", ("summary", "task_gain"), "{:+.3f}"),
    ("recall lost", ("summary", "fact_recall_lost"), "{:+.3f}"),
    ("skills lost", ("summary", "skills_lost"), "{:+.3f}"),
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
    """Each run's forgetting against its task score along training, one panel per measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    along = {name: forgetting_along(report.get("trajectory") or []) for name, report in reports.items()}
    measures = [m for m in MEASURES if any(m in p for points in along.values() for p in points)] or list(
        MEASURES
    )
    figure, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 4), squeeze=False)
    for axis, measure in zip(axes[0], measures, strict=True):
        for name, points in along.items():
            points = [p for p in points if measure in p]
            if points:
                axis.plot(
                    [p["task_exact_match"] for p in points],
                    [p[measure] for p in points],
                    "-o",
                    ms=3,
                    label=name,
                )
        axis.set_xlabel("task exact match")
        axis.set_ylabel(measure)
        axis.set_title(f"{measure} along training (lower is better)", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def per_method(
    flag: str, values: list[str], methods: list[str], form: str, parse, kind: str, refuse=None
) -> dict:
    """`flag METHOD=VALUE ...` as {method: parse(VALUE)}, METHOD one of --methods (parse raises
    ValueError on a VALUE that is not `kind`); `refuse(method, parsed)`, when given, says why a
    method cannot take it (None: it can)."""
    found: dict[str, Any] = {}
    for value in values:
        method, _, text = value.partition("=")
        if method not in methods or not text:
            raise ConfigError(f"{flag} {value!r}: expected METHOD={form} with METHOD one of --methods")
        try:
            parsed = parse(text)
        except ValueError:
            raise ConfigError(f"{flag} {value!r}: {text!r} is not {kind}") from None
        reason = refuse(method, parsed) if refuse is not None else None
        if reason:
            raise ConfigError(f"{flag} {value!r}: {reason}")
        found[method] = parsed
    return found


def parse_lrs(values: list[str], methods: list[str]) -> dict[str, list[str]]:
    """--lrs full=3e-4,1e-3 mofo=1e-3 as {method: [lr, ...]}; methods not named run once at the
    run's own --lr."""
    return per_method(
        "--lrs",
        values,
        methods,
        "LR[,LR...]",
        lambda text: [str(float(lr)) for lr in text.split(",")],
        "a list of numbers",
    )


def draws_nothing(method: str, _seeds: list[int]) -> str | None:
    """Why `method` cannot take plan seeds: no part of it draws its plan at random."""
    if any("seed" in accepted_options(builder) for builder in builders_of(method)):
        return None
    return f"{method!r} draws no plan at random (no part takes a seed)"


def parse_seeds(values: list[str], methods: list[str]) -> dict[str, list[int]]:
    """--plan_seeds hft=0,2,7 as {method: [seed, ...]}: each draws its plan with each seed."""
    return per_method(
        "--plan_seeds",
        values,
        methods,
        "SEED[,SEED...]",
        lambda text: [int(s) for s in text.split(",")],
        "a list of integers",
        refuse=draws_nothing,
    )


REPLAY = "replay"


def split_replay(entry: str) -> tuple[str, bool]:
    """(the finetune --method, whether it replays) of a --methods entry: ``replay`` is full
    fine-tuning with replay, ``mofo+replay`` MoFO with it."""
    parts = entry.split("+")
    if REPLAY not in parts:
        return entry, False
    return "+".join(part for part in parts if part != REPLAY) or "full", True


def builders_of(method: str) -> list:
    """The plan builders of `method`'s registered parts."""
    return [METHODS[part] for part in method.split("+") if part in METHODS]


def json_object(text: str) -> dict:
    options = json.loads(text)  # a JSONDecodeError is a ValueError
    if not isinstance(options, dict):
        raise ValueError(text)
    return options


def unknown_option(method: str, options: dict) -> str | None:
    """Why `method` cannot take `options`: one that no part of it takes (values: the run checks)."""
    accepted = set().union(*(accepted_options(builder) for builder in builders_of(method)))
    unknown = sorted(set(options) - accepted)
    if not unknown:
        return None
    return f"{method!r} has no option {unknown[0]!r}; its options: {', '.join(sorted(accepted)) or 'none'}"


def parse_options(values: list[str], methods: list[str]) -> dict[str, dict]:
    """--method_options l2='{"strength": 30}' ... as {method: options}."""
    return per_method(
        "--method_options", values, methods, "JSON", json_object, "a JSON object", refuse=unknown_option
    )


def with_options(flags: list[str], extra: dict) -> list[str]:
    """`flags` with `extra` set in --method_options (the run's other options kept)."""
    if not extra:
        return flags
    options = dict(parse_run_config(flags).method_options)
    return [*flags, "--method_options", json.dumps({**options, **extra})]


def with_evaluation(flags: list[str]) -> list[str]:
    """`flags` with --eval_every set to a tenth of --max_steps when the user set neither it nor epochs."""
    config = parse_run_config(flags)
    if config.eval_every or not config.max_steps:
        return flags
    return [*flags, "--eval_every", str(max(1, config.max_steps // 10))]


def main(argv: list[str]) -> None:
    ours, finetune_flags = split_passthrough(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="full,mofo", help="comma-separated methods (default: full,mofo)")
    parser.add_argument(
        "--lrs",
        nargs="*",
        default=[],
        help="learning rates per method, METHOD=LR[,LR...] (e.g. full=3e-4,1e-3 mofo=1e-3); default: --lr",
    )
    parser.add_argument("--output_dir", default="runs/compare", help="one sub-directory per run")
    parser.add_argument(
        "--num_gpus", type=int, default=None, help="ranks per run (default: all GPUs, or 2 CPU ranks)"
    )
    parser.add_argument(
        "--plan_seeds",
        nargs="*",
        default=[],
        help="plan seeds per method that draws its plan (HFT), METHOD=SEED[,SEED...]: one run per seed, "
        "the spread over them reported",
    )
    parser.add_argument(
        "--method_options",
        nargs="*",
        default=[],
        help="a method's own plan options, METHOD=JSON (e.g. l2='{\"strength\": 30}'); they join the "
        "--method_options after `--`",
    )
    parser.add_argument(
        "--replay_ratio",
        type=float,
        default=0.1,
        help="the replay entries' (replay, METHOD+replay) share of replayed general text (default 0.1)",
    )
    parser.add_argument(
        "--replay_text",
        default=None,
        help="the replay entries' general text: JSONL of {\"text\"} (default: the lab's pretraining corpus)",
    )
    args = parser.parse_args(ours)
    if "--output_dir" in finetune_flags or "--method" in finetune_flags:
        parser.error("--output_dir and --method are set per run by compare.py; pass them before `--`")
    if any(flag.split("=")[0] in ("--replay_ratio", "--replay_text") for flag in finetune_flags):
        raise ConfigError(
            "--replay_ratio and --replay_text apply to the replay entries (replay, METHOD+replay) only: "
            "pass them before `--`, not to every run"
        )
    output = Path(args.output_dir)
    methods = args.methods.split(",")
    replaying = [method for method in methods if split_replay(method)[1]]
    if replaying and not args.replay_ratio > 0:
        raise ConfigError(
            f"--replay_ratio {args.replay_ratio}: the replay entries ({','.join(replaying)}) need a ratio > 0"
        )
    if args.replay_text and not replaying:
        raise ConfigError("--replay_text: no entry of --methods replays (replay, or METHOD+replay)")
    lrs, seeds = parse_lrs(args.lrs, methods), parse_seeds(args.plan_seeds, methods)
    own_options = parse_options(args.method_options, methods)
    runs, method_of, group_of = {}, {}, {}
    for method in methods:  # every run's flags are checked before the first one starts
        job_method, replays = split_replay(method)
        replay_flags = []
        if replays:
            replay_flags = ["--replay_ratio", str(args.replay_ratio)]
            replay_flags += ["--replay_text", args.replay_text] if args.replay_text else []
        for lr in lrs.get(method, [None]):
            for seed in seeds.get(method, [None]):
                name, folder, extra = method, method, []
                if lr is not None:
                    extra = ["--lr", lr]
                    if len(lrs[method]) > 1:
                        name, folder = f"{name}@{lr}", f"{folder}-lr{lr}"
                group = name
                if seed is not None:
                    name, folder = f"{name}/seed{seed}", f"{folder}-seed{seed}"
                flags = ["--method", job_method, "--output_dir", str(output / folder), *finetune_flags]
                flags += [*replay_flags, *extra]
                plan_options = {**own_options.get(method, {}), **({} if seed is None else {"seed": seed})}
                flags = with_evaluation(with_options(flags, plan_options))
                runs[name] = (flags, output / folder, previous_run(output / folder, flags))
                method_of[name], group_of[name] = method, group
    reports = {}
    for name, (flags, run_dir, previous) in runs.items():
        if previous == "finished":
            print(f"== {name}: reusing the finished run in {run_dir} (same settings)", flush=True)
        else:
            command = finetune_command(args.num_gpus, *flags)
            resuming = f" (resuming the run in {run_dir})" if previous == "started" else ""
            print(f"== {name}{resuming}: {' '.join(command)}", flush=True)
            status = subprocess.run(command, env=subrun_env()).returncode
            if status != 0:  # the run printed its own error above; its status says which kind
                print(f"compare: the {name} run ended with status {status}", file=sys.stderr, flush=True)
                sys.exit(status if status > 0 else 1)
        reports[name] = json.loads((run_dir / "report.json").read_text())
    table = comparison_table(reports)
    matched = matched_gain({name: report.get("trajectory") or [] for name, report in reports.items()})
    matched["tuned"] = tuned_view(matched, method_of, group_of)
    if seeds:
        matched["seed_spread"] = seed_spread(matched, group_of)
    (output / "compare.json").write_text(dumps(reports, indent=2) + "\n")
    (output / "matched.json").write_text(dumps(matched, indent=2) + "\n")
    plot(reports, output / "compare.png")
    print(f"\n{table}\n\n{format_matched(matched)}\n", flush=True)
    if any("@" in name for name in reports):
        print(f"best over each method's learning rates\n{format_matched(matched['tuned'])}\n", flush=True)
    if seeds:
        print(f"spread over plan seeds\n{format_spread(matched['seed_spread'])}\n", flush=True)
    print(f"{output / 'compare.json'}, {output / 'matched.json'}, {output / 'compare.png'}", flush=True)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])  # a user error: one line, status 2
