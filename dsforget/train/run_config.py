"""The main job's configuration: one typed, self-validating dataclass.

Values come from, in increasing priority: the defaults below, a YAML/JSON file (``--config``),
and command-line flags (``--lr 3e-4``, ``--packing`` / ``--no-packing``). Every field is a flag
with a ``--help`` line taken from its metadata. Unknown keys are errors with a suggestion.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from ..errors import ConfigError, InputFileError
from ..lab.config import PRESETS
from ..optim.mofo_adamw import DEFAULT_FRACTION
from .tracking import parse_report_to

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def option(default: Any, help: str, choices: tuple[str, ...] | None = None, kind: type | None = None) -> Any:
    """A config field: its --help line, allowed values and flag type (from the default unless given)."""
    if kind is None:
        kind = str if default is None else type(default)
    metadata = {"help": help, "choices": choices, "kind": kind}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


# Options of one method: (the method part that takes it, its value when that part is present). A
# run whose method has no such part must leave the option unset (an error names it otherwise).
METHOD_OPTIONS = {
    "fraction": ("mofo", DEFAULT_FRACTION),
    "importance_data": ("cofitune", "general"),
    "importance_batches": ("cofitune", 16),
}


@dataclass(frozen=True)
class RunConfig:
    # what to train
    model: str = option("lab", "'lab' (the embedded experiment) or a local Hugging Face checkpoint directory")
    lab_preset: str = option(
        "default", "which lab when model is 'lab' (dsforget/lab/config.py PRESETS)", tuple(PRESETS)
    )
    init_from: str | None = option(
        None,
        "with model 'lab': start from this checkpoint directory instead of the lab's base model "
        "(continual stages; the lab's data and metrics stay)",
    )
    method: str = option(
        "mofo",
        "full, mofo, hft, cofitune, or a '+' combination such as hft+mofo; baselines: freeze, l2, lora "
        "(README 'Baselines')",
    )
    fraction: float | None = option(
        None,
        f"mofo (and combinations with it): share of each parameter's entries updated per step, in (0, 1]; "
        f"{DEFAULT_FRACTION} when not given",
        kind=float,
    )
    method_options: dict = option(
        {},
        "options of the method's plan builders as a JSON/YAML mapping, e.g. hft: trainable_fraction, "
        "norms, balance; cofitune: layers, modules, importance (see README 'Methods')",
    )
    resample_every: int = option(
        0,
        "HFT: draw a new trainable half every N optimizer steps, moments kept (0: one draw per run); "
        "costs full fine-tuning's memory and compute",
    )
    resample_each_epoch: bool = option(False, "HFT: draw a new trainable half at the start of every epoch")
    importance_data: str | None = option(
        None,
        "cofitune: importance measured on general text (the lab's corpus or --general_text) or train "
        "data; general when not given",
        ("general", "train"),
    )
    importance_batches: int | None = option(
        None, "cofitune: importance micro-batches per rank; 16 when not given", kind=int
    )
    # data
    data: str | None = option(
        None,
        "training data file (JSONL instruction/chat records or csv/json/parquet), or several mixed by "
        "weight: comma-separated PATH:WEIGHT entries, e.g. a.jsonl:0.7,b.jsonl:0.3 (README 'Mixing and "
        "replay'); default: the lab's task",
    )
    data_format: str | None = option(
        None, "format of --data when its suffix does not say", ("jsonl", "json", "csv", "parquet")
    )
    max_length: int = option(256, "tokens per training example (longer ones are truncated)")
    packing: bool = option(
        False,
        "pack whole examples into blocks of up to max_length tokens instead of padding each; packed "
        "examples do not attend to each other and their positions restart (README 'Data at scale')",
    )
    validation_fraction: float = option(0.05, "share of --data held out for validation loss, in [0, 1)")
    replay_text: str | None = option(
        None,
        'replay: JSONL of {"text"} general documents mixed into training as language modelling (loss on '
        "every token), or 'lab' for the lab's pretraining corpus (its held-out text excluded); with "
        "model 'lab' and --replay_ratio > 0 it defaults to 'lab'",
    )
    replay_ratio: float = option(
        0.0,
        "replay: expected share of training examples drawn from --replay_text, in [0, 1) (a seeded draw "
        "per example); 0: no replay",
    )
    eval_data: str | None = option(
        None, "task records scored by greedy exact match (default: the lab's eval split)"
    )
    data_cache_dir: str | None = option(
        None,
        "where tokenised data is cached, keyed by the data file's content, tokenizer, chat template, "
        "max_length, packing and split; default $DSFORGET_CACHE/data or ~/.cache/dsforget/data",
    )
    data_workers: int = option(
        0, "processes that tokenise --data (datasets.map num_proc); 0: one per CPU core, at most 16"
    )
    data_timeout_s: float = option(
        3600.0,
        "seconds the other ranks wait for rank 0 to tokenise the data into the cache before the job "
        "fails naming rank 0 and the phase",
    )
    general_text: str | None = option(
        None, 'JSONL of {"text"} for general perplexity (default: the lab\'s held-out text)'
    )
    eval_max_examples: int = option(
        200, "at most this many records per evaluation metric (and documents per --general_tasks task)"
    )
    general_tasks: str | None = option(
        None,
        "comma-separated lm-evaluation-harness tasks scored before, during (--eval_every) and after "
        "training, offline: lm-eval task, group or tag names (their data in the Hugging Face cache) or task "
        "YAML files; the lab adds lab_fact_recall, lab_heldout and lab_task (README 'General ability: "
        "lm-eval tasks')",
    )
    # optimisation
    lr: float = option(1e-3, "peak learning rate (the lab's default; real checkpoints want ~1e-5)")
    betas: tuple[float, float] = option((0.9, 0.999), "Adam betas")
    eps: float = option(1e-8, "Adam epsilon")
    weight_decay: float = option(0.0, "decoupled weight decay")
    decay_scope: str = option(
        "all", "which top-k entries decay: all (MoFO reference) or selected", ("all", "selected")
    )
    topk: str = option(
        "exact", "exact: top-k of the whole parameter; shard: of each rank's shard", ("exact", "shard")
    )
    kernel_backend: str = option("auto", "optimizer kernels", ("auto", "torch", "cpu", "triton"))
    epochs: int = option(3, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = option(0, "optimizer steps to run; 0 = as many as `epochs` take")
    micro_batch_size: int = option(8, "examples per rank per forward pass")
    gradient_accumulation: int = option(1, "micro-batches per optimizer step")
    warmup_steps: int = option(10, "linear warm-up steps")
    lr_schedule: str = option("cosine", "decay after warm-up", ("cosine", "constant"))
    gradient_clipping: float = option(1.0, "max global gradient norm; 0 disables")
    # system
    deepspeed: str = option(str(CONFIG_DIR / "zero3.json"), "DeepSpeed JSON config (ZeRO stage, offload)")
    precision: str = option(
        "auto", "auto: bf16 where the accelerator supports it, fp32 on CPU", ("auto", "bf16", "fp32")
    )
    seed: int = option(0, "seed of data order, sampling and the plan")
    gradient_checkpointing: bool = option(
        False,
        "recompute each decoder layer's activations in the backward pass (non-reentrant): activation "
        "memory of one layer instead of all, for about a third more compute per step",
    )
    attn_implementation: str | None = option(
        None,
        "attention kernel passed to from_pretrained; flash_attention_2 needs the flash_attn package and "
        "CUDA; default: transformers' choice for the model (sdpa for Llama), recorded in checkpoints",
        ("sdpa", "eager", "flash_attention_2"),
    )
    comm_timeout_s: float = option(
        600.0,
        "seconds a collective waits for the other ranks before the job fails (a dead or hung rank): the "
        "rendezvous, building, training, checkpoints; every process group, DeepSpeed's included",
    )
    eval_timeout_s: float = option(
        3600.0,
        "seconds a rank waits for the others while scoring the base or the tuned model and writing "
        "hf_model before the job fails naming the rank it waited for and the phase (generous: "
        "generating answers with a large model is slow)",
    )
    max_nonfinite_steps: int = option(
        10, "optimizer steps in a row with inf/NaN gradients (each skipped) before the run stops"
    )
    # output
    output_dir: str = option("runs/lab-mofo", "where config, plan, metrics, checkpoints and the model go")
    save_every: int = option(0, "save a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "resumable checkpoints kept on disk (oldest deleted first)")
    eval_every: int = option(
        0,
        "every N steps, the validation loss and the evaluation metrics (task exact match, fact recall, "
        "perplexity: report.json's trajectory, metrics.jsonl, TensorBoard); 0: only at the end",
    )
    log_every: int = option(10, "metrics line every N steps")
    report_to: str = option(
        "tensorboard",
        "where metrics and the forgetting report's numbers go besides metrics.jsonl and report.json: "
        "comma-separated tensorboard, wandb, mlflow, or none; wandb and mlflow are extras (pip install "
        "'dsforget[wandb]'), configured by their usual environment (WANDB_MODE=offline, MLFLOW_TRACKING_URI)",
    )
    resume: str = option(
        "auto",
        "auto: continue from output_dir's newest checkpoint; never: start from the base model, moving "
        "a previous run's outputs to output_dir/superseded-<time>/; or a checkpoint path (a rewind: "
        "the checkpoints after it are deleted once this run saves). Resuming unpickles DeepSpeed's "
        "files: it trusts the checkpoint's author as much as running their code",
    )
    export: bool = option(
        True,
        "write a Hugging Face (safetensors) checkpoint at the end (lora: the adapters merged into the base "
        "weights)",
    )
    export_adapter: bool = option(
        False,
        "lora: also write the adapter in peft's format to output_dir/adapter (adapter_config.json and "
        "adapter_model.safetensors, loadable with PeftModel.from_pretrained)",
    )
    export_max_shard_size: str = option(
        "5GB",
        "largest safetensors file of hf_model/, as transformers' max_shard_size (e.g. 500MB, 5GB): rank 0 "
        "holds one such shard in host memory while writing",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{f.name}={value!r} is not allowed; choose one of {', '.join(choices)}")
        from ..methods import METHODS
        from ..methods.lora import check_combination
        from ..optim.plan import PlanError

        parts = self.method.split("+")
        _check(
            all(part in METHODS for part in parts) and len(set(parts)) == len(parts),
            "method",
            self.method,
            f"must be one of {', '.join(sorted(METHODS))} or a '+' combination of distinct ones",
        )
        try:
            check_combination(parts)
        except PlanError as error:
            raise ConfigError(str(error)) from None
        parse_report_to(self.report_to)
        if self.export_adapter and "lora" not in parts:
            raise ConfigError(f"export_adapter: method {self.method!r} trains no adapter (use method lora)")
        for key, (part, default) in METHOD_OPTIONS.items():
            if part in parts:
                if getattr(self, key) is None:
                    object.__setattr__(self, key, default)
            elif getattr(self, key) is not None:
                raise ConfigError(
                    f"{key} applies to methods with a {part!r} part; method {self.method!r} does not take it"
                )
        if self.fraction is not None:
            _check(0 < self.fraction <= 1, "fraction", self.fraction, "must be in (0, 1]")
        _check(
            0 <= self.validation_fraction < 1,
            "validation_fraction",
            self.validation_fraction,
            "must be in [0, 1)",
        )
        self._check_replay()
        _check(self.lr > 0, "lr", self.lr, "must be > 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            self.betas,
            "must be two numbers in [0, 1)",
        )
        for key in (
            "max_length",
            "micro_batch_size",
            "gradient_accumulation",
            "eval_max_examples",
            "log_every",
            "keep_checkpoints",
        ):
            _check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        if self.importance_batches is not None:
            _check(
                self.importance_batches >= 1, "importance_batches", self.importance_batches, "must be >= 1"
            )
        for key in (
            "epochs",
            "max_steps",
            "data_workers",
            "resample_every",
            "warmup_steps",
            "save_every",
            "eval_every",
            "weight_decay",
            "gradient_clipping",
        ):
            _check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        if self.general_tasks is not None:
            _check(
                all(self.general_task_specs),
                "general_tasks",
                self.general_tasks,
                "must be comma-separated task names or YAML files, none empty",
            )
        _check(self.epochs > 0 or self.max_steps > 0, "epochs", self.epochs, "or max_steps must be > 0")
        _check(self.comm_timeout_s > 0, "comm_timeout_s", self.comm_timeout_s, "must be > 0")
        _check(self.eval_timeout_s > 0, "eval_timeout_s", self.eval_timeout_s, "must be > 0")
        _check(self.data_timeout_s > 0, "data_timeout_s", self.data_timeout_s, "must be > 0")
        from huggingface_hub import split_torch_state_dict_into_shards  # parses sizes as the export will

        try:
            split_torch_state_dict_into_shards({}, max_shard_size=self.export_max_shard_size)
        except ValueError:
            _check(
                False, "export_max_shard_size", self.export_max_shard_size, "must be a size like 500MB or 5GB"
            )
        _check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", self.max_nonfinite_steps, "must be >= 1")
        if (self.resample_every or self.resample_each_epoch) and "hft" not in parts:
            raise ConfigError(
                f"resample_every/resample_each_epoch: only HFT draws what trains, not {self.method!r}"
            )
        if self.init_from is not None and self.model != "lab":
            raise ConfigError("init_from only applies to model 'lab'; pass a checkpoint directory as --model")
        if self.model != "lab" and self.data is None:
            raise ConfigError("data: a training file is required when model is a checkpoint directory")

    def _check_replay(self) -> None:
        """--replay_ratio in [0, 1) with a replay source: --replay_text, or the lab's corpus."""
        _check(
            isinstance(self.replay_ratio, int | float)
            and not isinstance(self.replay_ratio, bool)
            and 0 <= self.replay_ratio < 1,
            "replay_ratio",
            self.replay_ratio,
            "must be a number in [0, 1) (the expected share of replayed examples)",
        )
        if self.replay_ratio == 0:
            if self.replay_text is not None:
                raise ConfigError(
                    f"replay_text={self.replay_text!r} is given but replay_ratio is 0: set --replay_ratio "
                    "(e.g. 0.1) to replay it"
                )
            return
        if self.replay_text is None:
            if not self.uses_lab:
                raise ConfigError(
                    'replay_ratio > 0 needs --replay_text: a JSONL file of {"text"} general documents '
                    "(the lab uses its own pretraining corpus)"
                )
            object.__setattr__(self, "replay_text", "lab")
        if self.replay_text == "lab" and not self.uses_lab:
            raise ConfigError("replay_text='lab' needs model 'lab'; give a JSONL file of general text")
        if (
            self.replay_text != "lab"
            and self.general_text is not None
            and Path(self.replay_text).resolve() == Path(self.general_text).resolve()
        ):
            raise ConfigError(
                f"replay_text {self.replay_text} is the --general_text file that measures forgetting "
                "(held-out perplexity): replay other general text"
            )

    def method_defaults(self) -> dict[str, Any]:
        """Run-level values the method's plan builders take when they accept them: the MoFO
        fraction (None unless the method has a mofo part) and the seed (HFT's draw)."""
        defaults: dict[str, Any] = {"seed": self.seed}
        if self.fraction is not None:
            defaults["fraction"] = self.fraction
        return defaults

    @property
    def uses_lab(self) -> bool:
        return self.model == "lab"

    @property
    def general_task_specs(self) -> list[str]:
        """--general_tasks as a list (empty when not given)."""
        return [] if self.general_tasks is None else [spec.strip() for spec in self.general_tasks.split(",")]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} {rule}")


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _unknown_key_error(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(FIELDS)}"
    return ConfigError(f"{source}: unknown key '{key}'{hint}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON run config as a dict of known keys."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputFileError(f"run config {path} does not exist (--config)") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"run config {path}: cannot parse ({err})") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"run config {path}: the top level must be a mapping of keys to values")
    for key in values:
        if key not in FIELDS:
            raise _unknown_key_error(key, str(path))
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return values


