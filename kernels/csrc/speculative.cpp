#include "adamw.h"
#include "common.h"
#include "moments.h"

namespace dsforget_cpu {

// A block's window in bit patterns of |m|: entries with low <= bits < high are deferred, entries
// with bits >= high speculatively selected.
struct Window {
  uint32_t low, high;
};

inline Window window_of(const int64_t* start, const int64_t* width, int64_t block, int64_t shift,
                        int64_t max_width) {
  TORCH_CHECK(start[block] >= 0, "speculative update: block ", block, " has no window");
  const int64_t clamped = std::clamp<int64_t>(width[block], 0, max_width);
  // start < 2^21 and width <= 1024: high < 2^32
  return {uint32_t(start[block] << shift), uint32_t((start[block] + clamped) << shift)};
}

inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

// A piece entry's flags (speculate_piece): 32 bits, as wide as its floats, so that the vectorised
// loop stores them from the lanes that computed them (byte flags made GCC unroll it 4x to fill a
// vector of bytes, and spill on AVX2's 16 registers).
using Flags = uint32_t;

// A piece's counts: entries inside the window, selected updates that cannot be undone, entries
// above the window, entries whose |m| is not 0.
struct PieceCounts {
  int64_t inside = 0, irreversible = 0, above = 0, nonzero = 0;
};

// How a piece's loop treats the moments: already updated (row-scaled segments: moments_tile ran),
// or updated in the same loop with torch's lerp from m (beta1 > 0.5) or from g. A template
// argument, not a runtime flag: GCC does not vectorise a loop that selects between the two forms.
enum class Moments { kUpdated, kLerpFromStart, kLerpFromEnd };

// The update of n entries of one top-k piece as if its threshold were window.high (entries inside
// the window are unselected until resolve_window). before[i]: p as it was; flags[i]: bit 0 inside
// the window, bit 1 a selected update that subtracting the step does not undo bit for bit.
// Branch-free (GCC vectorises it).
// The unselected p is p * decay: adamw_entry adds (-step_size * 0) / denom, which is -0 (a no-op)
// for every denom > 0, and this saves that division (one of two per entry). Returns false if a
// denom is not > 0 (NaN, or 0: v NaN, or eps 0 with v 0): the piece must then be left untouched,
// for the unselected p of such an entry is NaN and the step could not be added to it later.
// The loop runs kPrefetchChunk entries at a time and first asks for the lines of its four streams
// kPrefetchAhead entries on (of the next piece near a piece's end; never past `readable`, the
// entries that exist from the piece's start). Without it the loop kept too few loads in flight
// for one core's share of the bandwidth: 20.4 ms on one thread where torch's AdamW took 11.5,
// and 11.8-12.1 ms on two where AdamW took 6.1-6.3; with it 9.6-10.7 ms (kernels/RESULTS.md).
constexpr int64_t kPrefetchChunk = 128, kPrefetchAhead = 512, kFloatsPerLine = 16;

template <typename Grad>
inline void prefetch_entries(const Grad* grad, const float* p, const float* m, const float* v, int64_t from,
                             int64_t to) {
  for (int64_t i = from; i < to; i += kFloatsPerLine) {
    __builtin_prefetch(grad + i);
    __builtin_prefetch(p + i, 1);
    __builtin_prefetch(m + i, 1);
    __builtin_prefetch(v + i, 1);
  }
}

template <typename Grad, Moments kMoments>
inline bool speculate_piece(const Grad* __restrict grad, float* __restrict p, float* __restrict m,
                            float* __restrict v, float* __restrict before, Flags* __restrict flags,
                            int64_t n, int64_t readable, Window window, const MomentsConstants& moments,
                            const UpdateConstants& c, PieceCounts& counts) {
  // (int32 and & instead of &&: GCC vectorises)
  int32_t inside = 0, irreversible = 0, above = 0, nonzero = 0, odd = 0;
  for (int64_t chunk = 0; chunk < n; chunk += kPrefetchChunk) {
    const int64_t ahead = chunk + kPrefetchAhead;
    prefetch_entries(grad, p, m, v, std::min(ahead, readable), std::min(ahead + kPrefetchChunk, readable));
    const int64_t chunk_end = std::min(n, chunk + kPrefetchChunk);
    for (int64_t i = chunk; i < chunk_end; ++i) {
      float m_i = m[i], v_i = v[i];
      if (kMoments != Moments::kUpdated) {  // as moments_run
        const float g = load_float(grad[i]);
        m_i = fused_multiply_add(moments.coeff, g - m_i, kMoments == Moments::kLerpFromStart ? m_i : g);
        v_i = fused_multiply_add(moments.one_minus_beta2 * g, g, v_i * moments.beta2);
        m[i] = m_i;
        v[i] = v_i;
      }
      const uint32_t bits = abs_bits(m_i);
      const bool in_window = (bits >= window.low) & (bits < window.high);
      const bool selected = bits >= window.high;
      const float old = p[i];
      const float step = adamw_step(m_i, v_i, c);
      const float unselected = old * c.decay_selected;  // == decay_unselected (checked by the caller)
      const float updated = unselected + step;
      const bool lossy = selected & (float_bits(updated - step) != float_bits(unselected));
      before[i] = old;
      p[i] = selected ? updated : unselected;
      flags[i] = Flags(in_window) | (Flags(lossy) << 1);
      inside += in_window;
      irreversible += lossy;
      above += selected;
      nonzero += bits != 0;
      odd += !(adamw_denominator(v_i, c) > 0.0f);
    }
  }
  counts = {inside, irreversible, above, nonzero};
  return odd == 0;
}

// speculate_piece with the moments form of segment s and these constants
template <typename Grad>
inline bool speculate_segment_piece(const Segment& s, const Grad* grad, float* p, float* m, float* v,
                                    float* before, Flags* flags, int64_t n, int64_t readable, Window window,
                                    const MomentsConstants& moments, const UpdateConstants& c,
                                    PieceCounts& counts) {
  if (s.rowscale_start >= 0) {
    return speculate_piece<Grad, Moments::kUpdated>(grad, p, m, v, before, flags, n, readable, window,
                                                    moments, c, counts);
  }
  if (moments.from_start) {
    return speculate_piece<Grad, Moments::kLerpFromStart>(grad, p, m, v, before, flags, n, readable, window,
                                                          moments, c, counts);
  }
  return speculate_piece<Grad, Moments::kLerpFromEnd>(grad, p, m, v, before, flags, n, readable, window,
                                                      moments, c, counts);
}

constexpr int64_t kSpeculationPiece = 1024;
constexpr int64_t kUsedStride = 64 / sizeof(int64_t);

// Where the update lists entries: each block owns a region of region_size[b] slots from
// region_start[b] in every array (buffers the caller keeps between steps: fresh ones would cost
// their page faults every step), filled from the region's start; used[b] counts the slots taken.
struct SpeculationLists {
  int64_t *deferred_index, *deferred_block;
  float *deferred_exp_avg, *deferred_exp_avg_sq, *deferred_unselected;
  int64_t *rollback_index, *rollback_block;
  float* rollback_unselected;
  const int64_t *region_start, *region_size;
  // used[b * kUsedStride]: block b's slots taken, one cache line per block and list (threads
  // reserving slots of different blocks would otherwise pass one line back and forth)
  int64_t *deferred_used, *rollback_used;

