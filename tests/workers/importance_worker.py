"""One rank of CoFiTune unit importance on a ZeRO-3 partitioned TinyLM; rank 0 saves the results.

Usage: python importance_worker.py SPEC.json   (SPEC: see tests/methods/test_importance.py)

The model is built under deepspeed.zero.Init (before any deepspeed.initialize, as in the real
job), loaded with the dense reference's weights, and handed to compute_importance with this
rank's share of the batches. Afterwards the worker checks that the model is still partitioned,
unchanged and hook-free, and that a ZeRO-3 training engine can still be built on it and step.
"""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch
import torch._dynamo  # noqa: F401  (before zero.Init: see dsforget.train.job.load_model)
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from tiny import SEQ, TinyLM

from dsforget.methods.cofitune.importance import compute_importance, mask_gradients

CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.0,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}


def hook_counts(model: torch.nn.Module) -> list[int]:
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    ]


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    deepspeed.init_distributed(dist_backend="gloo")
    rank = deepspeed.comm.get_rank()
    with deepspeed.zero.Init(config_dict_or_path=CONFIG):
        model = TinyLM()
    state = torch.load(spec["init"])
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        for name, param in params.items():
            param.data.copy_(state[name])
    model.never_used.requires_grad_(False)  # a flag that must survive
    model.eval()
    hooks_before = hook_counts(model)
    all_batches = torch.load(spec["batches"])
    mine = [all_batches[index] for index in spec["split"][rank]]

    # Independent of the library's bookkeeping: after every gather, how many parameter entries
    # of the model are materialised on this rank.
    peak = [0]
    enter = deepspeed.zero.GatheredParameters.__enter__

    def counting_enter(self):
        enter(self)
        live = sum(p.ds_numel for p in model.parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)
        peak[0] = max(peak[0], live)

    deepspeed.zero.GatheredParameters.__enter__ = counting_enter
    try:
        raw = mask_gradients(model.llama, mine, dropout=spec["dropout"], seed=spec["seed"])
        importance = compute_importance(
            model.llama, iter(mine), dropout=spec["dropout"], seed=spec["seed"], source="zero3"
        )
    finally:
        deepspeed.zero.GatheredParameters.__enter__ = enter

    checks = {
        "partitioned": all(
            p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0 for p in model.parameters()
        ),
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": any(m.training for m in model.modules()),
        "grads": [name for name, p in model.named_parameters() if p.grad is not None],
        "hooks_unchanged": hook_counts(model) == hooks_before,
        "peak_live_numel": peak[0],
    }
    with deepspeed.zero.GatheredParameters(list(params.values())):
        after = {name: p.detach().clone() for name, p in params.items()}

    # The later training initialize must still work on the same partitioned model.
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=CONFIG
    )
    ids = all_batches[0]["input_ids"][:1, :SEQ]
    loss = engine(ids)
    engine.backward(loss)
    engine.step()
    with deepspeed.zero.GatheredParameters(list(params.values())):
        trained = {name: p.detach().clone() for name, p in params.items()}
    checks["train_loss"] = float(loss)
    checks["trained_moved"] = not torch.equal(trained["llama.lm_head.weight"], after["llama.lm_head.weight"])

    if rank == 0:
        result = {"raw": raw, "importance": {**importance.tensors(), "meta": importance.meta}}
        torch.save({**result, "after": after, "checks": checks}, spec["out"])
    print(f"rank {rank} done, {len(mine)} batches, checks {checks}")
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()
    # As in train_tiny.py: skip the interpreter teardown that sometimes aborts after ZeRO-3 on CPU.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