def _flag_type(f: dataclasses.Field) -> Any:
    kind = f.metadata["kind"]
    if kind is dict:
        return json.loads
    if kind is tuple:
        return lambda text: tuple(float(x) for x in text.split(","))
    return kind


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag value raises ConfigError (one line on rank 0, as every user error)
    instead of printing the usage on every rank and exiting from inside the parser."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"command line: {message} (see --help)")


def argument_parser(description: str) -> argparse.ArgumentParser:
    # allow_abbrev=False: "--warmup 5" must be an error, not a silent prefix match of --warmup_steps
    parser = _Parser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", help="YAML or JSON file of run settings (flags override it)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    for name, f in FIELDS.items():
        flag = "--" + name
        default = {} if f.metadata["kind"] is dict else f.default
        help_text = f"{f.metadata['help']} (default: {default})"
        if f.metadata["kind"] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(
                flag,
                type=_flag_type(f),
                default=None,
                choices=f.metadata.get("choices"),
                help=help_text,
                metavar=name.upper(),
            )
    return parser


def parse_run_config(argv: list[str] | None, description: str = "") -> RunConfig:
    """RunConfig from defaults, then --config FILE, then flags."""
    parser = argument_parser(description)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        key = unknown[0].lstrip("-").split("=")[0]
        raise _unknown_key_error(key, "command line")
    values = read_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in FIELDS and v is not None})
    return RunConfig(**values)
