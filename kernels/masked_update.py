"""Fused op 3: the masked, bias-corrected, decoupled-weight-decay AdamW update.

Per element of every segment:
    selected = block == DENSE  or  bits(|m|) >= threshold[block]
    p *= 1 - lr*wd                     (all entries; only selected ones if decay_selected_only)
    p -= selected * lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
The formula and its order follow torch.optim.AdamW so fraction 1 reproduces it.

One pass moves 16 B per element (read p, m, v; write p) and builds no mask tensor.
"""

from __future__ import annotations

import math

import torch

from ._cpu import cpu_ops
from ._triton import LAUNCH_OPTIONS, addressable, jit, tl
from .backends import check_backend
from .radix import abs_bits
from .segments import DENSE, SegmentTable
from .tiles import TileTable, check_block_tensor, check_buffers, segment_columns, tile_table

# 1024 elements per Triton program: 4 warps x 8 contiguous fp32 per thread.
TRITON_TILE = 1024
# 16384 elements per CPU tile (p, m, v: 192 KiB); sets the work-split granularity only.
CPU_TILE = 16384


def masked_adamw_reference(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    thresholds: torch.Tensor,
    *,
    lr: float,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    weight_decay: float,
    decay_selected_only: bool,
) -> None:
    step_size = lr / bias_correction1
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    decay = 1 - lr * weight_decay
    threshold_list = thresholds.tolist()
    for shard_offset, length, _, _, block, _ in table.rows():
        span = slice(shard_offset, shard_offset + length)
        p, m, v = param[span], exp_avg[span], exp_avg_sq[span]
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        if block == DENSE:
            p.mul_(decay)
            p.addcdiv_(m, denom, value=-step_size)
            continue
        selected = abs_bits(m) >= threshold_list[block]
        if decay_selected_only:
            p.mul_(torch.where(selected, decay, 1.0))
        else:
            p.mul_(decay)
        p.addcdiv_(torch.where(selected, m, 0.0), denom, value=-step_size)


@jit
def _masked_adamw_kernel(
    param_ptr,  # [N] fp32, updated in place
    exp_avg_ptr,  # [N] fp32, read only
    exp_avg_sq_ptr,  # [N] fp32, read only
    tile_segment_ptr,  # [T] int64, segment of each tile
    tile_start_ptr,  # [T] int64, first shard element of each tile
    shard_offset_ptr,  # [S] int64, the SegmentTable columns
    length_ptr,  # [S] int64
    block_ptr,  # [S] int64
    thresholds_ptr,  # [n_blocks] int64, bit pattern of the smallest selected |m|
    step_size,  # lr / bias_correction1
    bias_correction2_sqrt,
    eps,
    decay_selected,  # 1 - lr*wd
    decay_unselected,  # 1 - lr*wd, or 1 when decay_selected_only
    TILE: tl.constexpr,
):
    tile = tl.program_id(0)
    segment = tl.load(tile_segment_ptr + tile)
    tile_start = tl.load(tile_start_ptr + tile)
    segment_end = tl.load(shard_offset_ptr + segment) + tl.load(length_ptr + segment)
    block = tl.load(block_ptr + segment)
    # DENSE segments get threshold 0, which every bits(|m|) reaches (NaN included).
    threshold = tl.load(thresholds_ptr + tl.maximum(block, 0), mask=block >= 0, other=0)
    offsets = tile_start + tl.arange(0, TILE)  # [TILE] int64 shard elements
    in_segment = offsets < segment_end
    param = tl.load(param_ptr + offsets, mask=in_segment)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=in_segment)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=in_segment)
    selected = tl.abs(exp_avg).to(tl.int32, bitcast=True) >= threshold
    # IEEE sqrt and division (Triton's defaults are approximate), as torch computes them.
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    param = param * tl.where(selected, decay_selected, decay_unselected)
    param = param + tl.div_rn(-step_size * tl.where(selected, exp_avg, 0.0), denom)
    tl.store(param_ptr + offsets, param, mask=in_segment)


def _masked_adamw_triton(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    tiles: TileTable,
    thresholds: torch.Tensor,
    scalars: tuple[float, float, float, float, float],
) -> None:
    if tiles.num_tiles == 0:
        return
    _masked_adamw_kernel[(tiles.num_tiles,)](
        param,
        exp_avg,
        exp_avg_sq,
        tiles.tile_segment,
        tiles.tile_start,
        table.shard_offset,
        table.length,
        table.block,
        addressable(thresholds, tiles.tile_start),
        *scalars,
        TILE=tiles.tile_size,
        **LAUNCH_OPTIONS,
    )