  // Takes n slots of block b's region in `used`: their first, or -1 (and none) if they do not fit.
  static int64_t take(int64_t* used, int64_t size, int64_t n) {
    if (n == 0) return 0;
    const int64_t first = __atomic_fetch_add(used, n, __ATOMIC_RELAXED);
    if (first + n <= size) return first;
    __atomic_fetch_sub(used, n, __ATOMIC_RELAXED);
    return -1;
  }

  // Slots for a piece's entries of block b (both lists, or neither): false if they do not fit.
  bool reserve(int64_t b, int64_t deferred, int64_t rollbacks, int64_t& deferred_slot,
               int64_t& rollback_slot) {
    deferred_slot = take(deferred_used + b * kUsedStride, region_size[b], deferred);
    if (deferred_slot < 0) return false;
    rollback_slot = take(rollback_used + b * kUsedStride, region_size[b], rollbacks);
    if (rollback_slot >= 0) return true;
    if (deferred > 0) __atomic_fetch_sub(deferred_used + b * kUsedStride, deferred, __ATOMIC_RELAXED);
    return false;
  }

  // Moves every region's entries to the front of the arrays, in block order, and writes their
  // blocks there (a region is one block's: list_piece does not store them); returns how many
  // entries each list holds.
  std::pair<int64_t, int64_t> compact(int64_t n_blocks) {
    int64_t deferred = 0, rollbacks = 0;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t from = region_start[b], d = deferred_used[b * kUsedStride],
                    r = rollback_used[b * kUsedStride];
      std::memmove(deferred_index + deferred, deferred_index + from, size_t(d) * sizeof(int64_t));
      std::fill(deferred_block + deferred, deferred_block + deferred + d, b);
      std::memmove(deferred_exp_avg + deferred, deferred_exp_avg + from, size_t(d) * sizeof(float));
      std::memmove(deferred_exp_avg_sq + deferred, deferred_exp_avg_sq + from, size_t(d) * sizeof(float));
      std::memmove(deferred_unselected + deferred, deferred_unselected + from, size_t(d) * sizeof(float));
      std::memmove(rollback_index + rollbacks, rollback_index + from, size_t(r) * sizeof(int64_t));
      std::fill(rollback_block + rollbacks, rollback_block + rollbacks + r, b);
      std::memmove(rollback_unselected + rollbacks, rollback_unselected + from, size_t(r) * sizeof(float));
      deferred += d;
      rollbacks += r;
    }
    return {deferred, rollbacks};
  }
};

