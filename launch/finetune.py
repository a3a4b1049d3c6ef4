"""Fine-tune a causal LM with a forgetting-aware method inside DeepSpeed, and report forgetting.

With no arguments it runs the lab: a tiny Llama pretrained on an invented world (built once and
cached), fine-tuned with MoFO under ZeRO-3, with task gain against forgetting printed at the end.

    deepspeed --num_gpus 8 launch/finetune.py                       # the lab on 8 GPUs
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py    # the lab on 2 CPU ranks
    deepspeed --num_gpus 8 launch/finetune.py --model /ckpt/Llama-3.1-8B --data sft.jsonl \\
        --general_text general.jsonl --method mofo --lr 1e-5 --deepspeed configs/zero3.json
    deepspeed --num_gpus 8 launch/finetune.py --config my_run.yaml --method full

It also runs under torchrun, srun (launch/slurm/) and mpirun (rank discovery: dsforget/distributed.py).
Outputs in --output_dir: config.json, plan.json, metrics.jsonl, tensorboard/, checkpoints/,
hf_model/ (safetensors), report.json and report.png. A rerun with the same output_dir resumes.
SIGTERM or SIGUSR1 during training: every rank saves after the current step and exits with
status 75 (dsforget/faults.py says what each launcher does with signals and failed ranks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsforget
from dsforget import checkpoint, faults
from dsforget.data import DataConfig, PaddingCollator, prepare_data
from dsforget.distributed import init_distributed
from dsforget.export import gather_state_dict, save_hf_checkpoint
from dsforget.forgetting import drift, evaluate, forgetting_summary, format_table, write_report
from dsforget.importance_run import ensure_importance, needs_importance
from dsforget.job import (
    deepspeed_config,
    environment,
    load_model,
    lr_factor,
    resolve_inputs,
    run_identity,
    setup_logging,
)
from dsforget.resampling import Resampler
from dsforget.run_config import RunConfig, parse_run_config
from dsforget.trainer import Trainer, steps_per_epoch


def plain_model(model_dir: Path, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """An unsharded fp32 copy on this process's device, for evaluation on rank 0."""
    from deepspeed.accelerator import get_accelerator

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if state is not None:
        model.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=False)
    return model.to(get_accelerator().current_device_name())


