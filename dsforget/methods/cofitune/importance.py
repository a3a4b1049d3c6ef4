"""CoFiTune's fine level: how much each unit matters for general ability, computed once before training.

Units of decoder layer l (Llama-family naming, ``model.layers[l].self_attn.{q,k,v,o}_proj`` and
``.mlp.{gate,up,down}_proj``):

- ``heads`` [L, n_heads]: each attention head's output, i.e. o_proj's input viewed as
  [..., n_heads, head_dim], is scaled by its mask entry;
- ``intermediate`` [L, intermediate_size]: FFN neuron j, as ``act(gate(x)) * (up(x) * mask)``
  (a forward hook on up_proj, so before the gate product);
- ``hidden`` [L, hidden_size]: output dim d of down_proj.

The masks are *virtual*: tensors of ones that require grad, applied through forward hooks on an
unmodified ``transformers`` model, so they change nothing in the forward values. Per batch the
model runs twice in train mode with an extra dropout of probability p on **each decoder layer's
output** (the residual stream after the layer; Llama has no dropout of its own, and without one
both passes are identical and every gradient is zero). The loss is
KL(softmax(z2) || softmax(z1)) over the vocabulary, summed over real (attention_mask = 1)
tokens, with gradients through both passes. Mask gradients are summed over batches (signed, as
the CoFiTune/DAS reference does; ``absolute=True`` sums |gradient of each batch|) and divided by
the token count. Over data-parallel ranks both sums are all-reduced before the division, i.e.
the per-rank averages are averaged with token weights, so the result does not depend on how the
batches are split over ranks. Finally each layer (row) is normalised: z-score over its units
with the unbiased std, then |tanh|, giving importances in [0, 1); soft mask = 1 - importance.

Dropout masks are drawn per sequence, from a generator seeded by ``sequence_seed(seed, real
tokens)``, only at the real positions, in the order (pass 1, layers 0..L-1), (pass 2, layers
0..L-1), one ``torch.rand(n_real, hidden)`` each; keep where the draw is >= p, scaled by
1 / (1 - p). A sequence therefore gets the same masks whatever its padding, batch or rank
(given the same device type: CPU and CUDA generators differ).

ZeRO-3: a model built under ``deepspeed.zero.Init`` (before ``deepspeed.initialize``) is run
one block at a time (dsforget.integration.block_gather) and left partitioned and untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...integration.block_gather import BlockGatherer, is_partitioned, map_first_tensor

UNIT_KINDS = ("heads", "intermediate", "hidden")
_LARGEST_BELOW_ONE = 1.0 - 2.0**-24  # float32 just below 1: tanh rounds to 1.0 for |z| > ~9


class UnsupportedModelError(ValueError):
    """A model whose decoder layers, attention or FFN projections cannot be found."""


# ----------------------------------------------------------------------------- result artifact


@dataclass
class UnitImportance:
    """Per-unit importances in [0, 1) (row l = decoder layer l), and where they came from."""

    heads: torch.Tensor  # [L, n_heads], float32
    intermediate: torch.Tensor  # [L, intermediate_size]
    hidden: torch.Tensor  # [L, hidden_size]
    meta: dict = field(default_factory=dict)  # source, batches, tokens, dropout, absolute, world_size, seed

    def tensors(self) -> dict[str, torch.Tensor]:
        return {kind: getattr(self, kind) for kind in UNIT_KINDS}

    def save(self, path: str | Path) -> None:
        """Write safetensors (the three tensors, the meta as JSON in the header) atomically, so a
        crash mid-write never leaves a truncated artifact where training will look for one."""
        from safetensors.torch import save_file

        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tensors = {
            kind: tensor.detach().to("cpu", torch.float32).contiguous()
            for kind, tensor in self.tensors().items()
        }
        try:
            save_file(tensors, str(temporary), metadata={"meta": json.dumps(self.meta, sort_keys=True)})
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    @staticmethod
    def load(path: str | Path) -> UnitImportance:
        """Read what `save` wrote; a missing or malformed file raises an error naming it."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"unit importance file {path} does not exist (compute it with compute_importance)"
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:
            raise ValueError(
                f"unit importance file {path} is not a readable safetensors file: {error}"
            ) from error
        missing = [kind for kind in UNIT_KINDS if kind not in tensors]
        if missing:
            raise ValueError(f"unit importance file {path} lacks tensor(s) {missing} (has {sorted(tensors)})")
        try:
            meta = json.loads(header["meta"])
        except (KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"unit importance file {path} has no valid 'meta' JSON in its header") from error
        result = UnitImportance(**{kind: tensors[kind] for kind in UNIT_KINDS}, meta=meta)
        problem = result._problem()
        if problem:
            raise ValueError(f"unit importance file {path}: {problem}")
        return result

    def _problem(self) -> str | None:
        layers = {kind: tuple(tensor.shape) for kind, tensor in self.tensors().items()}
        if any(len(shape) != 2 for shape in layers.values()) or len({s[0] for s in layers.values()}) != 1:
            return f"tensors must be 2-D [layers, units] with the same number of layers, got {layers}"
        for kind, tensor in self.tensors().items():
            if tensor.dtype != torch.float32:
                return f"{kind} has dtype {tensor.dtype}, expected float32"
            if not bool(((tensor >= 0) & (tensor < 1)).all()):
                return f"{kind} has values outside [0, 1)"
        return None

    def combine(self, *others: UnitImportance) -> UnitImportance:
        """Element-wise max: a unit counts as important if any importance run (data source) says so."""
        combined = {kind: getattr(self, kind).clone() for kind in UNIT_KINDS}
        for other in others:
            for kind in UNIT_KINDS:
                theirs = getattr(other, kind)
                if theirs.shape != combined[kind].shape:
                    raise ValueError(
                        f"cannot combine unit importances of different models: {kind} has shape "
                        f"{tuple(combined[kind].shape)} here and {tuple(theirs.shape)} in another"
                    )
                combined[kind] = torch.maximum(combined[kind], theirs.to(combined[kind].device))
        metas = [self.meta, *(other.meta for other in others)]
        meta = {
            "source": "max(" + ", ".join(str(m.get("source", "?")) for m in metas) + ")",
            "combined_from": metas,
        }
        return UnitImportance(**combined, meta=meta)


