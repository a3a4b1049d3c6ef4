#include "common.h"

namespace dsforget_cpu {

void abs_histogram(at::TensorList exp_avg, at::TensorList segment_columns, const at::Tensor& tile_segment,
                   const at::Tensor& tile_start, int64_t tile_size, const at::Tensor& prefix,
                   at::Tensor histogram, int64_t shift, int64_t bits) {
  const std::vector<Segment> segments = gather_segments(segment_columns);
  const std::vector<const float*> ms =
      origins<const float>(exp_avg, segment_columns[7], &segments, at::kFloat, "exp_avg");
  const int64_t* prefix_ptr = prefix.data_ptr<int64_t>();
  const int64_t bins = int64_t(1) << bits;
  for_each_tile(segments, tile_segment, tile_start, tile_size, {histogram.data_ptr<int64_t>(), bins}, {},
                [&](const Segment& s, int64_t first, int64_t last, RangeContext& context) {
    if (s.block < 0 || prefix_ptr[s.block] < 0) return;  // DENSE, or block already resolved
    const float* m = ms[s.tensor];
    context.histograms[0].count_matching(s.block, m + first, last - first, shift, shift + bits,
                                         prefix_ptr[s.block]);
  });
}

// deferred_histogram for CPU tensors: entries given by their m and block.
void deferred_histogram(const at::Tensor& exp_avg, const at::Tensor& block, const at::Tensor& prefix,
                        at::Tensor histogram, int64_t shift, int64_t bits) {
  const float* m = exp_avg.data_ptr<float>();
  const int64_t* blocks = block.data_ptr<int64_t>();
  const int64_t* prefix_ptr = prefix.data_ptr<int64_t>();
  int64_t* counts = histogram.data_ptr<int64_t>();
  const int64_t bins = int64_t(1) << bits;
  for (int64_t i = 0; i < exp_avg.numel(); ++i) {
    const uint32_t magnitude = abs_bits(m[i]);
    // prefix -1 (resolved) never equals the non-negative high bits
    if (int64_t(magnitude >> (shift + bits)) != prefix_ptr[blocks[i]]) continue;
    ++counts[blocks[i] * bins + ((magnitude >> shift) & (bins - 1))];
  }
}

TORCH_LIBRARY_FRAGMENT(dsforget_cpu, ops) {
  ops.def("deferred_histogram(Tensor exp_avg, Tensor block, Tensor prefix, Tensor(a!) histogram, int shift, "
          "int bits) -> ()",
          &deferred_histogram);
  ops.def("abs_histogram(Tensor[] exp_avg, Tensor[] segments, Tensor tile_segment, Tensor tile_start, "
          "int tile_size, Tensor prefix, Tensor(a!) histogram, int shift, int bits) -> ()",
          &abs_histogram);
}

}  // namespace dsforget_cpu
