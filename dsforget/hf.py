"""``dsforget.hf.ForgetTrainer``: the stable name of dsforget.integration.hf.ForgetTrainer."""

from .integration.hf import ForgetTrainer

__all__ = ["ForgetTrainer"]
