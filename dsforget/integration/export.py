"""Full weights out of a DeepSpeed engine, one tensor at a time, and the Hugging Face export.

Under ZeRO-3 each parameter is gathered on its own (``deepspeed.zero.GatheredParameters``) while
the caller uses it, so no rank holds more than one full parameter beyond its partitions; under
ZeRO-0/1/2 every rank already holds the full (16-bit or fp32) parameters. The export streams
them into size-bounded safetensors shards written by rank 0, so rank 0's host memory holds one
shard at most, never the model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..atomic import replace_directory
from ..optim.params import full_shape

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' default max_shard_size for save_pretrained


def _persistent_buffers(module: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The buffers a state dict holds (not the non-persistent ones, e.g. rotary tables)."""
    persistent = module.state_dict().keys()  # keys only: nothing is gathered here
    return ((name, buffer) for name, buffer in module.named_buffers() if name in persistent)


def full_tensors(engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Each parameter, then each persistent buffer, of the engine's model in full, one at a time
    on the accelerator; a tensor is valid until the next is asked for. Under ZeRO-3 collective:
    every rank must run the iteration to its end."""
    import deepspeed

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    if zero3:  # prefetching leaves parameters gathered or in flight after a forward outside a step
        engine.empty_partition_cache()  # (seen: GatheredParameters "Cannot partition a param in flight")
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=zero3):
            yield name, param.detach()
    for name, buffer in _persistent_buffers(module):
        yield name, buffer.detach()


def _shard_plan(engine: Any, max_shard_size: int | str) -> Any:
    """huggingface_hub's split of the model into shard files, from sizes alone (meta tensors)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    module = engine.module
    sizes = {
        name: torch.empty(full_shape(param), dtype=param.dtype, device="meta")
        for name, param in module.named_parameters()
    }
    sizes.update(
        (name, torch.empty(buffer.shape, dtype=buffer.dtype, device="meta"))
        for name, buffer in _persistent_buffers(module)
    )
    return split_torch_state_dict_into_shards(sizes, max_shard_size=max_shard_size)


def _write_config(module: Any, dtype: torch.dtype, directory: Path) -> None:
    """config.json (with the exported dtype, as save_pretrained writes it) and generation_config."""
    module.config.dtype = str(dtype).split(".")[1]
    module.config.architectures = [type(module).__name__]
    module.config.save_pretrained(directory)
    if module.can_generate():
        module.generation_config.save_pretrained(directory)


def save_hf_checkpoint(
    engine: Any, tokenizer: Any, directory: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> Path | None:
    """A ``from_pretrained``-loadable safetensors checkpoint (with tokenizer) of the engine's model
    in its training dtype, written by rank 0 into `directory`: shards of at most
    `max_shard_size` (bytes, or "500MB"; one larger tensor gets a shard of its own) and, when there are
    several, ``model.safetensors.index.json``. Returns the path on rank 0. Collective.

    Tensor names are those ``save_pretrained`` writes (transformers' conversions of loaded
    weights reverted per shard). Written beside `directory` and swapped in whole
    (``atomic.replace_directory``): once a model was exported, `directory` holds a complete one
    at every instant, the old until the new is durable."""
    from deepspeed import comm
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    rank0 = comm.get_rank() == 0
    module = engine.module
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    plan = _shard_plan(engine, max_shard_size)
    file_of = plan.tensor_to_filename
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    pending = {file: len(names) for file, names in plan.filename_to_tensors.items()}
    shards: dict[str, dict[str, torch.Tensor]] = {}  # a file is written once all its tensors came
    dtype = None
    for name, tensor in full_tensors(engine):
        if not rank0:
            continue
        dtype = dtype or tensor.dtype
        file = file_of[name]
        shards.setdefault(file, {})[name] = tensor.to("cpu", copy=True).contiguous()
        pending[file] -= 1
        if pending[file] == 0:
            saved = revert_weight_conversion(module, shards.pop(file))
            save_file(saved, str(staging / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(saved, file))
    if rank0:
        if plan.is_sharded:
            index_file = {"metadata": dict(plan.metadata), "weight_map": dict(sorted(weight_map.items()))}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2) + "\n")
        _write_config(module, dtype or torch.float32, staging)
        tokenizer.save_pretrained(staging)
        replace_directory(staging, directory)
    comm.barrier()
    return directory if rank0 else None
