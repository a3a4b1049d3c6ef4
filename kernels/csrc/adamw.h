// The AdamW update of one entry, shared by the two-pass ops (masked_update.cpp) and the one-pass
// step (speculative.cpp): the one-pass step's exactness rests on every op rounding it identically.
#pragma once

#include <cmath>

namespace dsforget_cpu {

struct UpdateConstants {
  float step_size;
  // a product instead of ATen's division by sqrt(bc2): the divider bounds the update loop (sqrt
  // and two divisions per 8 lanes: 16 Mi on one core 10.2 -> 8.8 ms); denom moves by <= an ulp
  float inverse_bias_correction2_sqrt;
  float eps, decay_selected, decay_unselected;
};

inline UpdateConstants update_constants(double step_size, double bias_correction2_sqrt, double eps,
                                        double decay_selected, double decay_unselected) {
  return {float(step_size), 1.0f / float(bias_correction2_sqrt), float(eps), float(decay_selected),
          float(decay_unselected)};
}

// One entry's new p (branch-free: selects become blends when GCC vectorises a loop of it).
inline float adamw_denominator(float v, const UpdateConstants& c) {
  return std::sqrt(v) * c.inverse_bias_correction2_sqrt + c.eps;
}

// What a selected entry adds to its decayed p (ATen's addcdiv rounding). The one-pass step
// subtracts and re-adds exactly this, so every op computes it here.
inline float adamw_step(float m, float v, const UpdateConstants& c) {
  return (-c.step_size * m) / adamw_denominator(v, c);
}

inline float adamw_entry(float p, float m, float v, bool selected, const UpdateConstants& c) {
  const float decayed = p * (selected ? c.decay_selected : c.decay_unselected);
  return decayed + adamw_step(selected ? m : 0.0f, v, c);
}

}  // namespace dsforget_cpu
