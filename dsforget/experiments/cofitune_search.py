"""CoFiTune's coarse level as a resumable tree search: which modules, in which layers, to train.

Candidates. A candidate is a module set (``mha`` = q, k, v; ``ffn`` = up, down; ``both``) in a
named layer range (architecture.LAYER_RANGES): the halves ``bottom-plus`` [0, N/2),
``middle-plus`` [N/4, 3N/4), ``top-plus`` [N/2, N) and the quarters ``bottom1``, ``bottom2``,
``middle``, ``top``. On a model with few layers some ranges are empty or select the same layers
as another (2 layers: ``bottom-plus`` = ``middle-plus`` = ``bottom2`` = layer 0): an empty range is
skipped and a range equal to one already visited is not trained twice; both are listed as skipped.

Score. CoFiTune weighs a speciality score (the fine-tuning task) against a versatility score
(general ability); the paper's exact formula could not be confirmed, so this one is ours:

    speciality  S = (task_after - task_before) / (1 - task_before)
                    the share of the base model's remaining task headroom that the trial gained
                    (task = exact match on held-out task records, in [0, 1]; S = 0 if task_before = 1)
    versatility V = mean over the general metrics of after/before (fact recall, higher is better)
                    or before/after (general perplexity, lower is better): 1 = nothing lost;
                    a metric that is not finite after the trial (null in the JSON: a diverged
                    run) counts 0, one not finite before it is left out
    score         = S + lambda * (V - 1)                      (lambda = versatility_weight, default 1)

The base model scores 0; lambda = 1 trades one point of task headroom for one point of lost
general ability; lambda = 0 ranks by the task alone. V is not capped at 1: a trial that improves
general perplexity is credited for it. The per-trial score is absolute (it needs no other trial),
so a trial's score is final once recorded and the search's decisions do not depend on order.

Tree search (``tree_search``), within ``budget`` trials in all:
1. level 1: every module set on every half, in the order halves x module sets;
2. level 2: the half of the best level-1 trial, refined into the quarters it contains
   (bottom-plus -> bottom1, bottom2; middle-plus -> bottom2, middle; top-plus -> middle, top),
   each with the ``refine_module_sets`` module sets whose best level-1 score is highest (default 1);
3. the chosen configuration is the best trial of both levels (a quarter replaces its half only
   if it scores higher). Failed trials rank last; without any successful trial nothing is chosen.
A trial is an injected callable ``run_trial(candidate) -> TrialResult``; any exception it raises
marks that trial failed (with the error) and the search goes on; KeyboardInterrupt stops it.

State. ``<search_dir>/trials.jsonl``: a header line with the trial settings, then one line per
finished trial, each appended with write + flush + fsync. On a restart the recorded trials are
read back and not rerun (failed ones neither, unless ``retry_failed``); the budget counts the
distinct candidates recorded across restarts. A restart with other trial settings is an error;
budget, lambda and the search options may change between restarts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_atomic
from ..eval.forgetting import HIGHER_IS_BETTER
from ..methods.architecture import LAYER_RANGES, layer_range
from ..methods.cofitune.plan import MODULE_SETS
from ..optim.plan import PlanError
from ..strict_json import dumps
from ..train.run_config import FIELDS, RunConfig, argument_parser, read_config_file

logger = logging.getLogger(__name__)

HALVES = ("bottom-plus", "middle-plus", "top-plus")
QUARTERS = ("bottom1", "bottom2", "middle", "top")
TASK_METRIC = "task_exact_match"
STATE_FORMAT = 1


class SearchStateError(ValueError):
    """The state file cannot be used: corrupt line, other format, or other trial settings."""


def quarters_of(half: str) -> tuple[str, ...]:
    """The quarters whose fraction interval lies inside `half`'s (from LAYER_RANGES, not a copy)."""
    if half not in HALVES:
        raise ValueError(f"{half!r} is not a half; choose one of {', '.join(HALVES)}")
    low, high = LAYER_RANGES[half]
    return tuple(q for q in QUARTERS if low <= LAYER_RANGES[q][0] and LAYER_RANGES[q][1] <= high)


