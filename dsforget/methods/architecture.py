"""Which matrices of a decoder are attention, feed-forward or norms — by module names, per family.

HFT and CoFiTune choose whole matrices per transformer layer, so they must know, for any
`transformers` decoder, which modules of layer i are the attention projections and which the
feed-forward ones. A small table of naming families covers Llama, Qwen2/3, Mistral, Gemma
(`self_attn.q_proj`, `mlp.gate_proj`, ...) and GPT-2 (fused `attn.c_attn`, `mlp.c_fc`); norms
are recognised by module class. Anything else inside a layer is an error that names it, so a
new architecture fails loudly instead of half its matrices silently staying untouched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

from ..optim.params import full_shape, is_norm_module, named_parameters_with_modules
from ..optim.plan import PlanError

# "model.layers.3.self_attn.q_proj.weight" / "transformer.h.3.attn.c_attn.bias"
_LAYER_PARAM = re.compile(r"^(?:.*\.)?(?:layers|h)\.(?P<layer>\d+)\.(?P<module>.+)\.(?P<leaf>[^.]+)$")


def layer_position(name: str) -> tuple[int, str] | None:
    """(layer index, module path inside the layer) of a parameter of a numbered transformer
    layer ("model.layers.3.self_attn.q_proj.weight" -> (3, "self_attn.q_proj")), else None."""
    match = _LAYER_PARAM.match(name)
    return None if match is None else (int(match["layer"]), match["module"])


@dataclass(frozen=True)
class Family:
    """Module paths, relative to one layer, of each category (in the family's canonical order)."""

    name: str
    attention: tuple[str, ...]
    ffn: tuple[str, ...]
    # CoFiTune's trainable module sets: MHA = {q, k, v} (o never), FFN = {up, down} (gate never)
    cofitune_mha: tuple[str, ...] = ()
    cofitune_ffn: tuple[str, ...] = ()


FAMILIES = (
    Family(
        "llama",  # also Qwen2/Qwen3, Mistral, Gemma, Phi-3 style decoders
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        ffn=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        cofitune_mha=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        cofitune_ffn=("mlp.up_proj", "mlp.down_proj"),
    ),
    # GPT-2 fuses q, k, v into c_attn and stores Conv1D weights as [in, out]
    Family(
        "gpt2",
        attention=("attn.c_attn", "attn.c_proj"),
        ffn=("mlp.c_fc", "mlp.c_proj"),
        cofitune_mha=("attn.c_attn",),
        cofitune_ffn=("mlp.c_fc", "mlp.c_proj"),
    ),
)


@dataclass(frozen=True)
class Matrix:
    """One module of one layer with its parameters (weight and, if any, bias)."""

    layer: int
    module: str  # path inside the layer, e.g. "self_attn.q_proj"
    category: str  # attention | ffn | norm
    params: tuple[str, ...]
    numel: int


@dataclass(frozen=True)
class Anatomy:
    """A decoder's parameters sorted into per-layer matrices and everything outside the layers."""

    family: Family
    model_class: str
    layers: tuple[tuple[Matrix, ...], ...]  # layers[i]: layer i's matrices in canonical order
    embeddings: tuple[str, ...]  # input embeddings, position embeddings and the LM head
    final_norms: tuple[str, ...]
    other: tuple[str, ...]  # outside the layers and none of the above (e.g. a custom scale)
    shapes: dict[str, tuple[int, ...]]

    @property
    def numels(self) -> dict[str, int]:
        return {name: math.prod(shape) for name, shape in self.shapes.items()}

    def matrices(self, category: str) -> list[Matrix]:
        return [m for layer in self.layers for m in layer if m.category == category]


def _family_of(modules_of_first_layer: set[str], model_class: str) -> Family:
    for family in FAMILIES:
        if set(family.attention) <= modules_of_first_layer and set(family.ffn) <= modules_of_first_layer:
            return family
    known = "; ".join(f"{f.name}: {', '.join(f.attention + f.ffn)}" for f in FAMILIES)
    raise PlanError(
        f"cannot categorise the layers of {model_class}: layer 0 has modules "
        f"{sorted(modules_of_first_layer)}, which match no known naming family ({known}); "
        "add a Family to dsforget/methods/architecture.py"
    )


def anatomy(model: nn.Module) -> Anatomy:
    """Sort `model`'s parameters by layer and category, or raise naming what cannot be sorted."""
    model_class = type(model).__name__
    entries = list(named_parameters_with_modules(model))
    shapes = {name: full_shape(param) for name, param, _ in entries}
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    in_layers: dict[int, dict[str, list[tuple[str, nn.Module]]]] = {}
    outside: list[tuple[str, nn.Module]] = []
    for name, _, module in entries:
        position = layer_position(name)
        if position is None:
            outside.append((name, module))
            continue
        layer, path = position
        in_layers.setdefault(layer, {}).setdefault(path, []).append((name, module))
    if not in_layers:
        raise PlanError(f"{model_class} has no numbered transformer layers ('layers.N.' or 'h.N.')")
    if sorted(in_layers) != list(range(len(in_layers))):
        raise PlanError(f"{model_class}: layer numbers {sorted(in_layers)} are not 0..{len(in_layers) - 1}")
    family = _family_of(set(in_layers[0]), model_class)
    order = {path: i for i, path in enumerate(family.attention + family.ffn)}
    layers = []
    for index in range(len(in_layers)):
        matrices = []
        for path, params in in_layers[index].items():
            names = tuple(name for name, _ in params)
            if path in family.attention:
                category = "attention"
            elif path in family.ffn:
                category = "ffn"
            elif is_norm_module(params[0][1]):
                category = "norm"
            else:
                raise PlanError(
                    f"cannot categorise {names[0]} of {model_class} (family {family.name}): it is neither "
                    f"attention ({', '.join(family.attention)}), feed-forward ({', '.join(family.ffn)}) "
                    "nor a norm"
                )
            matrices.append(Matrix(index, path, category, names, sum(numels[n] for n in names)))
        missing = set(family.attention + family.ffn) - {m.module for m in matrices}
        if missing:
            raise PlanError(f"{model_class}: layer {index} lacks {sorted(missing)}")
        matrices.sort(key=lambda m: (order.get(m.module, len(order)), m.module))
        layers.append(tuple(matrices))
    # the LM head, wherever the transformers model sits inside a wrapper
    heads = {id(m.get_output_embeddings()) for m in model.modules() if hasattr(m, "get_output_embeddings")}
    embeddings, final_norms, other = [], [], []
    for name, module in outside:
        if isinstance(module, nn.Embedding) or id(module) in heads:
            embeddings.append(name)
        elif is_norm_module(module):
            final_norms.append(name)
        else:
            other.append(name)
    return Anatomy(
        family, model_class, tuple(layers), tuple(embeddings), tuple(final_norms), tuple(other), shapes
    )


LAYER_RANGES = {
    # CoFiTune's ranges over N layers: quarters and halves (METHODS.md)
    "bottom1": (0.0, 0.25),
    "bottom2": (0.25, 0.5),
    "middle": (0.5, 0.75),
    "top": (0.75, 1.0),
    "bottom-plus": (0.0, 0.5),
    "middle-plus": (0.25, 0.75),
    "top-plus": (0.5, 1.0),
    "all": (0.0, 1.0),
}


def layer_range(name: str, n_layers: int) -> range:
    """Layers [floor(lo·N), floor(hi·N)) of a named range; never empty."""
    if name not in LAYER_RANGES:
        raise PlanError(f"layer range {name!r} is unknown; choose one of {', '.join(LAYER_RANGES)}")
    low, high = LAYER_RANGES[name]
    start, stop = int(low * n_layers), int(high * n_layers)
    if stop <= start:
        raise PlanError(f"layer range {name!r} is empty for a model with {n_layers} layers")
    return range(start, stop)
