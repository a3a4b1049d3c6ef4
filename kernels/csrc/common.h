// What every op of the dsforget CPU extension shares: the segment table as C++ reads it, bit
// patterns of |m|, per-thread histograms and the parallel loop over tiles (see kernels/_cpu.py for
// how the extension is built, and kernels/segments.py, kernels/tiles.py for the tables).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

namespace dsforget_cpu {

// One row of the SegmentTable (its int64 columns, see segments.py).
struct Segment {
  int64_t shard_offset, length, param_offset, row_len, block, rowscale_start;
  int64_t counter = 0;  // the step counter of the segment's bias corrections
  int64_t tensor = 0;  // the tensor of the shard's list that holds it (0 for a flat shard)
};

inline uint32_t abs_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits & 0x7fffffffu;
}

// Bit i of the result: first <= bits(|x[i]|) >> shift < first + width, for i < n <= 64 (first +
// width <= 2^31). Adds to *above the entries with bits(|x[i]|) >> shift >= first + width when
// above != nullptr. AVX2: 8 lanes per compare and a movemask, ~0.1 ns per entry; the scalar loop is
// the same test.
inline uint64_t match_mask(const float* x, int64_t n, int64_t shift, uint32_t first, uint32_t width,
                           int64_t* above) {
  const uint32_t end = first + width;
#if defined(__AVX2__)
  if (n == 64) {
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
    const __m256i before = _mm256_set1_epi32(int32_t(first) - 1);
    const __m256i last = _mm256_set1_epi32(int32_t(end) - 1);
    const __m128i count = _mm_cvtsi32_si128(int(shift));
    __m256i beyond = _mm256_setzero_si256();  // minus the count per lane
    uint64_t hits = 0;
    for (int j = 0; j < 8; ++j) {
      const __m256i bits = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8 * j)),
                                            magnitude);
      const __m256i high = _mm256_srl_epi32(bits, count);  // < 2^31: signed compares are exact
      const __m256i after_last = _mm256_cmpgt_epi32(high, last);
      const __m256i inside = _mm256_andnot_si256(after_last, _mm256_cmpgt_epi32(high, before));
      hits |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(inside)))) << (8 * j);
      beyond = _mm256_add_epi32(beyond, after_last);
    }
    if (above != nullptr) {
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), beyond);
      for (int32_t lane : lanes) *above -= lane;
    }
    return hits;
  }
#endif
  uint64_t hits = 0;
  int64_t beyond = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t high = abs_bits(x[i]) >> shift;
    hits |= uint64_t(high >= first && high < end) << i;
    beyond += high >= end;
  }
  if (above != nullptr) *above += beyond;
  return hits;
}