// Bit j of the result: flags[j] != 0, for j < n <= 64 (AVX-512F: four compares of 16 flags;
// AVX2: eight of 8).
inline uint64_t nonzero_mask(const Flags* flags, int64_t n) {
#if defined(__AVX512F__)
  if (n == 64) {
    uint64_t mask = 0;
    for (int j = 0; j < 4; ++j) {
      const __m512i lanes = _mm512_loadu_si512(flags + 16 * j);
      mask |= uint64_t(_mm512_test_epi32_mask(lanes, lanes)) << (16 * j);
    }
    return mask;
  }
#elif defined(__AVX2__)
  if (n == 64) {
    const __m256i zero = _mm256_setzero_si256();
    uint64_t zeros = 0;
    for (int j = 0; j < 8; ++j) {
      const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(flags + 8 * j));
      zeros |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(lanes, zero)))))
               << (8 * j);
    }
    return ~zeros;
  }
#endif
  uint64_t mask = 0;
  for (int64_t j = 0; j < n; ++j) mask |= uint64_t(flags[j] != 0) << j;
  return mask;
}

// Lists the flagged entries of a committed piece starting at shard element `start` into the
// reserved slots, and counts its window entries by level-1 prefix. A piece lists ~1% of its
// entries: the flags are scanned 64 at a time and only the set ones visited.
inline void list_piece(const float* m, const float* v, const float* before, const Flags* flags,
                       int64_t start, int64_t n, int64_t block, Window window, int64_t shift,
                       const UpdateConstants& c, LocalHistogram& histogram, SpeculationLists& lists,
                       int64_t deferred_slot, int64_t rollback_slot) {
  const uint32_t first_prefix = window.low >> shift;
  int64_t deferred_at = lists.region_start[block] + deferred_slot;
  int64_t rollback_at = lists.region_start[block] + rollback_slot;
  for (int64_t word = 0; word < n; word += 64) {
    uint64_t set = nonzero_mask(flags + word, std::min<int64_t>(64, n - word));
    for (; set != 0; set &= set - 1) {
      const int64_t i = word + __builtin_ctzll(set);
      const int64_t at = start + i;
      const float p_unselected = before[i] * c.decay_unselected;  // as speculate_piece
      if (flags[i] & 1) {
        histogram.add(block, (abs_bits(m[at]) >> shift) - first_prefix);
        lists.deferred_index[deferred_at] = at;
        lists.deferred_exp_avg[deferred_at] = m[at];
        lists.deferred_exp_avg_sq[deferred_at] = v[at];
        lists.deferred_unselected[deferred_at] = p_unselected;
        ++deferred_at;
      }
      if (flags[i] & 2) {
        lists.rollback_index[rollback_at] = at;
        lists.rollback_unselected[rollback_at] = p_unselected;
        ++rollback_at;
      }
    }
  }
}

