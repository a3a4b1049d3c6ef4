"""Checks of plan-builder options shared by several methods (each error names the method and key)."""

from __future__ import annotations

from collections.abc import Sequence

from ..optim.plan import PlanError


def name_list(method: str, key: str, value: str | Sequence[str] | None, split: bool = True) -> list[str]:
    """An option holding names: a list of strings, or one string (comma-separated when `split`)."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",") if split else [value]
    elif isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        items = list(value)
    else:
        raise PlanError(f"{method} option {key}={value!r} must be a string or a list of strings")
    items = [item.strip() for item in items]
    if not items or not all(items):
        raise PlanError(f"{method} option {key}={value!r} holds an empty name")
    return items