// a*b + c rounded once where the CPU has FMA, as ATen's vectorised lerp computes it
inline float fused_multiply_add(float a, float b, float c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

inline float load_float(float x) { return x; }
// bfloat16 gradient (passed as raw uint16): the top half of a float32
inline float load_float(uint16_t x) {
  const uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The tensor of a shard's list that holds shard element `at`: the last whose start is <= at.
inline int64_t tensor_of(const int64_t* starts, int64_t n_tensors, int64_t at) {
  if (n_tensors == 1) return 0;
  return int64_t(std::upper_bound(starts, starts + n_tensors, at) - starts) - 1;
}

// The segment table as the C++ side reads it: columns gathered once per call into structs. The
// eighth column is the shard's tensor starts (kernels/tiles.py, TensorList): a flat shard is one
// tensor starting at 0; a multi-tensor step sees separate tensors laid end to end in a virtual
// shard, tensor i holding shard elements [starts[i], starts[i] + its numel). Every segment lies
// inside one tensor (checked against the tensors by `origins`).
inline std::vector<Segment> gather_segments(at::TensorList columns) {
  TORCH_CHECK(columns.size() == 8,
              "expected the 7 int64 columns of a SegmentTable (rows, then counter) and the tensor starts");
  std::vector<Segment> segments(columns[0].numel());
  // each column into its named field (not by indexing across the struct's members)
  const int64_t* shard_offset = columns[0].data_ptr<int64_t>();
  const int64_t* length = columns[1].data_ptr<int64_t>();
  const int64_t* param_offset = columns[2].data_ptr<int64_t>();
  const int64_t* row_len = columns[3].data_ptr<int64_t>();
  const int64_t* block = columns[4].data_ptr<int64_t>();
  const int64_t* rowscale_start = columns[5].data_ptr<int64_t>();
  const int64_t* counter = columns[6].data_ptr<int64_t>();
  const int64_t* starts = columns[7].data_ptr<int64_t>();
  const int64_t n_tensors = columns[7].numel();
  TORCH_CHECK(n_tensors >= 1 && starts[0] == 0, "the tensor starts must begin with 0");
  for (size_t s = 0; s < segments.size(); ++s) {
    segments[s] = {shard_offset[s], length[s], param_offset[s], row_len[s], block[s], rowscale_start[s],
                   counter[s],      tensor_of(starts, n_tensors, shard_offset[s])};
  }
  return segments;
}

// Per tensor of `tensors`, the pointer `origin` with origin[j] = shard element j (for j in the
// tensor's span): its data minus its start. Checks that each tensor is a contiguous CPU tensor of
// `dtype` (element type T) holding every segment `segments` places in it (segments may be null:
// entries listed by an earlier, checked op). A multi-tensor step's tensors are a model's own
// parameters, gradients and moments, of any shape: the checks are here, once per call, not in
// Python per tensor.
template <typename T>
std::vector<T*> origins(at::TensorList tensors, const at::Tensor& starts, const std::vector<Segment>* segments,
                        at::ScalarType dtype, const char* name) {
  const int64_t n_tensors = starts.numel();
  TORCH_CHECK(int64_t(tensors.size()) == n_tensors, name, ": ", tensors.size(), " tensors for ", n_tensors,
              " tensor starts");
  const int64_t* start = starts.data_ptr<int64_t>();
  std::vector<int64_t> needed(n_tensors, 0);
  if (segments != nullptr) {
    for (const Segment& s : *segments) {
      needed[s.tensor] = std::max(needed[s.tensor], s.shard_offset + s.length - start[s.tensor]);
    }
  }
  std::vector<T*> result(n_tensors);
  for (int64_t i = 0; i < n_tensors; ++i) {
    const at::Tensor& tensor = tensors[i];
    TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == dtype && tensor.is_contiguous(), name,
                "[", i, "] must be a contiguous CPU tensor of ", dtype, ", got ", tensor.scalar_type(), " on ",
                tensor.device(), tensor.is_contiguous() ? "" : " (not contiguous)");
    TORCH_CHECK(tensor.numel() >= needed[i], name, "[", i, "] has ", tensor.numel(),
                " elements, but the segment table reaches element ", needed[i], " of it");
    // (integer arithmetic: the origin itself may lie before the allocation; only origin + j for
    // j in the tensor's span is ever dereferenced)
    result[i] = reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(tensor.data_ptr()) -
                                     uintptr_t(start[i]) * sizeof(T));
  }
  return result;
}

// The pointers of a shard's list by shard element, for entries listed by index (not by segment).
template <typename T>
struct ElementPointers {
  std::vector<T*> origin;
  const int64_t* starts;
  int64_t n_tensors;

  ElementPointers(at::TensorList tensors, const at::Tensor& tensor_starts, at::ScalarType dtype, const char* name)
      : origin(origins<T>(tensors, tensor_starts, nullptr, dtype, name)),
        starts(tensor_starts.data_ptr<int64_t>()),
        n_tensors(tensor_starts.numel()) {}

  T& operator[](int64_t at) const { return origin[tensor_of(starts, n_tensors, at)][at]; }
};

// One thread's counts for one block at a time, added to the shared int64 histogram
// [n_blocks, bins] with atomics when the block changes or the thread's range ends: one atomic
// per touched bin per (thread, block) instead of one per element. Four interleaved copies of
// the counters: |m| of neighbouring elements mostly share a digit, and a single counter array
// would chain every increment on the previous one's store (about 5 cycles each instead of ~1.5).
class LocalHistogram {
 public:
  static constexpr int kCopies = 4;

  LocalHistogram(int64_t* shared, int64_t bins)
      : shared_(shared), bins_(bins), counts_(shared == nullptr ? 0 : kCopies * bins, 0) {}