template <typename Grad>
Leftovers speculative_update_impl(const std::vector<const Grad*>& grads, const std::vector<float*>& ps,
                                  const std::vector<float*>& ms, const std::vector<float*>& vs,
                                  const std::vector<Segment>& segments, const float* rowscale,
                                  const at::Tensor& tile_segment, const at::Tensor& tile_start,
                                  int64_t tile_size, HistogramTarget window_histogram,
                                  const HintCounts& hints, int64_t* nonzero_counts,
                                  const MomentsConstants& moments, const UpdateConstantsByCounter& constants,
                                  SpeculationLists& lists) {
  return for_each_tile(segments, tile_segment, tile_start, tile_size, {}, window_histogram,
                       [&](const Segment& s, int64_t first, int64_t last, RangeContext& context) {
    const UpdateConstants update = constants[s.counter];
    const Grad* grad = grads[s.tensor];
    float* p = ps[s.tensor];
    float* m = ms[s.tensor];
    float* v = vs[s.tensor];
    if (s.block < 0) {  // DENSE: moments and update piece by piece, while the piece is in cache
      for (int64_t start = first; start < last; start += kSpeculationPiece) {
        const int64_t stop = std::min(start + kSpeculationPiece, last);
        moments_tile<Grad, false>(grad, m, v, nullptr, rowscale, s, start, stop, moments);
        for (int64_t i = start; i < stop; ++i) p[i] = adamw_entry(p[i], m[i], v[i], true, update);
      }
      return;
    }
    const Window window = window_of(hints.start, hints.width, s.block, hints.shift, hints.max_width);
    const uint32_t width = (window.high - window.low) >> hints.shift;
    LocalHistogram& histogram = context.histograms[1];
    alignas(64) float before[kSpeculationPiece];
    alignas(64) Flags flags[kSpeculationPiece];
    int64_t above = 0, nonzero = 0;
    for (int64_t start = first; start < last; start += kSpeculationPiece) {
      const int64_t stop = std::min(start + kSpeculationPiece, last);
      const int64_t n = stop - start;
      // once a piece of this range could not list its entries, the range writes no more p
      bool commit = context.left.untouched.empty();
      const bool scaled = s.rowscale_start >= 0;
      // (a segment without row scales updates its moments inside speculate_piece's loop)
      int64_t piece_nonzero = 0;
      if (scaled || !commit) {
        piece_nonzero = moments_tile<Grad, false>(grad, m, v, nullptr, rowscale, s, start, stop, moments);
      }
      if (commit) {
        PieceCounts counts;
        int64_t deferred_slot = 0, rollback_slot = 0;
        const bool updated = speculate_segment_piece(s, grad + start, p + start, m + start, v + start, before,
                                                     flags, n, last - start, window, moments, update, counts);
        piece_nonzero = counts.nonzero;  // (of the new m, whether or not the piece commits)
        commit = updated &&
                 lists.reserve(s.block, counts.inside, counts.irreversible, deferred_slot, rollback_slot);
        if (!commit) {
          std::memcpy(p + start, before, size_t(n) * sizeof(float));
        } else {
          above += counts.above;
          if (counts.inside + counts.irreversible > 0) {
            list_piece(m, v, before, flags, start, n, s.block, window, hints.shift, update, histogram, lists,
                       deferred_slot, rollback_slot);
          }
        }
      }
      if (!commit) {
        above += histogram.count_in_window(s.block, m + start, n, hints.shift, window.low >> hints.shift,
                                           width);
        context.left.leave_untouched(start, stop);
      }
      nonzero += piece_nonzero;
    }
    __atomic_fetch_add(hints.above + s.block, above, __ATOMIC_RELAXED);
    if (nonzero_counts != nullptr) __atomic_fetch_add(nonzero_counts + s.block, nonzero, __ATOMIC_RELAXED);
  });
}

