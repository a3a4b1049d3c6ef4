"""CoFiTune (Zhang et al. 2024, arXiv 2404.10306): train chosen modules in chosen layers
(plan.py) and scale each unit's gradient by 1 - its importance for general ability
(importance.py)."""

from .plan import MODULE_SETS, cofitune_plan

__all__ = ["MODULE_SETS", "cofitune_plan"]
