"""Several training files mixed by weight, and replay of general text, as one seeded stream.

``--data`` names one file (``sft.jsonl``: the plain pipeline, batch order from
``DistributedSampler`` exactly as without this module) or several, comma-separated, each with an
optional weight after its last colon: ``a.jsonl:0.7,b.jsonl:0.3`` (``parse_data_spec``; a value
that is an existing file is that one file, whole, even where it holds a comma or a colon).
``--replay_ratio r`` with ``--replay_text`` adds plain-text language-modelling examples of general
data (``dsforget.data.tokenize_texts``: loss on every token).

The unit of mixing is one example (one packed block with ``--packing``: a block holds one
source's examples only). Slot ``i`` of an epoch's global stream comes from replay with
probability ``r`` and from task file ``j`` with probability ``(1 - r) * w_j / sum(w)``: an
independent seeded draw per slot (``Mixture.epoch_sources``), so a share is the expected share,
off by about ``sqrt(p (1 - p) / n)`` over ``n`` slots. Each source is read in its own seeded
shuffled order, reshuffled each time it is used up, so its examples come back only after all of
them were drawn; the cursors continue across epochs. An epoch is ``round(task examples / (1 - r))``
slots: the task examples once, in expectation, plus the replay on top. As with one file, the
epoch's tail that does not fill an optimizer step is not trained (its draws still move the
sources' cursors, so the stream stays a function of the epoch).

Everything is a function of (seed, epoch, slot): the trainer's saved position (epoch,
micro-batch) restores the stream exactly on resume, with no sampler state of its own. Ranks split
an epoch's stream as ``DistributedSampler`` splits its permutation (rank ``r`` takes slots
``r, r + world, ...``), so a global batch holds the same examples at any number of ranks with the
same micro-batch × ranks, as for a single file.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, InputFileError

TASK, REPLAY = "task", "replay"


def parse_data_spec(spec: str, flag: str = "--data") -> list[tuple[str, float]]:
    """``--data`` as ``[(path, weight), ...]``: one existing file (weight 1), or comma-separated
    ``PATH[:WEIGHT]`` entries (weight 1 when left out). Weights are relative, finite and > 0.
    Raises ConfigError on a bad weight or a file named twice, InputFileError on a missing file,
    each naming `flag` and the entry."""
    if Path(spec).is_file():
        return [(spec, 1.0)]
    entries = []
    for entry in spec.split(","):
        entry = entry.strip()
        path, weight = entry, 1.0
        if not Path(entry).is_file() and ":" in entry:
            path, _, text = entry.rpartition(":")
            try:
                weight = float(text)
            except ValueError:
                if not Path(path).is_file():  # no weight after all: a missing file with a colon in its name
                    raise InputFileError(f"data file {entry} does not exist ({flag})") from None
                raise ConfigError(
                    f"{flag} entry {entry!r}: the weight {text!r} after the last ':' is not a number "
                    "(expected PATH or PATH:WEIGHT, e.g. a.jsonl:0.7,b.jsonl:0.3)"
                ) from None
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(f"{flag} entry {entry!r}: the weight must be a finite number > 0")
        if not path:
            raise ConfigError(f"{flag} {spec!r}: an empty entry (expected PATH[:WEIGHT],...)")
        if not Path(path).is_file():
            named = f"{flag} entry {entry!r}" if "," in spec or path != entry else flag
            raise InputFileError(f"data file {path} does not exist ({named})")
        entries.append((path, weight))
    paths = [str(Path(path).resolve()) for path, _ in entries]
    twice = sorted({path for path in paths if paths.count(path) > 1})
    if twice:
        raise ConfigError(f"{flag}: {twice[0]} is named twice; give each file once, with its weight")
    return entries


@dataclass(frozen=True)
class Source:
    """One stream of the mix: ``name`` (a path, or where replay text came from), ``kind`` (task or
    replay), its ``--data`` weight (replay: the ratio), its expected ``share`` of the stream and
    its ``examples`` (rows: examples, or packed blocks)."""

    name: str
    kind: str
    weight: float
    share: float
    examples: int


def _seed(*parts: object) -> int:
    """A 63-bit seed from the parts (stable across runs, machines and Python's hash seed)."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


class Mixture:
    """The seeded stream over the concatenation of `sources`' rows (source ``k``'s rows at
    ``offsets[k]`` onwards), an epoch of ``epoch_size`` slots at a time (module docstring)."""

    def __init__(self, sources: Sequence[Source], seed: int, epoch_size: int) -> None:
        if not sources or any(source.examples < 1 for source in sources):
            raise ValueError("a mixture needs sources with at least one example each")
        self.sources, self.seed, self.epoch_size = list(sources), seed, epoch_size
        shares = torch.tensor([source.share for source in sources], dtype=torch.float64)
        self._bounds = torch.cumsum(shares / shares.sum(), 0)
        self.offsets = [0]
        for source in sources:
            self.offsets.append(self.offsets[-1] + source.examples)
        self._counts: list[torch.Tensor] = []  # draws per source in each epoch computed so far

    def epoch_sources(self, epoch: int) -> torch.Tensor:
        """The source of every slot of `epoch` (int64, epoch_size): one uniform draw per slot."""
        draws = _generator(self.seed, "mix", epoch)
        uniform = torch.rand(self.epoch_size, generator=draws, dtype=torch.float64)
        return torch.searchsorted(self._bounds, uniform, right=True).clamp_(max=len(self.sources) - 1)

    def _cursors(self, epoch: int) -> torch.Tensor:
        """Rows each source gave before `epoch` (the draws of every earlier epoch, counted once)."""
        while len(self._counts) < epoch:
            drawn = self.epoch_sources(len(self._counts))
            self._counts.append(torch.bincount(drawn, minlength=len(self.sources)))
        if epoch == 0:
            return torch.zeros(len(self.sources), dtype=torch.int64)
        return torch.stack(self._counts[:epoch]).sum(0)

    def _rows(self, index: int, start: int, count: int) -> torch.Tensor:
        """Rows number start .. start+count of source `index`'s endless stream: a fresh seeded
        permutation of its rows for every pass."""
        size, pieces = self.sources[index].examples, []
        while count > 0:
            cycle, offset = divmod(start, size)
            order = torch.randperm(size, generator=_generator(self.seed, "source", index, cycle))
            piece = order[offset : offset + count]
            pieces.append(piece)
            start, count = start + len(piece), count - len(piece)
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)

    def epoch_order(self, epoch: int) -> list[int]:
        """The rows (indices into the concatenation) of `epoch`'s slots, in stream order."""
        drawn = self.epoch_sources(epoch)
        cursors = self._cursors(epoch)
        order = torch.empty(self.epoch_size, dtype=torch.int64)
        for index in range(len(self.sources)):
            slots = drawn == index
            rows = self._rows(index, int(cursors[index]), int(slots.sum()))
            order[slots] = self.offsets[index] + rows
        return order.tolist()

    def drawn(self, slots: int, slots_per_epoch: int) -> list[int]:
        """Slots each source filled in a run's first `slots` trained slots (every rank's micro-batches
        together), of which each epoch trains its first `slots_per_epoch` (the tail that does not
        fill an optimizer step is dropped, as DistributedSampler's drop_last drops it)."""
        counts = torch.zeros(len(self.sources), dtype=torch.int64)
        epoch = 0
        while slots > 0:
            taken = min(slots, slots_per_epoch)
            counts += torch.bincount(self.epoch_sources(epoch)[:taken], minlength=len(self.sources))
            slots, epoch = slots - taken, epoch + 1
        return counts.tolist()

    def describe(self, slots: int, slots_per_epoch: int) -> dict[str, Any]:
        """report.json's ``data`` section: every source, its weight, expected and realised share
        over the run's first `slots` trained slots (``drawn``)."""
        counts = self.drawn(slots, slots_per_epoch)
        total = max(1, sum(counts))
        replay = [source for source in self.sources if source.kind == REPLAY]
        return {
            "unit": "example",
            "epoch_slots": self.epoch_size,
            "replay_ratio": replay[0].weight if replay else 0.0,
            "sources": [
                {
                    "name": source.name,
                    "kind": source.kind,
                    "weight": source.weight,
                    "rows": source.examples,
                    "expected_share": round(source.share, 6),
                    "drawn": count,
                    "realised_share": round(count / total, 6),
                }
                for source, count in zip(self.sources, counts, strict=True)
            ],
        }


