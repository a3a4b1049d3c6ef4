#include "adamw.h"
#include "common.h"

namespace dsforget_cpu {

// n elements of one tile. Entries with bits(|m|) >> defer_shift == defer_prefix keep their p
// (defer_prefix UINT32_MAX: none); returns how many did.
int64_t masked_adamw_run(float* __restrict p, const float* __restrict m, const float* __restrict v,
                         int64_t n, uint32_t threshold, uint32_t defer_prefix, int64_t defer_shift,
                         const UpdateConstants& c) {
  int32_t deferred = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = abs_bits(m[i]);
    const float updated = adamw_entry(p[i], m[i], v[i], bits >= threshold, c);
    const bool defer = (bits >> defer_shift) == defer_prefix;
    deferred += defer;
    p[i] = defer ? p[i] : updated;
  }
  return deferred;
}

// Deferring tiles run in pieces this long, and only pieces that deferred an entry are searched
// for it: a deferred bin holds ~1e-4 of a block, so almost every piece skips the search.
constexpr int64_t kDeferPiece = 1024;

// Appends every entry of [first, last) with bits(|m|) >> shift == prefix to `deferred`.
void record_matching(const float* m, const float* v, int64_t first, int64_t last, int64_t shift,
                     uint32_t prefix, int64_t block, Deferred& deferred) {
  for (int64_t start = first; start < last; start += 64) {
    uint64_t hits = match_mask(m + start, std::min<int64_t>(64, last - start), shift, prefix, 1, nullptr);
    for (; hits != 0; hits &= hits - 1) {
      const int64_t i = start + __builtin_ctzll(hits);
      deferred.index.push_back(i);
      deferred.block.push_back(block);
      deferred.exp_avg.push_back(m[i]);
      deferred.exp_avg_sq.push_back(v[i]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_adamw(
    at::TensorList param, at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList segment_columns,
    const at::Tensor& tile_segment, const at::Tensor& tile_start, int64_t tile_size,
    const at::Tensor& thresholds,
    const c10::optional<at::Tensor>& defer_prefix, int64_t defer_shift,
    const c10::optional<at::Tensor>& corrections, double step_size, double bias_correction2_sqrt, double eps,
    double decay_selected, double decay_unselected) {
  const std::vector<Segment> segments = gather_segments(segment_columns);
  const at::Tensor& starts = segment_columns[7];
  const std::vector<float*> ps = origins<float>(param, starts, &segments, at::kFloat, "param");
  const std::vector<const float*> ms = origins<const float>(exp_avg, starts, &segments, at::kFloat, "exp_avg");
  const std::vector<const float*> vs =
      origins<const float>(exp_avg_sq, starts, &segments, at::kFloat, "exp_avg_sq");
  const int64_t* threshold_ptr = thresholds.data_ptr<int64_t>();
  const int64_t* defer_ptr = defer_prefix.has_value() ? defer_prefix->data_ptr<int64_t>() : nullptr;
  const UpdateConstantsByCounter constants(corrections, step_size, bias_correction2_sqrt, eps, decay_selected,
                                           decay_unselected);
  const Deferred deferred = for_each_tile(segments, tile_segment, tile_start, tile_size, {}, {},
                [&](const Segment& s, int64_t first, int64_t last, RangeContext& context) {
    const UpdateConstants c = constants[s.counter];
    float* p = ps[s.tensor];
    const float* m = ms[s.tensor];
    const float* v = vs[s.tensor];
    // DENSE segments get threshold 0, which every bits(|m|) reaches (NaN included).
    const uint32_t threshold = s.block < 0 ? 0u : uint32_t(threshold_ptr[s.block]);
    const int64_t defer = s.block < 0 || defer_ptr == nullptr ? -1 : defer_ptr[s.block];
    const uint32_t prefix = defer < 0 ? UINT32_MAX : uint32_t(defer);
    const int64_t piece = defer < 0 ? last - first : kDeferPiece;
    for (int64_t start = first; start < last; start += piece) {
      const int64_t stop = std::min(start + piece, last);
      const int64_t deferred =
          masked_adamw_run(p + start, m + start, v + start, stop - start, threshold, prefix, defer_shift, c);
      if (deferred > 0) {
        record_matching(m, v, start, stop, defer_shift, prefix, s.block, context.left.deferred);
      }
    }
  }).deferred;
  return {vector_tensor(deferred.index, at::kLong), vector_tensor(deferred.block, at::kLong),
          vector_tensor(deferred.exp_avg, at::kFloat), vector_tensor(deferred.exp_avg_sq, at::kFloat)};
}

// apply_deferred for CPU tensors: the entries' m and v come with the list, p is read at index.
// block_corrections: fp32 [n_blocks, 2], each block's (step_size, bias_correction2_sqrt) where they
// differ between blocks, else none.
void apply_deferred(at::TensorList param, const at::Tensor& tensor_starts, const at::Tensor& index, const at::Tensor& block,
                    const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& thresholds,
                    const c10::optional<at::Tensor>& block_corrections, double step_size,
                    double bias_correction2_sqrt, double eps, double decay_selected, double decay_unselected) {
  const UpdateConstantsByCounter constants(block_corrections, step_size, bias_correction2_sqrt, eps,
                                           decay_selected, decay_unselected);
  const ElementPointers<float> p(param, tensor_starts, at::kFloat, "param");
  const int64_t* at = index.data_ptr<int64_t>();
  const int64_t* blocks = block.data_ptr<int64_t>();
  const float* m = exp_avg.data_ptr<float>();
  const float* v = exp_avg_sq.data_ptr<float>();
  const int64_t* threshold = thresholds.data_ptr<int64_t>();
  // The entries are scattered over the shard, each p a cache miss: prefetching kAhead entries ahead
  // overlaps the misses (the 73K window entries of a one-pass step at 16 Mi: 1.75 -> 1.25 ms).
  constexpr int64_t kAhead = 64;
  const int64_t n = index.numel();
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) __builtin_prefetch(&p[at[i + kAhead]], 1);
    const bool selected = abs_bits(m[i]) >= uint32_t(threshold[blocks[i]]);
    p[at[i]] = adamw_entry(p[at[i]], m[i], v[i], selected, constants[blocks[i]]);
  }
}

TORCH_LIBRARY_FRAGMENT(dsforget_cpu, ops) {
  ops.def("apply_deferred(Tensor(a!)[] param, Tensor tensor_starts, Tensor index, Tensor block, Tensor exp_avg, Tensor exp_avg_sq, "
          "Tensor thresholds, Tensor? block_corrections, float step_size, float bias_correction2_sqrt, float eps, "
          "float decay_selected, float decay_unselected) -> ()",
          &apply_deferred);
  ops.def("masked_adamw(Tensor(a!)[] param, Tensor[] exp_avg, Tensor[] exp_avg_sq, Tensor[] segments, "
          "Tensor tile_segment, Tensor tile_start, int tile_size, Tensor thresholds, Tensor? defer_prefix, "
          "int defer_shift, Tensor? corrections, float step_size, float bias_correction2_sqrt, float eps, "
          "float decay_selected, float decay_unselected) -> (Tensor, Tensor, Tensor, Tensor)",
          &masked_adamw);
}

}  // namespace dsforget_cpu