  // every element of m[0, n): digit = (bits(|m|) >> shift) & (bins - 1)
  void count_all(int64_t block, const float* m, int64_t n, int64_t shift) {
    switch_to(block);
    const uint32_t mask = uint32_t(bins_ - 1);
    uint32_t* counts = counts_.data();
    int64_t i = 0;
    for (; i + kCopies <= n; i += kCopies) {
      for (int c = 0; c < kCopies; ++c) ++counts[c * bins_ + ((abs_bits(m[i + c]) >> shift) & mask)];
    }
    for (; i < n; ++i) ++counts[(abs_bits(m[i]) >> shift) & mask];
  }

  // digits computed by the caller (level 0 in update_moments), each < bins
  void count_digits(int64_t block, const uint16_t* digits, int64_t n) {
    switch_to(block);
    uint32_t* counts = counts_.data();
    int64_t i = 0;
    for (; i + kCopies <= n; i += kCopies) {
      for (int c = 0; c < kCopies; ++c) ++counts[c * bins_ + digits[i + c]];
    }
    for (; i < n; ++i) ++counts[digits[i]];
  }

  // entries of m[0, n) with bits(|m|) >> high_shift == prefix, counted by (bits >> shift) & (bins - 1)
  void count_in_bin(int64_t block, const float* m, int64_t n, int64_t shift, int64_t high_shift,
                    uint32_t prefix) {
    switch_to(block);
    const uint32_t mask = uint32_t(bins_ - 1);
    uint32_t* counts = counts_.data();
    for (int64_t start = 0; start < n; start += 64) {
      const float* chunk = m + start;
      uint64_t hits = match_mask(chunk, std::min<int64_t>(64, n - start), high_shift, prefix, 1, nullptr);
      for (; hits != 0; hits &= hits - 1) ++counts[(abs_bits(chunk[__builtin_ctzll(hits)]) >> shift) & mask];
    }
  }

  // entries of m[0, n) with first <= bits(|m|) >> shift < first + width (width <= bins), counted by
  // (bits >> shift) - first; returns how many were above the window instead
  int64_t count_in_window(int64_t block, const float* m, int64_t n, int64_t shift, uint32_t first,
                          uint32_t width) {
    switch_to(block);
    uint32_t* counts = counts_.data();
    int64_t above = 0;
    for (int64_t start = 0; start < n; start += 64) {
      const float* chunk = m + start;
      const int64_t size = std::min<int64_t>(64, n - start);
      uint64_t hits = match_mask(chunk, size, shift, first, width, &above);
      for (; hits != 0; hits &= hits - 1) ++counts[(abs_bits(chunk[__builtin_ctzll(hits)]) >> shift) - first];
    }
    return above;
  }

  // one entry of the bin `bin` (< bins)
  void add(int64_t block, uint32_t bin) {
    switch_to(block);
    ++counts_[bin];
  }

  // this thread's buffer for n digits
  uint16_t* scratch(int64_t n) {
    if (int64_t(scratch_.size()) < n) scratch_.resize(n);
    return scratch_.data();
  }

  // only elements with bits(|m|) >> high_shift == prefix (high_shift 31: all of them). At levels
  // 1 and 2 a few percent of a block match: a vectorised compare builds a 64-bit match mask per
  // 64 elements and only the set bits are visited, 2-6x faster than a branch per element
  // (measured on 16M elements with 4% and 0.01% matching).
  void count_matching(int64_t block, const float* m, int64_t n, int64_t shift, int64_t high_shift,
                      int64_t prefix) {
    if (high_shift >= 31) {
      count_all(block, m, n, shift);
      return;
    }
    count_in_bin(block, m, n, shift, high_shift, uint32_t(prefix));
  }

  void flush() {
    if (block_ < 0) return;
    int64_t* row = shared_ + block_ * bins_;
    for (int64_t d = 0; d < bins_; ++d) {
      int64_t total = 0;
      for (int c = 0; c < kCopies; ++c) {
        total += counts_[c * bins_ + d];
        counts_[c * bins_ + d] = 0;
      }
      if (total != 0) __atomic_fetch_add(row + d, total, __ATOMIC_RELAXED);
    }
    block_ = -1;
  }

 private:
  void switch_to(int64_t block) {
    if (block != block_) {
      flush();
      block_ = block;
    }
  }

  int64_t* shared_;
  int64_t bins_;
  int64_t block_ = -1;
  std::vector<uint32_t> counts_;
  std::vector<uint16_t> scratch_;
};

