"""The fine-tuning job behind launch/finetune.py: build, train, report.

`FinetuneJob` holds what a run builds (inputs, data, model, plan, optimizer, engine) so the entry
point reads as parse -> build -> train -> report. Resume: --resume auto continues from the newest
complete checkpoint in output_dir (or --resume names one: a rewind), after checking that it was
written by the same kind of run (checkpoint.check_resume), and reads the plan back from it
instead of building a new one; the run's lr, betas, eps and weight decay replace the saved ones
(job.apply_hyperparameters, logged). --resume never sets a previous run's outputs aside
(``superseded-<time>/``) before starting. A run whose checkpoint already reached the last step
and whose report.json describes it trains nothing, keeps its outputs and exits 0.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from ..atomic import write_atomic
from ..data import PaddingCollator
from ..eval.forgetting import DriftSums, evaluate
from ..eval.general_tasks import score_general_tasks
from ..eval.report import print_summary, run_report, trajectory, write_report
from ..integration.checkpoint_weights import CheckpointWeights
from ..integration.distributed import init_distributed, rank0_decides
from ..integration.export import full_tensors, save_adapter, save_hf_checkpoint
from ..integration.initialize import initialize
from ..lab.evaluate import Ranks
from ..methods.coordinator import build_plan
from ..methods.lora import add_adapters
from ..methods.resampling import Resampler
from ..optim.comm import close_process_group
from ..optim.optimizer import ForgetAdamW
from ..optim.params import full_shape
from ..optim.plan import MaskPlan
from ..strict_json import dumps
from . import checkpoint, faults
from .cofitune_importance import ensure_importance, needs_importance
from .inputs import prepare_training_data, resolve_inputs
from .job import (
    apply_hyperparameters,
    deepspeed_config,
    environment,
    identity_defaults,
    load_model,
    lr_factor,
    run_identity,
    setup_logging,
)
from .memory import PeakMarks, peak_memory_of_ranks, return_freed_memory
from .run_config import RunConfig
from .tracking import open_trackers, parse_report_to
from .trainer import LoopConfig, Trainer, TrainStats, steps_per_epoch

logger = logging.getLogger("dsforget")

# What a run leaves in output_dir that describes that run alone; --resume never moves them aside
# (config.json and plan.json are rewritten by every run; importance.safetensors is a cache).
RUN_OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "tensorboard",
    "wandb",
    "before.json",
    "report.json",
    "report.png",
    "hf_model",
    "adapter",
)


def resume_source(config: RunConfig, output: Path) -> Path | None:
    """The checkpoint this run continues from: --resume auto, never, or a path."""
    if config.resume == "auto":
        return checkpoint.latest_checkpoint(output / "checkpoints")
    return None if config.resume == "never" else Path(config.resume)


def set_aside_previous_run(output: Path) -> Path | None:
    """Move a previous run's outputs (RUN_OUTPUTS) into ``output/superseded-<time>/`` so that a
    fresh start neither mixes its metrics with theirs nor loses to their checkpoints; returns
    that folder, or None when there was nothing to move."""
    present = [name for name in RUN_OUTPUTS if (output / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = output / f"superseded-{stamp}"
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = output / f"superseded-{stamp}-{suffix}"
    aside.mkdir(parents=True)
    for name in present:
        shutil.move(str(output / name), str(aside / name))
    newest = checkpoint.latest_checkpoint(aside / "checkpoints")
    logger.warning(
        "--resume never: the previous run in %s (%s) was moved to %s; delete it when no longer needed",
        output,
        f"checkpoint {newest.name}" if newest else "no complete checkpoint",
        aside,
    )
    return aside


def finished_report(output: Path, step: int) -> dict[str, Any] | None:
    """report.json in `output` when it describes a run that ended at `step`, else None."""
    path = output / "report.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    return report if report.get("train", {}).get("steps") == step else None


class FinetuneJob:
    """One fine-tuning run on every rank: `build`, then `train`, then `report`."""

    def __init__(self, config: RunConfig) -> None:
        import deepspeed

        self.config = config
        # also under mpirun: dsforget/integration/distributed.py; every collective of the job is
        # bounded: comm_timeout_s, or eval_timeout_s where the others wait for rank 0 alone
        init_distributed(timeout_s=config.comm_timeout_s)
        self.rank, self.world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
        setup_logging(self.rank)
        return_freed_memory()  # before the model is loaded: CPU ranks only
        torch.manual_seed(config.seed)
        self.output = Path(config.output_dir)
        self.finished: dict[str, Any] | None = None  # the report of a run that has nothing to train
        self.peaks = PeakMarks()  # report.json's memory: where each rank's peak was reached
        if self.rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            if config.resume == "never":
                set_aside_previous_run(self.output)
        deepspeed.comm.barrier()  # no rank looks into output_dir before it is set up

    # -- build --------------------------------------------------------------------------------

    def build(self) -> None:
        """Inputs, data, model, plan, optimizer and engine; then the base model's scores."""
        config = self.config
        self.inputs = resolve_inputs(config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.inputs.model_dir)
        self.data = prepare_training_data(config, self.inputs, self.tokenizer, self.rank, self.world)
        flatten = config.attn_implementation == "flash_attention_2"  # packed rows: see PaddingCollator
        self.collator = PaddingCollator.for_tokenizer(self.tokenizer, flatten=flatten)
        per_epoch = steps_per_epoch(
            self.data.epoch_examples,
            config.micro_batch_size,
            self.world,
            config.gradient_accumulation,
            mixed=self.data.mixture is not None,
        )
        self.per_epoch = per_epoch
        self.total_steps = config.max_steps or config.epochs * per_epoch
        ds_config = deepspeed_config(config)
        self.model = load_model(
            self.inputs.model_dir, ds_config, config.attn_implementation, config.gradient_checkpointing
        )
        if "lora" in config.method.split("+"):  # every rank, before the plan and DeepSpeed's partitions
            add_adapters(self.model, config.method_options, seed=config.seed)
        self.peaks.mark("load")
        self.run = run_identity(config, self.model)  # what a resume must match (checkpoint.check_resume)
        self.resume_from = resume_source(config, self.output)
        if self.resume_from is not None:
            checkpoint.check_resume(self.resume_from, self.run, self.world, defaults=identity_defaults())
            if self._nothing_to_train(checkpoint.saved_step(self.resume_from)):
                return  # config.json included: the outputs describe the finished run
        if self.rank == 0:
            (self.output / "config.json").write_text(dumps(config.to_dict(), indent=2) + "\n")
        every = per_epoch if config.resample_each_epoch else config.resample_every
        self.resampler = (
            Resampler(self.model, config.method, config.method_defaults(), config.method_options, every)
            if every
            else None
        )
        self.plan = self._choose_plan()
        if self.rank == 0:
            self.plan.save(self.output / "plan.json")
        self.optimizer = ForgetAdamW(
            self.model.named_parameters(),
            plan=self.plan,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            topk=config.topk,
            decay_scope=config.decay_scope,
            backend=config.kernel_backend,
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config, self.total_steps))
        self.engine, *_ = initialize(
            model=self.model, optimizer=self.optimizer, config=ds_config, lr_scheduler=self.schedule
        )
        faults.bound_process_groups(config.comm_timeout_s)  # the groups DeepSpeed just created
        self.peaks.mark("initialize")
        self._score_base()
        self.peaks.mark("score_base")

    def _choose_plan(self) -> MaskPlan:
        """The checkpoint's plan on resume; every matrix HFT could draw when it resamples (draws
        switch what trains); else the method's plan, built on rank 0 and broadcast."""
        config = self.config
        if self.resume_from is not None:
            return checkpoint.read_plan(self.resume_from)
        if self.resampler is not None:
            return self.resampler.membership_plan()
        options = dict(config.method_options)
        if needs_importance(config):  # CoFiTune's fine level, measured on this model before training
            options["importance"] = str(
                ensure_importance(
                    config,
                    self.model,
                    self.tokenizer,
                    self.data.task_train,  # the task files' examples: replay is general text
                    self.collator,
                    self.output,
                    self.rank,
                    self.world,
                )
            )
        return build_plan(self.model, config.method, config.method_defaults(), **options)

    def _nothing_to_train(self, step: int) -> bool:
        """Whether the checkpoint at `step` ends this run and its report is written: then the run
        keeps what it has and builds nothing more (says so on rank 0)."""
        if step < self.total_steps:
            return False
        self.finished = finished_report(self.output, step)
        how = (
            "start over with --resume never (the old run is set aside) or another --output_dir; "
            "train longer with a larger --max_steps or --epochs"
        )
        if self.finished is not None:
            logger.warning(
                "%s: finished at step %d (this run's end: step %d); nothing to train, report.json and "
                "the other outputs are kept as they are. To %s",
                self.resume_from,
                step,
                self.total_steps,
                how,
            )
            return True
        logger.warning(
            "%s: the checkpoint is at step %d, the end of this run (step %d); nothing to train, "
            "writing the report. To %s",
            self.resume_from,
            step,
            self.total_steps,
            how,
        )
        return False

    def _scores(self) -> dict[str, float]:
        """Every rank scores its slice with the engine's model (dsforget's metrics, then the
        --general_tasks' ``lm_eval/<task>/<metric>``); then ZeRO-3 releases what its prefetching
        left gathered or in flight for a backward pass that does not come. Collective."""
        ranks = Ranks.of_engine(self.engine)
        scores = evaluate(self.engine.module, self.tokenizer, self.inputs.eval_sources, ranks)
        if self.inputs.general_tasks is not None:
            scores.update(
                score_general_tasks(self.engine.module, self.tokenizer, self.inputs.general_tasks, ranks)
            )
        self.engine.empty_partition_cache()
        return scores

    def _score_base(self) -> None:
        """The base model's scores, once per output_dir (kept across resumes): taken with the
        engine before its first step, every rank scoring a slice (rank 0 decides and writes)."""
        import deepspeed

        self.before_file = self.output / "before.json"
        with faults.collective_phase("scoring the base model (before.json)", self.config.eval_timeout_s):
            if rank0_decides(self.rank == 0 and self.before_file.exists()):
                return
            scores = self._scores()
            if self.rank == 0:
                write_atomic(self.before_file, dumps(scores))
            deepspeed.comm.barrier()  # bounded here, not by the first training collective

    # -- train --------------------------------------------------------------------------------

    def train(self) -> TrainStats:
        """Train to the end (or to a stop signal: then save and exit with status 75)."""
        config = self.config
        if self.finished is not None:
            return TrainStats(steps=self.finished["train"]["steps"])
        parent = self.resume_from  # what the next checkpoint continues (checkpoint.save prunes by it)

        def save(position: checkpoint.TrainerState) -> None:
            nonlocal parent
            parent = checkpoint.save(
                self.engine,
                self.output / "checkpoints",
                position,
                self.plan,
                keep=config.keep_checkpoints,
                run=self.run,
                parent=parent,
            )

        position = checkpoint.TrainerState(0, 0, 0)
        if self.resume_from is not None:
            position = checkpoint.load(self.engine, self.resume_from)
            changed = apply_hyperparameters(self.optimizer, self.schedule, config)
            if changed:
                logger.warning(
                    "resume from %s: this run's settings replace the checkpoint's: %s",
                    self.resume_from,
                    ", ".join(changed),
                )
        before_step = None
        if self.resampler is not None:
            resampler, optimizer = self.resampler, self.optimizer

            def before_step(step: int) -> None:
                resampler.before_step(step, optimizer)

        self.trackers = open_trackers(parse_report_to(config.report_to), self.output, config.to_dict())
        trainer = Trainer(
            self.engine,
            self.data.train,
            self.data.validation,
            self.collator,
            LoopConfig.from_run(config, self.total_steps),
            save=save,
            before_step=before_step,
            score=self._scores,
            trackers=self.trackers,
            mixture=self.data.mixture,
        )
        stats = trainer.fit(position)
        self.peaks.mark("train")
        if stats.preempted:  # a checkpoint is saved; the same command resumes from it
            if self.trackers is not None:
                self.trackers.close()
            faults.exit_preempted()  # status faults.PREEMPTED_EXIT_CODE (75)
        return stats

    # -- report -------------------------------------------------------------------------------

    def report(self, stats: TrainStats) -> dict[str, Any] | None:
        """Export, score the tuned model and write report.json / report.png (rank 0's report)."""
        import deepspeed

        if self.finished is not None:  # a finished run's report stays as it is
            return self.finished if self.rank == 0 else None
        timeout = self.config.eval_timeout_s
        if self.config.export:
            with faults.collective_phase("writing hf_model", timeout):
                save_hf_checkpoint(
                    self.engine, self.tokenizer, self.output / "hf_model", self.config.export_max_shard_size
                )
            self.peaks.mark("export")
        if self.config.export_adapter:
            with faults.collective_phase("writing adapter", timeout):
                save_adapter(self.engine, self.output / "adapter")
        with faults.collective_phase("scoring the tuned model (report.json)", timeout):
            after = stats.scores if stats.scores is not None else self._scores()
            self.peaks.mark("score_tuned")
            moved = self._drift()
            self.peaks.mark("drift")
            memory = peak_memory_of_ranks(self.world, self.peaks)  # export and scoring done
            report = None
            if self.rank == 0:
                before = json.loads(self.before_file.read_text())
                report = run_report(
                    config=self.config,
                    plan=self.plan,
                    optimizer=self.optimizer,
                    shapes={name: full_shape(p) for name, p in self.model.named_parameters()},
                    before=before,
                    after=after,
                    drift=moved,
                    stats=stats,
                    world=self.world,
                    environment=environment(),
                    memory=memory,
                    trajectory=trajectory(self.output / "metrics.jsonl", before),
                )
                if self.data.mixture is not None:
                    report["data"] = self._mixed_data(stats.steps)
                write_report(report, self.output)
                print_summary(report, self.output)
                self.trackers.summary(report)  # rank 0 holds the trackers
                self.trackers.close()
            deepspeed.comm.barrier()
        return report

    def _mixed_data(self, steps: int) -> dict[str, Any]:
        """report.json's ``data``: the mixed sources, their weights and expected shares, and the
        shares the run's `steps` optimizer steps drew (all ranks' examples together)."""
        config = self.config
        per_step = config.micro_batch_size * self.world * config.gradient_accumulation
        described = self.data.mixture.describe(steps * per_step, self.per_epoch * per_step)
        described["unit"] = "packed block" if config.packing else "example"  # what a slot holds
        return described

    def _drift(self) -> dict[str, dict[str, float]] | None:
        """How far the tuned weights moved from the checkpoint's, one parameter at a time (rank 0's
        result). Collective under ZeRO-3; the base tensors are read lazily from the checkpoint."""
        base = (
            CheckpointWeights(self.inputs.model_dir, self.model.base_model_prefix) if self.rank == 0 else None
        )
        sums, missing = DriftSums(), []
        for name, tuned in full_tensors(self.engine):  # every rank: each takes part in every gather
            before = None if base is None else base.get(name)
            if before is not None:
                sums.add(name, before.to(tuned.device), tuned)
            elif base is not None:
                missing.append(name)
        if base is None:
            return None
        if missing:
            logger.warning(
                "drift leaves out %d tensor(s) that %s does not hold under the model's names: %s",
                len(missing),
                self.inputs.model_dir,
                ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
            )
        return sums.result()

    def close(self) -> None:
        close_process_group()  # gloo's workers finish first: destroying the group alone can abort the exit