def normalise(raw: torch.Tensor) -> torch.Tensor:
    """Per layer (row): z-score over the layer's units with the unbiased std, then |tanh| in [0, 1).

    A row whose units are all equal (std 0, or a single unit) has no ranking: it gets 0, where
    the reference code would produce NaN. float32 tanh rounds to exactly 1 for |z| > ~9 (z can
    reach (n-1)/sqrt(n), ~105 for 11008 neurons), so values are capped just below 1: a soft mask
    1 - importance then never zeroes a unit's gradient exactly and the [0, 1) contract holds.
    """
    if raw.dim() != 2:
        raise ValueError(f"normalise expects [layers, units], got shape {tuple(raw.shape)}")
    values = raw.detach().to(torch.float64)
    units = values.shape[1]
    if units < 2:
        return torch.zeros(values.shape, dtype=torch.float32, device=raw.device)
    mean = values.mean(dim=1, keepdim=True)
    std = values.std(dim=1, unbiased=True, keepdim=True)
    z = torch.where(std > 0, (values - mean) / torch.where(std > 0, std, 1.0), 0.0)
    return z.tanh().abs().to(torch.float32).clamp(max=_LARGEST_BELOW_ONE)


# ----------------------------------------------------------------------------- finding the units


@dataclass(frozen=True)
class _Units:
    layers: list[nn.Module]
    n_heads: int
    head_dim: int
    intermediate_size: int
    hidden_size: int


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_FFN = ("gate_proj", "up_proj", "down_proj")