@dataclass(frozen=True)
class Candidate:
    """One coarse configuration: train `modules` in the layer range `layers`."""

    modules: str
    layers: str

    def __post_init__(self) -> None:
        if self.modules not in MODULE_SETS:
            raise ValueError(
                f"modules={self.modules!r} is not allowed; choose one of {', '.join(MODULE_SETS)}"
            )
        if self.layers not in HALVES + QUARTERS:
            raise ValueError(
                f"layers={self.layers!r} is not allowed; choose one of {', '.join(HALVES + QUARTERS)}"
            )

    @property
    def key(self) -> str:
        return f"{self.modules}@{self.layers}"

    @property
    def level(self) -> int:
        """1 for a half, 2 for a quarter."""
        return 1 if self.layers in HALVES else 2

    def method_options(self) -> dict[str, str]:
        return {"layers": self.layers, "modules": self.modules}


@dataclass(frozen=True)
class TrialResult:
    """What a trial measured: the metrics of forgetting.evaluate before and after fine-tuning."""

    before: Mapping[str, float]
    after: Mapping[str, float]
    details: Mapping[str, Any] = field(default_factory=dict)  # kept as is (output dir, timings, ...)


@dataclass(frozen=True)
class Score:
    speciality: float
    versatility: float
    value: float


def score(
    before: Mapping[str, float | None], after: Mapping[str, float | None], versatility_weight: float = 1.0
) -> Score:
    """speciality + versatility_weight·(versatility − 1), as defined in the module docstring."""
    if TASK_METRIC not in before or TASK_METRIC not in after:
        raise ValueError(
            f"the trial measured no {TASK_METRIC} (metrics: {sorted(after)}); the search needs task "
            "records to score speciality: pass --eval_data (the lab has its own)"
        )
    task_before, task_after = before[TASK_METRIC], after[TASK_METRIC]
    speciality = (task_after - task_before) / (1 - task_before) if task_before < 1 else 0.0
    retentions = []
    for metric, base in before.items():
        if metric == TASK_METRIC or metric not in after or base is None:  # None: not finite (no reference)
            continue
        if metric not in HIGHER_IS_BETTER:
            raise ValueError(f"metric {metric!r} has no direction in forgetting.HIGHER_IS_BETTER")
        tuned = after[metric]
        if tuned is None:  # reports and the state file store a non-finite value (a diverged run) as null
            retentions.append(0.0)
        elif HIGHER_IS_BETTER[metric]:
            retentions.append(tuned / base if base > 0 else 1.0)  # nothing to lose from 0
        else:
            retentions.append(base / tuned)
    if not retentions:
        raise ValueError(
            f"the trial measured no general-ability metric (metrics: {sorted(after)}); the search needs "
            "one to score versatility: pass --general_text (the lab has its own)"
        )
    versatility = sum(retentions) / len(retentions)
    return Score(speciality, versatility, speciality + versatility_weight * (versatility - 1))


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial, as stored in one line of the state file."""

    candidate: Candidate
    layer_indices: tuple[int, int]  # [start, stop) on the model
    status: str  # "ok" or "failed"
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "trial",
            "key": self.candidate.key,
            "modules": self.candidate.modules,
            "layers": self.candidate.layers,
            "layer_indices": list(self.layer_indices),
            "status": self.status,
            "before": self.before,
            "after": self.after,
            "details": self.details,
            "error": self.error,
            "seconds": round(self.seconds, 3),
        }

    @staticmethod
    def from_dict(data: Any) -> TrialRecord:
        if not isinstance(data, dict) or data.get("kind") != "trial":
            raise ValueError('not a trial record (expected a JSON object with "kind": "trial")')
        missing = {"modules", "layers", "layer_indices", "status"} - set(data)
        if missing:
            raise ValueError(f"trial record lacks {sorted(missing)}")
        if data["status"] not in ("ok", "failed"):
            raise ValueError(f"status {data['status']!r} is neither 'ok' nor 'failed'")
        start, stop = data["layer_indices"]
        return TrialRecord(
            candidate=Candidate(data["modules"], data["layers"]),
            layer_indices=(int(start), int(stop)),
            status=data["status"],
            before=dict(data.get("before") or {}),
            after=dict(data.get("after") or {}),
            details=dict(data.get("details") or {}),
            error=data.get("error"),
            seconds=float(data.get("seconds", 0.0)),
        )


def _normalised(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), for comparing settings."""
    return json.loads(dumps(value, sort_keys=True))


