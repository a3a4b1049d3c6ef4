#include "common.h"

namespace dsforget_cpu {

// radix.advance for int64 CPU tensors [n_blocks] (histogram [n_blocks, bins]); returns the new
// prefix, remaining, threshold and matching, and which blocks moved (bool). base None: prefix <<
// digit_bits (refine); skipped None: 0. within_counts: only blocks whose remaining-th largest
// entry lies among the counted ones move (a hint's window).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> radix_advance(
    const at::Tensor& prefix, const at::Tensor& remaining, const at::Tensor& threshold,
    const at::Tensor& matching, const at::Tensor& histogram, const c10::optional<at::Tensor>& base,
    const c10::optional<at::Tensor>& skipped, const c10::optional<at::Tensor>& blocks, int64_t shift,
    int64_t digit_bits, bool last_level, bool within_counts) {
  at::Tensor new_prefix = prefix.clone(), new_remaining = remaining.clone();
  at::Tensor new_threshold = threshold.clone(), new_matching = matching.clone();
  at::Tensor moved = at::zeros({prefix.numel()}, prefix.options().dtype(at::kBool));
  const at::Tensor counts = histogram.contiguous();
  const at::Tensor chosen = blocks.has_value() ? blocks->to(at::kBool).contiguous() : at::Tensor();
  const at::Tensor bases = base.has_value() ? base->contiguous() : at::Tensor();
  const at::Tensor skips = skipped.has_value() ? skipped->contiguous() : at::Tensor();
  const int64_t n = prefix.numel(), bins = counts.size(1);
  const int64_t* count = counts.data_ptr<int64_t>();
  int64_t* p_out = new_prefix.data_ptr<int64_t>();
  int64_t* left_out = new_remaining.data_ptr<int64_t>();
  bool* moved_out = moved.data_ptr<bool>();
  for (int64_t b = 0; b < n; ++b) {
    int64_t& p = p_out[b];
    if (p == -1 || (chosen.defined() && !chosen.data_ptr<bool>()[b])) continue;
    const int64_t* row = count + b * bins;
    const int64_t skip = skips.defined() ? skips.data_ptr<int64_t>()[b] : 0;
    int64_t& left = left_out[b];
    if (within_counts) {
      int64_t total = 0;
      for (int64_t d = 0; d < bins; ++d) total += row[d];
      if (left <= skip || left > skip + total) continue;
    }
    const int64_t wanted = left - skip;
    int64_t digit = bins - 1, above = 0;  // the top bin, unless a lower one is needed
    while (digit > 0 && above + row[digit] < wanted) above += row[digit--];
    above += skip;
    const int64_t needed = left - above, in_bin = row[digit];
    const int64_t entered = (bases.defined() ? bases.data_ptr<int64_t>()[b] : p << digit_bits) + digit;
    moved_out[b] = true;
    if (needed == in_bin || last_level) {
      new_threshold.data_ptr<int64_t>()[b] = entered << shift;
      p = -1;
    } else {
      left = needed;
      new_matching.data_ptr<int64_t>()[b] = in_bin;
      p = entered;
    }
  }
  return {new_prefix, new_remaining, new_threshold, new_matching, moved};
}

TORCH_LIBRARY_FRAGMENT(dsforget_cpu, ops) {
  ops.def("radix_advance(Tensor prefix, Tensor remaining, Tensor threshold, Tensor matching, "
          "Tensor histogram, Tensor? base, Tensor? skipped, Tensor? blocks, int shift, int digit_bits, "
          "bool last_level, bool within_counts) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
          &radix_advance);
}

}  // namespace dsforget_cpu