def _is_decoder_layer(module: nn.Module) -> bool:
    attention, ffn = getattr(module, "self_attn", None), getattr(module, "mlp", None)
    return (
        attention is not None
        and ffn is not None
        and all(isinstance(getattr(attention, name, None), nn.Linear) for name in _ATTENTION)
        and all(isinstance(getattr(ffn, name, None), nn.Linear) for name in _FFN)
    )


def _find_units(model: nn.Module) -> _Units:
    """The decoder stack of a Llama-family model (Llama, Qwen2, Mistral, ...), found by structure."""
    layers = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(map(_is_decoder_layer, module)):
            layers = list(module)
            break
    if layers is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no list of decoder layers with self_attn.{{q,k,v,o}}_proj and "
            f"mlp.{{gate,up,down}}_proj (nn.Linear) was found; CoFiTune unit importance supports "
            f"Llama-family models (Llama, Qwen2, Mistral). Pass the causal LM itself, not a wrapper."
        )
    first = layers[0]
    o_proj = first.self_attn.o_proj
    head_dim = getattr(first.self_attn, "head_dim", None) or getattr(
        getattr(model, "config", None), "head_dim", None
    )
    if not head_dim or o_proj.in_features % head_dim:
        raise UnsupportedModelError(
            f"{type(model).__name__}: cannot tell the attention head size (self_attn.head_dim = {head_dim}, "
            f"o_proj.in_features = {o_proj.in_features})"
        )
    units = _Units(
        layers=layers,
        n_heads=o_proj.in_features // head_dim,
        head_dim=head_dim,
        intermediate_size=first.mlp.up_proj.out_features,
        hidden_size=first.mlp.down_proj.out_features,
    )
    for index, layer in enumerate(layers):
        shapes = (
            layer.self_attn.o_proj.in_features,
            layer.mlp.up_proj.out_features,
            layer.mlp.down_proj.out_features,
        )
        if shapes != (units.n_heads * head_dim, units.intermediate_size, units.hidden_size):
            raise UnsupportedModelError(
                f"{type(model).__name__}: decoder layer {index} differs in size from layer 0"
            )
    return units


# ----------------------------------------------------------------------------- virtual masks, dropout


def _install_masks(units: _Units, masks: dict[str, torch.Tensor]) -> list[Any]:
    handles = []
    for index, layer in enumerate(units.layers):

        def scale_heads(module, args, index=index):
            (x, *rest) = args
            head_mask = masks["heads"][index].to(x.dtype)
            scaled = (x.unflatten(-1, (units.n_heads, units.head_dim)) * head_mask[:, None]).flatten(-2)
            return (scaled, *rest)

        def scale_neurons(module, args, output, index=index):
            return output * masks["intermediate"][index].to(output.dtype)

        def scale_hidden(module, args, output, index=index):
            return output * masks["hidden"][index].to(output.dtype)

        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(scale_heads))
        handles.append(layer.mlp.up_proj.register_forward_hook(scale_neurons))
        handles.append(layer.mlp.down_proj.register_forward_hook(scale_hidden))
    return handles


