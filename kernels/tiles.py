"""The work decomposition shared by the fused backends: tiles of a SegmentTable.

A tile is a window of `tile_size` consecutive shard elements assigned to one segment; tiles never
cross a segment, so a kernel instance (a Triton program, a CPU loop iteration) reads its segment's
columns once and sees plain contiguous memory. Elements outside every segment belong to no tile
and are therefore never touched. Two layouts:

- unaligned (the C++ CPU backend, which depends on it): a segment [s, e) gets the tiles starting
  at s, s + tile_size, ... < e; a tile starts at its segment's element and only its tail can lie
  past the segment (`offset < e` masks it);
- aligned (the Triton backend): the tiles starting at floor(s / tile_size) * tile_size,
  + tile_size, ... < e, so every tile start is a multiple of `tile_size` in shard coordinates and
  the kernels can tell the compiler so (`tl.multiple_of`): a tile whose window lies inside its
  segment is then read and written with unmasked 16-byte vector accesses (when the buffers are
  16-byte aligned). A segment's first and last tile may reach past it at either end: the kernels
  mask lanes outside [s, e) (both bounds). Two segments can get a tile at the same start (they
  share that window, each masked to its own elements).

The tile table is derived from `shard_offset` and `length` only, built once per
(SegmentTable, tile_size, aligned) and cached: SegmentTables are immutable by contract, and one
is built per flat shard, so a shard pays the build (and, on GPU, its few device syncs) once per
run, not once per step.

Triton launch parameters (tile size, warps) come from one table, `triton_launch`, by kernel and
shard size; `triton_tiles` gives a launcher its aligned tiles and warps.
"""

from __future__ import annotations

import bisect
import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

import torch

from .segments import DENSE, NO_ROWSCALE, SegmentTable


@dataclass(frozen=True)
class TileTable:
    """tile_segment int64 [T]: segment of each tile; tile_start int64 [T]: the shard element its
    window starts at (aligned: a multiple of tile_size, possibly before its segment's first).

    extent is one past the last element any segment covers: buffers must hold at least that many.
    """

    tile_size: int
    tile_segment: torch.Tensor
    tile_start: torch.Tensor
    extent: int
    aligned: bool = False

    @property
    def num_tiles(self) -> int:
        return int(self.tile_segment.numel())


_CACHE: dict[tuple[int, int, bool], TileTable] = {}


def tile_table(table: SegmentTable, tile_size: int, aligned: bool = False) -> TileTable:
    """The (cached) tiles of `table` (aligned: tile starts are multiples of `tile_size`, see the
    module docstring); raises ValueError if segments overlap or are malformed."""
    key = (id(table), tile_size, aligned)
    tiles = _CACHE.get(key)
    if tiles is None:
        tiles = _build(table, tile_size, aligned)
        _CACHE[key] = tiles
        # id() is reused after garbage collection: drop the entry with its table.
        weakref.finalize(table, _CACHE.pop, key, None)
    return tiles


def _build(table: SegmentTable, tile_size: int, aligned: bool) -> TileTable:
    _validate(table)
    device = table.length.device
    segment_end = table.shard_offset + table.length
    if aligned:  # windows [j * tile_size, (j + 1) * tile_size) that meet [shard_offset, end)
        first_start = table.shard_offset // tile_size * tile_size
        tiles_per_segment = torch.where(
            table.length > 0, (segment_end - first_start + tile_size - 1) // tile_size, 0
        )
    else:
        first_start = table.shard_offset
        tiles_per_segment = (table.length + tile_size - 1) // tile_size
    num_tiles = int(tiles_per_segment.sum())
    tile_segment = torch.repeat_interleave(torch.arange(table.num_segments, device=device), tiles_per_segment)
    # index of each tile inside its segment: global tile index minus the segment's first tile
    first_tile = torch.cumsum(tiles_per_segment, 0) - tiles_per_segment
    tile_in_segment = torch.arange(num_tiles, device=device) - first_tile[tile_segment]
    tile_start = first_start[tile_segment] + tile_in_segment * tile_size
    extent = int(segment_end.max()) if table.num_segments else 0
    return TileTable(tile_size, tile_segment.contiguous(), tile_start.contiguous(), extent, aligned)


# ------------------------------------------------------------------ Triton launch parameters

