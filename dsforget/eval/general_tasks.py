"""General ability on standard benchmarks: lm-evaluation-harness tasks scored with the job's model.

``--general_tasks mmlu,gsm8k,path/to/task.yaml`` names lm-eval tasks, groups or task YAML files;
the lab's own metrics are lm-eval tasks too (``dsforget.lab.lm_eval_tasks``). They are loaded once,
before training (an unknown name or data that is not on disk is a one-line error then), and scored
with the model the engine holds, before, during (``--eval_every``) and after training.

How the ranks share the work. lm-eval's ``HFLM`` takes a model object but then assumes one process;
its own data parallelism (accelerate) assumes a whole model per rank. Here every rank scores its own
documents (lm-eval's ``rank``/``world_size`` sharding, per-document metrics gathered to rank 0 and
the scores broadcast), so W ranks share the work of one pass. Under ZeRO-3 no rank holds the model:
every forward pass gathers each layer from all ranks, so every rank must run every forward pass, and
how many a rank's documents need differs (lm-eval batches by length and context). Each model call is
therefore one round in lockstep (``_Lockstep``): the ranks agree on whether any still has a call to
make, and those without one run a one-token stand-in; generation runs with ``synced_gpus``. Ranks
must run lm-eval's request types in the same order, which holds when every task gives every rank a
document; a task smaller than the world size makes every rank score every document (a WARNING says
so: correct, not sharded).

Offline: ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` must be set before ``datasets`` is imported
(launch/finetune.py sets them); a task whose data is neither local nor in the Hugging Face cache
fails to load. Scores are flat ``lm_eval/<task>/<metric>`` keys (metrics.jsonl, TensorBoard).
"""

from __future__ import annotations

import copy
import difflib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import ConfigError, InputFileError
from ..lab.evaluate import ONE_PROCESS, Ranks, evaluating

logger = logging.getLogger("dsforget")

PREFIX = "lm_eval/"
BATCH_SIZE = 16

R = TypeVar("R")


def require_offline() -> None:
    """Raise unless the Hugging Face libraries were imported in offline mode: dsforget never downloads."""
    import datasets
    import huggingface_hub.constants

    if not (datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE):
        raise ConfigError(
            "--general_tasks scores lm-eval tasks offline: set HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 "
            "before Python starts (launch/finetune.py sets them unless they are set otherwise)"
        )


@dataclass
class GeneralTasks:
    """lm-eval tasks loaded with their documents: ``names`` are the reported ones (a group reports
    its aggregate, a tag its tasks), ``task_dict`` is what ``lm_eval.evaluator.evaluate`` takes."""

    names: list[str]
    task_dict: dict[str, Any]
    limit: int | None
    smallest: tuple[str, int]  # the task with the fewest documents (after `limit`), and how many
    warned_unsharded: bool = False  # the WARNING that scoring is not sharded, once per run


def _is_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or "/" in spec