def sequence_seed(seed: int, tokens: torch.Tensor) -> int:
    """Seed of one sequence's dropout generator: a hash of `seed` and its real tokens (not Python's
    salted `hash`), so every process draws the same masks for the same sequence."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(int(seed).to_bytes(8, "little", signed=True))
    digest.update(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


class _SequenceDropout:
    """Dropout on each decoder layer's output, drawn per sequence at its real positions only."""

    def __init__(self, probability: float, seed: int) -> None:
        self.probability, self.seed = probability, seed
        self.generators: list[torch.Generator] = []
        self.positions: list[torch.Tensor] = []

    def start_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.generators, self.positions = [], []
        for tokens, mask in zip(input_ids, attention_mask, strict=True):
            real = mask.nonzero().squeeze(-1)
            generator = torch.Generator(device=input_ids.device)
            generator.manual_seed(sequence_seed(self.seed, tokens[real]))
            self.generators.append(generator)
            self.positions.append(real)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.probability == 0:
            return output
        return map_first_tensor(output, self._drop)

    def _drop(self, hidden: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(hidden.shape, dtype=torch.float32, device=hidden.device)  # [B, T, H]
        for row, (generator, real) in enumerate(zip(self.generators, self.positions, strict=True)):
            draws = torch.rand(len(real), hidden.shape[-1], generator=generator, device=hidden.device)
            scale[row, real] = (draws >= self.probability).float() / (1.0 - self.probability)
        return hidden * scale.to(hidden.dtype)


# ----------------------------------------------------------------------------- the passes


@dataclass
class _Accumulated:
    raw: dict[str, torch.Tensor]
    batches: int
    tokens: int
    world_size: int


def _world() -> tuple[Any, int]:
    """deepspeed.comm and the world size when a multi-rank process group is up, else (None, 1)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None, 1  # and no need to import deepspeed
    from deepspeed import comm

    if not comm.is_initialized() or comm.get_world_size() <= 1:
        return None, 1
    return comm, comm.get_world_size()


def _compute_device(model: nn.Module, partitioned: bool) -> torch.device:
    if partitioned:
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    return next(model.parameters()).device


def _checked_batch(batch: Mapping[str, torch.Tensor], index: int, device: torch.device):
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(f"importance batch {index} must be a dict with 'input_ids' (and 'attention_mask')")
    input_ids = torch.as_tensor(batch["input_ids"])
    attention_mask = batch.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask)
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"importance batch {index}: input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must both be [batch, sequence]"
        )
    return input_ids.to(device), attention_mask.to(device=device, dtype=torch.long)


def _accumulate(model: nn.Module, batches: Iterable[Mapping], dropout: float, absolute: bool, seed: int):
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    checkpointing = (
        "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else None
    )
    if getattr(model, checkpointing or "is_gradient_checkpointing", False):
        raise ValueError(
            "unit importance needs gradient checkpointing off (layer recomputation would redraw the "
            "dropout and re-run the hooks): call model.gradient_checkpointing_disable() before and "
            "gradient_checkpointing_enable() after"
        )
    units = _find_units(model)
    partitioned = is_partitioned(model)
    comm, world_size = _world()
    device = _compute_device(model, partitioned)
    layers = len(units.layers)
    sizes = {"heads": units.n_heads, "intermediate": units.intermediate_size, "hidden": units.hidden_size}
    masks = {kind: torch.ones(layers, n, device=device, requires_grad=True) for kind, n in sizes.items()}
    totals = {kind: torch.zeros(layers, n, dtype=torch.float64, device=device) for kind, n in sizes.items()}
    sequence_dropout = _SequenceDropout(dropout, seed)
    gatherer = BlockGatherer(model, units.layers, device) if partitioned else None

    batch_list: Iterable[Mapping] = batches
    lockstep = 0
    if partitioned and comm is not None:
        # Every forward and backward gathers over all ranks: ranks with fewer batches run extra
        # throw-away passes so that all ranks issue the same collectives.
        batch_list = list(batches)
        count = torch.tensor([len(batch_list)], dtype=torch.long, device=device)
        comm.all_reduce(count, op=comm.ReduceOp.MAX)
        lockstep = int(count.item())

    requires_grad = {param: param.requires_grad for param in model.parameters()}
    training = {module: module.training for module in model.modules()}
    handles: list[Any] = []
    n_batches = tokens = 0
    try:
        for param in requires_grad:
            param.requires_grad_(False)  # only the masks get gradients
        model.train()
        if gatherer is not None:
            handles += gatherer.install()  # first, so a block is gathered before any other hook runs
        handles += _install_masks(units, masks)
        handles += [layer.register_forward_hook(sequence_dropout) for layer in units.layers]

        def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
            sequence_dropout.start_batch(input_ids, attention_mask)
            # Positions count real tokens only, as generate() does for left padding (RoPE models
            # barely notice a shift, but a sequence's positions should not depend on its padding).
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            with torch.enable_grad():
                logits = [model(**inputs, use_cache=False).logits for _ in range(2)]
                detached = [z.detach().requires_grad_(True) for z in logits]
                real = attention_mask.bool()
                log_p1, log_p2 = (F.log_softmax(z[real].float(), dim=-1) for z in detached)
                loss = F.kl_div(log_p1, log_p2, reduction="sum", log_target=True)  # sum p2 (log p2 - log p1)
                grads = torch.autograd.grad(loss, detached)
                # One pass after the other (same gradient as loss.backward() through both), so a
                # ZeRO-3 block is never needed by two interleaved backward passes at once.
                for z, grad in zip(reversed(logits), reversed(grads), strict=True):
                    torch.autograd.backward(z, grad)
                    if gatherer is not None:
                        gatherer.partition_all()

        index = -1
        for index, batch in enumerate(batch_list):
            input_ids, attention_mask = _checked_batch(batch, index, device)
            run(input_ids, attention_mask)
            for kind, mask in masks.items():
                grad = mask.grad.to(torch.float64)
                totals[kind] += grad.abs() if absolute else grad
                mask.grad = None
            n_batches += 1
            tokens += int(attention_mask.sum())
        for _ in range(index + 1, lockstep):
            run(
                torch.zeros(1, 1, dtype=torch.long, device=device),
                torch.ones(1, 1, dtype=torch.long, device=device),
            )
            for mask in masks.values():
                mask.grad = None
    finally:
        for handle in handles:
            handle.remove()
        if gatherer is not None:
            gatherer.partition_all()
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        for module, flag in training.items():
            module.train(flag)

    flat = torch.cat([totals[kind].flatten() for kind in UNIT_KINDS])
    flat = torch.cat([flat, torch.tensor([n_batches, tokens], dtype=torch.float64, device=device)])
    if comm is not None:
        comm.all_reduce(flat)  # sum over ranks; then one division by the total token count
    n_batches, tokens = int(flat[-2].item()), int(flat[-1].item())
    if tokens == 0:
        raise ValueError(
            "unit importance needs at least one real token: every batch was empty or all padding"
        )
    raw, offset = {}, 0
    for kind in UNIT_KINDS:
        numel = totals[kind].numel()
        raw[kind] = (
            (flat[offset : offset + numel] / tokens).view(layers, sizes[kind]).to("cpu", torch.float32)
        )
        offset += numel
    return _Accumulated(raw=raw, batches=n_batches, tokens=tokens, world_size=world_size)


def mask_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    dropout: float = 0.003,
    absolute: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Raw mask gradients per real token: {"heads", "intermediate", "hidden"} -> float32 [L, units] on CPU.

    Summed over this rank's `batches` (dicts with input_ids and attention_mask) and over all
    ranks, divided by the total token count. Collective when a process group of several ranks
    is up: every rank must call it. The model is left as it was (hooks, requires_grad, train/eval
    mode, no .grad; a ZeRO-3 model stays partitioned). See the module docstring for the math.
    """
    return _accumulate(model, batches, dropout, absolute, seed).raw


def compute_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    dropout: float = 0.003,
    absolute: bool = False,
    seed: int = 0,
    source: str = "train",
) -> UnitImportance:
    """CoFiTune unit importance: `mask_gradients`, each layer normalised (`normalise`), with the
    data source name and run settings recorded in `meta` so the artifact says what it measured."""
    accumulated = _accumulate(model, batches, dropout, absolute, seed)
    meta = {
        "source": source,
        "batches": accumulated.batches,
        "tokens": accumulated.tokens,
        "dropout": dropout,
        "absolute": absolute,
        "world_size": accumulated.world_size,
        "seed": seed,
        "model": type(model).__name__,
    }
    return UnitImportance(**{kind: normalise(raw) for kind, raw in accumulated.raw.items()}, meta=meta)
