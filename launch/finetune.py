"""Fine-tune a causal LM with a forgetting-aware method inside DeepSpeed, and report forgetting.

With no arguments it runs the lab: a tiny Llama pretrained on an invented world (built once and
cached), fine-tuned with MoFO under ZeRO-3, with task gain against forgetting printed at the end.

    deepspeed --num_gpus 8 launch/finetune.py                       # the lab on 8 GPUs
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py    # the lab on 2 CPU ranks
    deepspeed --num_gpus 8 launch/finetune.py --model /ckpt/Llama-3.1-8B --data sft.jsonl \\
        --general_text general.jsonl --method mofo --lr 1e-5 --deepspeed configs/zero3.json
    deepspeed --num_gpus 8 launch/finetune.py --config my_run.yaml --method full
    deepspeed --num_gpus 8 launch/finetune.py --model /ckpt/Llama-3.1-8B --data a.jsonl:0.7,b.jsonl:0.3 \\
        --replay_text general.jsonl --replay_ratio 0.1    # two files mixed, 10% replayed general text

It also runs under torchrun, srun (launch/slurm/) and mpirun (rank discovery:
dsforget/integration/distributed.py). Outputs in --output_dir: config.json, plan.json,
metrics.jsonl, tensorboard/ (and wandb/ with --report_to wandb), checkpoints/, hf_model/
(safetensors; lora: merged), adapter/ (--export_adapter), report.json and report.png.
A rerun with the same output_dir resumes (a finished one says so and trains nothing;
--resume never starts over, moving the old run to output_dir/superseded-<time>/). SIGTERM or
SIGUSR1 during training: every rank saves after the current step and exits with status 75
(dsforget/train/faults.py says what each launcher does with signals and failed ranks).
"""

from __future__ import annotations

import os
import sys

# Nothing is downloaded: lm-eval's tasks (--general_tasks) read local files or the Hugging Face
# cache. Set before the Hugging Face libraries are imported, which read them once.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dsforget.errors import run_main  # noqa: E402
from dsforget.train.finetune import FinetuneJob  # noqa: E402
from dsforget.train.run_config import parse_run_config  # noqa: E402


def main(argv: list[str]) -> None:
    config = parse_run_config(argv, description=__doc__)
    job = FinetuneJob(config)
    job.build()
    stats = job.train()
    job.report(stats)
    job.close()


if __name__ == "__main__":
    run_main(main, sys.argv[1:])  # a user error: one line on rank 0, status 2
