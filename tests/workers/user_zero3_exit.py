"""A user's script as the README shows it: MoFOAdamW + dsforget.initialize under ZeRO-3, a few
steps, the result written on rank 0, then return: no destroy_process_group, no os._exit.

Reproduces the open exit abort (README, "Known open problem"): run it several times under
`DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 tests/workers/user_zero3_exit.py RESULT` and
look for status 250 / "terminate called without an active exception". It is not in the suite
until the abort is fixed: an intermittent failure there would only make CI flaky."""

import sys

import deepspeed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dsforget


def main(result_file: str) -> None:
    deepspeed.init_distributed()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    optimizer = dsforget.MoFOAdamW(model.named_parameters(), lr=1e-3, fraction=0.2)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
    engine, *_ = dsforget.initialize(model=model, optimizer=optimizer, config=ds_config)
    for _ in range(6):
        ids = torch.randint(0, 128, (2, 16))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    if engine.global_rank == 0:
        with open(result_file, "w") as file:
            file.write(f"{loss.item()}\n")


if __name__ == "__main__":
    main(sys.argv[-1])  # the deepspeed launcher puts --local_rank=N first