# (covered elements below which the row applies, TILE, num_warps) per kernel, first match wins;
# the last row has no bound. NOT YET MEASURED on a GPU: reasoned from the H100/H200 (132 SMs,
# 16-byte vector accesses, 32 threads a warp), to be replaced with the best rows of
# `python -m dsforget.kernels.bench --triton-sweep` from the first GPU session:
# - a thread should hold at least 4 consecutive fp32 of each buffer (one 16-byte access each),
#   8-16 for more bytes in flight per thread: TILE / (32 * num_warps) is 4 in the small rows of
#   update_moments and masked_adamw and 8 in their others, 8-16 in abs_histogram's;
# - small shards (< 256 Ki elements): 256-element tiles, so that a 64 Ki-element shard still
#   makes 256 programs (2 per SM) and a 256 Ki one 1024; 1024-element tiles would leave most
#   SMs idle (64 and 256 programs). Per-program costs (the 2048-bin tile histogram of a counting
#   moments pass) weigh most here, but a step on such a shard is bound by launch latency anyway;
# - middle (< 4 Mi): 1024 x 4 warps (abs_histogram 2048 x 4), the kernels' fixed parameters
#   before this table;
# - large: 2048 x 8 warps, still >= 2048 programs (>= 15 per SM), with half the per-program
#   fixed costs (tile and segment column loads; with counting, the tile histogram's zeroing and
#   its merge of up to 2048 bins, which at 1024 elements costs about as much as the counting);
# - abs_histogram reads 4 B per element (moments 20, masked_adamw 16): twice the tile for the
#   same bytes in flight per program, and its per-tile histogram merge amortised over more.
# Larger tiles put more of a short segment on the masked (scalar) path of its first and last
# tile: with 2048-element tiles a 4096-element norm vector that starts off a multiple of 2048
# has one full tile of three, and a 2048-element one none.
TRITON_LAUNCH: dict[str, tuple[tuple[int | None, int, int], ...]] = {
    "update_moments": ((1 << 18, 256, 2), (1 << 22, 1024, 4), (None, 2048, 8)),
    "masked_adamw": ((1 << 18, 256, 2), (1 << 22, 1024, 4), (None, 2048, 8)),
    "abs_histogram": ((1 << 18, 512, 2), (1 << 22, 2048, 4), (None, 4096, 8)),
}

_FORCED_LAUNCH: tuple[int, int] | None = None


def triton_launch(kernel: str, numel: int) -> tuple[int, int]:
    """(TILE, num_warps) of `kernel` (a TRITON_LAUNCH key) for a shard of `numel` covered elements."""
    if _FORCED_LAUNCH is not None:
        return _FORCED_LAUNCH
    for bound, tile_size, num_warps in TRITON_LAUNCH[kernel]:
        if bound is None or numel < bound:
            return tile_size, num_warps
    raise AssertionError(f"TRITON_LAUNCH[{kernel!r}] has no unbounded last row")


def triton_launches() -> set[tuple[int, int]]:
    """Every (TILE, num_warps) the table can choose (what the tests compile and run)."""
    return {(tile_size, num_warps) for rows in TRITON_LAUNCH.values() for _, tile_size, num_warps in rows}


@contextlib.contextmanager
def forced_triton_launch(tile_size: int, num_warps: int) -> Iterator[None]:
    """Every Triton launcher uses (tile_size, num_warps) inside the block (the benchmark's sweep
    and the tests; not thread-safe). tile_size must be a power of two."""
    global _FORCED_LAUNCH
    if tile_size < 1 or tile_size & (tile_size - 1):
        raise ValueError(f"tile_size must be a power of two, got {tile_size}")
    saved, _FORCED_LAUNCH = _FORCED_LAUNCH, (tile_size, num_warps)
    try:
        yield
    finally:
        _FORCED_LAUNCH = saved


_COVERED: dict[int, int] = {}


def covered_elements(table: SegmentTable) -> int:
    """Elements the segments of `table` cover, read from the device once per table (cached)."""
    key = id(table)
    covered = _COVERED.get(key)
    if covered is None:
        covered = int(table.length.sum()) if table.num_segments else 0
        _COVERED[key] = covered
        weakref.finalize(table, _COVERED.pop, key, None)
    return covered


def triton_tiles(table: SegmentTable, kernel: str) -> tuple[TileTable, int]:
    """The aligned tiles and num_warps a Triton launcher of `kernel` uses for `table`."""
    tile_size, num_warps = triton_launch(kernel, covered_elements(table))
    return tile_table(table, tile_size, aligned=True), num_warps