// Returns the deferred and rollback counts (int64 [2]) and the untouched spans (int64 [U, 2]);
// the lists are the first entries of the list buffers.
std::vector<at::Tensor> speculative_update(
    at::TensorList grad, at::TensorList param, at::TensorList exp_avg, at::TensorList exp_avg_sq,
    at::TensorList segment_columns, const at::Tensor& rowscale, const at::Tensor& tile_segment,
    const at::Tensor& tile_start, int64_t tile_size, const at::Tensor& window_start,
    const at::Tensor& window_width, at::Tensor hint_above, at::Tensor hint_histogram, int64_t hint_bins,
    int64_t hint_shift, const c10::optional<at::Tensor>& nonzero, double beta1, double beta2,
    const c10::optional<at::Tensor>& corrections, double step_size, double bias_correction2_sqrt, double eps,
    double decay_selected, double decay_unselected, const at::Tensor& region_start,
    const at::Tensor& region_size, at::TensorList buffers) {
  TORCH_CHECK(decay_selected == decay_unselected,
              "speculative update: selected and unselected entries must decay alike");
  TORCH_CHECK(buffers.size() == 8, "expected the 8 list buffers");
  const std::vector<Segment> segments = gather_segments(segment_columns);
  const int64_t n_blocks = hint_above.numel();
  std::vector<int64_t> deferred_used(n_blocks * kUsedStride, 0), rollback_used(n_blocks * kUsedStride, 0);
  SpeculationLists lists{buffers[0].data_ptr<int64_t>(),  buffers[1].data_ptr<int64_t>(),
                         buffers[2].data_ptr<float>(),    buffers[3].data_ptr<float>(),
                         buffers[4].data_ptr<float>(),    buffers[5].data_ptr<int64_t>(),
                         buffers[6].data_ptr<int64_t>(),  buffers[7].data_ptr<float>(),
                         region_start.data_ptr<int64_t>(), region_size.data_ptr<int64_t>(),
                         deferred_used.data(),            rollback_used.data()};
  const HintCounts hints{window_start.data_ptr<int64_t>(), window_width.data_ptr<int64_t>(),
                         hint_above.data_ptr<int64_t>(), hint_shift, hint_bins};
  const float lerp_weight = float(1.0 - beta1);
  const bool from_start = lerp_weight < 0.5f;
  const MomentsConstants moments{from_start ? lerp_weight : lerp_weight - 1.0f, from_start, float(beta2),
                                 float(1.0 - beta2), 0};
  const UpdateConstantsByCounter update(corrections, step_size, bias_correction2_sqrt, eps, decay_selected,
                                        decay_unselected);
  const HistogramTarget window_histogram{hint_histogram.data_ptr<int64_t>(), hint_bins};
  int64_t* nonzero_counts = nonzero.has_value() ? nonzero->data_ptr<int64_t>() : nullptr;
  const at::Tensor& starts = segment_columns[7];
  const std::vector<float*> p = origins<float>(param, starts, &segments, at::kFloat, "param");
  const std::vector<float*> m = origins<float>(exp_avg, starts, &segments, at::kFloat, "exp_avg");
  const std::vector<float*> v = origins<float>(exp_avg_sq, starts, &segments, at::kFloat, "exp_avg_sq");
  const float* scales = rowscale.data_ptr<float>();
  TORCH_CHECK(!grad.empty(), "speculative update: no gradient tensors");
  const Leftovers left =
      grad[0].scalar_type() == at::kBFloat16
          ? speculative_update_impl(origins<const uint16_t>(grad, starts, &segments, at::kBFloat16, "grad"), p,
                                    m, v, segments, scales, tile_segment, tile_start, tile_size,
                                    window_histogram, hints, nonzero_counts, moments, update, lists)
          : speculative_update_impl(origins<const float>(grad, starts, &segments, at::kFloat, "grad"), p, m, v,
                                    segments, scales, tile_segment, tile_start, tile_size, window_histogram,
                                    hints, nonzero_counts, moments, update, lists);
  const auto [deferred, rollbacks] = lists.compact(n_blocks);
  std::vector<int64_t> spans;
  for (const auto& [first, last] : left.untouched) {
    spans.push_back(first);
    spans.push_back(last);
  }
  return {vector_tensor(std::vector<int64_t>{deferred, rollbacks}, at::kLong),
          vector_tensor(spans, at::kLong).view({-1, 2})};
}