def rank_share(stream: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank `rank`'s slots of an epoch's `stream`, split as ``DistributedSampler`` (drop_last)
    splits its permutation: slots ``rank, rank + world, ...`` of the first ``world * (n // world)``."""
    return list(stream[rank : len(stream) - len(stream) % world : world])


def build_mixture(
    task_sizes: Sequence[tuple[str, float, int]],
    replay: tuple[str, int] | None,
    replay_ratio: float,
    seed: int,
) -> Mixture:
    """The mixture of task files ``(name, weight, rows)`` and, with `replay_ratio` > 0, the replay
    text ``(name, rows)``: shares ``(1 - ratio) * w / sum(w)`` and ``ratio``."""
    total_weight = sum(weight for _, weight, _ in task_sizes)
    sources = [
        Source(name, TASK, weight, (1 - replay_ratio) * weight / total_weight, rows)
        for name, weight, rows in task_sizes
    ]
    if replay is not None and replay_ratio > 0:
        sources.append(Source(replay[0], REPLAY, replay_ratio, replay_ratio, replay[1]))
    task_rows = sum(rows for _, _, rows in task_sizes)
    return Mixture(sources, seed, max(1, round(task_rows / (1 - replay_ratio))))


class ConcatExamples(Sequence):
    """Several sequences of examples read as one (``datasets.Dataset`` rows stay memory-mapped)."""

    def __init__(self, parts: Sequence[Sequence[dict]]) -> None:
        self.parts = list(parts)
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = bisect.bisect_right(self.starts, index) - 1
        return self.parts[part][index - self.starts[part]]