def load_general_tasks(
    specs: Sequence[str], include_paths: Sequence[Path] = (), limit: int | None = None
) -> GeneralTasks:
    """The tasks `specs` name (lm-eval task, group or tag names, or task YAML files), with their
    data read now. `include_paths`: folders of task YAMLs whose names `specs` may use (the lab's).
    `limit`: at most this many documents per task (lm-eval's ``--limit``). Raises a ConfigError
    naming the spec for an unknown name, a missing file or data that cannot be loaded offline."""
    require_offline()
    from lm_eval.tasks import TaskManager

    for spec in specs:
        if _is_path(spec) and not Path(spec).is_file():
            raise InputFileError(f"--general_tasks: task file {spec} does not exist")
    # lm-eval indexes its ~15,000 built-in YAMLs in ~10 s: only when a spec needs them
    manager = TaskManager(include_path=[str(p) for p in include_paths] or None, include_defaults=False)
    if any(not _is_path(spec) and spec not in manager.all_tasks for spec in specs):
        manager = TaskManager(include_path=[str(p) for p in include_paths] or None)
    merged: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
    names: list[str] = []
    for spec in specs:
        if not _is_path(spec) and spec not in manager.all_tasks:
            close = difflib.get_close_matches(spec, manager.all_tasks, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"--general_tasks: '{spec}' is neither an lm-eval task, group or tag nor a task YAML "
                f"file{hint}"
            )
        try:
            loaded = manager.load([spec])
        except Exception as error:  # lm-eval and datasets raise many kinds; each ends here
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"--general_tasks: task '{spec}' cannot be loaded offline ({type(error).__name__}: "
                f"{first_line}); its data must be local files or already in the Hugging Face datasets cache"
            ) from None
        for task_name in loaded["tasks"]:
            if task_name in merged["tasks"]:
                raise ConfigError(f"--general_tasks: task '{task_name}' is named twice (in '{spec}')")
        merged["tasks"].update(loaded["tasks"])
        merged["groups"].update(loaded["groups"])
        merged["group_map"].update(loaded["group_map"])
        # a group reports its aggregate, a tag (several tasks, no group) each of its tasks
        names.extend(list(loaded["groups"])[:1] or list(loaded["tasks"]))
    sizes = {
        name: len(task.eval_docs) if limit is None else min(limit, len(task.eval_docs))
        for name, task in merged["tasks"].items()
    }
    smallest = min(sizes.items(), key=lambda item: item[1])
    return GeneralTasks(names, merged, limit, smallest)


class _Lockstep:
    """Model calls of every rank in step, for ZeRO-3 (see the module's docstring). Each call is one
    round: an all-reduce (MAX) of its kind, then the call; a rank with nothing left to call answers
    IDLE and runs a one-token stand-in of the agreed kind until every rank answers IDLE (``drain``).
    Cost: one 8-byte all-reduce per forward pass or generate call."""

    IDLE, FORWARD, GENERATE = 0, 1, 2

    def __init__(self, model: torch.nn.Module, device: torch.device, token_id: int) -> None:
        self.model, self.device = model, device
        self.token = torch.tensor([[token_id]], device=device)

    def _agree(self, kind: int) -> int:
        flag = torch.tensor([kind], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def call(self, kind: int, run: Callable[[], R]) -> R:
        agreed = self._agree(kind)
        if agreed != kind:
            raise RuntimeError(
                f"lm-eval ranks out of step: this rank makes model call {kind}, another {agreed}"
            )
        return run()

    def drain(self) -> None:
        """Stand-ins until every rank has made all its calls."""
        while (agreed := self._agree(self.IDLE)) != self.IDLE:
            with torch.no_grad():
                if agreed == self.FORWARD:
                    self.model(input_ids=self.token)
                else:
                    self.model.generate(
                        input_ids=self.token,
                        attention_mask=torch.ones_like(self.token),
                        max_new_tokens=1,
                        do_sample=False,
                        synced_gpus=True,
                        pad_token_id=int(self.token[0, 0]),
                    )


def _engine_lm_class() -> type:
    """``EngineLM``: lm-eval's HFLM over a model the job's ranks hold (imported on first use: lm-eval
    pulls in many packages that a run without --general_tasks never needs)."""
    from lm_eval.models.huggingface import HFLM

    class EngineLM(HFLM):
        """HFLM whose ranks are the job's: lm-eval shards documents over `ranks`; under ZeRO-3
        (`lockstep`) every model call runs in step on every rank."""

        def __init__(
            self, model: Any, tokenizer: Any, ranks: Ranks, sharded: bool, lockstep: _Lockstep | None
        ) -> None:
            quiet = logging.getLogger("lm_eval")
            level = quiet.level
            quiet.setLevel(logging.ERROR)  # its warnings about a model object are what we intend
            try:
                super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=BATCH_SIZE)
            finally:
                quiet.setLevel(level)
            self._rank, self._world_size = (ranks.rank, ranks.world) if sharded else (0, 1)
            self.lockstep = lockstep

        def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
            if self.lockstep is None:
                return super()._model_call(inps, attn_mask, labels)
            return self.lockstep.call(_Lockstep.FORWARD, lambda: super(EngineLM, self)._model_call(inps))

        def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any):
            if self.lockstep is None:
                return super()._model_generate(context, max_length, stop, **kwargs)
            return self.lockstep.call(
                _Lockstep.GENERATE,
                lambda: super(EngineLM, self)._model_generate(
                    context, max_length, stop, synced_gpus=True, **kwargs
                ),
            )

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            if self.world_size <= 1:
                return tensor
            tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, tensor)
            return torch.cat(parts)

        def barrier(self) -> None:
            # after each request type: the ranks that finished first keep the others' forwards company
            if self.lockstep is not None:
                self.lockstep.drain()

        def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
            self.barrier()
            if self.world_size <= 1:
                return [obj]
            gathered = [None] * self.world_size if self.rank == dst else None
            torch.distributed.gather_object(obj, gathered, dst=dst)
            return gathered

    return EngineLM