// After a speculative update, for the blocks whose exact threshold lies outside their window: add
// the step where an entry below the window is selected, subtract it where one above is not, then
// put back the listed unselected values. Tiles of the table (the speculated spans only) whose
// block's threshold lies in its window are skipped.
void correct_speculation(at::TensorList param, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                         at::TensorList segment_columns, const at::Tensor& tile_segment,
                         const at::Tensor& tile_start, int64_t tile_size, const at::Tensor& thresholds,
                         const at::Tensor& window_start, const at::Tensor& window_width, int64_t hint_bins,
                         int64_t hint_shift, const at::Tensor& rollback_index,
                         const at::Tensor& rollback_block, const at::Tensor& rollback_unselected,
                         const c10::optional<at::Tensor>& corrections, double step_size,
                         double bias_correction2_sqrt, double eps, double decay_selected,
                         double decay_unselected) {
  const std::vector<Segment> segments = gather_segments(segment_columns);
  const UpdateConstantsByCounter constants(corrections, step_size, bias_correction2_sqrt, eps, decay_selected,
                                           decay_unselected);
  const at::Tensor& starts = segment_columns[7];
  const std::vector<float*> ps = origins<float>(param, starts, &segments, at::kFloat, "param");
  const std::vector<const float*> ms = origins<const float>(exp_avg, starts, &segments, at::kFloat, "exp_avg");
  const std::vector<const float*> vs =
      origins<const float>(exp_avg_sq, starts, &segments, at::kFloat, "exp_avg_sq");
  const int64_t* threshold = thresholds.data_ptr<int64_t>();
  const int64_t* start = window_start.data_ptr<int64_t>();
  const int64_t* width = window_width.data_ptr<int64_t>();
  for_each_tile(segments, tile_segment, tile_start, tile_size, {}, {},
                [&](const Segment& s, int64_t first, int64_t last, RangeContext&) {
    if (s.block < 0) return;
    const Window window = window_of(start, width, s.block, hint_shift, hint_bins);
    const uint32_t t = uint32_t(threshold[s.block]);
    if (t >= window.low && t <= window.high) return;  // every entry outside the window was right
    const UpdateConstants c = constants[s.counter];
    float* p = ps[s.tensor];
    const float* m = ms[s.tensor];
    const float* v = vs[s.tensor];
    for (int64_t i = first; i < last; ++i) {
      const uint32_t bits = abs_bits(m[i]);
      const bool outside = (bits < window.low) | (bits >= window.high);
      const bool wrong = outside & ((bits >= t) != (bits >= window.high));
      const float step = adamw_step(m[i], v[i], c);
      const float corrected = bits >= t ? p[i] + step : p[i] - step;
      p[i] = wrong ? corrected : p[i];
    }
  });
  const int64_t* at = rollback_index.data_ptr<int64_t>();
  const int64_t* blocks = rollback_block.data_ptr<int64_t>();
  const float* unselected = rollback_unselected.data_ptr<float>();
  const ElementPointers<float> p(param, starts, at::kFloat, "param");
  const ElementPointers<const float> m(exp_avg, starts, at::kFloat, "exp_avg");
  for (int64_t i = 0; i < rollback_index.numel(); ++i) {
    if (abs_bits(m[at[i]]) < uint32_t(threshold[blocks[i]])) p[at[i]] = unselected[i];
  }
}

