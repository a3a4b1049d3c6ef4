"""One rank of tests/integration/test_trl.py: launch/examples/sft_trainer.py's chats, tokenizer and
tiny Llama under ZeRO-3, trained by ForgetSFTTrainer with MoFOAdamW; writes what the rank saw and did.

argv: output file (rank r writes <file>.<r>.json), steps, micro-batch, MoFO fraction.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
from launcher import REPO

import dsforget
from dsforget.hf import ForgetSFTTrainer

sys.path.insert(0, str(REPO / "launch" / "examples"))
import sft_trainer as example  # noqa: E402


def main(out: str, steps: int, batch: int, fraction: float) -> None:
    dataset = example.chats()
    tokenizer = example.tokenizer_for(dataset)
    model = example.tiny_llama(tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = ForgetSFTTrainer(
        model=model,
        args=example.sft_config(str(Path(out).parent / "trainer"), steps, zero=3, batch=batch),
        train_dataset=dataset,
        processing_class=tokenizer,
        make_optimizer=lambda m: dsforget.MoFOAdamW(m.named_parameters(), lr=3e-3, fraction=fraction),
    )
    seen: list[list[int]] = []
    collate = trainer.data_collator

    def recording(examples: list[dict]) -> dict:
        seen.extend(list(map(int, example["input_ids"])) for example in examples)
        return collate(examples)

    trainer.data_collator = recording
    trainer.train()
    del seen[steps * batch :]  # accelerate's loader fetches one batch ahead, which no step trains on
    optimizer = trainer.forget_optimizer
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        changed = {
            name: (p.detach() != before[name]).double().mean().item() for name, p in model.named_parameters()
        }
    rank = torch.distributed.get_rank()
    result = {
        "world": torch.distributed.get_world_size(),
        "seen": seen,
        "global_step": trainer.state.global_step,
        "optimizer": type(optimizer).__name__,
        "optimizer_steps": sorted({int(state["step"]) for state in optimizer.state.values()}),
        "zero3": hasattr(next(model.parameters()), "ds_id"),
        "modes": {name: optimizer.plan[name].mode for name in changed},
        "changed": changed,
    }
    Path(f"{out}.{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
