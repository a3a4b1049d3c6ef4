"""A user's script as the README shows it: MoFOAdamW + dsforget.initialize under ZeRO-3, a few
steps, the result written on rank 0, then return: no destroy_process_group, no os._exit.

tests/integration/test_exit.py runs it repeatedly under the deepspeed launcher and requires status
0 every time: it once ended with status 250 ("terminate called without an active exception") in
5 of 40 runs, until dsforget.initialize's exit hook let gloo's worker threads finish before
interpreter finalisation (see dsforget/integration/initialize.py)."""

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
