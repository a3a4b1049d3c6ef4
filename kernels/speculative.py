"""Fused op 4 (CPU): the whole MoFO step in one pass over the shard, speculating on the threshold.

The two-pass step (moments, then the masked update once the threshold is exact) reads 24 B per
element: g, m, v, then p, m, v. On a CPU whose memory time goes to reads, that is ~1.5x the 16 B
of one AdamW pass however well each pass runs. A block's threshold moves little from one step
to the next, and the moments pass already counts a window of |m| around where it is expected
(`ThresholdHint`). This op therefore applies the update in the same pass, as if the threshold
lay inside the window, and keeps what it needs to make the result exact whatever it turns out
to be:

- entries above the window: updated as selected. If the update cannot be undone bit for bit
  (`p_new - step` does not give back the unselected p, where the update moves p across a power
  of two or is large against p: ~2% of the selected entries in the benchmark, at lr 1e-3), the
  unselected p is listed (the rollbacks);
- entries inside the window (~0.3-1% of a block): updated as unselected and listed with m, v
  and that p (like the two-pass step's last bin); `resolve_window` adds the step to those that
  turn out selected, writing p without reading it (the entries are scattered: a read is a cache
  miss each);
- entries below the window: updated as unselected (decayed only);
- DENSE segments: updated.

A block whose exact threshold lies in its window (a hit, almost every step once the windows
settle) is then done: one pass, 16 B read and 12 B written per element, AdamW's traffic. A
block that missed takes `correct_speculation`: a pass over its entries outside the window that
adds the step where it was wrongly left out and subtracts it where it was wrongly applied, then
puts back the listed unselected values. Every path gives the two-pass step's result bit for bit
(tested), so speculation changes the work a step does, never its result.

Memory: each block has a region of 1 / LISTED_SHARE of its local entries (at least LISTED_MIN)
in buffers kept per table (`list_buffers`) for its window entries (28 B each: index, block, m,
v, p) and as many for rollbacks (20 B), i.e. ~0.75 B per element of the shard. A piece of a block
whose entries do not fit (ties: a block of equal |m| has all of it in the window) is left
untouched, as is the rest of that thread's range of the block's pieces; the untouched spans are
returned and take the two-pass update (`masked_adamw`) once the threshold is exact. Which pieces
those are depends on the threads' timing; the result does not.

Preconditions (checked by the caller, `topk_adamw_step`): selected and unselected entries decay
alike (weight-decay scope "all", or no weight decay), and every top-k block has a window. Only
the "cpu" backend implements this op.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ._cpu import cpu_ops
from .masked_update import CPU_TILE, AdamWScalars, DeferredEntries
from .moments import HINT_SHIFT, HINT_WINDOW, HintedCounts
from .segments import SegmentTable
from .tiles import check_block_tensor, check_buffers, segment_columns, tile_table

# A block's lists hold at most 1 / LISTED_SHARE of its entries on this rank (at least LISTED_MIN):
# its window entries (0.3-1% of a block once the windows settle, up to ~6% at their widest, right
# after a cold start), and as many rollbacks (~0.4% at 16 Mi in the benchmark, lr 1e-3).
LISTED_SHARE = 64
LISTED_MIN = 1024


@dataclass(frozen=True)
class SpeculationLeftovers:
    """What the one-pass update leaves for the rest of the step.

    deferred: the window entries, by block, in no particular order within a block, and
    deferred_unselected: fp32 [D], their p as written (unselected; `resolve_window`).
    rollback_index, rollback_block: int64 [R], rollback_unselected: fp32 [R], the entries updated as
    selected whose unselected p cannot be recomputed from the new one (p if they are not).
    untouched: int64 [U, 2], ascending shard spans [first, last) whose p this op did not write.
    """

    deferred: DeferredEntries
    deferred_unselected: torch.Tensor
    rollback_index: torch.Tensor
    rollback_block: torch.Tensor
    rollback_unselected: torch.Tensor
    untouched: torch.Tensor

    def untouched_spans(self) -> list[tuple[int, int]]:
        return [(int(first), int(last)) for first, last in self.untouched.tolist()]


CPU_SOURCE = r"""
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