def _validate(table: SegmentTable) -> None:
    rows = table.rows()
    for index, (shard_offset, length, param_offset, row_len, block, rowscale_start) in enumerate(rows):
        problem = None
        if shard_offset < 0 or length < 0 or param_offset < 0 or row_len < 1:
            problem = "offsets and lengths must be >= 0 and row_len >= 1"
        elif not DENSE <= block < table.num_blocks:
            problem = f"block must be DENSE ({DENSE}) or in [0, {table.num_blocks})"
        elif rowscale_start != NO_ROWSCALE and (
            rowscale_start < 0
            or rowscale_start + (param_offset + length - 1) // row_len >= table.rowscale.numel()
        ):
            problem = f"its rows need row scales beyond the {table.rowscale.numel()} in `rowscale`"
        if problem is not None:
            raise ValueError(
                f"segment {index} (shard_offset={shard_offset}, length={length}, "
                f"param_offset={param_offset}, row_len={row_len}, block={block}, "
                f"rowscale_start={rowscale_start}): {problem}"
            )
    spans = sorted((offset, offset + length, index) for index, (offset, length, *_) in enumerate(rows))
    for (_, end, before), (start, _, after) in pairwise(spans):
        if start < end:
            raise ValueError(
                f"segments {before} and {after} overlap (shard elements [{start}, {end})): "
                "each shard element may belong to one segment only"
            )


@dataclass(frozen=True)
class TensorList:
    """Separate tensors that the fused ops address as one flat shard (the multi-tensor step over a
    parameter group without ZeRO, as torch's fused AdamW steps a list of tensors): tensor i holds
    the shard elements [starts[i], starts[i] + tensors[i].numel()), in its own memory. A
    SegmentTable over that virtual shard places every segment inside one tensor.

    The parameters, gradients, exp_avg and exp_avg_sq of one step are four TensorLists with one
    `starts` (the same object): tensor i of each is the same parameter's. Nothing is copied: the
    ops read and write each tensor where it lies (a Triton kernel from the tensors' addresses:
    `triton_buffer`, `list_tiles`). Tensors may have any shape but must be contiguous (checked
    once per call: dtypes, contiguity and sizes).
    starts: int64 [n_tensors] on the CPU, the tensors laid end to end (``starts_of`` their sizes):
    checked here, because an entry the ops address by shard index finds its tensor from the
    starts alone.
    """

    tensors: tuple[torch.Tensor, ...]
    starts: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.tensors) != self.starts.numel() or not self.tensors:
            raise ValueError(f"TensorList: {len(self.tensors)} tensors for {self.starts.numel()} starts")
        if self.starts.dtype != torch.int64 or self.starts.device.type != "cpu":
            raise ValueError(
                f"TensorList: starts must be CPU int64, got {self.starts.dtype} on {self.starts.device}"
            )
        expected = self.starts_of([tensor.numel() for tensor in self.tensors])
        if not torch.equal(self.starts, expected):
            raise ValueError(
                f"TensorList: starts {self.starts.tolist()[:8]} are not the tensors laid end to end "
                f"({expected.tolist()[:8]}): build them with TensorList.starts_of"
            )

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @staticmethod
    def starts_of(numels: list[int]) -> torch.Tensor:
        """The starts of tensors of these sizes laid end to end."""
        starts, total = [], 0
        for numel in numels:
            starts.append(total)
            total += numel
        return torch.tensor(starts, dtype=torch.int64)


# A flat tensor, or a TensorList (CPU backend only).
Shard = torch.Tensor | TensorList

_FLAT_STARTS = torch.zeros(1, dtype=torch.int64)  # a flat shard: one tensor starting at 0


def kernel_tensors(shard: Shard) -> list[torch.Tensor]:
    """The tensors the C++ ops take for `shard` (a flat shard is a list of one)."""
    return [shard] if isinstance(shard, torch.Tensor) else list(shard.tensors)


def shard_starts(shard: Shard) -> torch.Tensor:
    """The tensor starts the C++ ops take for `shard` ([0] for a flat shard)."""
    return _FLAT_STARTS if isinstance(shard, torch.Tensor) else shard.starts


def require_flat(op: str, backend: str, *shards: Shard | None) -> None:
    """Raise ValueError if a TensorList reaches the "torch" references (the fused backends take
    one: "cpu" and "triton")."""
    if backend == "torch" and any(isinstance(shard, TensorList) for shard in shards):
        raise ValueError(
            f"{op}: a TensorList (the multi-tensor step) runs on the fused backends ('cpu', 'triton'), "
            "not 'torch'; step such tensors one at a time"
        )


@dataclass(frozen=True)
class ListTiles:
    """What a Triton kernel needs to address a TensorList: tile_tensor int64 [T], the tensor
    each tile lies in (its segment's: segments never cross tensors), and tensor_start int64
    [n_tensors], the tensors' first shard elements, both on the device. A tile of tensor i finds
    element j of a buffer at address[i] + (j - tensor_start[i]) (see `triton_buffer`)."""

    tile_tensor: torch.Tensor
    tensor_start: torch.Tensor


