"""The only module that imports Triton; it decides whether the Triton kernels are usable.

Importing dsforget never needs Triton or a GPU: without Triton, `jit` leaves kernels as plain
Python functions that are never launched, because `triton_usable` is False everywhere and the
backend check refuses "triton" first.

Interpreter (TRITON_INTERPRET=1, the kernels run on CPU tensors through numpy). Triton reads
the variable when a kernel is decorated, so it must be set before dsforget.kernels is first
imported. Constraints the kernels respect so they run there as well as compiled:
- `tl.histogram` with a mask, its lanes held in range (masked ones at bin 0) and its int32
  result cast before use: older interpreters returned int64 (silently corrupting int32 stores)
  and counted a value equal to the bin count in the last bin; seen exact on Triton 3.9, and
  tested against the references (tests/kernels, including blocks of 90% exact zeros);
- an atomic's mask must be a block-shaped comparison: `mask & scalar_bool` reaches the
  interpreter's atomic with an unsupported mask dtype (Triton 3.9), so per-tile conditions are
  folded into the bound instead (`offsets < where(active, end, start)`).

Vector accesses: the tile kernels take aligned tiles (tiles.py), tell the compiler that a tile
starts at a multiple of TILE (`tile_offsets`), and read and write a tile that lies inside its
segment without a mask (`load_tile`, `store_tile`): a mask compared with a segment bound loaded
from memory has no known constancy, so a masked access is never vectorised, whatever its offsets.
Triton also needs the buffer's address 16-byte aligned, which it checks at each launch
(`data_ptr() % 16`, a specialisation): a shard sliced at an odd element gets scalar code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

# Why Triton could not be imported (the ImportError's text), for the fallback WARNING and the
# error of an explicit backend="triton"; None when it imported.
TRITON_IMPORT_ERROR: str | None = None
try:
    import triton
    import triton.language as tl
except ImportError as error:  # Triton is an optional extra (`pip install dsforget[triton]`)
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = str(error)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Passed to every launch: FMA contraction on, as nvcc compiles PyTorch's CUDA kernels by default
# (--fmad=true). Explicit because Triton 3.9 warns that its default flips in 3.10. Contraction
# changes rounding per element only, so results stay independent of the shard layout.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def jit(fn: Callable[..., Any]) -> Any:
    """`triton.jit` when Triton is installed, else the function itself (never launched)."""
    return fn if triton is None else triton.jit(fn)


@jit
def tile_offsets(tile_start_ptr, tile, TILE: tl.constexpr):
    """(tile_start, offsets [TILE] int64) of tile `tile` of an aligned tile table: its start is a
    multiple of TILE, and the TILE offsets are consecutive (both true by construction)."""
    tile_start = tl.multiple_of(tl.load(tile_start_ptr + tile), TILE)
    offsets = tl.max_contiguous(tile_start + tl.arange(0, TILE), TILE)
    return tile_start, offsets


@jit
def load_tile(pointer, offsets, mask, full):
    """pointer[offsets] where `mask`; unmasked (vectorisable) when `full` (the whole tile is in
    its segment, so `mask` is all true). Masked-off lanes are undefined, as tl.load's."""
    if full:
        values = tl.load(pointer + offsets)
    else:
        values = tl.load(pointer + offsets, mask=mask)
    return values


@jit
def store_tile(pointer, offsets, values, mask, full):
    """pointer[offsets] = values where `mask` (unmasked when `full`, as load_tile)."""
    if full:
        tl.store(pointer + offsets, values)
    else:
        tl.store(pointer + offsets, values, mask=mask)


def addressable(tensor: torch.Tensor, stand_in: torch.Tensor) -> torch.Tensor:
    """`tensor`, or `stand_in` when it is empty: Triton wants a valid address for every pointer
    argument, and an empty tensor may have none. Only for arguments the kernel then never reads
    (no rowscale: no segment is row-scaled; no blocks: every segment is DENSE)."""
    return tensor if tensor.numel() else stand_in


def triton_usable(device: torch.device) -> bool:
    """True when Triton kernels can run on tensors of `device`."""
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return INTERPRET and device.type == "cpu"


@jit
def list_base(pointer, addresses_ptr, tensor, first):
    """In a kernel over a TensorList (tiles.TensorList): the pointer from which tensor `tensor`
    of a buffer is addressed by shard element, its address (addresses_ptr[tensor], int64) less
    its first shard element `first`, typed like the buffer's `pointer` argument."""
    return tl.load(addresses_ptr + tensor).to(tl.pointer_type(pointer.dtype.element_ty)) - first
