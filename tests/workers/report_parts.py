"""One rank of the job's report path on the tiny lab: sharded evaluation, streamed drift and the
streamed Hugging Face export, each beside its one-process reference.

Usage: python report_parts.py SPEC.json   (SPEC: see tests/train/test_scale.py)
Rank 0 writes SPEC["out"]/result.json with both sides of every comparison.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsforget
from dsforget.eval.forgetting import DriftSums, EvalSources, drift, evaluate
from dsforget.integration.checkpoint_weights import CheckpointWeights
from dsforget.integration.ds_config import job_config
from dsforget.integration.export import full_tensors, save_hf_checkpoint
from dsforget.lab import LabConfig, build_lab
from dsforget.lab.evaluate import Ranks
from dsforget.train.job import load_model


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = deepspeed.comm.get_rank()
    lab = build_lab(LabConfig.preset("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(lab.model_dir)
    # odd counts: the ranks' slices differ in size, so ZeRO-3 needs padding batches
    sources = EvalSources(lab.load_task_eval()[:21], lab.load_facts()[:31], lab.load_heldout_texts()[:11])
    repo = Path(__file__).resolve().parents[2]
    config = job_config(
        repo / "configs" / f"zero{spec['stage']}.json",
        micro_batch_size=4,
        gradient_accumulation=1,
        gradient_clipping=0.0,
        precision="fp32",
    )
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    if spec["stage"] == 3:  # buckets far below the model's size, as for an 8B model with the defaults:
        # prefetching then leaves parameters in flight after a forward outside the training step
        for key in ("stage3_prefetch_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance"):
            config["zero_optimization"][key] = 20_000
    model = load_model(lab.model_dir, config)
    optimizer = dsforget.MoFOAdamW(model.named_parameters(), lr=1e-3, fraction=0.5)
    engine, *_ = dsforget.initialize(model=model, optimizer=optimizer, config=config)
    ranks = Ranks.of_engine(engine)
    before = evaluate(engine.module, tokenizer, sources, ranks, batch_size=5)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(3):  # a few steps, so that the tuned model differs from the base
        ids = torch.randint(0, len(tokenizer), (4, 24), generator=generator)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    after = evaluate(engine.module, tokenizer, sources, ranks, batch_size=5)

    gathered = {name: tensor.to("cpu", copy=True) for name, tensor in full_tensors(engine)}
    base = CheckpointWeights(lab.model_dir, engine.module.base_model_prefix)
    streamed = DriftSums()
    for name, tuned in full_tensors(engine):
        if rank == 0:
            streamed.add(name, base.get(name), tuned)
    save_hf_checkpoint(engine, tokenizer, out / "hf_model", max_shard_size=spec["shard_bytes"])
    if rank == 0:
        plain_base = AutoModelForCausalLM.from_pretrained(lab.model_dir, dtype=torch.float32)
        plain_tuned = AutoModelForCausalLM.from_pretrained(lab.model_dir, dtype=torch.float32)
        plain_tuned.load_state_dict(gathered)
        exported = AutoModelForCausalLM.from_pretrained(out / "hf_model", dtype=torch.float32)
        result = {
            "sharded": {"before": before, "after": after},
            "one_process": {
                "before": evaluate(plain_base, tokenizer, sources, batch_size=7),
                "after": evaluate(plain_tuned, tokenizer, sources, batch_size=7),
            },
            "drift_streamed": streamed.result(),
            "drift_whole": drift(plain_base.state_dict(), plain_tuned.state_dict()),
            "export_equal": {
                name: bool(torch.equal(tensor, gathered[name]))
                for name, tensor in exported.state_dict().items()
            },
            "export_files": sorted(p.name for p in (out / "hf_model").iterdir()),
        }
        (out / "result.json").write_text(json.dumps(result, indent=1))
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/workers/train_tiny.py: teardown after DeepSpeed on CPU may abort


if __name__ == "__main__":
    main()
