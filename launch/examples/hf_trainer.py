"""dsforget's optimizer in a Hugging Face Trainer, with or without DeepSpeed.

    python launch/examples/hf_trainer.py                                        # one process
    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 launch/examples/hf_trainer.py --zero 3   # 2 CPU ranks
    .venv/bin/deepspeed --num_gpus 8 launch/examples/hf_trainer.py --zero 3     # 8 GPUs

Use ``dsforget.hf.ForgetTrainer`` with ``make_optimizer=``: under DeepSpeed transformers drops
an optimizer passed as ``optimizers=(optimizer, None)`` and trains with its own AdamW. The
Trainer builds the engine itself (through accelerate); ForgetAdamW then finds DeepSpeed's
partitions from its parameters on its first step, so ZeRO-1/2/3 work unchanged. Pass the
DeepSpeed config through ``dsforget.engine.prepare_config`` (it allows the client optimizer).
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import dsforget
from dsforget.integration.hf import ForgetTrainer


class CountingSequences(torch.utils.data.Dataset):
    """Token sequences start, start+1, ...: learnable at once, so the loss visibly falls."""

    def __len__(self) -> int:
        return 256

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(32) + index * 7) % 128
        return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zero", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage (default: no DeepSpeed)"
    )
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--output_dir", default="runs/hf-trainer", help="Trainer output directory")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args()

    torch.manual_seed(0)  # the same initial model on every rank
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    deepspeed_config = None
    if args.zero is not None:
        deepspeed_config = dsforget.engine.prepare_config(
            {
                "zero_optimization": {"stage": args.zero},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        )
    training = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=8,
        max_steps=args.steps,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        deepspeed=deepspeed_config,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = ForgetTrainer(
        model=model,
        args=training,
        train_dataset=CountingSequences(),
        make_optimizer=lambda model: dsforget.MoFOAdamW(model.named_parameters(), lr=3e-3, fraction=0.15),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        print(f"losses every 10 steps: {', '.join(f'{loss:.4f}' for loss in losses)}", flush=True)
        optimizer = trainer.forget_optimizer
        steps = max((int(state["step"]) for state in optimizer.state.values()), default=0)
        print(f"{type(optimizer).__name__} steps: {steps}", flush=True)


if __name__ == "__main__":
    main()