def _flat_scores(results: dict[str, Any], names: Sequence[str]) -> dict[str, float]:
    """``lm_eval/<task>/<metric>`` for each reported name: lm-eval's ``metric,filter`` keys with the
    default filter ("none") left out; stderr, aliases and sizes are not scores."""
    scores = {}
    for name in names:
        row = results.get("results", {}).get(name) or results.get("groups", {}).get(name) or {}
        for key, value in row.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            label = metric if filter_name == "none" else f"{metric},{filter_name}"
            scores[f"{PREFIX}{name}/{label}"] = float(value)
    return scores


def score_general_tasks(
    model: torch.nn.Module, tokenizer: Any, tasks: GeneralTasks, ranks: Ranks = ONE_PROCESS
) -> dict[str, float]:
    """Every task of `tasks` scored with `model` (the engine's module, or a plain model in one
    process): ``{"lm_eval/<task>/<metric>": value}``, the same on every rank. Collective with ranks."""
    from lm_eval.evaluator import evaluate

    sharded = ranks.world > 1 and tasks.smallest[1] >= ranks.world
    if ranks.world > 1 and not sharded and not tasks.warned_unsharded and ranks.rank == 0:
        tasks.warned_unsharded = True
        logger.warning(
            "general task %s has %d documents, fewer than the %d ranks: every rank scores every document of "
            "every general task (correct, not sharded)",
            *tasks.smallest,
            ranks.world,
        )
    start = time.perf_counter()
    with evaluating(model) as device:
        # a copy: HFLM may give the tokenizer a pad token, which must not leak into training or export
        tokenizer = copy.deepcopy(tokenizer)
        token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        lockstep = _Lockstep(model, device, token_id) if ranks.synced and ranks.world > 1 else None
        lm = _engine_lm_class()(model, tokenizer, ranks, sharded, lockstep)
        results = evaluate(lm, tasks.task_dict, limit=tasks.limit, bootstrap_iters=0, log_samples=False)
        if lockstep is not None:
            lockstep.drain()  # unsharded, lm-eval calls no barrier
        scores = _flat_scores(results, tasks.names) if results is not None else None
        if sharded:  # rank 0 holds lm-eval's results
            message = [scores]
            torch.distributed.broadcast_object_list(message, src=0)
            scores = message[0]
    if ranks.rank == 0:
        logger.info(
            "general tasks (%s) scored in %.1f s", ", ".join(tasks.names), time.perf_counter() - start
        )
    return scores


def split_scores(scores: dict[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(dsforget's own metrics, the general tasks' as {task: {metric: value}}) of a flat score dict."""
    own: dict[str, float] = {}
    general: dict[str, dict[str, float]] = {}
    for key, value in scores.items():
        if key.startswith(PREFIX):
            task, _, metric = key[len(PREFIX) :].rpartition("/")
            general.setdefault(task, {})[metric] = value
        else:
            own[key] = value
    return own, general
