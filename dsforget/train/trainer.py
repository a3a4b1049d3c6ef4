"""The training loop of the main job: deterministic, resumable batches and rank-0 reporting.

Batch order comes from ``torch.utils.data.DistributedSampler`` (shuffled per epoch from the run
seed, tail dropped so every rank takes the same number of micro-batches), or, for several files or
replay, from the seeded stream of ``dsforget.mixing.Mixture`` split over ranks the same way; either
way the position (epoch, micro-batch) fully determines what comes next, which is what resume
restores.

Faults (see dsforget.train.faults): a stop signal ends training after the current optimizer step with
a checkpoint (``TrainStats.preempted``); a step with inf/NaN gradients is skipped and counted
(``nonfinite_steps`` in metrics.jsonl), and ``max_nonfinite_steps`` of them in a row raise
``NonFiniteGradientError``; a collective that fails because another rank died or hung raises
``LostRankError`` naming the silent ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from ..errors import ConfigError
from ..mixing import Mixture, rank_share
from ..strict_json import dumps
from . import faults
from .checkpoint import TrainerState
from .tracking import Trackers

logger = logging.getLogger("dsforget")


@dataclass
class TrainStats:
    steps: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    last_loss: float = float("nan")
    validation_loss: float | None = None
    scores: dict[str, float] | None = None  # the evaluation metrics at the end (Trainer's `score`)
    nonfinite_steps: int = 0  # optimizer steps skipped for inf/NaN gradients, resumes included
    preempted: str | None = None  # the stop signal that ended training early, if one did

    @property
    def median_step_ms(self) -> float | None:
        """None when this attempt trained no step (a rerun of a finished run)."""
        times = sorted(self.step_seconds[1:] or self.step_seconds)  # the first step includes warm-up
        return 1000 * times[len(times) // 2] if times else None


def steps_per_epoch(
    examples: int, micro_batch: int, world: int, accumulation: int, mixed: bool = False
) -> int:
    """Optimizer steps in one pass (`mixed`: one epoch of dsforget.mixing's stream); an error when
    the data cannot fill one step."""
    per_step = micro_batch * world * accumulation
    steps = examples // per_step
    if steps == 0:
        what = "an epoch of the mixed data (--data files, --replay_ratio)" if mixed else "the training data"
        raise ConfigError(
            f"{what} has {examples} examples, fewer than one optimizer step takes "
            f"(micro_batch_size {micro_batch} x {world} ranks x gradient_accumulation {accumulation} "
            f"= {per_step}): use fewer ranks, a smaller micro_batch_size or gradient_accumulation, "
            "or more data"
        )
    return steps


@dataclass(frozen=True)
class LoopConfig:
    """How the loop runs: batch shape, length, cadence of logs, validation and checkpoints."""

    micro_batch: int
    accumulation: int
    total_steps: int
    seed: int
    output_dir: Path
    log_every: int
    eval_every: int  # steps between evaluations (validation loss, `score`); 0: only at the end
    save_every: int  # steps between checkpoints; 0: only at the end (or on a stop signal)
    max_nonfinite_steps: int = 10
    comm_timeout_s: float = 0.0

    @classmethod
    def from_run(cls, config: Any, total_steps: int) -> LoopConfig:
        """The loop settings of a RunConfig, for `total_steps` optimizer steps."""
        return cls(
            micro_batch=config.micro_batch_size,
            accumulation=config.gradient_accumulation,
            total_steps=total_steps,
            seed=config.seed,
            output_dir=Path(config.output_dir),
            log_every=config.log_every,
            eval_every=config.eval_every,
            save_every=config.save_every,
            max_nonfinite_steps=config.max_nonfinite_steps,
            comm_timeout_s=config.comm_timeout_s,
        )


@dataclass
class LossWindow:
    """Sums over micro-batches of applied steps: loss, micro-batches and trained (label) tokens."""

    loss_sum: float = 0.0
    micro_batches: float = 0.0
    tokens: float = 0.0

    def add(self, other: LossWindow) -> None:
        self.loss_sum += other.loss_sum
        self.micro_batches += other.micro_batches
        self.tokens += other.tokens

    def as_list(self) -> list[float]:
        return [self.loss_sum, self.micro_batches, self.tokens]


class Trainer:
    """Trains a DeepSpeed engine over `train` (tokenised examples, batched by `collate`)."""

    def __init__(
        self,
        engine: Any,
        train: Sequence[dict],
        validation: Sequence[dict],
        collate: Callable[[Sequence[dict]], dict[str, torch.Tensor]],
        config: LoopConfig,
        save: Callable[[TrainerState], None],
        before_step: Callable[[int], None] | None = None,
        score: Callable[[], dict[str, float]] | None = None,
        trackers: Trackers | None = None,
        mixture: Mixture | None = None,
    ) -> None:
        from deepspeed import comm

        self.engine, self.train, self.validation, self.collate = engine, train, validation, collate
        self.config, self.save = config, save
        self.before_step = before_step  # called with the step number before each optimizer step
        self.score = score  # the run's evaluation metrics (collective): every eval_every steps and at the end
        self.rank, self.world = comm.get_rank(), comm.get_world_size()
        self.guard: faults.NonFiniteGuard | None = None  # set while fit runs where DeepSpeed has no skip
        self.mixture = mixture  # dsforget.mixing.Mixture over `train`, or None: DistributedSampler
        examples = len(train) if mixture is None else mixture.epoch_size
        self.per_epoch = steps_per_epoch(
            examples, config.micro_batch, self.world, config.accumulation, mixed=mixture is not None
        )
        self.metrics_file = config.output_dir / "metrics.jsonl"
        self.trackers = trackers  # --report_to, on rank 0 (the caller closes them)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of `epoch`, as lists of example indices."""
        if self.mixture is not None:
            indices = rank_share(self.mixture.epoch_order(epoch), self.rank, self.world)
        else:
            sampler = DistributedSampler(
                range(len(self.train)),
                num_replicas=self.world,
                rank=self.rank,
                shuffle=True,
                seed=self.config.seed,
                drop_last=True,
            )
            sampler.set_epoch(epoch)
            indices = list(sampler)
        size = self.config.micro_batch
        batches = [indices[i : i + size] for i in range(0, len(indices), size)]
        return batches[: self.per_epoch * self.config.accumulation]

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.engine.device) for key, value in batch.items()}

    def _all_sum(self, values: list[float]) -> list[float]:
        from deepspeed import comm

        tensor = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        comm.all_reduce(tensor)
        return tensor.tolist()

    def validation_loss(self) -> float | None:
        """Token-weighted mean loss over the validation split, every rank on its share."""
        if not self.validation:
            return None
        sampler = DistributedSampler(
            range(len(self.validation)),
            num_replicas=self.world,
            rank=self.rank,
            shuffle=False,
            drop_last=False,
        )
        indices = list(sampler)
        self.engine.eval()
        loss_sum, tokens = 0.0, 0.0
        with torch.no_grad():
            size = self.config.micro_batch
            for start in range(0, len(indices), size):
                batch = self._to_device(
                    self.collate([self.validation[i] for i in indices[start : start + size]])
                )
                count = float((batch["labels"][:, 1:] != -100).sum())
                loss_sum += float(self.engine(**batch, use_cache=False).loss) * count
                tokens += count
        self.engine.train()
        loss_sum, tokens = self._all_sum([loss_sum, tokens])
        return loss_sum / max(tokens, 1.0)

    def _evaluation(self) -> tuple[dict[str, float], float | None, dict[str, float] | None]:
        """(the metrics.jsonl record, validation loss, `score`'s metrics) at this step. Collective."""
        validation = self.validation_loss()
        scores = self.score() if self.score is not None else None
        record = {} if validation is None else {"validation_loss": validation}
        record.update(scores or {})
        return record, validation, scores

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.metrics_file, "a") as file:
            file.write(dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)

    def _step_skipped(self) -> bool:
        """Whether the optimizer step just taken was skipped for inf/NaN gradients (same on every rank)."""
        if self.guard is not None:
            return self.guard.take_skipped()
        return not self.engine.was_step_applied()  # DeepSpeed's skip: the all-reduced norm was not finite

    def fit(self, state: TrainerState) -> TrainStats:
        """Train from `state` to total_steps, or until a stop signal (then ``stats.preempted``).

        Saves at the end either way; raises NonFiniteGradientError or LostRankError.
        """
        stats = TrainStats(steps=state.step, nonfinite_steps=state.nonfinite_steps)
        # DeepSpeed's optimizer wrappers (ZeRO-1/2/3, bf16) skip non-finite steps and say so in
        # `overflow`; ForgetAdamW stepped directly by the engine (no ZeRO, fp32) needs a guard.
        if not hasattr(self.engine.optimizer, "overflow"):
            self.guard = faults.NonFiniteGuard(self.engine.optimizer, self.engine.device, self.world)
        with faults.StopSignals() as stop, faults.comm_timeout(self.config.comm_timeout_s):
            try:
                self._train(state, stats, stop)
            except RuntimeError as error:
                if not faults.is_communication_failure(error):
                    raise
                message = faults.lost_rank_message(
                    self.rank, self.world, stats.steps, error, self.config.comm_timeout_s
                )
                logger.error(message)
                raise faults.LostRankError(message) from error
            finally:
                if self.guard is not None:
                    self.guard.remove()
                    self.guard = None
        return stats

    def _train(self, state: TrainerState, stats: TrainStats, stop: faults.StopSignals) -> None:
        bar = tqdm(
            total=self.config.total_steps,
            initial=state.step,
            disable=self.rank != 0,
            desc="fine-tune",
            unit="step",
            dynamic_ncols=True,
        )
        config = self.config
        window = LossWindow()  # applied steps since the last log line
        in_step = LossWindow()  # the step in progress
        in_a_row = state.nonfinite_in_a_row
        window_start = start = time.perf_counter()
        position = state
        self.engine.train()
        while stats.steps < config.total_steps and stats.preempted is None:
            batches = self.epoch_batches(position.epoch)
            step_start = time.perf_counter()
            for index in range(position.micro_batch, len(batches)):
                if self.before_step is not None and index % config.accumulation == 0:
                    self.before_step(stats.steps)
                batch = self._to_device(self.collate([self.train[i] for i in batches[index]]))
                # No cache: training never reads one, and with one transformers would not detect
                # packed sequences in the position ids (the examples of a block would attend
                # to each other)
                loss = self.engine(**batch, use_cache=False).loss
                self.engine.backward(loss)
                self.engine.step()
                in_step.add(LossWindow(loss.item(), 1, float((batch["labels"] != -100).sum())))
                if (index + 1) % config.accumulation:
                    continue
                stats.steps += 1
                stats.step_seconds.append(time.perf_counter() - step_start)
                step_start = time.perf_counter()
                if self._step_skipped():
                    stats.nonfinite_steps += 1
                    in_a_row += 1
                    self._nonfinite_step(stats.steps, stats.nonfinite_steps, in_a_row)
                else:
                    in_a_row = 0
                    window.add(in_step)
                in_step = LossWindow()
                # An epoch holds a whole number of steps, so its last micro-batch ends a step.
                ended = index + 1 == len(batches)
                position = TrainerState(
                    stats.steps,
                    position.epoch + ended,
                    0 if ended else index + 1,
                    nonfinite_steps=stats.nonfinite_steps,
                    nonfinite_in_a_row=in_a_row,
                )
                if stats.steps % config.log_every == 0 or stats.steps == config.total_steps:
                    loss_sum, micro_batches, tokens = self._all_sum(window.as_list())
                    elapsed = time.perf_counter() - window_start
                    record = {"step": stats.steps}
                    if micro_batches:  # every step since the last line may have been skipped
                        stats.last_loss = loss_sum / micro_batches
                        record["loss"] = stats.last_loss
                    record.update(
                        lr=self.engine.get_lr()[0],
                        # trained (answer) tokens only: prompt and padding tokens carry no loss
                        answer_tokens_per_second=tokens / elapsed,
                        epoch=position.epoch,
                        nonfinite_steps=stats.nonfinite_steps,
                    )
                    self._log(record)
                    bar.set_postfix(loss=f"{stats.last_loss:.4f}", ans_tok_s=f"{tokens / elapsed:.0f}")
                    window, window_start = LossWindow(), time.perf_counter()
                bar.update(1)
                if stats.steps == config.total_steps:
                    break
                # Once per step on every rank, so all stop after the same step whoever got the signal.
                if faults.any_rank(stop.received is not None, self.engine.device, self.world):
                    stats.preempted = stop.received or "a stop signal on another rank"
                    break
                if config.eval_every and stats.steps % config.eval_every == 0:
                    record = self._evaluation()[0]
                    if record:
                        self._log({"step": stats.steps, **record})
                if config.save_every and stats.steps % config.save_every == 0:
                    self.save(position)
        bar.close()
        stats.seconds = time.perf_counter() - start
        if stats.preempted is not None:
            logger.warning(
                "stopping after step %d (%s): saving a checkpoint, then exiting with status %d; "
                "the same command resumes from it",
                stats.steps,
                stats.preempted,
                faults.PREEMPTED_EXIT_CODE,
            )
            self._log({"step": stats.steps, "preempted": stats.preempted})
        else:  # the end: evaluated here once, the report takes these scores
            record, stats.validation_loss, stats.scores = self._evaluation()
            if record:
                self._log({"step": stats.steps, **record})
        if stats.steps > state.step:  # else the checkpoint it started from already holds this state
            self.save(position)

    def _nonfinite_step(self, step: int, total: int, in_a_row: int) -> None:
        """Log a skipped step; raise on every rank once `max_nonfinite_steps` came in a row."""
        self._log({"step": step, "nonfinite_gradient": 1, "nonfinite_steps": total})
        if self.rank == 0:
            logger.warning(
                "step %d: inf/NaN gradients, step skipped (parameters and optimizer state unchanged); "
                "%d in a row, %d in total",
                step,
                in_a_row,
                total,
            )
        if in_a_row >= self.config.max_nonfinite_steps:
            raise faults.NonFiniteGradientError(
                f"{in_a_row} optimizer steps in a row (steps {step - in_a_row + 1}-{step}) had inf/NaN "
                f"gradients and were skipped; max_nonfinite_steps={self.config.max_nonfinite_steps} ends the "
                "run here. Training is diverging or the data or model produce inf/NaN: lower --lr, check "
                f"the data of these steps, or raise --max_nonfinite_steps. The parameters are still those "
                f"after step {step - in_a_row}."
            )
