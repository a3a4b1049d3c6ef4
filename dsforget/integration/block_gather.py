"""Run forward and backward through a ZeRO-3 partitioned model with one block gathered at a time.

For work on a model built under ``deepspeed.zero.Init`` *before* ``deepspeed.initialize`` (CoFiTune's
importance pass): a block is one decoder layer, or one other module that owns parameters directly
(embeddings, final norm, LM head). It is gathered with ``deepspeed.zero.GatheredParameters`` in
its forward pre-hook and partitioned again after its forward; in the backward an identity
autograd function on the block's output gathers it again and one on its input partitions it once
the block's backward is done. Back-propagating one pass at a time keeps at most one block
gathered, and the model is left partitioned and untouched for the later ``initialize``.

(A ZeRO-3 engine without an optimizer would install DeepSpeed's own fetch hooks, but in 0.19
those hooks' backward closures outlive ``engine.destroy()`` and would be reused by the training
engine built afterwards.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def map_first_tensor(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `function` to a module output that is a tensor or a tuple/list starting with one."""
    if torch.is_tensor(value):
        return function(value)
    if isinstance(value, tuple | list) and value and torch.is_tensor(value[0]):
        return type(value)([function(value[0]), *value[1:]])
    return value


# ----------------------------------------------------------------------------- virtual masks, dropout


class _Marker(torch.autograd.Function):
    """Identity whose backward calls `on_backward`: the hook point for a block's backward."""

    @staticmethod
    def forward(ctx, anchor, on_backward, x):
        ctx.on_backward = on_backward
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        ctx.on_backward()
        return None, None, grad


class _Block:
    def __init__(self, name: str, params: list[nn.Parameter]) -> None:
        self.name, self.params = name, params
        self.context = None

    def gather(self) -> None:
        if self.context is None:
            import deepspeed

            self.context = deepspeed.zero.GatheredParameters(self.params)
            self.context.__enter__()

    def partition(self) -> None:
        if self.context is not None:
            context, self.context = self.context, None
            context.__exit__(None, None, None)


class BlockGatherer:
    """Gathers a ZeRO-3 partitioned model block by block in forward and backward (see module doc).

    Blocks: each of `layers`, and every other module that owns parameters directly.
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], device: torch.device) -> None:
        layer_ids = {id(layer) for layer in layers}
        inside_layers = {id(p) for layer in layers for p in layer.parameters()}
        self.blocks: list[tuple[nn.Module, _Block]] = []
        for name, module in model.named_modules():
            if id(module) in layer_ids:
                self.blocks.append((module, _Block(name, list(module.parameters()))))
                continue
            own = [p for p in module.parameters(recurse=False) if id(p) not in inside_layers]
            if own:
                self.blocks.append((module, _Block(name, own)))
        # Makes a block's input require grad so that its input marker runs even for the first
        # layer, whose input (the embeddings of frozen weights) needs no gradient.
        self.anchor = torch.zeros((), device=device, requires_grad=True)

    def install(self) -> list[Any]:
        handles = []
        for module, block in self.blocks:
            handles.append(module.register_forward_pre_hook(self._pre_hook(block), with_kwargs=True))
            handles.append(module.register_forward_hook(self._post_hook(block)))
        return handles

    def _pre_hook(self, block: _Block):
        def hook(module, args, kwargs):
            block.gather()
            if not torch.is_grad_enabled():
                return None
            mark = lambda x: _Marker.apply(self.anchor, block.partition, x)  # noqa: E731
            for index, value in enumerate(args):
                if torch.is_tensor(value) and value.is_floating_point():
                    return (*args[:index], mark(value), *args[index + 1 :]), kwargs
            # A decoder layer called with keywords only: its residual input is `hidden_states`.
            for key in sorted(kwargs, key=lambda key: key != "hidden_states"):
                value = kwargs[key]
                if torch.is_tensor(value) and value.is_floating_point():
                    return args, {**kwargs, key: mark(value)}
            return None

        return hook

    def _post_hook(self, block: _Block):
        def hook(module, args, output):
            block.partition()

            def mark(x: torch.Tensor) -> torch.Tensor:
                return _Marker.apply(self.anchor, block.gather, x) if x.requires_grad else x

            return map_first_tensor(output, mark)

        return hook

    def partition_all(self) -> None:
        for _, block in self.blocks:
            block.partition()


def is_partitioned(model: nn.Module) -> bool:
    return any(hasattr(param, "ds_id") for param in model.parameters())
