"""dsforget's optimizer in TRL's SFTTrainer, on chat data, with or without DeepSpeed.

    .venv/bin/python launch/examples/sft_trainer.py                                       # one process
    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 launch/examples/sft_trainer.py --zero 3  # 2 CPU ranks

Needs TRL: ``pip install 'dsforget[trl]'``. Use ``dsforget.hf.ForgetSFTTrainer`` with
``make_optimizer=``, as ``ForgetTrainer`` in hf_trainer.py: SFTTrainer builds its optimizer in
``Trainer.create_optimizer``, and under DeepSpeed transformers drops an optimizer passed as
``optimizers=(optimizer, None)``. A tiny Llama, randomly initialised, and a tokenizer trained
here on the chats themselves: nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig

import dsforget
from dsforget.hf import ForgetSFTTrainer
from dsforget.lab.tokenizer import train_tokenizer

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def chats() -> Dataset:
    """64 conversations in TRL's "messages" format, each different: a question and its answer."""
    rows = []
    for index in range(64):
        a, b = NUMBERS[index % 8], NUMBERS[index // 8]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"what comes after {a} and after {b}?"},
                    {
                        "role": "assistant",
                        "content": f"after {a} comes {NUMBERS[index % 8 + 1]}, "
                        f"after {b} comes {NUMBERS[index // 8 + 1]}.",
                    },
                ]
            }
        )
    return Dataset.from_list(rows)


def tokenizer_for(dataset: Dataset) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a chat template, trained on the dataset's own text."""
    texts = [message["content"] for row in dataset for message in row["messages"]]
    return train_tokenizer(texts, vocab_size=320, model_max_length=64)


def tiny_llama(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same initial model on every rank
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def sft_config(output_dir: str, steps: int, zero: int | None, batch: int = 8) -> SFTConfig:
    deepspeed_config = None
    if zero is not None:
        deepspeed_config = dsforget.engine.prepare_config(
            {
                "zero_optimization": {"stage": zero},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        )
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        max_steps=steps,
        max_length=64,
        lr_scheduler_type="constant",
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        bf16=False,
        activation_checkpointing=False,
        deepspeed=deepspeed_config,
        use_cpu=not torch.cuda.is_available(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zero", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage (default: no DeepSpeed)"
    )
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--output_dir", default="runs/sft-trainer", help="Trainer output directory")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args()

    dataset = chats()
    tokenizer = tokenizer_for(dataset)
    model = tiny_llama(tokenizer)
    trainer = ForgetSFTTrainer(
        model=model,
        args=sft_config(args.output_dir, args.steps, args.zero),
        train_dataset=dataset,
        processing_class=tokenizer,
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