def main(argv: list[str]) -> None:
    config: RunConfig = parse_run_config(argv, description=__doc__)
    init_distributed()  # also under mpirun: dsforget/distributed.py
    rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    setup_logging(rank)
    torch.manual_seed(config.seed)
    output = Path(config.output_dir)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    # build: inputs, data, model, plan, engine
    inputs = resolve_inputs(config)
    tokenizer = AutoTokenizer.from_pretrained(inputs.model_dir)
    data = prepare_data(
        DataConfig(
            path=str(inputs.train_file),
            format=config.data_format,
            max_length=config.max_length,
            packing=config.packing,
            validation_fraction=config.validation_fraction,
            seed=config.seed,
        ),
        tokenizer,
    )
    per_epoch = steps_per_epoch(len(data.train), config.micro_batch_size, world, config.gradient_accumulation)
    total_steps = config.max_steps or config.epochs * per_epoch
    ds_config = deepspeed_config(config)
    model = load_model(inputs.model_dir, ds_config)
    run = run_identity(config, model)  # what a resume must match (checkpoint.check_resume)
    resume_from = (
        checkpoint.latest_checkpoint(output / "checkpoints")
        if config.resume == "auto"
        else (None if config.resume == "never" else Path(config.resume))
    )
    defaults = {"fraction": config.fraction, "seed": config.seed}  # to the methods that take them
    options = dict(config.method_options)
    every = per_epoch if config.resample_each_epoch else config.resample_every
    resampler = Resampler(model, config.method, defaults, options, every) if every else None
    if resume_from is not None:
        checkpoint.check_resume(resume_from, run, world)
        plan = checkpoint.read_plan(resume_from)
    elif resampler is not None:  # every matrix HFT could draw is in the optimizer; draws switch
        plan = resampler.membership_plan()
    else:
        if needs_importance(config):  # CoFiTune's fine level, measured on this model before training
            collator = PaddingCollator.for_tokenizer(tokenizer)
            options["importance"] = str(
                ensure_importance(config, model, tokenizer, data.train, collator, output, rank, world)
            )
        plan = dsforget.build_plan(model, config.method, defaults, **options)
    if rank == 0:
        plan.save(output / "plan.json")
    optimizer = dsforget.ForgetAdamW(
        model.named_parameters(),
        plan=plan,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        topk=config.topk,
        decay_scope=config.decay_scope,
        backend=config.kernel_backend,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, total_steps))
    engine, *_ = dsforget.initialize(
        model=model, optimizer=optimizer, config=ds_config, lr_scheduler=schedule
    )

    # the base model's scores (once per output_dir, kept across resumes)
    before_file = output / "before.json"
    if rank == 0 and not before_file.exists():
        before_file.write_text(
            json.dumps(evaluate(plain_model(inputs.model_dir), tokenizer, inputs.eval_sources))
        )
    deepspeed.comm.barrier()

    # train
    def save(position: checkpoint.TrainerState) -> None:
        checkpoint.save(engine, output / "checkpoints", position, plan, keep=config.keep_checkpoints, run=run)

    position = checkpoint.load(engine, resume_from) if resume_from else checkpoint.TrainerState(0, 0, 0)
    trainer = Trainer(
        engine,
        data.train,
        data.validation,
        PaddingCollator.for_tokenizer(tokenizer),
        micro_batch=config.micro_batch_size,
        accumulation=config.gradient_accumulation,
        total_steps=total_steps,
        seed=config.seed,
        output_dir=output,
        log_every=config.log_every,
        eval_every=config.eval_every,
        save_every=config.save_every,
        save=save,
        max_nonfinite_steps=config.max_nonfinite_steps,
        comm_timeout_s=config.comm_timeout_s,
        before_step=None if resampler is None else lambda step: resampler.before_step(step, optimizer),
    )
    stats = trainer.fit(position)
    if stats.preempted:  # a checkpoint is saved; the same command resumes from it
        faults.exit_preempted()  # status faults.PREEMPTED_EXIT_CODE (75)

    # report
    tuned_state = gather_state_dict(engine)
    if config.export:
        save_hf_checkpoint(engine, tokenizer, output / "hf_model")
    if rank == 0:
        base = plain_model(inputs.model_dir)
        base_state = {name: t.detach().cpu().clone() for name, t in base.state_dict().items()}
        tuned = plain_model(inputs.model_dir, tuned_state)
        optimizer_bytes = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        params = dict(base.named_parameters())
        report = {
            "method": config.method,
            "model": config.model,
            "plan_digest": plan.digest,
            "trainable_share": optimizer.plan.trainable_share(  # the active draw when HFT resamples
                (n, p.numel()) for n, p in params.items() if n in plan.rules
            ),
            "before": json.loads(before_file.read_text()),
            "after": evaluate(tuned, tokenizer, inputs.eval_sources),
            "drift": drift(base_state, tuned_state),
            "train": {
                "steps": stats.steps,
                "seconds": round(stats.seconds, 2),
                "median_step_ms": round(stats.median_step_ms, 2),
                "final_loss": stats.last_loss,
                "validation_loss": stats.validation_loss,
                "world_size": world,
                "optimizer_state_mib_per_rank": round(optimizer_bytes / 2**20, 3),
            },
            "environment": environment(),
        }
        report["summary"] = forgetting_summary(report["before"], report["after"])
        write_report(report, output)
        print(
            f"\n{config.method} on {config.model}: {stats.steps} steps on {world} ranks, "
            f"{report['train']['median_step_ms']} ms/step\n{format_table(report)}\n"
            f"report: {output / 'report.json'}, {output / 'report.png'}",
            flush=True,
        )
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()  # an undestroyed gloo group can abort the exit


if __name__ == "__main__":
    main(sys.argv[1:])
