// The moments update of a tile (m and v as torch's lerp_/addcmul_ round them) and the hint's
// counting targets, shared by update_moments (moments.cpp) and the one-pass step (speculative.cpp).
#pragma once

#include "common.h"

namespace dsforget_cpu {

struct MomentsConstants {
  float coeff;  // torch's lerp in the form of its vectorised CPU kernel:
  bool from_start;  //   m = fma(coeff, g - m, from_start ? m : g)
  float beta2, one_minus_beta2;
  int64_t digit_shift;  // level-0 digit of |m|: bits(|m|) >> digit_shift, < 2^11 (no sign bit)
};

// n elements of one row piece (one scale); with kDigits also the level-0 digit of each new |m|,
// computed here in vector registers so that the scalar counting loop only loads and increments
// (moments + histogram of 16M elements on one core: 17.9 -> 16.0 ms). Returns how many new |m|
// are not 0 (a lane-wise count in the same loop). Loop-invariant branches only, so GCC
// vectorises it.
template <typename Grad, bool kScaled, bool kDigits>
int64_t moments_run(const Grad* __restrict grad, float* __restrict m, float* __restrict v,
                    uint16_t* __restrict digits, int64_t n, float scale, const MomentsConstants& c) {
  int32_t nonzero = 0;  // (n <= a tile: int32 lanes)
  for (int64_t i = 0; i < n; ++i) {
    float g = load_float(grad[i]);
    if (kScaled) g *= scale;
    const float m_new = fused_multiply_add(c.coeff, g - m[i], c.from_start ? m[i] : g);
    m[i] = m_new;
    v[i] = fused_multiply_add(c.one_minus_beta2 * g, g, v[i] * c.beta2);  // ATen's addcmul rounding
    if (kDigits) digits[i] = uint16_t(abs_bits(m_new) >> c.digit_shift);
    nonzero += abs_bits(m_new) != 0;
  }
  return nonzero;
}

// shard elements [first, last) of segment s; digits[0, last - first) when kDigits. Returns how
// many new |m| are not 0.
template <typename Grad, bool kDigits>
int64_t moments_tile(const Grad* grad, float* m, float* v, uint16_t* digits, const float* rowscale,
                     const Segment& s, int64_t first, int64_t last, const MomentsConstants& c) {
  if (s.rowscale_start < 0) {
    return moments_run<Grad, false, kDigits>(grad + first, m + first, v + first, digits, last - first, 1.0f,
                                             c);
  }
  // walk the tile row by row: one scale per row piece, no per-element division
  const int64_t element = s.param_offset + (first - s.shard_offset);
  int64_t row = element / s.row_len;
  int64_t column = element % s.row_len;
  int64_t nonzero = 0;
  for (int64_t j = first; j < last; ++row, column = 0) {
    const int64_t n = std::min(last - j, s.row_len - column);
    uint16_t* piece_digits = kDigits ? digits + (j - first) : nullptr;
    const float scale = rowscale[s.rowscale_start + row];
    nonzero += moments_run<Grad, true, kDigits>(grad + j, m + j, v + j, piece_digits, n, scale, c);
    j += n;
  }
  return nonzero;
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

}  // namespace dsforget_cpu
