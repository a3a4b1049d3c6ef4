"""Reading a checkpoint's tensors one at a time (dsforget.integration.checkpoint_weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsforget.integration.checkpoint_weights import CheckpointWeights, CheckpointWeightsError

TENSORS = {f"layer.{i}.weight": torch.full((3, 2), float(i)) for i in range(4)}


def _mapped(path: Path) -> int:
    return sum(1 for line in open("/proc/self/maps") if str(path) in line)


def test_sharded_safetensors_read_by_name_and_unmapped_once_read(tmp_path: Path) -> None:
    """Catches a wrong index lookup, and files kept mapped after their last tensor was read
    (their pages would count as the process's memory for the whole pass)."""
    names = list(TENSORS)
    files = {"a.safetensors": names[:2], "b.safetensors": names[2:]}
    for file, keys in files.items():
        save_file({k: TENSORS[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in files.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    weights = CheckpointWeights(tmp_path)
    first = weights.get(names[0])
    assert torch.equal(first, TENSORS[names[0]])
    del first
    assert _mapped(tmp_path / "a.safetensors") == 1
    assert torch.equal(weights.get(names[1]), TENSORS[names[1]])
    assert _mapped(tmp_path / "a.safetensors") == 0  # both of a's tensors read (and dropped)
    assert torch.equal(weights.get(names[0]), TENSORS[names[0]])  # read again: mapped again
    assert weights.get("absent.weight") is None


def test_bin_checkpoint_and_base_model_prefix(tmp_path: Path) -> None:
    torch.save({k: v for k, v in TENSORS.items()}, tmp_path / "pytorch_model.bin")
    weights = CheckpointWeights(tmp_path, base_model_prefix="model")
    assert torch.equal(weights.get("model.layer.3.weight"), TENSORS["layer.3.weight"])


def test_a_directory_without_weights_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointWeightsError, match=str(tmp_path)):
        CheckpointWeights(tmp_path)