CPU_SOURCE = r"""
namespace dsforget_cpu {

// n elements of one tile; branch-free (selects become blends) so GCC vectorises it.
void masked_adamw_run(float* __restrict p, const float* __restrict m, const float* __restrict v, int64_t n,
                      uint32_t threshold, float step_size, float bias_correction2_sqrt, float eps,
                      float decay_selected, float decay_unselected) {
  for (int64_t i = 0; i < n; ++i) {
    const bool selected = abs_bits(m[i]) >= threshold;
    const float denom = std::sqrt(v[i]) / bias_correction2_sqrt + eps;
    const float decayed = p[i] * (selected ? decay_selected : decay_unselected);
    p[i] = decayed + (-step_size * (selected ? m[i] : 0.0f)) / denom;  // ATen's addcdiv rounding
  }
}

void masked_adamw(at::Tensor param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                  at::TensorList segment_columns, const at::Tensor& tile_segment,
                  const at::Tensor& tile_start, int64_t tile_size, const at::Tensor& thresholds,
                  double step_size, double bias_correction2_sqrt, double eps, double decay_selected,
                  double decay_unselected) {
  const std::vector<Segment> segments = gather_segments(segment_columns);
  float* p = param.data_ptr<float>();
  const float* m = exp_avg.data_ptr<float>();
  const float* v = exp_avg_sq.data_ptr<float>();
  const int64_t* threshold_ptr = thresholds.data_ptr<int64_t>();
  for_each_tile(segments, tile_segment, tile_start, tile_size, nullptr, 0,
                [&](const Segment& s, int64_t first, int64_t last, LocalHistogram&) {
    // DENSE segments get threshold 0, which every bits(|m|) reaches (NaN included).
    const uint32_t threshold = s.block < 0 ? 0u : uint32_t(threshold_ptr[s.block]);
    masked_adamw_run(p + first, m + first, v + first, last - first, threshold, float(step_size),
                     float(bias_correction2_sqrt), float(eps), float(decay_selected),
                     float(decay_unselected));
  });
}

TORCH_LIBRARY_FRAGMENT(dsforget_cpu, ops) {
  ops.def("masked_adamw(Tensor(a!) param, Tensor exp_avg, Tensor exp_avg_sq, Tensor[] segments, "
          "Tensor tile_segment, Tensor tile_start, int tile_size, Tensor thresholds, float step_size, "
          "float bias_correction2_sqrt, float eps, float decay_selected, float decay_unselected) -> ()",
          &masked_adamw);
}

}  // namespace dsforget_cpu
"""


def _masked_adamw_cpu(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    tiles: TileTable,
    thresholds: torch.Tensor,
    scalars: tuple[float, float, float, float, float],
) -> None:
    cpu_ops().masked_adamw(
        param,
        exp_avg,
        exp_avg_sq,
        segment_columns(table),
        tiles.tile_segment,
        tiles.tile_start,
        tiles.tile_size,
        addressable(thresholds, tiles.tile_start),
        *scalars,
    )


def masked_adamw(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    thresholds: torch.Tensor,
    *,
    lr: float,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    weight_decay: float,
    decay_selected_only: bool,
    backend: str = "torch",
) -> None:
    """Apply the update to `param` in place on segment elements only (m and v are read only).

    thresholds: int64 [n_blocks], RadixState.threshold once every block is resolved.
    """
    check_backend("masked_adamw", backend, param.device)
    if backend == "torch":
        masked_adamw_reference(
            param,
            exp_avg,
            exp_avg_sq,
            table,
            thresholds,
            lr=lr,
            bias_correction1=bias_correction1,
            bias_correction2=bias_correction2,
            eps=eps,
            weight_decay=weight_decay,
            decay_selected_only=decay_selected_only,
        )
        return
    tiles = tile_table(table, CPU_TILE if backend == "cpu" else TRITON_TILE)
    check_buffers("masked_adamw", tiles, param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    check_block_tensor("masked_adamw", "thresholds", thresholds, table, param.device)
    decay = 1 - lr * weight_decay
    # the same double-precision scalars as the reference, rounded to fp32 by the kernels
    scalars = (
        lr / bias_correction1,
        math.sqrt(bias_correction2),
        eps,
        decay,
        1.0 if decay_selected_only else decay,
    )
    launch = _masked_adamw_cpu if backend == "cpu" else _masked_adamw_triton
    launch(param, exp_avg, exp_avg_sq, table, tiles, thresholds, scalars)
