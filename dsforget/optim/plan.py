"""The MaskPlan: one update rule per named parameter, identical on every rank.

A plan is plain data (JSON-serialisable, with a digest) so that the coordinator can choose it
once and every rank can prove it applies the same one. Rules:

- ``frozen``: never updated; excluded from the optimizer (no gradient, master copy or state).
- ``dense``: a plain AdamW update on every entry.
- ``topk``: Adam moments on every entry, parameter update only on the entries whose |m| is in
  the top ``fraction`` of the parameter (MoFO). k = max(1, floor(fraction * numel)).
- ``row_scale`` (combines with dense or topk): row r of the gradient (output unit r of an
  ``nn.Linear`` weight, i.e. dim 0) is multiplied by ``row_scale[r]`` before the moments.
- ``pull`` (combines with dense or topk; L2-SP): each step, before the Adam update, every entry
  moves towards the parameter's value at the first step, w ← w − lr·pull·(w − w0), decoupled
  like AdamW's weight decay. 0 (the default) is no pull and keeps no copy of w0.
- ``frozen_rows`` (combines with dense or topk): row ranges [start, stop) of dim 0 that are never
  touched — no moments, no decay, no pull, no update — while the other rows train. It is how a
  fused matrix (Phi-3's ``qkv_proj``, ``gate_up_proj``) freezes some of the matrices it holds;
  the parameter still has a gradient and optimizer state, so only a whole frozen parameter saves
  memory. A top-k block is the parameter's trained rows: k counts only their entries.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserInputError

MODES = ("frozen", "dense", "topk")
PLAN_FORMAT_VERSION = 1


class PlanError(UserInputError, ValueError):
    """A plan that cannot be applied as written; the message names the parameter and key."""


@dataclass(frozen=True)
class ParamRule:
    mode: str
    fraction: float | None = None
    row_scale: tuple[float, ...] | None = None
    pull: float = 0.0
    frozen_rows: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PlanError(f"rule mode {self.mode!r} is unknown; allowed: {', '.join(MODES)}")
        if self.mode == "topk":
            if self.fraction is None or not (0.0 < self.fraction <= 1.0) or math.isnan(self.fraction):
                raise PlanError(f"topk fraction must be in (0, 1], got {self.fraction!r}")
        elif self.fraction is not None:
            raise PlanError(f"fraction is only meaningful with mode 'topk', not {self.mode!r}")
        if self.row_scale is not None:
            if self.mode == "frozen":
                raise PlanError("row_scale cannot combine with mode 'frozen'")
            if not all(math.isfinite(s) for s in self.row_scale):
                raise PlanError("row_scale values must be finite")
        if not (math.isfinite(self.pull) and self.pull >= 0):
            raise PlanError(f"pull must be a finite number >= 0, got {self.pull!r}")
        if self.pull and self.mode == "frozen":
            raise PlanError("pull cannot combine with mode 'frozen'")
        if self.frozen_rows is not None:
            if self.mode == "frozen":
                raise PlanError("frozen_rows cannot combine with mode 'frozen' (every row is frozen)")
            end = 0
            for start, stop in self.frozen_rows:
                if not start < stop or start < end:
                    raise PlanError(
                        f"frozen_rows must be sorted, non-empty, non-overlapping [start, stop) ranges, "
                        f"got {[list(r) for r in self.frozen_rows]}"
                    )
                end = stop

    @property
    def trains(self) -> bool:
        return self.mode != "frozen"

    def trained_rows(self, rows: int) -> list[tuple[int, int]]:
        """The [start, stop) row ranges of a `rows`-row parameter that train, in order."""
        if not self.trains:
            return []
        ranges, start = [], 0
        for frozen_start, frozen_stop in self.frozen_rows or ():
            if start < frozen_start:
                ranges.append((start, frozen_start))
            start = frozen_stop
        if start < rows:
            ranges.append((start, rows))
        return ranges

    def top_k(self, numel: int) -> int:
        """Entries selected per step in a block of `numel` entries (never 0: a tiny block still learns)."""
        assert self.fraction is not None
        return max(1, math.floor(self.fraction * numel))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self.fraction is not None:
            out["fraction"] = self.fraction
        if self.row_scale is not None:
            out["row_scale"] = list(self.row_scale)
        if self.pull:  # absent when 0, so plans without a pull keep their digests
            out["pull"] = self.pull
        if self.frozen_rows is not None:
            out["frozen_rows"] = [list(r) for r in self.frozen_rows]
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any], where: str) -> ParamRule:
        unknown = set(data) - {"mode", "fraction", "row_scale", "pull", "frozen_rows"}
        if unknown:
            raise PlanError(
                f"{where}: unknown key(s) {sorted(unknown)}; allowed: mode, fraction, row_scale, pull, "
                "frozen_rows"
            )
        if "mode" not in data:
            raise PlanError(f"{where}: missing key 'mode'")
        row_scale, frozen_rows = data.get("row_scale"), data.get("frozen_rows")
        try:
            return ParamRule(
                mode=data["mode"],
                fraction=None if data.get("fraction") is None else float(data["fraction"]),
                row_scale=None if row_scale is None else tuple(float(s) for s in row_scale),
                pull=float(data.get("pull", 0.0)),
                frozen_rows=None
                if frozen_rows is None
                else tuple((int(start), int(stop)) for start, stop in frozen_rows),
            )
        except (TypeError, ValueError) as err:
            raise PlanError(f"{where}: {err}") from None


FROZEN = ParamRule("frozen")
DENSE = ParamRule("dense")


@dataclass(frozen=True)
class MaskPlan:
    """Rules by parameter name, plus free-form metadata (method, seed, choices made)."""

    rules: Mapping[str, ParamRule]
    method: str = "custom"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ParamRule:
        try:
            return self.rules[name]
        except KeyError:
            raise PlanError(
                f"the plan ({self.method}) has no rule for parameter {name!r}; "
                "build the plan from the same model the optimizer trains"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "method": self.method,
            "meta": dict(self.meta),
            "params": {name: rule.to_dict() for name, rule in self.rules.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON: equal digests mean the same rules, bit for bit."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @staticmethod
    def from_dict(data: Mapping[str, Any], source: str = "plan") -> MaskPlan:
        version = data.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise PlanError(
                f"{source}: format_version {version!r} is not supported (expected {PLAN_FORMAT_VERSION})"
            )
        params = data.get("params")
        if not isinstance(params, Mapping):
            raise PlanError(f"{source}: key 'params' must map parameter names to rules")
        rules = {
            name: ParamRule.from_dict(rule, f"{source}: params[{name!r}]") for name, rule in params.items()
        }
        return MaskPlan(
            rules=rules, method=str(data.get("method", "custom")), meta=dict(data.get("meta", {}))
        )

    @staticmethod
    def from_json(text: str, source: str = "plan") -> MaskPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"{source}: not valid JSON ({err})") from None
        return MaskPlan.from_dict(data, source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @staticmethod
    def load(path: str | Path) -> MaskPlan:
        return MaskPlan.from_json(Path(path).read_text(), source=str(path))

    def check_parameters(
        self, named_shapes: Iterable[tuple[str, tuple[int, ...]]], required: Iterable[str] | None = None
    ) -> None:
        """Fail unless every rule names one of these parameters and fits its rows, and every
        `required` parameter (default: all) has a rule."""
        shapes = dict(named_shapes)
        missing = [name for name in (shapes if required is None else required) if name not in self.rules]
        extra = [name for name in self.rules if name not in shapes]
        if extra:
            raise PlanError(
                f"the plan ({self.method}) names {len(extra)} parameter(s) the model lacks, "
                f"e.g. {extra[:3]}; was it built for another model?"
            )
        if missing:
            raise PlanError(
                f"the plan ({self.method}) has no rule for {len(missing)} parameter(s), e.g. {missing[:3]}"
            )
        for name, rule in self.rules.items():
            rows = shapes[name][0] if shapes[name] else 1
            if rule.row_scale is not None and len(rule.row_scale) != rows:
                raise PlanError(
                    f"params[{name!r}].row_scale has {len(rule.row_scale)} values "
                    f"but the parameter has {rows} rows"
                )
            if rule.frozen_rows and rule.frozen_rows[-1][1] > rows:
                raise PlanError(
                    f"params[{name!r}].frozen_rows reach row {rule.frozen_rows[-1][1]} "
                    f"but the parameter has {rows} rows"
                )

    def trainable_share(self, named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> float:
        """Fraction of all parameter entries that train (frozen rows of a fused matrix excluded)."""
        total = trained = 0
        for name, shape in named_shapes:
            numel, rows = math.prod(shape), shape[0] if shape else 1
            total += numel
            trained_rows = sum(stop - start for start, stop in self[name].trained_rows(rows))
            trained += trained_rows * numel // max(rows, 1)
        return trained / max(total, 1)