// The window entries' p once the thresholds are exact: the selected ones get the step added to
// their unselected p (as speculate_piece), the others already hold theirs. Writes p, never reads
// it (each entry's p is a cache miss: a store does not stall the loop, a load would).
constexpr int64_t kResolveGrain = 1024;

void resolve_window(at::TensorList param, const at::Tensor& tensor_starts, const at::Tensor& index, const at::Tensor& block,
                    const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& unselected,
                    const at::Tensor& thresholds, const c10::optional<at::Tensor>& block_corrections,
                    double step_size, double bias_correction2_sqrt, double eps, double decay_selected,
                    double decay_unselected) {
  const UpdateConstantsByCounter constants(block_corrections, step_size, bias_correction2_sqrt, eps,
                                           decay_selected, decay_unselected);
  const ElementPointers<float> p(param, tensor_starts, at::kFloat, "param");
  const int64_t* at = index.data_ptr<int64_t>();
  const int64_t* blocks = block.data_ptr<int64_t>();
  const float* m = exp_avg.data_ptr<float>();
  const float* v = exp_avg_sq.data_ptr<float>();
  const float* p_unselected = unselected.data_ptr<float>();
  const int64_t* threshold = thresholds.data_ptr<int64_t>();
  // entries are distinct elements: threads split the list (each entry a cache miss, ~1% of a
  // shard: 1.3 ms of a 25 M-parameter step on one thread)
  at::parallel_for(0, index.numel(), kResolveGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (abs_bits(m[i]) < uint32_t(threshold[blocks[i]])) continue;
      p[at[i]] = p_unselected[i] + adamw_step(m[i], v[i], constants[blocks[i]]);
    }
  });
}

TORCH_LIBRARY_FRAGMENT(dsforget_cpu, ops) {
  ops.def("resolve_window(Tensor(a!)[] param, Tensor tensor_starts, Tensor index, Tensor block, Tensor exp_avg, Tensor exp_avg_sq, "
          "Tensor unselected, Tensor thresholds, Tensor? block_corrections, float step_size, "
          "float bias_correction2_sqrt, float eps, float decay_selected, float decay_unselected) -> ()",
          &resolve_window);
  ops.def("speculative_update(Tensor[] grad, Tensor(a!)[] param, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
          "Tensor[] segments, Tensor rowscale, Tensor tile_segment, Tensor tile_start, int tile_size, "
          "Tensor window_start, Tensor window_width, Tensor(d!) hint_above, Tensor(e!) hint_histogram, "
          "int hint_bins, int hint_shift, Tensor(g!)? nonzero, float beta1, float beta2, "
          "Tensor? corrections, float step_size, float bias_correction2_sqrt, float eps, "
          "float decay_selected, float decay_unselected, "
          "Tensor region_start, Tensor region_size, "
          "Tensor(f!)[] buffers) -> Tensor[]",
          &speculative_update);
  ops.def("correct_speculation(Tensor(a!)[] param, Tensor[] exp_avg, Tensor[] exp_avg_sq, Tensor[] segments, "
          "Tensor tile_segment, Tensor tile_start, int tile_size, Tensor thresholds, Tensor window_start, "
          "Tensor window_width, int hint_bins, int hint_shift, Tensor rollback_index, Tensor rollback_block, "
          "Tensor rollback_unselected, Tensor? corrections, float step_size, float bias_correction2_sqrt, "
          "float eps, float decay_selected, float decay_unselected) -> ()",
          &correct_speculation);
}

}  // namespace dsforget_cpu
