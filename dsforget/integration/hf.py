"""dsforget's optimizer in a Hugging Face Trainer (or TRL's SFTTrainer), with or without DeepSpeed.

transformers drops an optimizer handed over as ``Trainer(optimizers=(optimizer, None))`` once
DeepSpeed is enabled: its ``deepspeed_init`` sets ``trainer.optimizer = None`` and calls
``create_optimizer()``, which then builds torch's AdamW, and training runs without MoFO and
without a word. The way in that holds under both is to build the optimizer in
``create_optimizer``, which ``ForgetOptimizerMixin`` does for ``ForgetTrainer`` and
``dsforget.hf.ForgetSFTTrainer`` alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import Trainer

from ..optim.optimizer import ForgetAdamW


class ForgetOptimizerMixin:
    """Put before a ``transformers.Trainer`` subclass: ``create_optimizer`` returns
    ``make_optimizer(model)``, a ForgetAdamW, and optimizers the Trainer would drop or ignore
    (``optimizers=(optimizer, ...)``, ``optimizer_cls_and_kwargs=``) are refused."""

    def __init__(self, *args: Any, make_optimizer: Callable[[nn.Module], ForgetAdamW], **kwargs: Any) -> None:
        name = type(self).__name__
        if (kwargs.get("optimizers") or (None, None))[0] is not None:
            raise ValueError(
                f"{name}: pass make_optimizer= instead of optimizers=(optimizer, ...), which "
                "the Trainer discards under DeepSpeed"
            )
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(f"{name}: pass make_optimizer= instead of optimizer_cls_and_kwargs=")
        super().__init__(*args, **kwargs)
        self.make_optimizer = make_optimizer
        self.forget_optimizer: ForgetAdamW | None = None

    def create_optimizer(self, model: nn.Module | None = None) -> ForgetAdamW:
        if self.optimizer is None:
            optimizer = self.make_optimizer(self.model if model is None else model)
            if not isinstance(optimizer, ForgetAdamW):
                raise TypeError(
                    f"{type(self).__name__}: make_optimizer returned a {type(optimizer).__name__}"
                )
            self.optimizer = self.forget_optimizer = optimizer
        return self.optimizer


class ForgetTrainer(ForgetOptimizerMixin, Trainer):
    """A ``transformers.Trainer`` whose optimizer is ``make_optimizer(model)``, e.g.
    ``lambda model: dsforget.MoFOAdamW(model.named_parameters(), lr=2e-5, fraction=0.15)``.

    The optimizer's own lr is the base lr that the Trainer's scheduler scales
    (``TrainingArguments.learning_rate`` is not used). ``forget_optimizer`` is the ForgetAdamW
    itself (under DeepSpeed, ``trainer.optimizer`` becomes accelerate's wrapper of the engine's).
    """
