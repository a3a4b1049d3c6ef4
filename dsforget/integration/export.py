"""Full weights out of a DeepSpeed engine, one tensor at a time, and the Hugging Face export.

Under ZeRO-3 each parameter is gathered on its own (``deepspeed.zero.GatheredParameters``) while
the caller uses it, so no rank holds more than one full parameter beyond its partitions; under
ZeRO-0/1/2 every rank already holds the full (16-bit or fp32) parameters. A model carrying LoRA
adapters (peft) yields each adapted weight merged, W + (alpha/rank)·B·A, under the base model's
name (its W, A and B gathered together, one layer at a time), and its adapters not at all: the
export is a plain checkpoint of the base architecture and drift compares it with the base by
name. The export streams
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


def _lora_layers(module: Any) -> dict[str, Any]:
    """peft's LoRA layers in `module`, by path (none when the model carries no peft adapter)."""
    if not hasattr(module, "peft_config"):  # what peft's inject_adapter_in_model leaves on a model
        return {}
    from peft.tuners.lora import LoraLayer

    return {path: layer for path, layer in module.named_modules() if isinstance(layer, LoraLayer)}


def _exported_parameters(module: Any) -> Iterator[tuple[str, torch.nn.Parameter, Any]]:
    """(name in the base model, parameter, its LoRA layer when the parameter is an adapted weight)
    for every parameter the export writes: a LoRA layer's ``base_layer.weight`` under the layer's
    own name, its other base parameters (bias) likewise, its adapters left out."""
    layers = _lora_layers(module)
    for name, param in module.named_parameters():
        parts = name.split(".")
        owner = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in layers), None)
        if owner is None:
            yield name, param, None
            continue
        path, local = ".".join(parts[:owner]), parts[owner:]
        if local[0] == "base_layer":  # peft: the wrapped module's own parameters
            base_name = ".".join([path, *local[1:]])
            yield base_name, param, layers[path] if local[1:] == ["weight"] else None


def _adapter_parameters(layer: Any) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """A LoRA layer's own parameters (lora_A, lora_B, ...), not those of the layer it wraps."""
    return ((name, param) for name, param in layer.named_parameters() if not name.startswith("base_layer."))


@torch.no_grad()
def _merged(layer: Any, weight: torch.Tensor) -> torch.Tensor:
    """`weight` plus the deltas of the layer's active adapters (peft's get_delta_weight:
    (alpha/rank)·B·A), as peft's unsafe merge adds them, in the weight's dtype. The job never
    merges in place (peft's merge), so `weight` is the base weight."""
    merged = weight.clone()
    for adapter in layer.active_adapters:
        merged += layer.get_delta_weight(adapter).to(merged.dtype)
    return merged


def full_tensors(engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Each parameter, then each persistent buffer, of the engine's model in full, one at a time
    on the accelerator, under the base model's names (LoRA merged); a tensor is valid until the
    next is asked for. Under ZeRO-3 collective: every rank must run the iteration to its end."""
    import deepspeed

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    if zero3:  # prefetching leaves parameters gathered or in flight after a forward outside a step
        engine.empty_partition_cache()  # (seen: GatheredParameters "Cannot partition a param in flight")
    for name, param, layer in _exported_parameters(module):
        adapters = [] if layer is None else [param for _, param in _adapter_parameters(layer)]
        with deepspeed.zero.GatheredParameters([param, *adapters], enabled=zero3):
            yield name, param.detach() if layer is None else _merged(layer, param.detach())
    for name, buffer in _persistent_buffers(module):
        yield name, buffer.detach()


def adapter_tensors(engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Each LoRA adapter parameter of the engine's model in full, under its own name
    (``...q_proj.lora_A.default.weight``), one at a time. Collective under ZeRO-3."""
    import deepspeed

    module = engine.module
    layers = _lora_layers(module)
    zero3 = engine.zero_optimization_stage() == 3
    if zero3:
        engine.empty_partition_cache()
    for path, layer in layers.items():
        for local, param in _adapter_parameters(layer):
            with deepspeed.zero.GatheredParameters([param], enabled=zero3):
                yield f"{path}.{local}", param.detach()


def _shard_plan(engine: Any, max_shard_size: int | str) -> Any:
    """huggingface_hub's split of the model into shard files, from sizes alone (meta tensors)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    module = engine.module
    sizes = {
        name: torch.empty(full_shape(param), dtype=param.dtype, device="meta")
        for name, param, _ in _exported_parameters(module)
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


# PeftModel wraps the model as base_model (the tuner) -> model: adapter files name tensors so.
PEFT_PREFIX = "base_model.model."


def save_adapter(engine: Any, directory: str | Path, adapter_name: str = "default") -> Path | None:
    """The engine's LoRA adapter in peft's format (adapter_config.json, adapter_model.safetensors),
    loadable with ``PeftModel.from_pretrained(base, directory)``, written by rank 0 into `directory`
    and swapped in whole. Rank 0 holds the adapter (rank x (in + out) per adapted layer), never the
    base weights. Returns the path on rank 0. Collective."""
    from deepspeed import comm
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    rank0 = comm.get_rank() == 0
    module = engine.module
    if not _lora_layers(module):
        raise ValueError("save_adapter: the model carries no LoRA adapter")
    tensors = {}
    for name, tensor in adapter_tensors(engine):  # every rank: each takes part in every gather
        if rank0:
            tensors[name] = tensor.to("cpu", copy=True).contiguous()
    directory = Path(directory)
    if rank0:
        staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        adapter = get_peft_model_state_dict(module, state_dict=tensors, adapter_name=adapter_name)
        adapter = {PEFT_PREFIX + name: tensor for name, tensor in adapter.items()}
        save_file(adapter, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        module.peft_config[adapter_name].save_pretrained(staging)
        replace_directory(staging, directory)
    comm.barrier()
    return directory if rank0 else None