// A piece's counts: entries inside the window, selected updates that cannot be undone, entries
// above the window.
struct PieceCounts {
  int64_t inside = 0, irreversible = 0, above = 0;
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
template <typename Grad, Moments kMoments>
inline bool speculate_piece(const Grad* __restrict grad, float* __restrict p, float* __restrict m,
                            float* __restrict v, float* __restrict before, uint8_t* __restrict flags,
                            int64_t n, Window window, const MomentsConstants& moments,
                            const UpdateConstants& c, PieceCounts& counts) {
  int32_t inside = 0, irreversible = 0, above = 0, odd = 0;  // (int32 and & instead of &&: GCC vectorises)
  for (int64_t i = 0; i < n; ++i) {
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
    flags[i] = uint8_t(in_window) | uint8_t(uint8_t(lossy) << 1);
    inside += in_window;
    irreversible += lossy;
    above += selected;
    odd += !(adamw_denominator(v_i, c) > 0.0f);
  }
  counts = {inside, irreversible, above};
  return odd == 0;
}

// speculate_piece with the moments form of segment s and these constants
template <typename Grad>
inline bool speculate_segment_piece(const Segment& s, const Grad* grad, float* p, float* m, float* v,
                                    float* before, uint8_t* flags, int64_t n, Window window,
                                    const MomentsConstants& moments, const UpdateConstants& c,
                                    PieceCounts& counts) {
  if (s.rowscale_start >= 0) {
    return speculate_piece<Grad, Moments::kUpdated>(grad, p, m, v, before, flags, n, window, moments, c,
                                                    counts);
  }
  if (moments.from_start) {
    return speculate_piece<Grad, Moments::kLerpFromStart>(grad, p, m, v, before, flags, n, window, moments, c,
                                                          counts);
  }
  return speculate_piece<Grad, Moments::kLerpFromEnd>(grad, p, m, v, before, flags, n, window, moments, c,
                                                      counts);
}

constexpr int64_t kSpeculationPiece = 1024;

// Where the update lists entries: each block owns a region of region_size[b] slots from
// region_start[b] in every array (buffers the caller keeps between steps: fresh ones would cost
// their page faults every step), filled from the region's start; used[b] counts the slots taken.
struct SpeculationLists {
  int64_t *deferred_index, *deferred_block;
  float *deferred_exp_avg, *deferred_exp_avg_sq, *deferred_unselected;
  int64_t *rollback_index, *rollback_block;
  float* rollback_unselected;
  const int64_t *region_start, *region_size;
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
    deferred_slot = take(deferred_used + b, region_size[b], deferred);
    if (deferred_slot < 0) return false;
    rollback_slot = take(rollback_used + b, region_size[b], rollbacks);
    if (rollback_slot >= 0) return true;
    if (deferred > 0) __atomic_fetch_sub(deferred_used + b, deferred, __ATOMIC_RELAXED);
    return false;
  }

  // Moves every region's entries to the front of the arrays, in block order; returns how many
  // entries each list holds.
  std::pair<int64_t, int64_t> compact(int64_t n_blocks) {
    int64_t deferred = 0, rollbacks = 0;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t from = region_start[b], d = deferred_used[b], r = rollback_used[b];
      std::memmove(deferred_index + deferred, deferred_index + from, size_t(d) * sizeof(int64_t));
      std::memmove(deferred_block + deferred, deferred_block + from, size_t(d) * sizeof(int64_t));
      std::memmove(deferred_exp_avg + deferred, deferred_exp_avg + from, size_t(d) * sizeof(float));
      std::memmove(deferred_exp_avg_sq + deferred, deferred_exp_avg_sq + from, size_t(d) * sizeof(float));
      std::memmove(deferred_unselected + deferred, deferred_unselected + from, size_t(d) * sizeof(float));
      std::memmove(rollback_index + rollbacks, rollback_index + from, size_t(r) * sizeof(int64_t));
      std::memmove(rollback_block + rollbacks, rollback_block + from, size_t(r) * sizeof(int64_t));
      std::memmove(rollback_unselected + rollbacks, rollback_unselected + from, size_t(r) * sizeof(float));
      deferred += d;
      rollbacks += r;
    }
    return {deferred, rollbacks};
  }
};

