#include "common.h"
#include "moments.h"

namespace dsforget_cpu {

constexpr int64_t kHintPiece = 1024;

template <typename Grad>
void update_moments_impl(const std::vector<const Grad*>& grads, const std::vector<float*>& ms,
                         const std::vector<float*>& vs, const std::vector<Segment>& segments,
                         const float* rowscale, const at::Tensor& tile_segment, const at::Tensor& tile_start,
                         int64_t tile_size, HistogramTarget histogram, HistogramTarget hint_histogram,
                         const HintCounts& hints, int64_t* nonzero, const MomentsConstants& c) {
  for_each_tile(segments, tile_segment, tile_start, tile_size, histogram, hint_histogram,
                [&](const Segment& s, int64_t first, int64_t last, RangeContext& context) {
    const Grad* grad = grads[s.tensor];
    float* m = ms[s.tensor];
    float* v = vs[s.tensor];
    // the tile's count of nonzero new |m| (top-k blocks, when asked for): one atomic per tile
    const auto count_nonzero = [&](int64_t count) {
      if (nonzero == nullptr || s.block < 0) return;
      __atomic_fetch_add(nonzero + s.block, count, __ATOMIC_RELAXED);
    };
    const int64_t window_start = hints.start == nullptr || s.block < 0 ? -1 : hints.start[s.block];
    if (window_start >= 0) {
      const uint32_t width = uint32_t(std::clamp<int64_t>(hints.width[s.block], 0, hints.max_width));
      // counted in L1-sized pieces right after their moments, so the counting overlaps the
      // stream of the next piece (a whole 64 KiB tile at a time: +30% on the pass)
      int64_t above = 0, tile_nonzero = 0;
      for (int64_t start = first; start < last; start += kHintPiece) {
        const int64_t stop = std::min(start + kHintPiece, last);
        tile_nonzero += moments_tile<Grad, false>(grad, m, v, nullptr, rowscale, s, start, stop, c);
        above += context.histograms[1].count_in_window(s.block, m + start, stop - start, hints.shift,
                                                       uint32_t(window_start), width);
      }
      __atomic_fetch_add(hints.above + s.block, above, __ATOMIC_RELAXED);
      count_nonzero(tile_nonzero);
      return;
    }
    if (histogram.shared == nullptr || s.block < 0) {
      count_nonzero(moments_tile<Grad, false>(grad, m, v, nullptr, rowscale, s, first, last, c));
      return;
    }
    uint16_t* digits = context.histograms[0].scratch(last - first);
    count_nonzero(moments_tile<Grad, true>(grad, m, v, digits, rowscale, s, first, last, c));
    context.histograms[0].count_digits(s.block, digits, last - first);
  });
}

void update_moments(at::TensorList grad, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                    at::TensorList segment_columns, const at::Tensor& rowscale,
                    const at::Tensor& tile_segment, const at::Tensor& tile_start, int64_t tile_size,
                    const c10::optional<at::Tensor>& histogram, int64_t bins, int64_t shift,
                    const c10::optional<at::Tensor>& window_start,
                    const c10::optional<at::Tensor>& window_width,
                    const c10::optional<at::Tensor>& hint_above,
                    const c10::optional<at::Tensor>& hint_histogram, int64_t hint_bins, int64_t hint_shift,
                    const c10::optional<at::Tensor>& nonzero, double beta1, double beta2) {
  const std::vector<Segment> segments = gather_segments(segment_columns);
  const HistogramTarget counts{histogram.has_value() ? histogram->data_ptr<int64_t>() : nullptr, bins};
  const bool hinted = window_start.has_value() && window_width.has_value() && hint_above.has_value() &&
                      hint_histogram.has_value();
  const HistogramTarget hint_counts{hinted ? hint_histogram->data_ptr<int64_t>() : nullptr, hint_bins};
  const HintCounts hints{hinted ? window_start->data_ptr<int64_t>() : nullptr,
                         hinted ? window_width->data_ptr<int64_t>() : nullptr,
                         hinted ? hint_above->data_ptr<int64_t>() : nullptr, hint_shift, hint_bins};
  int64_t* nonzero_counts = nonzero.has_value() ? nonzero->data_ptr<int64_t>() : nullptr;
  const at::Tensor& starts = segment_columns[7];
  const std::vector<float*> m = origins<float>(exp_avg, starts, &segments, at::kFloat, "exp_avg");
  const std::vector<float*> v = origins<float>(exp_avg_sq, starts, &segments, at::kFloat, "exp_avg_sq");
  // 1 - beta in double, then rounded, like the Python scalars the reference passes to ATen
  const float lerp_weight = float(1.0 - beta1);
  const bool from_start = lerp_weight < 0.5f;
  const MomentsConstants c{from_start ? lerp_weight : lerp_weight - 1.0f, from_start, float(beta2),
                           float(1.0 - beta2), shift};
  const float* scales = rowscale.data_ptr<float>();
  TORCH_CHECK(!grad.empty(), "update_moments: no gradient tensors");
  if (grad[0].scalar_type() == at::kBFloat16) {
    // bfloat16 gradients as raw uint16 (load_float widens them)
    const auto grad_bits = origins<const uint16_t>(grad, starts, &segments, at::kBFloat16, "grad");
    update_moments_impl(grad_bits, m, v, segments, scales, tile_segment, tile_start, tile_size, counts,
                        hint_counts, hints, nonzero_counts, c);
  } else {
    update_moments_impl(origins<const float>(grad, starts, &segments, at::kFloat, "grad"), m, v, segments, scales, tile_segment, tile_start, tile_size,
                        counts, hint_counts, hints, nonzero_counts, c);
  }
}

TORCH_LIBRARY_FRAGMENT(dsforget_cpu, ops) {
  ops.def("update_moments(Tensor[] grad, Tensor(a!)[] exp_avg, Tensor(b!)[] exp_avg_sq, Tensor[] segments, "
          "Tensor rowscale, Tensor tile_segment, Tensor tile_start, int tile_size, Tensor(c!)? histogram, "
          "int bins, int shift, Tensor? window_start, Tensor? window_width, Tensor(d!)? hint_above, "
          "Tensor(e!)? hint_histogram, "
          "int hint_bins, int hint_shift, Tensor(f!)? nonzero, float beta1, float beta2) -> ()",
          &update_moments);
}

}  // namespace dsforget_cpu
