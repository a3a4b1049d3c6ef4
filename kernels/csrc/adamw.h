// The AdamW update of one entry, shared by the two-pass ops (masked_update.cpp) and the one-pass
// step (speculative.cpp): the one-pass step's exactness rests on every op rounding it identically.
#pragma once

#include <cmath>
#include <vector>

#include <torch/extension.h>

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

// The constants of each step counter where the segments' bias corrections differ (HFT resampling:
// a parameter's moments have seen only the steps it trained), else one set for all. corrections:
// fp32 [C, 2], (step_size, bias_correction2_sqrt) of each counter, rounded from double as the
// scalar arguments are: a counter of the uniform step's count gets its constants bit for bit.
class UpdateConstantsByCounter {
 public:
  UpdateConstantsByCounter(const c10::optional<at::Tensor>& corrections, double step_size,
                           double bias_correction2_sqrt, double eps, double decay_selected,
                           double decay_unselected)
      : uniform_(update_constants(step_size, bias_correction2_sqrt, eps, decay_selected, decay_unselected)) {
    if (!corrections.has_value()) return;
    TORCH_CHECK(corrections->scalar_type() == at::kFloat && corrections->dim() == 2 &&
                    corrections->size(1) == 2 && corrections->is_contiguous(),
                "corrections must be a contiguous fp32 [counters, 2] tensor");
    const float* values = corrections->data_ptr<float>();
    for (int64_t c = 0; c < corrections->size(0); ++c) {
      UpdateConstants counter = uniform_;
      counter.step_size = values[2 * c];
      counter.inverse_bias_correction2_sqrt = 1.0f / values[2 * c + 1];
      per_counter_.push_back(counter);
    }
  }

  // by value: a local copy the hot loops keep in registers
  UpdateConstants operator[](int64_t counter) const {
    if (per_counter_.empty()) return uniform_;
    TORCH_CHECK(counter >= 0 && counter < int64_t(per_counter_.size()), "counter ", counter,
                " has no corrections row");
    return per_counter_[counter];
  }

 private:
  UpdateConstants uniform_;
  std::vector<UpdateConstants> per_counter_;
};

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
