"""Tensors of a Hugging Face checkpoint directory read one at a time, for comparing a trained
model with its base parameter by parameter (drift) without loading the base model.

safetensors files are memory-mapped (``safe_open``); ``pytorch_model*.bin`` files are opened with
``torch.load(mmap=True, weights_only=True)``, which maps them and runs no pickled code.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..errors import UserInputError

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointWeightsError(UserInputError, ValueError):
    """A checkpoint directory without weights dsforget can read."""


class CheckpointWeights:
    """``get(name)``: one tensor of the checkpoint in `directory`, on the CPU, or None when the
    checkpoint has no tensor of that name. Names are tried as given, then without or with the
    model's ``base_model_prefix`` (checkpoints of a bare base model, e.g. GPT-2's ``h.0...``).

    A file is unmapped once each of its tensors was read, so a pass over the model keeps one
    checkpoint shard's pages resident at most (mapped pages count as the process's memory)."""

    def __init__(self, directory: str | Path, base_model_prefix: str = "") -> None:
        self.directory = Path(directory)
        self.prefix = f"{base_model_prefix}." if base_model_prefix else ""
        self._open: dict[str, Any] = {}
        self._file_of = self._weight_map()
        self._tensors_in = Counter(self._file_of.values())
        self._unread = dict(self._tensors_in)

    def _weight_map(self) -> dict[str, str]:
        for index in _INDEXES:
            path = self.directory / index
            if path.exists():
                try:
                    return dict(json.loads(path.read_text())["weight_map"])
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise CheckpointWeightsError(f"{path}: not a checkpoint index ({error})") from None
        for single in _SINGLE_FILES:
            if (self.directory / single).exists():
                return {name: single for name in self._handle(single).keys()}
        raise CheckpointWeightsError(
            f"{self.directory}: no {' or '.join(_SINGLE_FILES + _INDEXES)} to compare the tuned model with"
        )

    def _handle(self, file: str) -> Any:
        if file not in self._open:
            path = self.directory / file
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[file] = safe_open(str(path), framework="pt", device="cpu")
            else:
                self._open[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[file]

    def get(self, name: str) -> torch.Tensor | None:
        candidates = [name]
        if self.prefix:
            candidates += [name.removeprefix(self.prefix), self.prefix + name]
        for key in candidates:
            file = self._file_of.get(key)
            if file is not None:
                handle = self._handle(file)
                tensor = handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key].clone()
                self._unread[file] -= 1
                if self._unread[file] == 0:
                    del self._open[file]  # unmapped: a later get of this file maps it again
                    self._unread[file] = self._tensors_in[file]
                return tensor
        return None
