"""Hugging Face trainers with dsforget's optimizer, built where the trainer asks for one.

``dsforget.hf.ForgetTrainer`` is the stable name of dsforget.integration.hf.ForgetTrainer
(``transformers.Trainer``); ``dsforget.hf.ForgetSFTTrainer`` is TRL's ``SFTTrainer``, loaded on
first use so that dsforget imports without trl (``pip install 'dsforget[trl]'``).
"""

from typing import Any

from .integration.hf import ForgetTrainer

__all__ = ["ForgetTrainer"]  # ForgetSFTTrainer is left out: ``import *`` must work without trl
TRL_INSTALL = "pip install 'dsforget[trl]'"


def __getattr__(name: str) -> Any:
    if name == "ForgetSFTTrainer":
        try:
            import trl  # noqa: F401
        except ImportError as error:
            raise ImportError(
                f"dsforget.hf.ForgetSFTTrainer needs TRL, which is not installed: {TRL_INSTALL} ({error})"
            ) from error
        from .integration.trl_sft import ForgetSFTTrainer

        return ForgetSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "ForgetSFTTrainer"])
