"""Fused op 1: row-scale the gradient, update Adam's moments, and count |m| digits.

Per element of every segment (fp32 math, gradient fp32 or bf16):
    g = grad * rowscale[row]            (only for row-scaled segments)
    m = lerp(m, g, 1 - beta1)           (= beta1*m + (1-beta1)*g, as torch.optim.AdamW)
    v = beta2*v + (1-beta2)*g*g
and, when `histogram` is given, histogram[block, digit0(|m|)] += 1 for top-k segments,
which is the first radix-select level fused into the same pass over m.

With `hinted` (HintedCounts), a block with a window [start, start + width) of level-1 prefixes
p = bits(|m|) >> 10 around where its threshold is expected (start -1: none) counts instead:
above[block] += 1 for entries with p >= start + width, and histogram[block, p - start] += 1 for
those inside the window. Thresholds move little and smoothly between steps, so the new one
usually lies in the window: then these counts fix levels 0 and 1 at once, and the scatter into
2048 level-0 bins (a quarter of the pass's time on a CPU) and the level-1 pass over m are both
saved. The window is far narrower than a level-0 bin (0.1-6% of |m| instead of a quarter octave),
and only its entries are scattered. A block whose threshold left the window is counted again.

One pass moves 20 B per element with an fp32 gradient (read g, m, v; write m, v) and 18 B with
bf16; the reference's separate ops (cast, scale, lerp, mul, addcmul, abs, shift, bincount) move
about 60 B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._cpu import cpu_ops
from ._triton import LAUNCH_OPTIONS, addressable, jit, tl
from .backends import check_backend
from .radix import LEVELS, abs_bits, digit_and_prefix, level_bins
from .segments import DENSE, NO_ROWSCALE, SegmentTable
from .tiles import TileTable, check_block_tensor, check_buffers, segment_columns, tile_table

# The widest window, in level-1 prefixes (bits(|m|) >> 10): 2^20 float ulps, 6-12% of |m| (by
# where the threshold sits in its octave); the histogram of a window has this many bins.
HINT_WINDOW = 1024
HINT_SHIFT = LEVELS[1][0]

# 1024 elements per Triton program: 4 warps x 8 contiguous fp32 per thread, two 16-byte loads.
TRITON_TILE = 1024
# 16384 elements per CPU tile: g, m, v of a tile are 192 KiB (fp32), resident in L2 between the
# vectorised moments loop and the histogram loop that re-reads m.
CPU_TILE = 16384


@dataclass(frozen=True)
class HintedCounts:
    """start, width: int64 [n_blocks], a block's window of level-1 prefixes (start -1: none;
    widths are clamped to [0, HINT_WINDOW]); above: int64 [n_blocks] and histogram: int64
    [n_blocks, HINT_WINDOW], accumulated into (callers zero them)."""

    start: torch.Tensor
    width: torch.Tensor
    above: torch.Tensor
    histogram: torch.Tensor


def segment_rows(param_offset: int, length: int, row_len: int, device: torch.device) -> torch.Tensor:
    """Row index inside the parameter of each element of a segment."""
    return torch.arange(param_offset, param_offset + length, device=device) // row_len


def update_moments_reference(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    *,
    beta1: float,
    beta2: float,
    histogram: torch.Tensor | None = None,
    hinted: HintedCounts | None = None,
) -> None:
    """Plain PyTorch, one segment at a time."""
    windows = None
    if hinted is not None:
        windows = list(zip(hinted.start.tolist(), hinted.width.tolist(), strict=True))
    for shard_offset, length, param_offset, row_len, block, rowscale_start in table.rows():
        span = slice(shard_offset, shard_offset + length)
        g = grad[span].float()
        if rowscale_start != NO_ROWSCALE:
            rows = segment_rows(param_offset, length, row_len, grad.device)
            g = g * table.rowscale[rowscale_start + rows]
        m, v = exp_avg[span], exp_avg_sq[span]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if block == DENSE:
            continue
        if windows is not None and hinted is not None and windows[block][0] >= 0:
            start, width = windows[block][0], min(max(windows[block][1], 0), HINT_WINDOW)
            in_window = (abs_bits(m) >> HINT_SHIFT) - start
            hinted.above[block] += (in_window >= width).sum()
            inside = in_window[(in_window >= 0) & (in_window < width)]
            hinted.histogram[block] += torch.bincount(inside, minlength=HINT_WINDOW)
        elif histogram is not None:
            digit, _ = digit_and_prefix(abs_bits(m), 0)
            histogram[block] += torch.bincount(digit, minlength=level_bins(0))


@jit
def _update_moments_kernel(
    grad_ptr,  # [N] fp32 or bf16, the flat gradient shard
    exp_avg_ptr,  # [N] fp32, updated in place
    exp_avg_sq_ptr,  # [N] fp32, updated in place
    tile_segment_ptr,  # [T] int64, segment of each tile
    tile_start_ptr,  # [T] int64, first shard element of each tile
    shard_offset_ptr,  # [S] int64, the SegmentTable columns
    length_ptr,  # [S] int64
    param_offset_ptr,  # [S] int64
    row_len_ptr,  # [S] int64
    block_ptr,  # [S] int64
    rowscale_start_ptr,  # [S] int64
    rowscale_ptr,  # [R] fp32
    histogram_ptr,  # [n_blocks, BINS] int64, accumulated into (only read when HISTOGRAM)
    window_start_ptr,  # [n_blocks] int64, HintedCounts.start (only read when HINT)
    window_width_ptr,  # [n_blocks] int64, HintedCounts.width (only read when HINT)
    hint_above_ptr,  # [n_blocks] int64, HintedCounts.above, accumulated into
    hint_histogram_ptr,  # [n_blocks, HINT_WINDOW] int64, HintedCounts.histogram, accumulated into
    lerp_weight,  # 1 - beta1 (rounded from double, as the reference's Python scalar)
    beta2,
    one_minus_beta2,  # likewise
    DIGIT_SHIFT: tl.constexpr,  # level-0 digit of |m|: bits >> DIGIT_SHIFT (the top 11 bits)
    BINS: tl.constexpr,
    HISTOGRAM: tl.constexpr,
    HINT_SHIFT: tl.constexpr,  # a window holds the prefixes bits >> HINT_SHIFT from its start on
    HINT_WINDOW: tl.constexpr,
    HINT: tl.constexpr,
    TILE: tl.constexpr,
):
    tile = tl.program_id(0)
    segment = tl.load(tile_segment_ptr + tile)
    tile_start = tl.load(tile_start_ptr + tile)
    segment_start = tl.load(shard_offset_ptr + segment)
    segment_end = segment_start + tl.load(length_ptr + segment)
    offsets = tile_start + tl.arange(0, TILE)  # [TILE] int64 shard elements; the tail is masked
    in_segment = offsets < segment_end
    grad = tl.load(grad_ptr + offsets, mask=in_segment).to(tl.float32)
    rowscale_start = tl.load(rowscale_start_ptr + segment)
    if rowscale_start >= 0:
        element = tl.load(param_offset_ptr + segment) + (offsets - segment_start)  # index in the parameter
        rows = element // tl.load(row_len_ptr + segment)  # [TILE]; a tile may span several rows
        grad = grad * tl.load(rowscale_ptr + rowscale_start + rows, mask=in_segment)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=in_segment)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=in_segment)
    # torch's lerp: start + w*(end - start) for w < 0.5, else end - (end - start)*(1 - w); the
    # same branch keeps fraction 1 within rounding of torch.optim.AdamW for any beta1.
    if lerp_weight < 0.5:
        exp_avg = exp_avg + lerp_weight * (grad - exp_avg)
    else:
        exp_avg = grad - (grad - exp_avg) * (1 - lerp_weight)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=in_segment)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=in_segment)
    if HISTOGRAM or HINT:
        block = tl.load(block_ptr + segment)
        # DENSE segments count nothing: their bound collapses to the tile start.
        counted = offsets < tl.where(block >= 0, segment_end, tile_start)
        bits = tl.abs(exp_avg).to(tl.int32, bitcast=True)
        digit = (bits >> DIGIT_SHIFT) & (BINS - 1)
        ones = tl.full([TILE], 1, tl.int64)
        row = tl.maximum(block, 0)
        window_start = tl.load(window_start_ptr + row, mask=HINT & (block >= 0), other=-1)
        if window_start >= 0:
            window_width = tl.minimum(tl.maximum(tl.load(window_width_ptr + row), 0), HINT_WINDOW)
            in_window = (bits >> HINT_SHIFT) - window_start  # [TILE] int64
            inside = counted & (in_window >= 0) & (in_window < window_width)
            tl.atomic_add(hint_histogram_ptr + row * HINT_WINDOW + in_window, ones, mask=inside)
            tl.atomic_add(hint_above_ptr + row, tl.sum((counted & (in_window >= window_width)).to(tl.int64)))
        elif HISTOGRAM:
            tl.atomic_add(histogram_ptr + row * BINS + digit, ones, mask=counted)


def _update_moments_triton(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    tiles: TileTable,
    beta1: float,
    beta2: float,
    histogram: torch.Tensor | None,
    hinted: HintedCounts | None,
) -> None:
    if tiles.num_tiles == 0:
        return
    unused = tiles.tile_start  # a valid pointer for arguments a constexpr branch never reads
    _update_moments_kernel[(tiles.num_tiles,)](
        grad,
        exp_avg,
        exp_avg_sq,
        tiles.tile_segment,
        tiles.tile_start,
        table.shard_offset,
        table.length,
        table.param_offset,
        table.row_len,
        table.block,
        table.rowscale_start,
        addressable(table.rowscale, exp_avg),
        unused if histogram is None else addressable(histogram, unused),
        unused if hinted is None else addressable(hinted.start, unused),
        unused if hinted is None else addressable(hinted.width, unused),
        unused if hinted is None else addressable(hinted.above, unused),
        unused if hinted is None else addressable(hinted.histogram, unused),
        1 - beta1,
        beta2,
        1 - beta2,
        DIGIT_SHIFT=LEVELS[0][0],
        BINS=level_bins(0),
        HISTOGRAM=histogram is not None,
        HINT_SHIFT=HINT_SHIFT,
        HINT_WINDOW=HINT_WINDOW,
        HINT=hinted is not None,
        TILE=tiles.tile_size,
        **LAUNCH_OPTIONS,
    )


CPU_SOURCE = r"""
namespace dsforget_cpu {

struct MomentsConstants {
  float coeff;  // torch's lerp in the form of its vectorised CPU kernel:
  bool from_start;  //   m = fma(coeff, g - m, from_start ? m : g)
  float beta2, one_minus_beta2;
  int64_t digit_shift;  // level-0 digit of |m|: bits(|m|) >> digit_shift, < 2^11 (no sign bit)
};

// n elements of one row piece (one scale); with kDigits also the level-0 digit of each new |m|,
// computed here in vector registers so that the scalar counting loop only loads and increments
// (moments + histogram of 16M elements on one core: 17.9 -> 16.0 ms). Loop-invariant branches
// only, so GCC vectorises it.
template <typename Grad, bool kScaled, bool kDigits>
void moments_run(const Grad* __restrict grad, float* __restrict m, float* __restrict v,
                 uint16_t* __restrict digits, int64_t n, float scale, const MomentsConstants& c) {
  for (int64_t i = 0; i < n; ++i) {
    float g = load_float(grad[i]);
    if (kScaled) g *= scale;
    const float m_new = fused_multiply_add(c.coeff, g - m[i], c.from_start ? m[i] : g);
    m[i] = m_new;
    v[i] = fused_multiply_add(c.one_minus_beta2 * g, g, v[i] * c.beta2);  // ATen's addcmul rounding
    if (kDigits) digits[i] = uint16_t(abs_bits(m_new) >> c.digit_shift);
  }
}

// shard elements [first, last) of segment s; digits[0, last - first) when kDigits
template <typename Grad, bool kDigits>
void moments_tile(const Grad* grad, float* m, float* v, uint16_t* digits, const float* rowscale,
                  const Segment& s, int64_t first, int64_t last, const MomentsConstants& c) {
  if (s.rowscale_start < 0) {
    moments_run<Grad, false, kDigits>(grad + first, m + first, v + first, digits, last - first, 1.0f, c);
    return;
  }
  // walk the tile row by row: one scale per row piece, no per-element division
  const int64_t element = s.param_offset + (first - s.shard_offset);
  int64_t row = element / s.row_len;
  int64_t column = element % s.row_len;
  for (int64_t j = first; j < last; ++row, column = 0) {
    const int64_t n = std::min(last - j, s.row_len - column);
    uint16_t* piece_digits = kDigits ? digits + (j - first) : nullptr;
    const float scale = rowscale[s.rowscale_start + row];
    moments_run<Grad, true, kDigits>(grad + j, m + j, v + j, piece_digits, n, scale, c);
    j += n;
  }
}

// A block with a window counts, instead of its level-0 histogram, the entries whose prefix
// bits >> shift lies in [start, start + width), by prefix, and those above it (see moments.py).
struct HintCounts {
  const int64_t* start = nullptr;  // [n_blocks] the window's first prefix, or -1 for none
  const int64_t* width = nullptr;  // [n_blocks] at most the histogram's bins
  int64_t* above = nullptr;  // [n_blocks] entries above the window
  int64_t shift = 0;
  int64_t max_width = 0;  // the histogram's bins; wider windows are clamped to it
};

constexpr int64_t kHintPiece = 1024;

template <typename Grad>
void update_moments_impl(const Grad* grad, float* m, float* v, const std::vector<Segment>& segments,
                         const float* rowscale, const at::Tensor& tile_segment, const at::Tensor& tile_start,
                         int64_t tile_size, HistogramTarget histogram, HistogramTarget hint_histogram,
                         const HintCounts& hints, const MomentsConstants& c) {
  for_each_tile(segments, tile_segment, tile_start, tile_size, histogram, hint_histogram,
                [&](const Segment& s, int64_t first, int64_t last, RangeContext& context) {
    const int64_t window_start = hints.start == nullptr || s.block < 0 ? -1 : hints.start[s.block];
    if (window_start >= 0) {
      const uint32_t width = uint32_t(std::clamp<int64_t>(hints.width[s.block], 0, hints.max_width));
      // counted in L1-sized pieces right after their moments, so the counting overlaps the
      // stream of the next piece (a whole 64 KiB tile at a time: +30% on the pass)
      int64_t above = 0;
      for (int64_t start = first; start < last; start += kHintPiece) {
        const int64_t stop = std::min(start + kHintPiece, last);
        moments_tile<Grad, false>(grad, m, v, nullptr, rowscale, s, start, stop, c);
        above += context.histograms[1].count_in_window(s.block, m + start, stop - start, hints.shift,
                                                       uint32_t(window_start), width);
      }
      __atomic_fetch_add(hints.above + s.block, above, __ATOMIC_RELAXED);
      return;
    }
    if (histogram.shared == nullptr || s.block < 0) {
      moments_tile<Grad, false>(grad, m, v, nullptr, rowscale, s, first, last, c);
      return;
    }
    uint16_t* digits = context.histograms[0].scratch(last - first);
    moments_tile<Grad, true>(grad, m, v, digits, rowscale, s, first, last, c);
    context.histograms[0].count_digits(s.block, digits, last - first);
  });
}

void update_moments(const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                    at::TensorList segment_columns, const at::Tensor& rowscale,
                    const at::Tensor& tile_segment, const at::Tensor& tile_start, int64_t tile_size,
                    const c10::optional<at::Tensor>& histogram, int64_t bins, int64_t shift,
                    const c10::optional<at::Tensor>& window_start,
                    const c10::optional<at::Tensor>& window_width,
                    const c10::optional<at::Tensor>& hint_above,
                    const c10::optional<at::Tensor>& hint_histogram, int64_t hint_bins, int64_t hint_shift,
                    double beta1, double beta2) {
  const std::vector<Segment> segments = gather_segments(segment_columns);
  const HistogramTarget counts{histogram.has_value() ? histogram->data_ptr<int64_t>() : nullptr, bins};
  const bool hinted = window_start.has_value() && window_width.has_value() && hint_above.has_value() &&
                      hint_histogram.has_value();
  const HistogramTarget hint_counts{hinted ? hint_histogram->data_ptr<int64_t>() : nullptr, hint_bins};
  const HintCounts hints{hinted ? window_start->data_ptr<int64_t>() : nullptr,
                         hinted ? window_width->data_ptr<int64_t>() : nullptr,
                         hinted ? hint_above->data_ptr<int64_t>() : nullptr, hint_shift, hint_bins};
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  // 1 - beta in double, then rounded, like the Python scalars the reference passes to ATen
  const float lerp_weight = float(1.0 - beta1);
  const bool from_start = lerp_weight < 0.5f;
  const MomentsConstants c{from_start ? lerp_weight : lerp_weight - 1.0f, from_start, float(beta2),
                           float(1.0 - beta2), shift};
  const float* scales = rowscale.data_ptr<float>();
  if (grad.scalar_type() == at::kBFloat16) {
    const auto* grad_bits = reinterpret_cast<const uint16_t*>(grad.data_ptr());
    update_moments_impl(grad_bits, m, v, segments, scales, tile_segment, tile_start, tile_size, counts,
                        hint_counts, hints, c);
  } else {
    update_moments_impl(grad.data_ptr<float>(), m, v, segments, scales, tile_segment, tile_start, tile_size,
                        counts, hint_counts, hints, c);
  }
}

TORCH_LIBRARY_FRAGMENT(dsforget_cpu, ops) {
  ops.def("update_moments(Tensor grad, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, Tensor[] segments, "
          "Tensor rowscale, Tensor tile_segment, Tensor tile_start, int tile_size, Tensor(c!)? histogram, "
          "int bins, int shift, Tensor? window_start, Tensor? window_width, Tensor(d!)? hint_above, "
          "Tensor(e!)? hint_histogram, "
          "int hint_bins, int hint_shift, float beta1, float beta2) -> ()",
          &update_moments);
}

}  // namespace dsforget_cpu
"""


def _update_moments_cpu(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    tiles: TileTable,
    beta1: float,
    beta2: float,
    histogram: torch.Tensor | None,
    hinted: HintedCounts | None,
) -> None:
    cpu_ops().update_moments(
        grad,
        exp_avg,
        exp_avg_sq,
        segment_columns(table),
        table.rowscale,
        tiles.tile_segment,
        tiles.tile_start,
        tiles.tile_size,
        histogram,
        level_bins(0),
        LEVELS[0][0],
        None if hinted is None else hinted.start,
        None if hinted is None else hinted.width,
        None if hinted is None else hinted.above,
        None if hinted is None else hinted.histogram,
        HINT_WINDOW,
        HINT_SHIFT,
        beta1,
        beta2,
    )


def update_moments(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    *,
    beta1: float,
    beta2: float,
    histogram: torch.Tensor | None = None,
    hinted: HintedCounts | None = None,
    backend: str = "torch",
) -> None:
    """Run the op with the named backend (see dsforget.kernels.backends).

    exp_avg, exp_avg_sq: flat fp32 shards, updated in place on segment elements only.
    histogram: int64 [n_blocks, level_bins(0)], accumulated into (callers zero it).
    hinted: the counts that replace `histogram` for blocks with a window (the others count into
    `histogram`, if given).
    """
    check_backend("update_moments", backend, exp_avg.device)
    if backend == "torch":
        update_moments_reference(
            grad,
            exp_avg,
            exp_avg_sq,
            table,
            beta1=beta1,
            beta2=beta2,
            histogram=histogram,
            hinted=hinted,
        )
        return
    tiles = tile_table(table, CPU_TILE if backend == "cpu" else TRITON_TILE)
    check_buffers("update_moments", tiles, grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    if histogram is not None:
        check_block_tensor("update_moments", "histogram", histogram, table, exp_avg.device, level_bins(0))
    if hinted is not None:
        check_block_tensor("update_moments", "window_start", hinted.start, table, exp_avg.device)
        check_block_tensor("update_moments", "window_width", hinted.width, table, exp_avg.device)
        check_block_tensor("update_moments", "hint_above", hinted.above, table, exp_avg.device)
        check_block_tensor(
            "update_moments", "hint_histogram", hinted.histogram, table, exp_avg.device, HINT_WINDOW
        )
    launch = _update_moments_cpu if backend == "cpu" else _update_moments_triton
    launch(grad, exp_avg, exp_avg_sq, table, tiles, beta1, beta2, histogram, hinted)
