#include "common.h"

namespace dsforget_cpu {

// ThresholdHint.after for int64 CPU tensors [n_blocks]: one [5, n_blocks] tensor whose rows are
// prefix, center, reach, start and width (the reference's integer math; // floors).
at::Tensor next_hint(const at::Tensor& threshold, const c10::optional<at::Tensor>& previous_prefix,
                     const c10::optional<at::Tensor>& previous_center,
                     const c10::optional<at::Tensor>& previous_reach, int64_t shift, int64_t min_reach,
                     int64_t max_reach, int64_t kept_numerator, int64_t kept_denominator) {
  const int64_t n = threshold.numel();
  at::Tensor packed = at::empty({5, n}, threshold.options());
  int64_t* prefix = packed.data_ptr<int64_t>();
  int64_t *center = prefix + n, *reach = prefix + 2 * n, *start = prefix + 3 * n, *width = prefix + 4 * n;
  const bool first = !previous_prefix.has_value();
  // contiguous copies (usually the tensors themselves), alive while their pointers are read
  const at::Tensor bits = threshold.contiguous();
  const at::Tensor last_prefix = first ? at::Tensor() : previous_prefix->contiguous();
  const at::Tensor last_center = first ? at::Tensor() : previous_center->contiguous();
  const at::Tensor last_reach = first ? at::Tensor() : previous_reach->contiguous();
  const int64_t* bit = bits.data_ptr<int64_t>();
  const int64_t* moved_from = first ? nullptr : last_prefix.data_ptr<int64_t>();
  const int64_t* expected = first ? nullptr : last_center.data_ptr<int64_t>();
  const int64_t* was = first ? nullptr : last_reach.data_ptr<int64_t>();
  const auto floor_div = [](int64_t x, int64_t d) { return x / d - (x % d != 0 && (x < 0) != (d < 0)); };
  for (int64_t b = 0; b < n; ++b) {
    prefix[b] = bit[b] >> shift;
    // no previous hint, or a previous threshold in prefix 0 (0 itself, resolved at zero): a
    // first window around this threshold, nothing to extrapolate from
    if (first || moved_from[b] == 0) {
      center[b] = prefix[b];
      reach[b] = max_reach;
    } else {
      const int64_t error = std::abs(prefix[b] - expected[b]);
      const int64_t kept = floor_div(was[b] * kept_numerator, kept_denominator);
      reach[b] = std::min(std::max(3 * error + min_reach, kept), max_reach);
      center[b] = prefix[b] + floor_div(prefix[b] - moved_from[b], 2);
    }
    start[b] = std::max<int64_t>(center[b] - reach[b], 0);
    // a threshold of 0: an empty window at 0 (every entry above it, see ThresholdHint)
    width[b] = bit[b] == 0 ? 0 : std::max<int64_t>(center[b] + reach[b] - start[b], 0);
  }
  return packed;
}

TORCH_LIBRARY_FRAGMENT(dsforget_cpu, ops) {
  ops.def("next_hint(Tensor threshold, Tensor? previous_prefix, Tensor? previous_center, "
          "Tensor? previous_reach, int shift, int min_reach, int max_reach, int kept_numerator, "
          "int kept_denominator) -> Tensor",
          &next_hint);
}

}  // namespace dsforget_cpu