// Bit j of the result: flags[j] != 0, for j < n <= 64 (AVX-512BW: one compare for 64 flags).
inline uint64_t nonzero_mask(const uint8_t* flags, int64_t n) {
#if defined(__AVX512BW__)
  if (n == 64) {
    const __m512i bytes = _mm512_loadu_si512(flags);
    return _mm512_test_epi8_mask(bytes, bytes);
  }
#endif
  uint64_t mask = 0;
  for (int64_t j = 0; j < n; ++j) mask |= uint64_t(flags[j] != 0) << j;
  return mask;
}

// Lists the flagged entries of a committed piece starting at shard element `start` into the
// reserved slots, and counts its window entries by level-1 prefix. A piece lists ~1% of its
// entries: the flags are scanned 64 at a time and only the set ones visited.
inline void list_piece(const float* m, const float* v, const float* before, const uint8_t* flags,
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
        lists.deferred_block[deferred_at] = block;
        lists.deferred_exp_avg[deferred_at] = m[at];
        lists.deferred_exp_avg_sq[deferred_at] = v[at];
        lists.deferred_unselected[deferred_at] = p_unselected;
        ++deferred_at;
      }
      if (flags[i] & 2) {
        lists.rollback_index[rollback_at] = at;
        lists.rollback_block[rollback_at] = block;
        lists.rollback_unselected[rollback_at] = p_unselected;
        ++rollback_at;
      }
    }
  }
}

