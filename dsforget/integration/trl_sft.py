"""dsforget's optimizer in TRL's ``SFTTrainer`` (needs ``pip install 'dsforget[trl]'``).

Imported only through ``dsforget.hf.ForgetSFTTrainer``, so that dsforget works without trl.
"""

from __future__ import annotations

from trl import SFTTrainer

from .hf import ForgetOptimizerMixin


class ForgetSFTTrainer(ForgetOptimizerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` whose optimizer is ``make_optimizer(model)``, as in ``ForgetTrainer``.

    SFTTrainer builds its optimizer through ``Trainer.create_optimizer``, and under DeepSpeed
    transformers drops an optimizer passed as ``optimizers=(optimizer, None)`` and trains with
    its own AdamW, silently; so the ForgetAdamW is built in ``create_optimizer`` (and
    ``optimizers=`` is refused). Its lr is the base lr the scheduler scales;
    ``forget_optimizer`` is the ForgetAdamW itself.
    """
