"""Which matrices of a decoder are attention, feed-forward or norms — by module names, per family.

HFT and CoFiTune choose whole matrices per transformer layer, so they must know, for any
`transformers` decoder, which modules of layer i are the attention projections and which the
feed-forward ones. A small table of naming families covers Llama, Qwen2/3, Mistral, Gemma 1/2/3
and OLMo 2 (`self_attn.q_proj`, `mlp.gate_proj`, ...), Phi-3 (fused `self_attn.qkv_proj` and
`mlp.gate_up_proj`) and GPT-2 (fused `attn.c_attn`, `mlp.c_fc`); norms, however many a layer has
(Gemma 2/3's pre/post-feedforward norms, OLMo 2's and Qwen3's q_norm/k_norm), are recognised by
module class. Phi-3's fused modules are split into row blocks, one Matrix per block
("self_attn.qkv_proj[k]"), so q, k, v, gate and up stay matrices of their own and a plan freezes
a block through the rule's frozen rows. GPT-2's c_attn stays whole: its Conv1D stores [in, out],
so q, k and v are column blocks, which a row rule cannot express.

Anything else inside a layer is an error that names it, so a new architecture fails loudly
instead of half its matrices silently staying untouched. Mixture-of-experts layers are refused:
neither paper says which experts or whether the router train.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..optim.params import full_shape, is_norm_module, named_parameters_with_modules
from ..optim.plan import PlanError

# "model.layers.3.self_attn.q_proj.weight" / "transformer.h.3.attn.c_attn.bias"
# (expert tensors have no module leaf: "model.layers.3.mlp.experts.gate_up_proj" -> module "mlp.experts")
_LAYER_PARAM = re.compile(r"^(?:.*\.)?(?:layers|h)\.(?P<layer>\d+)\.(?P<module>.+)\.(?P<leaf>[^.]+)$")


def layer_position(name: str) -> tuple[int, str] | None:
    """(layer index, module path inside the layer) of a parameter of a numbered transformer
    layer ("model.layers.3.self_attn.q_proj.weight" -> (3, "self_attn.q_proj")), else None."""
    match = _LAYER_PARAM.match(name)
    return None if match is None else (int(match["layer"]), match["module"])


@dataclass(frozen=True)
class Fused:
    """A module whose output rows (dim 0) stack several matrices, in `parts` order.

    The first part has as many rows as `first_rows_from`'s input width when it is given (Phi-3's
    q: o_proj's input, num_heads·head_dim), else an equal share; the other parts share the rest
    equally (k and v under grouped-query attention; gate and up)."""

    module: str
    parts: tuple[str, ...]
    first_rows_from: str | None = None

    def units(self) -> tuple[str, ...]:
        return tuple(f"{self.module}[{part}]" for part in self.parts)

    def row_blocks(self, rows: int, layer_shapes: dict[str, tuple[int, ...]]) -> list[tuple[int, int]]:
        """[start, stop) rows of each part in a fused matrix of `rows` rows."""
        first = rows // len(self.parts)
        if self.first_rows_from is not None:
            first = layer_shapes[self.first_rows_from][1]
        rest, remainder = divmod(rows - first, len(self.parts) - 1)
        if first <= 0 or rest <= 0 or remainder:
            raise PlanError(
                f"{self.module} has {rows} rows, which do not split into {', '.join(self.parts)} "
                f"({self.parts[0]}: {first} rows, the others equal)"
            )
        bounds = [0, first] + [first + rest * (i + 1) for i in range(len(self.parts) - 1)]
        return list(zip(bounds[:-1], bounds[1:], strict=True))


@dataclass(frozen=True)
class Family:
    """Units, relative to one layer, of each category (in the family's canonical order).

    A unit is a module path, or a row block "module[part]" of a `fused` module."""

    name: str
    attention: tuple[str, ...]
    ffn: tuple[str, ...]
    # CoFiTune's trainable module sets: MHA = {q, k, v} (o never), FFN = {up, down} (gate never)
    cofitune_mha: tuple[str, ...] = ()
    cofitune_ffn: tuple[str, ...] = ()
    fused: tuple[Fused, ...] = ()

    @property
    def modules(self) -> set[str]:
        """The module paths a layer of this family must have."""
        return {unit.split("[")[0] for unit in self.attention + self.ffn}


_QKV = Fused("self_attn.qkv_proj", ("q", "k", "v"), first_rows_from="self_attn.o_proj")
_GATE_UP = Fused("mlp.gate_up_proj", ("gate", "up"))  # Phi3MLP: gate, up = output.chunk(2)

FAMILIES = (
    Family(
        "llama",  # also Qwen2/Qwen3, Mistral, Gemma 1/2/3, OLMo 2
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        ffn=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        cofitune_mha=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        cofitune_ffn=("mlp.up_proj", "mlp.down_proj"),
    ),
    Family(
        "phi3",
        attention=(*_QKV.units(), "self_attn.o_proj"),
        ffn=(*_GATE_UP.units(), "mlp.down_proj"),
        cofitune_mha=_QKV.units(),
        cofitune_ffn=(_GATE_UP.units()[1], "mlp.down_proj"),
        fused=(_QKV, _GATE_UP),
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
    """One module of one layer with its parameters (weight and, if any, bias), or one row block
    of a fused module: rows [start, stop) of each of its parameters."""

    layer: int
    module: str  # unit inside the layer, e.g. "self_attn.q_proj" or "self_attn.qkv_proj[k]"
    category: str  # attention | ffn | norm
    params: tuple[str, ...]
    numel: int
    rows: tuple[int, int] | None = None  # a fused module's row block; None: the whole parameters

    @property
    def role(self) -> str:
        """What the matrix computes: "q", "k", "v", "o", "gate", "up", "down" for the Llama and
        Phi-3 families (the block's part, else the module's name without "_proj")."""
        if self.rows is not None:
            return self.module.rsplit("[", 1)[1].rstrip("]")
        return self.module.rsplit(".", 1)[-1].removesuffix("_proj")


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

    def frozen_rows(self, trained: Iterable[Matrix]) -> dict[str, tuple[tuple[int, int], ...] | None]:
        """Every parameter of the `trained` matrices, with the rows that stay frozen: None where all
        its rows train, else the row blocks of its fused module that are not in `trained`."""
        blocks: dict[str, list[tuple[int, int] | None]] = {}
        for matrix in trained:
            for name in matrix.params:
                blocks.setdefault(name, []).append(matrix.rows)
        out: dict[str, tuple[tuple[int, int], ...] | None] = {}
        for name, rows in blocks.items():
            frozen, start = [], 0
            for block_start, block_stop in sorted(
                (0, self.shapes[name][0]) if r is None else r for r in rows
            ):
                if start < block_start:
                    frozen.append((start, block_start))
                start = max(start, block_stop)
            if start < self.shapes[name][0]:
                frozen.append((start, self.shapes[name][0]))
            out[name] = tuple(frozen) or None
        return out


_EXPERTS = re.compile(r"(^|\.)experts($|\.)")


def _family_of(modules_of_first_layer: set[str], model_class: str) -> Family:
    experts = sorted(path for path in modules_of_first_layer if _EXPERTS.search(path))
    if experts:
        raise PlanError(
            f"{model_class} has mixture-of-experts layers (layer 0: {', '.join(experts)}): HFT and CoFiTune "
            "have no category for experts and their router (neither paper says which of them train), so "
            "dsforget refuses rather than guess; train it with full, mofo, freeze or l2"
        )
    for family in FAMILIES:
        if family.modules <= modules_of_first_layer:
            return family
    known = "; ".join(f"{f.name}: {', '.join(sorted(f.modules))}" for f in FAMILIES)
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
    fused = {f.module: f for f in family.fused}
    layers = []
    for index in range(len(in_layers)):
        matrices = []
        layer_shapes = {path: shapes[params[0][0]] for path, params in in_layers[index].items()}
        for path, params in in_layers[index].items():
            names = tuple(name for name, _ in params)
            if path in fused:
                row_numel = sum(numels[n] // shapes[n][0] for n in names)  # a weight row and its bias entry
                for unit, (start, stop) in zip(
                    fused[path].units(),
                    fused[path].row_blocks(layer_shapes[path][0], layer_shapes),
                    strict=True,
                ):
                    category = "attention" if unit in family.attention else "ffn"
                    matrices.append(
                        Matrix(index, unit, category, names, (stop - start) * row_numel, (start, stop))
                    )
                continue
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
        missing = family.modules - set(in_layers[index])
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
