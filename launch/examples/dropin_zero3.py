"""MoFO as a drop-in for AdamW in an existing DeepSpeed ZeRO-3 script: two lines change.

    deepspeed --num_gpus 8 launch/examples/dropin_zero3.py --deepspeed_config configs/zero3.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/examples/dropin_zero3.py   # CPU ranks

The model is a small randomly initialised Llama and the data counting sequences (start, start+1,
...), so the script runs anywhere and the loss visibly falls; replace both with your own.
"""

from __future__ import annotations

import argparse

import deepspeed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dsforget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepspeed_config", default="configs/zero3.json", help="DeepSpeed JSON config")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args()

    deepspeed.init_distributed()
    torch.manual_seed(0)  # every rank builds the same initial model
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)

    # was: optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer = dsforget.MoFOAdamW(model.named_parameters(), lr=3e-3, fraction=0.15)
    # was: engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=...)
    ds_config = {"train_micro_batch_size_per_gpu": 4, **dsforget.load_deepspeed_config(args.deepspeed_config)}
    engine, *_ = dsforget.initialize(model=model, optimizer=optimizer, config=ds_config)

    generator = torch.Generator().manual_seed(1 + engine.global_rank)
    for step in range(args.steps):
        starts = torch.randint(0, config.vocab_size, (4, 1), generator=generator)
        tokens = ((starts + torch.arange(32)) % config.vocab_size).to(engine.device)
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        if engine.global_rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    dsforget.close_process_group()  # optional: dsforget.initialize does it at exit


if __name__ == "__main__":
    main()