class SearchState:
    """The append-only JSONL state file: a header with the trial settings, then finished trials."""

    def __init__(self, path: str | Path, settings: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.settings = _normalised(dict(settings))

    def load(self) -> dict[str, TrialRecord]:
        """The recorded trials by candidate key (a later line for the same key wins); creates the
        file with its header when it does not exist."""
        if not self.path.exists():
            header = {"kind": "header", "format": STATE_FORMAT, "settings": self.settings}
            write_atomic(self.path, dumps(header, sort_keys=True) + "\n")
            return {}
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # a write cut short by a crash: that trial was never recorded, so it runs again
            keep = data.rfind(b"\n") + 1
            logger.warning(
                "%s: dropping an incomplete last line (%d bytes) left by an interrupted write",
                self.path,
                len(data) - keep,
            )
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
                handle.flush()
                os.fsync(handle.fileno())
            data = data[:keep]
        lines = data.decode(errors="replace").splitlines()  # bad bytes fail below, naming the line
        if not lines:
            raise SearchStateError(f"{self.path}: empty state file; delete it to start the search afresh")
        self._check_header(lines[0])
        records: dict[str, TrialRecord] = {}
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = TrialRecord.from_dict(json.loads(line))
            except (ValueError, TypeError, KeyError) as err:
                raise SearchStateError(
                    f"{self.path}:{number}: cannot read this trial record ({err}); delete the line to run "
                    "that trial again"
                ) from None
            records[record.candidate.key] = record
        return records

    def _check_header(self, line: str) -> None:
        try:
            header = json.loads(line)
        except ValueError as err:
            raise SearchStateError(f"{self.path}:1: the header is not JSON ({err})") from None
        if not isinstance(header, dict) or header.get("kind") != "header":
            raise SearchStateError(f"{self.path}:1: the first line must be the search header")
        if header.get("format") != STATE_FORMAT:
            raise SearchStateError(
                f"{self.path}:1: state format {header.get('format')!r}, this code reads {STATE_FORMAT}"
            )
        stored = header.get("settings", {})
        if stored != self.settings:
            differ = sorted(
                k for k in set(stored) | set(self.settings) if stored.get(k) != self.settings.get(k)
            )
            raise SearchStateError(
                f"{self.path}: its trials were run with other trial settings (differing: "
                f"{', '.join(differ)}); rerun with the same settings to resume, or choose a new "
                "search directory"
            )

    def append(self, record: TrialRecord) -> None:
        with open(self.path, "a") as handle:
            handle.write(dumps(record.to_dict(), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


@dataclass(frozen=True)
class SearchConfig:
    """The search's options; none of them changes what one trial measures."""

    n_layers: int
    budget: int | None = None  # trials in all, across restarts; None: the whole tree
    versatility_weight: float = 1.0  # lambda
    module_sets: tuple[str, ...] = MODULE_SETS
    halves: tuple[str, ...] = HALVES
    refine_module_sets: int = 1
    retry_failed: bool = False

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"n_layers={self.n_layers} must be >= 1")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget={self.budget} must be >= 1 trial")
        if not (self.versatility_weight >= 0 and math.isfinite(self.versatility_weight)):
            raise ValueError(f"versatility_weight={self.versatility_weight} must be a finite number >= 0")
        for key, allowed in (("module_sets", MODULE_SETS), ("halves", HALVES)):
            values = getattr(self, key)
            wrong = [v for v in values if v not in allowed]
            if wrong or not values or len(set(values)) != len(values):
                raise ValueError(
                    f"{key}={','.join(values)} is not allowed; choose distinct values among "
                    f"{', '.join(allowed)}"
                )
        if not 1 <= self.refine_module_sets <= len(self.module_sets):
            raise ValueError(
                f"refine_module_sets={self.refine_module_sets} must be in 1..{len(self.module_sets)}"
            )

    @property
    def tree_size(self) -> int:
        """Trials of the whole tree at most (before skipping empty or repeated ranges)."""
        return len(self.halves) * len(self.module_sets) + 2 * self.refine_module_sets


@dataclass(frozen=True)
class Ranked:
    record: TrialRecord
    score: Score | None  # None for a failed trial


@dataclass(frozen=True)
class Skipped:
    candidate: Candidate
    reason: str


@dataclass
class SearchResult:
    config: SearchConfig
    ranking: list[Ranked]  # successful trials best first, then failed ones
    skipped: list[Skipped]
    not_run: list[Candidate]  # left out by the budget
    new_trials: int  # trials run by this call (the others were read back from the state)

    @property
    def chosen(self) -> Ranked | None:
        return self.ranking[0] if self.ranking and self.ranking[0].score is not None else None

    @property
    def complete(self) -> bool:
        return not self.not_run

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for position, entry in enumerate(self.ranking, start=1):
            row = entry.record.to_dict()
            del row["kind"]
            row["rank"] = position if entry.score is not None else None
            row["level"] = entry.record.candidate.level
            row["score"] = dataclasses.asdict(entry.score) if entry.score else None
            rows.append(row)
        chosen = self.chosen
        return {
            "score_definition": (
                "speciality + versatility_weight * (versatility - 1); "
                "see dsforget/experiments/cofitune_search.py"
            ),
            "versatility_weight": self.config.versatility_weight,
            "n_layers": self.config.n_layers,
            "budget": self.config.budget or self.config.tree_size,
            "complete": self.complete,
            "chosen": None if chosen is None else chosen.record.candidate.method_options(),
            "ranking": rows,
            "skipped": [{"key": s.candidate.key, "reason": s.reason} for s in self.skipped],
            "not_run": [c.key for c in self.not_run],
        }


RunTrial = Callable[[Candidate], TrialResult]


class _TreeSearch:
    def __init__(self, config: SearchConfig, run_trial: RunTrial, state: SearchState, log: Callable) -> None:
        self.config, self.run_trial, self.state, self.log = config, run_trial, state, log
        self.records = state.load()
        self.budget = config.budget or config.tree_size
        self.visited: dict[tuple[str, tuple[int, int]], str] = {}  # (modules, layers) -> first key
        self.order: list[str] = []  # keys in the order the tree visits them
        self.skipped: list[Skipped] = []
        self.not_run: list[Candidate] = []
        self.new_trials = 0

    def score(self, record: TrialRecord) -> Score:
        return score(record.before, record.after, self.config.versatility_weight)

    def visit(self, candidate: Candidate) -> TrialRecord | None:
        """The candidate's record: read back, freshly run, or None (skipped, or over the budget)."""
        try:
            span = layer_range(candidate.layers, self.config.n_layers)
        except PlanError:
            self.skipped.append(Skipped(candidate, f"empty on {self.config.n_layers} layers"))
            return None
        indices = (span.start, span.stop)
        same = self.visited.setdefault((candidate.modules, indices), candidate.key)
        if same != candidate.key:
            self.skipped.append(Skipped(candidate, f"same layers {indices[0]}..{indices[1] - 1} as {same}"))
            return None
        self.order.append(candidate.key)
        record = self.records.get(candidate.key)
        if record is not None and (record.ok or not self.config.retry_failed):
            return record
        if record is None and len(self.records) >= self.budget:
            self.not_run.append(candidate)
            return None
        record = self._run(candidate, indices, retry=record is not None)
        self.records[candidate.key] = record
        self.state.append(record)
        return record

    def _run(self, candidate: Candidate, indices: tuple[int, int], retry: bool) -> TrialRecord:
        number = len(self.records) + (0 if retry else 1)
        self.log(
            f"[trial {number}/{self.budget}] level {candidate.level}: {candidate.key} "
            f"(layers {indices[0]}..{indices[1] - 1}){' (retry)' if retry else ''}"
        )
        self.new_trials += 1
        started = time.monotonic()
        try:
            result = self.run_trial(candidate)
        except Exception as err:  # any crash of one trial is recorded; the search goes on
            record = TrialRecord(
                candidate,
                indices,
                "failed",
                error=f"{type(err).__name__}: {err}",
                seconds=time.monotonic() - started,
            )
            self.log(f"    failed: {record.error}")
            return record
        record = TrialRecord(
            candidate,
            indices,
            "ok",
            before=dict(result.before),
            after=dict(result.after),
            details=dict(result.details),
            seconds=time.monotonic() - started,
        )
        value = self.score(record)  # a report without the needed metrics stops the search here
        self.log(
            f"    score {value.value:+.4f} (speciality {value.speciality:+.4f}, "
            f"versatility {value.versatility:.4f})"
        )
        return record

    def best(self, records: Sequence[TrialRecord]) -> TrialRecord | None:
        """The highest score; ties go to the record visited first (max keeps the first maximum)."""
        successful = [r for r in records if r.ok]
        return max(successful, key=lambda r: self.score(r).value) if successful else None

    def run(self) -> SearchResult:
        config = self.config
        level1 = [self.visit(Candidate(m, h)) for h in config.halves for m in config.module_sets]
        level1 = [r for r in level1 if r is not None]
        best = self.best(level1)
        if best is not None:
            per_module = {
                m: self.best([r for r in level1 if r.candidate.modules == m]) for m in config.module_sets
            }
            ranked_modules = sorted(
                (m for m, r in per_module.items() if r is not None),
                key=lambda m: -self.score(per_module[m]).value,
            )
            for modules in ranked_modules[: config.refine_module_sets]:
                for quarter in quarters_of(best.candidate.layers):
                    self.visit(Candidate(modules, quarter))
        return SearchResult(config, self.ranking(), self.skipped, self.not_run, self.new_trials)

    def ranking(self) -> list[Ranked]:
        # every recorded trial (also from an earlier, differently configured search over the same
        # trial settings); visit order, then key, breaks ties so the ranking is deterministic
        position = {key: i for i, key in enumerate(self.order)}
        keys = sorted(self.records, key=lambda k: (position.get(k, len(position)), k))
        successful = [
            Ranked(self.records[k], self.score(self.records[k])) for k in keys if self.records[k].ok
        ]
        successful.sort(key=lambda entry: -entry.score.value)  # stable: ties keep visit order
        failed = [Ranked(self.records[k], None) for k in keys if not self.records[k].ok]
        return successful + failed


def tree_search(
    config: SearchConfig,
    run_trial: RunTrial,
    state_path: str | Path,
    settings: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run (or resume) the tree search described in the module docstring.

    `settings` describe what every trial runs (base run config, ranks, model): they are stored in
    the state file's header, and a restart with different ones raises SearchStateError.
    """
    return _TreeSearch(config, run_trial, SearchState(state_path, settings or {}), log).run()


# ---- presentation and run configs -------------------------------------------------------------


def ranking_table(result: SearchResult) -> str:
    """The ranking as aligned text, best first; failed, skipped and unrun candidates below it."""
    header = (
        f"{'rank':>4}  {'candidate':<18}{'layers':>8}{'score':>10}{'special.':>10}{'versat.':>10}"
        f"{'task gain':>11}{'recall lost':>13}{'ppl incr.':>11}"
    )
    lines = [header]
    for position, entry in enumerate(result.ranking, start=1):
        record = entry.record
        span = f"{record.layer_indices[0]}..{record.layer_indices[1] - 1}"
        if entry.score is None:
            error = (record.error or "").splitlines()[0][:60] if record.error else ""
            lines.append(f"{'-':>4}  {record.candidate.key:<18}{span:>8}  failed: {error}")
            continue
        before, after = record.before, record.after
        task_gain = after[TASK_METRIC] - before[TASK_METRIC]
        recall = f"{before['fact_recall'] - after['fact_recall']:+.3f}" if "fact_recall" in before else "-"
        ppl = (
            f"{after['general_perplexity'] / before['general_perplexity'] - 1:+.2%}"
            if "general_perplexity" in before
            else "-"
        )
        lines.append(
            f"{position:>4}  {record.candidate.key:<18}{span:>8}{entry.score.value:>+10.4f}"
            f"{entry.score.speciality:>+10.4f}{entry.score.versatility:>10.4f}{task_gain:>+11.3f}"
            f"{recall:>13}{ppl:>11}"
        )
    lines.extend(f"{'':>4}  {s.candidate.key:<18}  skipped: {s.reason}" for s in result.skipped)
    lines.extend(f"{'':>4}  {c.key:<18}  not run: over the budget" for c in result.not_run)
    return "\n".join(lines)


def base_run_values(config_file: str | Path | None, flags: Sequence[str]) -> dict[str, Any]:
    """The run settings given explicitly (a --config file, then launch/finetune.py flags), validated.

    Only explicit keys are kept, so the chosen config stays short and defaults stay defaults."""
    parser = argument_parser("")
    args, unknown = parser.parse_known_args(list(flags))
    if unknown:
        raise ValueError(f"unknown launch/finetune.py flag {unknown[0]!r} among the run settings")
    if args.config and config_file:
        raise ValueError("give --config once: either before `--` or among the flags after it")
    config_file = config_file or args.config
    values = read_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in vars(args).items() if k in FIELDS and v is not None})
    if "output_dir" in values:
        raise ValueError("output_dir is set per trial by the search; use --search_dir instead")
    if values.get("method", "cofitune") != "cofitune":
        raise ValueError(f"method={values['method']!r}: the search runs cofitune; remove the method key")
    values.pop("method", None)
    RunConfig(**values)  # raises naming the key
    return values


def _with_candidate(base: Mapping[str, Any], candidate: Candidate) -> dict[str, Any]:
    values = dict(base)
    values["method"] = "cofitune"
    values["method_options"] = {**dict(base.get("method_options") or {}), **candidate.method_options()}
    return values


def trial_run_values(
    base: Mapping[str, Any], candidate: Candidate, output_dir: str | Path, max_steps: int | None
) -> dict[str, Any]:
    """One trial's run config: the base settings, the candidate, its own output_dir, `max_steps`
    (None: the base's length) and no Hugging Face export (a trial's weights are not kept)."""
    values = _with_candidate(base, candidate)
    values["output_dir"] = str(output_dir)
    values["export"] = False
    if max_steps is not None:
        values["max_steps"] = max_steps
    RunConfig(**values)
    return values


def chosen_run_values(base: Mapping[str, Any], candidate: Candidate) -> dict[str, Any]:
    """The full run's config: the base settings (its own length, not the trials') with the candidate."""
    values = _with_candidate(base, candidate)
    values["output_dir"] = f"runs/cofitune-{candidate.modules}-{candidate.layers}"
    RunConfig(**values)
    return values


def write_run_config(path: str | Path, values: Mapping[str, Any], comments: Sequence[str] = ()) -> None:
    """`values` as a YAML run config that launch/finetune.py --config reads, `comments` on top."""
    plain = _normalised(dict(values))  # tuples (betas) as lists: read_config_file turns them back
    head = "".join(f"# {line}\n" for line in comments)
    write_atomic(path, head + yaml.safe_dump(plain, sort_keys=False))
