"""The work decomposition shared by the fused backends: tiles of a SegmentTable.

A tile is up to `tile_size` consecutive elements of one segment; tiles never cross a segment,
so a kernel instance (a Triton program, a CPU loop iteration) reads its segment's columns once
and sees plain contiguous memory. Elements outside every segment belong to no tile and are
therefore never touched.

The tile table is derived from `shard_offset` and `length` only, built once per
(SegmentTable, tile_size) and cached: SegmentTables are immutable by contract, and one is
built per flat shard, so a shard pays the build (and, on GPU, its few device syncs) once per
run, not once per step.
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass
from itertools import pairwise

import torch

from .segments import DENSE, NO_ROWSCALE, SegmentTable


@dataclass(frozen=True)
class TileTable:
    """tile_segment int64 [T]: segment of each tile; tile_start int64 [T]: its first shard element.

    extent is one past the last element any segment covers: buffers must hold at least that many.
    """

    tile_size: int
    tile_segment: torch.Tensor
    tile_start: torch.Tensor
    extent: int

    @property
    def num_tiles(self) -> int:
        return int(self.tile_segment.numel())


_CACHE: dict[tuple[int, int], TileTable] = {}


def tile_table(table: SegmentTable, tile_size: int) -> TileTable:
    """The (cached) tiles of `table`; raises ValueError if segments overlap or are malformed."""
    key = (id(table), tile_size)
    tiles = _CACHE.get(key)
    if tiles is None:
        tiles = _build(table, tile_size)
        _CACHE[key] = tiles
        # id() is reused after garbage collection: drop the entry with its table.
        weakref.finalize(table, _CACHE.pop, key, None)
    return tiles


def _build(table: SegmentTable, tile_size: int) -> TileTable:
    _validate(table)
    device = table.length.device
    tiles_per_segment = (table.length + tile_size - 1) // tile_size
    num_tiles = int(tiles_per_segment.sum())
    tile_segment = torch.repeat_interleave(torch.arange(table.num_segments, device=device), tiles_per_segment)
    # index of each tile inside its segment: global tile index minus the segment's first tile
    first_tile = torch.cumsum(tiles_per_segment, 0) - tiles_per_segment
    tile_in_segment = torch.arange(num_tiles, device=device) - first_tile[tile_segment]
    tile_start = table.shard_offset[tile_segment] + tile_in_segment * tile_size
    extent = int((table.shard_offset + table.length).max()) if table.num_segments else 0
    return TileTable(tile_size, tile_segment.contiguous(), tile_start.contiguous(), extent)


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


_LIST_CACHE: dict[tuple[int, int, int], ListTiles] = {}


def list_tiles(table: SegmentTable, tiles: TileTable, shard: TensorList) -> ListTiles:
    """The (cached) ListTiles of `tiles` over the tensors of `shard`; raises ValueError if a
    segment crosses from one tensor into the next or past the last (a kernel addresses a tile
    from its first element's tensor)."""
    key = (id(table), tiles.tile_size, id(shard.starts))
    cached = _LIST_CACHE.get(key)
    if cached is None:
        _validate_in_tensors(table, shard)
        tensor_start = device_starts(shard)
        tile_tensor = torch.searchsorted(tensor_start, tiles.tile_start, right=True) - 1
        cached = ListTiles(tile_tensor.contiguous(), tensor_start)
        _LIST_CACHE[key] = cached
        weakref.finalize(table, _LIST_CACHE.pop, key, None)
    return cached


_STARTS_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def device_starts(shard: TensorList) -> torch.Tensor:
    """`shard.starts` on the shard's device, copied once per starts object (the multi-tensor step
    keeps one per batch of tensors) and without a host sync (pinned, non-blocking)."""
    key = (id(shard.starts), str(shard.device))
    cached = _STARTS_CACHE.get(key)
    if cached is None:
        cached = shard.starts
        if shard.device.type == "cuda":
            cached = cached.pin_memory().to(shard.device, non_blocking=True)
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


def triton_buffer(shard: Shard) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Triton kernel's two arguments for one buffer: the pointer (a flat shard; a TensorList's
    first tensor, which gives the kernel the element type) and, for a TensorList, the tensors'
    addresses (int64 [n_tensors] on the device; None for a flat shard). The addresses go to the
    device without a host sync (pinned, non-blocking): they are read every step, because a
    gradient may be a new tensor at each backward."""
    if isinstance(shard, torch.Tensor):
        return shard, None
    addresses = torch.tensor([tensor.data_ptr() for tensor in shard.tensors], dtype=torch.int64)
    if shard.device.type == "cuda":
        addresses = addresses.pin_memory().to(shard.device, non_blocking=True)
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