template <typename Grad>
Leftovers speculative_update_impl(const Grad* grad, float* p, float* m, float* v,
                                  const std::vector<Segment>& segments, const float* rowscale,
                                  const at::Tensor& tile_segment, const at::Tensor& tile_start,
                                  int64_t tile_size, HistogramTarget window_histogram,
                                  const HintCounts& hints, const MomentsConstants& moments,
                                  const UpdateConstants& update, SpeculationLists& lists) {
  return for_each_tile(segments, tile_segment, tile_start, tile_size, {}, window_histogram,
                       [&](const Segment& s, int64_t first, int64_t last, RangeContext& context) {
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
    alignas(64) uint8_t flags[kSpeculationPiece];
    int64_t above = 0;
    for (int64_t start = first; start < last; start += kSpeculationPiece) {
      const int64_t stop = std::min(start + kSpeculationPiece, last);
      const int64_t n = stop - start;
      // once a piece of this range could not list its entries, the range writes no more p
      bool commit = context.left.untouched.empty();
      const bool scaled = s.rowscale_start >= 0;
      // (a segment without row scales updates its moments inside speculate_piece's loop)
      if (scaled || !commit) {
        moments_tile<Grad, false>(grad, m, v, nullptr, rowscale, s, start, stop, moments);
      }
      if (commit) {
        PieceCounts counts;
        int64_t deferred_slot = 0, rollback_slot = 0;
        commit = speculate_segment_piece(s, grad + start, p + start, m + start, v + start, before, flags, n,
                                         window, moments, update, counts) &&
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
    }
    __atomic_fetch_add(hints.above + s.block, above, __ATOMIC_RELAXED);
  });
}

// Returns the deferred and rollback counts (int64 [2]) and the untouched spans (int64 [U, 2]);
// the lists are the first entries of the list buffers.
std::vector<at::Tensor> speculative_update(
    const at::Tensor& grad, at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq,
    at::TensorList segment_columns, const at::Tensor& rowscale, const at::Tensor& tile_segment,
    const at::Tensor& tile_start, int64_t tile_size, const at::Tensor& window_start,
    const at::Tensor& window_width, at::Tensor hint_above, at::Tensor hint_histogram, int64_t hint_bins,
    int64_t hint_shift, double beta1, double beta2, double step_size, double bias_correction2_sqrt,
    double eps, double decay_selected, double decay_unselected, const at::Tensor& region_start,
    const at::Tensor& region_size, at::TensorList buffers) {
  TORCH_CHECK(decay_selected == decay_unselected,
              "speculative update: selected and unselected entries must decay alike");
  TORCH_CHECK(buffers.size() == 8, "expected the 8 list buffers");
  const std::vector<Segment> segments = gather_segments(segment_columns);
  const int64_t n_blocks = hint_above.numel();
  std::vector<int64_t> deferred_used(n_blocks, 0), rollback_used(n_blocks, 0);
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
  const UpdateConstants update =
      update_constants(step_size, bias_correction2_sqrt, eps, decay_selected, decay_unselected);
  const HistogramTarget window_histogram{hint_histogram.data_ptr<int64_t>(), hint_bins};
  float* p = param.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const float* scales = rowscale.data_ptr<float>();
  const Leftovers left =
      grad.scalar_type() == at::kBFloat16
          ? speculative_update_impl(reinterpret_cast<const uint16_t*>(grad.data_ptr()), p, m, v, segments,
                                    scales, tile_segment, tile_start, tile_size, window_histogram, hints,
                                    moments, update, lists)
          : speculative_update_impl(grad.data_ptr<float>(), p, m, v, segments, scales, tile_segment,
                                    tile_start, tile_size, window_histogram, hints, moments, update, lists);
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
void correct_speculation(at::Tensor param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         at::TensorList segment_columns, const at::Tensor& tile_segment,
                         const at::Tensor& tile_start, int64_t tile_size, const at::Tensor& thresholds,
                         const at::Tensor& window_start, const at::Tensor& window_width, int64_t hint_bins,
                         int64_t hint_shift, const at::Tensor& rollback_index,
                         const at::Tensor& rollback_block, const at::Tensor& rollback_unselected,
                         double step_size, double bias_correction2_sqrt, double eps, double decay_selected,
                         double decay_unselected) {
  const std::vector<Segment> segments = gather_segments(segment_columns);
  const UpdateConstants c = update_constants(step_size, bias_correction2_sqrt, eps, decay_selected,
                                             decay_unselected);
  float* p = param.data_ptr<float>();
  const float* m = exp_avg.data_ptr<float>();
  const float* v = exp_avg_sq.data_ptr<float>();
  const int64_t* threshold = thresholds.data_ptr<int64_t>();
  const int64_t* start = window_start.data_ptr<int64_t>();
  const int64_t* width = window_width.data_ptr<int64_t>();
  for_each_tile(segments, tile_segment, tile_start, tile_size, {}, {},
                [&](const Segment& s, int64_t first, int64_t last, RangeContext&) {
    if (s.block < 0) return;
    const Window window = window_of(start, width, s.block, hint_shift, hint_bins);
    const uint32_t t = uint32_t(threshold[s.block]);
    if (t >= window.low && t <= window.high) return;  // every entry outside the window was right
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
  for (int64_t i = 0; i < rollback_index.numel(); ++i) {
    if (abs_bits(m[at[i]]) < uint32_t(threshold[blocks[i]])) p[at[i]] = unselected[i];
  }
}

// The window entries' p once the thresholds are exact: the selected ones get the step added to
// their unselected p (as speculate_piece), the others already hold theirs. Writes p, never reads
// it (each entry's p is a cache miss: a store does not stall the loop, a load would).
void resolve_window(at::Tensor param, const at::Tensor& index, const at::Tensor& block,
                    const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& unselected,
                    const at::Tensor& thresholds, double step_size, double bias_correction2_sqrt, double eps,
                    double decay_selected, double decay_unselected) {
  const UpdateConstants c =
      update_constants(step_size, bias_correction2_sqrt, eps, decay_selected, decay_unselected);
  float* p = param.data_ptr<float>();
  const int64_t* at = index.data_ptr<int64_t>();
  const int64_t* blocks = block.data_ptr<int64_t>();
  const float* m = exp_avg.data_ptr<float>();
  const float* v = exp_avg_sq.data_ptr<float>();
  const float* p_unselected = unselected.data_ptr<float>();
  const int64_t* threshold = thresholds.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    if (abs_bits(m[i]) < uint32_t(threshold[blocks[i]])) continue;
    p[at[i]] = p_unselected[i] + adamw_step(m[i], v[i], c);
  }
}

TORCH_LIBRARY_FRAGMENT(dsforget_cpu, ops) {
  ops.def("resolve_window(Tensor(a!) param, Tensor index, Tensor block, Tensor exp_avg, Tensor exp_avg_sq, "
          "Tensor unselected, Tensor thresholds, float step_size, float bias_correction2_sqrt, float eps, "
          "float decay_selected, float decay_unselected) -> ()",
          &resolve_window);
  ops.def("speculative_update(Tensor grad, Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
          "Tensor[] segments, Tensor rowscale, Tensor tile_segment, Tensor tile_start, int tile_size, "
          "Tensor window_start, Tensor window_width, Tensor(d!) hint_above, Tensor(e!) hint_histogram, "
          "int hint_bins, int hint_shift, float beta1, float beta2, float step_size, "
          "float bias_correction2_sqrt, float eps, float decay_selected, float decay_unselected, "
          "Tensor region_start, Tensor region_size, "
          "Tensor(f!)[] buffers) -> Tensor[]",
          &speculative_update);
  ops.def("correct_speculation(Tensor(a!) param, Tensor exp_avg, Tensor exp_avg_sq, Tensor[] segments, "
          "Tensor tile_segment, Tensor tile_start, int tile_size, Tensor thresholds, Tensor window_start, "
          "Tensor window_width, int hint_bins, int hint_shift, Tensor rollback_index, Tensor rollback_block, "
          "Tensor rollback_unselected, float step_size, float bias_correction2_sqrt, float eps, "
          "float decay_selected, float decay_unselected) -> ()",
          &correct_speculation);
}

}  // namespace dsforget_cpu
"""


@dataclass(frozen=True)
class ListBuffers:
    """Where the update lists entries, kept per table between steps (fresh buffers would cost
    their page faults every step: ~2 ms at 16 Mi elements). Block b owns the slots
    [region_start[b], region_start[b] + region_size[b]) of every array; the op then moves the
    entries to the front."""

    region_start: torch.Tensor
    region_size: torch.Tensor
    arrays: tuple[torch.Tensor, ...]  # window index, block, m, v, unselected p; rollback index, block, p


_BUFFERS: dict[tuple[int, int, int], ListBuffers] = {}


def list_buffers(table: SegmentTable) -> ListBuffers:
    """The (cached) list buffers of `table`: a block's region holds 1 / LISTED_SHARE of its
    entries in the table, at least LISTED_MIN, at most all of them."""
    key = (id(table), LISTED_SHARE, LISTED_MIN)
    buffers = _BUFFERS.get(key)
    if buffers is None:
        local = torch.zeros(table.num_blocks, dtype=torch.int64)
        topk = table.block >= 0
        local.index_add_(0, table.block[topk].cpu(), table.length[topk].cpu())
        # (never more slots than entries: a block cannot list more)
        size = torch.minimum(torch.clamp(local // LISTED_SHARE, min=LISTED_MIN), local)
        slots = int(size.sum())
        device = table.length.device
        arrays = tuple(
            torch.empty(slots, dtype=dtype, device=device)
            for dtype in (torch.int64, torch.int64, torch.float32, torch.float32, torch.float32)
            + (torch.int64, torch.int64, torch.float32)
        )
        start = torch.cumsum(size, 0) - size
        buffers = ListBuffers(start.to(device), size.to(device), arrays)
        _BUFFERS[key] = buffers
        weakref.finalize(table, _BUFFERS.pop, key, None)
    return buffers


def speculative_update(
    grad: torch.Tensor,
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    hinted: HintedCounts,
    scalars: AdamWScalars,
    *,
    beta1: float,
    beta2: float,
) -> SpeculationLeftovers:
    """Moments, window counts (into hinted.above and hinted.histogram, as `update_moments`) and
    the speculative update, in one pass (see the module docstring); CPU tensors only. The lists
    it returns live in the table's list buffers: valid until the next call for the table."""
    tiles = tile_table(table, CPU_TILE)
    check_buffers("speculative_update", tiles, grad, param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    for name in ("start", "width", "above"):
        check_block_tensor("speculative_update", f"window {name}", getattr(hinted, name), table, param.device)
    check_block_tensor(
        "speculative_update", "window histogram", hinted.histogram, table, param.device, HINT_WINDOW
    )
    buffers = list_buffers(table)
    counts, untouched = cpu_ops().speculative_update(
        grad,
        param,
        exp_avg,
        exp_avg_sq,
        segment_columns(table),
        table.rowscale,
        tiles.tile_segment,
        tiles.tile_start,
        tiles.tile_size,
        hinted.start,
        hinted.width,
        hinted.above,
        hinted.histogram,
        HINT_WINDOW,
        HINT_SHIFT,
        beta1,
        beta2,
        *scalars.kernel_arguments(),
        buffers.region_start,
        buffers.region_size,
        list(buffers.arrays),
    )
    deferred, rollbacks = counts.tolist()
    lists = [array[:deferred] for array in buffers.arrays[:5]] + [
        array[:rollbacks] for array in buffers.arrays[5:]
    ]
    return SpeculationLeftovers(DeferredEntries(*lists[:4]), *lists[4:], untouched)


def correct_speculation(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    speculated: SegmentTable,
    thresholds: torch.Tensor,
    hinted: HintedCounts,
    left: SpeculationLeftovers,
    scalars: AdamWScalars,
) -> None:
    """Make the speculated entries of `speculated` (the table without the untouched spans) exact
    for the blocks whose `thresholds` lie outside their windows; CPU tensors only."""
    tiles = tile_table(speculated, CPU_TILE)
    check_buffers("correct_speculation", tiles, param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    check_block_tensor("correct_speculation", "thresholds", thresholds, speculated, param.device)
    cpu_ops().correct_speculation(
        param,
        exp_avg,
        exp_avg_sq,
        segment_columns(speculated),
        tiles.tile_segment,
        tiles.tile_start,
        tiles.tile_size,
        thresholds,
        hinted.start,
        hinted.width,
        HINT_WINDOW,
        HINT_SHIFT,
        left.rollback_index,
        left.rollback_block,
        left.rollback_unselected,
        *scalars.kernel_arguments(),
    )


def resolve_window(
    param: torch.Tensor, left: SpeculationLeftovers, thresholds: torch.Tensor, scalars: AdamWScalars
) -> None:
    """Finish the window entries the update listed, now that `thresholds` are exact; CPU only."""
    deferred = left.deferred
    cpu_ops().resolve_window(
        param,
        deferred.index,
        deferred.block,
        deferred.exp_avg,
        deferred.exp_avg_sq,
        left.deferred_unselected,
        thresholds,
        *scalars.kernel_arguments(),
    )