// A shared int64 histogram [n_blocks, bins] that tiles count into (shared == nullptr: none).
struct HistogramTarget {
  int64_t* shared = nullptr;
  int64_t bins = 0;
};

// Entries an op left for the caller: shard indices, their blocks, and their m and v.
struct Deferred {
  std::vector<int64_t> index, block;
  std::vector<float> exp_avg, exp_avg_sq;

  void append(const Deferred& more) {
    index.insert(index.end(), more.index.begin(), more.index.end());
    block.insert(block.end(), more.block.begin(), more.block.end());
    exp_avg.insert(exp_avg.end(), more.exp_avg.begin(), more.exp_avg.end());
    exp_avg_sq.insert(exp_avg_sq.end(), more.exp_avg_sq.begin(), more.exp_avg_sq.end());
  }
};

// What an op left for the caller: deferred entries, and the shard spans [first, last) whose p it
// did not write (adjacent spans merged).
struct Leftovers {
  Deferred deferred;
  std::vector<std::pair<int64_t, int64_t>> untouched;

  bool empty() const { return deferred.index.empty() && untouched.empty(); }

  void leave_untouched(int64_t first, int64_t last) {
    if (!untouched.empty() && untouched.back().second == first) {
      untouched.back().second = last;
    } else {
      untouched.emplace_back(first, last);
    }
  }

  void append(const Leftovers& more) {
    deferred.append(more.deferred);
    for (const auto& [first, last] : more.untouched) leave_untouched(first, last);
  }
};

// What one thread's contiguous range of tiles accumulates: its LocalHistograms over the op's
// (up to two) histograms, and what it left for the caller.
struct RangeContext {
  RangeContext(HistogramTarget first, HistogramTarget second)
      : histograms{LocalHistogram(first.shared, first.bins), LocalHistogram(second.shared, second.bins)} {}

  LocalHistogram histograms[2];
  Leftovers left;
};

// Calls body(segment, first, last, context) for every tile [first, last) of shard elements, in
// parallel over contiguous ranges of tiles (one range per thread, so a thread's tiles are
// neighbours in memory and mostly in one block). Each range's histograms are flushed at its end;
// the leftovers of all ranges are returned in range (= shard) order.
template <typename Body>
Leftovers for_each_tile(const std::vector<Segment>& segments, const at::Tensor& tile_segment,
                        const at::Tensor& tile_start, int64_t tile_size, HistogramTarget first,
                        HistogramTarget second, Body body) {
  const int64_t* tile_segment_ptr = tile_segment.data_ptr<int64_t>();
  const int64_t* tile_start_ptr = tile_start.data_ptr<int64_t>();
  std::mutex finished_lock;
  std::vector<std::pair<int64_t, RangeContext>> finished;
  // Threads only for >= 64K elements each: below that (~30 us of moments work at the 0.45 ns per
  // element measured on one core) waking a thread costs more than it saves, and far more when the
  // cores are shared with other processes.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / tile_size);
  at::parallel_for(0, tile_segment.numel(), grain, [&](int64_t begin, int64_t end) {
    RangeContext context(first, second);
    for (int64_t t = begin; t < end; ++t) {
      const Segment& segment = segments[tile_segment_ptr[t]];
      const int64_t start = tile_start_ptr[t];
      const int64_t stop = std::min(start + tile_size, segment.shard_offset + segment.length);
      body(segment, start, stop, context);
    }
    for (LocalHistogram& histogram : context.histograms) histogram.flush();
    if (!context.left.empty()) {
      std::lock_guard<std::mutex> guard(finished_lock);
      finished.emplace_back(begin, std::move(context));
    }
  });
  std::sort(finished.begin(), finished.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  Leftovers left;
  for (auto& [begin, context] : finished) left.append(context.left);
  return left;
}

// A std::vector as a new 1-D CPU tensor of `dtype` (the element sizes must agree).
template <typename T>
at::Tensor vector_tensor(const std::vector<T>& values, at::ScalarType dtype) {
  at::Tensor out = at::empty({int64_t(values.size())}, at::TensorOptions().dtype(dtype));
  std::memcpy(out.data_ptr(), values.data(), values.size() * sizeof(T));
  return out;
}

}  // namespace dsforget_cpu