_LIST_CACHE: dict[tuple[int, int, bool, int], ListTiles] = {}


def list_tiles(table: SegmentTable, tiles: TileTable, shard: TensorList) -> ListTiles:
    """The (cached) ListTiles of `tiles` over the tensors of `shard`; raises ValueError if a
    segment crosses from one tensor into the next or past the last (a kernel addresses a tile
    from its first element's tensor)."""
    key = (id(table), tiles.tile_size, tiles.aligned, id(shard.starts))
    cached = _LIST_CACHE.get(key)
    if cached is None:
        _validate_in_tensors(table, shard)
        tensor_start = device_starts(shard)
        # by the tile's segment: an aligned tile may start before its segment, in the tensor before
        segment_start = table.shard_offset[tiles.tile_segment]
        tile_tensor = torch.searchsorted(tensor_start, segment_start, right=True) - 1
        cached = ListTiles(tile_tensor.contiguous(), tensor_start)
        _LIST_CACHE[key] = cached
        weakref.finalize(table, _LIST_CACHE.pop, key, None)
    return cached


def _on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device`; on CUDA without a host sync (pinned, non-blocking)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


_STARTS_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def device_starts(shard: TensorList) -> torch.Tensor:
    """`shard.starts` on the shard's device, copied once per starts object (the multi-tensor step
    keeps one per batch of tensors) and without a host sync (pinned, non-blocking)."""
    key = (id(shard.starts), str(shard.device))
    cached = _STARTS_CACHE.get(key)
    if cached is None:
        cached = _on_device(shard.starts, shard.device)
        _STARTS_CACHE[key] = cached
        weakref.finalize(shard.starts, _STARTS_CACHE.pop, key, None)
    return cached


def list_arguments(
    table: SegmentTable, tiles: TileTable, shard: Shard, addresses: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """A Triton kernel's TensorList arguments, in the order the kernels declare them:
    tile_tensor, tensor_start, then the addresses of each buffer (`triton_buffer`'s, in the
    kernel's order); for a flat shard the same number of stand-ins (valid pointers that
    LIST=False never reads)."""
    if isinstance(shard, torch.Tensor):
        return [tiles.tile_start] * (2 + len(addresses))
    listed = list_tiles(table, tiles, shard)
    return [listed.tile_tensor, listed.tensor_start, *addresses]


def _validate_in_tensors(table: SegmentTable, shard: TensorList) -> None:
    ends = (shard.starts + torch.tensor([tensor.numel() for tensor in shard.tensors])).tolist()
    starts = shard.starts.tolist()
    for index, (offset, length, *_) in enumerate(table.rows()):
        if length == 0:
            continue
        tensor = bisect.bisect_right(starts, offset) - 1
        if offset + length > ends[tensor]:
            raise ValueError(
                f"segment {index} (shard elements [{offset}, {offset + length})) does not lie inside "
                f"one tensor of the TensorList (tensor {tensor} holds [{starts[tensor]}, {ends[tensor]}))"
            )


# address tables on their devices by (device, addresses): a table holds nothing but its key, so a
# hit is always right; bounded, since gradients reallocated every backward give new keys
_ADDRESS_TABLES: OrderedDict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = OrderedDict()
_ADDRESS_TABLES_KEPT = 64


def triton_buffer(shard: Shard) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Triton kernel's two arguments for one buffer: the pointer (a flat shard; a TensorList's
    first tensor, which gives the kernel the element type) and, for a TensorList, the tensors'
    addresses (int64 [n_tensors] on the device; None for a flat shard). The addresses are read
    every step, because a gradient may be a new tensor at each backward; a table already on the
    device for the same addresses is reused, and a new one goes there without a host sync
    (pinned, non-blocking)."""
    if isinstance(shard, torch.Tensor):
        return shard, None
    key = (shard.device, tuple(tensor.data_ptr() for tensor in shard.tensors))
    addresses = _ADDRESS_TABLES.get(key)
    if addresses is not None:
        _ADDRESS_TABLES.move_to_end(key)
        return shard.tensors[0], addresses
    addresses = _on_device(torch.tensor(key[1], dtype=torch.int64), shard.device)
    _ADDRESS_TABLES[key] = addresses
    if len(_ADDRESS_TABLES) > _ADDRESS_TABLES_KEPT:
        _ADDRESS_TABLES.popitem(last=False)
    return shard.tensors[0], addresses


def check_buffers(
    op: str, tiles: TileTable, grad: Shard | None = None, *, backend: str = "cpu", **state: Shard
) -> None:
    """Raise ValueError unless the flat buffers are ones the fused kernels may address directly.

    `state` tensors (param, exp_avg, exp_avg_sq) must be contiguous 1-D float32; `grad` may be
    float32 or bfloat16; all on one device and at least `tiles.extent` long, because the kernels
    index raw memory where the references would merely slice short. TensorLists (all of them or
    none) must share one `starts`; their tensors are checked here for the Triton kernels, by the
    C++ op itself on the "cpu" backend.
    """
    shards = dict(state) if grad is None else {"grad": grad, **state}
    lists = [isinstance(shard, TensorList) for shard in shards.values()]
    if any(lists):
        if not all(lists):
            raise ValueError(f"{op}: pass all of {', '.join(shards)} as TensorLists or none")
        starts = next(iter(shards.values())).starts
        for name, shard in shards.items():
            if shard.starts is not starts:
                raise ValueError(f"{op}: {name} is a TensorList with other starts than the rest")
            if shard.device != tiles.tile_start.device:
                raise ValueError(
                    f"{op}: {name} is on {shard.device}, the segment table on {tiles.tile_start.device}"
                )
            if backend != "cpu":
                _check_list(op, name, shard, tiles.extent)
        return
    tensors = shards
    device = next(iter(tensors.values())).device
    if tiles.tile_start.device != device:
        raise ValueError(
            f"{op}: the segment table is on {tiles.tile_start.device} but the buffers are on {device}; "
            "build it there or move it with table.to(device)"
        )
    for name, tensor in tensors.items():
        allowed = (torch.float32, torch.bfloat16) if name == "grad" else (torch.float32,)
        problem = None
        if tensor.dtype not in allowed:
            problem = f"dtype {tensor.dtype}, expected one of {allowed}"
        elif tensor.dim() != 1 or not tensor.is_contiguous():
            problem = f"shape {tuple(tensor.shape)}, strides {tensor.stride()}; expected contiguous 1-D"
        elif tensor.device != device:
            problem = f"device {tensor.device}, expected {device} like the other buffers"
        elif tensor.numel() < tiles.extent:
            problem = f"{tensor.numel()} elements, but the segment table reaches element {tiles.extent}"
        if problem is not None:
            raise ValueError(f"{op}: {name} has {problem}")


def _check_list(op: str, name: str, shard: TensorList, extent: int) -> None:
    """Raise ValueError unless the tensors of `shard` are contiguous, on one device, of one dtype
    a kernel takes (float32; bfloat16 too for a gradient) and reach the table's `extent`."""
    allowed = (torch.float32, torch.bfloat16) if name == "grad" else (torch.float32,)
    dtype = shard.tensors[0].dtype
    total = int(shard.starts[-1]) + shard.tensors[-1].numel()
    if total < extent:
        raise ValueError(
            f"{op}: {name} holds {total} elements, but the segment table reaches element {extent}"
        )
    for index, tensor in enumerate(shard.tensors):
        problem = None
        if tensor.dtype != dtype or dtype not in allowed:
            problem = f"dtype {tensor.dtype} (tensor 0: {dtype}); expected one of {allowed}, the same for all"
        elif not tensor.is_contiguous():
            problem = f"strides {tensor.stride()} for shape {tuple(tensor.shape)}; expected contiguous"
        elif tensor.device != shard.device:
            problem = f"device {tensor.device}, tensor 0 on {shard.device}"
        if problem is not None:
            raise ValueError(f"{op}: {name} tensor {index} has {problem}")


def check_block_tensor(
    op: str, name: str, tensor: torch.Tensor, table: SegmentTable, device: torch.device, bins: int = 0
) -> None:
    """Raise ValueError unless `tensor` is a contiguous int64 [n_blocks] (or [n_blocks, bins]) on `device`."""
    shape = (table.num_blocks, bins) if bins else (table.num_blocks,)
    if tensor.dtype != torch.int64 or tuple(tensor.shape) != shape or not tensor.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be a contiguous int64 tensor of shape {shape}, "
            f"got {tensor.dtype} {tuple(tensor.shape)}"
        )
    if tensor.device != device:
        raise ValueError(f"{op}: {name} is on {tensor.device}, the buffers on {device}")


def segment_columns(table: SegmentTable, shard: Shard | None = None) -> list[torch.Tensor]:
    """The six int64 columns in the order of SegmentTable.rows(), then `counter`, then the tensor
    starts of `shard` (a TensorList's, or [0]), as the C++ ops take them."""
    return [
        table.shard_offset,
        table.length,
        table.param_offset,
        table.row_len,
        table.block,
        table.rowscale_start,
        table.counter,
        _FLAT_STARTS if shard is None else shard_starts(shard),
    ]
