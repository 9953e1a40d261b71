// Sparse kernel bodies, written once against lanes (lanes.h) and instantiated per ISA by
// kernel_table.h: the fused sparse merge, the bracket pass of magnitude_select and the kept-L1
// sums of the "l1" rescale. Each processes one register of elements at a time across all
// models, so a model's kept value, vote and agreement never leave registers.
// Semantics: fusion_kernels/reference/{magnitude_prune,random_mask,sparse_merge}.py.
#pragma once
#include <algorithm>
#include <type_traits>

#include "lanes.h"
#include "sparse_args.h"

namespace fk {
namespace {

// The per-vector helpers below must inline into the element loops: called out of line, every
// register argument and result goes through memory.
#define FK_ALWAYS_INLINE inline __attribute__((always_inline))
#define FK_INLINE_LAMBDA __attribute__((always_inline))

// Typed access to the task vectors. HasBase: tau = x - base; Keys16: keys are x's own 16-bit
// magnitude bits (16-bit task vectors), otherwise the float32 bits of |tau|.
template <class T, bool HasBase, bool Keys16>
struct TaskView {
  static constexpr bool has_base = HasBase;
  const T* base;
  const T* const* xs;

  explicit TaskView(const TaskArgs& a)
      : base(static_cast<const T*>(a.base)), xs(reinterpret_cast<const T* const*>(a.xs)) {}

  template <class L>
  FK_ALWAYS_INLINE typename L::R base_at(int64_t j) const {
    if constexpr (HasBase) return L::load(base + j);
    return L::zero();
  }
  template <class L>
  FK_ALWAYS_INLINE typename L::R tau(int i, int64_t j, typename L::R b) const {
    if constexpr (HasBase) return L::sub(L::load(xs[i] + j), b);
    return L::load(xs[i] + j);
  }
  template <class L>
  FK_ALWAYS_INLINE typename L::I key(int i, int64_t j, typename L::R tau) const {
    if constexpr (Keys16) return L::key16(xs[i] + j);
    return L::abs_bits(tau);
  }
  // prefetch_ahead for the base's elements at j, and for model i's (a first pass's).
  template <class L>
  FK_ALWAYS_INLINE void prefetch_base(int64_t j) const {
    if constexpr (HasBase) prefetch_ahead<L>(base + j);
  }
  template <class L>
  FK_ALWAYS_INLINE void prefetch(int i, int64_t j) const {
    prefetch_ahead<L>(xs[i] + j);
    prefetch_base<L>(j);
  }
  // out = base + r, or r itself (keeping -0) without a base.
  template <class L>
  FK_ALWAYS_INLINE typename L::R add_base(typename L::R b, typename L::R r) const {
    if constexpr (HasBase) return L::add(b, r);
    return r;
  }
};

// Calls f(view) with the TaskView matching a (storage type T fixed by the caller).
template <class T, class F>
void with_task_view(const TaskArgs& a, F&& f) {
  if (a.base) return f(TaskView<T, true, false>(a));
  if constexpr (!std::is_same_v<T, float>) {
    if (a.keys16) return f(TaskView<T, false, true>(a));
  }
  f(TaskView<T, false, false>(a));
}

// Calls f(T{}) with the storage type of a dtype code (float32, float16 or bfloat16).
template <class F>
void with_storage(int dtype, F&& f) {
  switch (dtype) {
    case kFloat16:
      return f(f16{});
    case kBFloat16:
      return f(bf16{});
    default:
      return f(float{});
  }
}

// Lanes j .. j+width-1 in {key > t} ∪ {key == t and index < cut}. Only the one vector holding
// the cut needs the index test; elsewhere it is key > t or key >= t.
template <class L>
FK_ALWAYS_INLINE typename L::M in_topk(typename L::I key, int32_t t, int64_t cut, int64_t j) {
  const int64_t room = cut - j;
  if (room <= 0) return L::igt(key, L::iset1(t));
  if (room >= L::width) return L::igt(key, L::iset1(t - 1));  // t >= -1: no overflow
  const auto tv = L::iset1(t);
  return L::mor(L::igt(key, tv), L::mand(L::ieq(key, tv), L::igt(L::iset1(int32_t(room)), L::iota())));
}

constexpr uint32_t kMixA = 0x7feb352du, kMixB = 0x846ca68bu;

template <class L>
FK_ALWAYS_INLINE typename L::I mix32(typename L::I x) {
  x = L::ixor(x, L::template isrl<16>(x));
  x = L::imul(x, L::iset1(static_cast<int32_t>(kMixA)));
  x = L::ixor(x, L::template isrl<15>(x));
  x = L::imul(x, L::iset1(static_cast<int32_t>(kMixB)));
  return L::ixor(x, L::template isrl<16>(x));
}

// DARE's draws (reference/random_mask.py): element j takes 16 bits of the hash of its counter
// c = (j >> 4)·8 + (j & 7), the low half if bit 3 of j is 0, else the high half; so one hash serves
// elements j and j + 8 of each 16-element group. The hash key of c depends on c's high 32 bits.
FK_ALWAYS_INLINE uint32_t hash_key(const KeepRule& r, int64_t j) {
  const uint32_t high = uint32_t(uint64_t(j) >> 33);
  return high == 0 ? r.key0 : r.s1 ^ uint32_t(mix32<ScalarLane>(static_cast<int32_t>(high ^ r.s2)));
}

// The hash inputs (c + lane) ^ k of elements j .. j+width-1 (width <= 8, j a multiple of it): c's
// low bits below the width are 0, so c + lane = c ^ lane and one broadcast of c ^ k serves. Sixteen
// lanes from j a multiple of 32 give the counters c .. c+15 of two whole groups the same way.
template <class L>
FK_ALWAYS_INLINE typename L::I draw_input(int64_t j, uint32_t k) {
  const uint32_t c = uint32_t((uint64_t(j) >> 4 << 3) | uint64_t(j & 7));
  return L::ixor(L::iset1(static_cast<int32_t>(c ^ k)), L::iota());
}

template <class L>
FK_ALWAYS_INLINE typename L::I draw_hash(int64_t j, uint32_t k) {
  return mix32<L>(draw_input<L>(j, k));
}

// Keep where the 16-bit draw (the high or the low half of h) is below p16.
template <class L>
FK_ALWAYS_INLINE typename L::M draw_keeps(const KeepRule& r, typename L::I h, bool high) {
  const auto draw = high ? L::template isrl<16>(h) : L::iand(h, L::iset1(0xffff));
  return L::igt(L::iset1(r.p16), draw);
}

// Which of elements j .. j+width-1 model rule r keeps, for r.mode == Mode. key: their |tau| keys;
// k = hash_key(r, j), for kKeepRandom.
template <int Mode, class L>
FK_ALWAYS_INLINE typename L::M keep_mask(const KeepRule& r, int64_t j, typename L::I key, uint32_t k) {
  if constexpr (Mode == kKeepTopK) {
    return in_topk<L>(key, r.hi_key, r.hi.cut, j);
  } else if constexpr (Mode == kKeepBand) {
    return L::mandnot(in_topk<L>(key, r.hi_key, r.hi.cut, j), in_topk<L>(key, r.lo_key, r.lo.cut, j));
  } else if constexpr (Mode == kKeepRandom) {
    if constexpr (L::width == 16) {  // a whole group: one 8-lane hash, its low halves then its high halves
      return L::igt(L::iset1(r.p16), L::halves16(draw_hash<typename L::Half>(j, k)));
    }
    return draw_keeps<L>(r, draw_hash<L>(j, k), (j & 8) != 0);
  } else if constexpr (Mode == kKeepMask) {
    return L::load_mask8(r.mask + j);
  } else {
    return L::mall();
  }
}

// Calls step(L{}, j, keep_of) for the registers of elements [j0, j1) (vectors of V, then single
// elements of S; j0 a multiple of 16 and the range inside one 2^33-element span, so one hash key), where keep_of(keys) gives model rule's keep mask of the
// register. For kKeepRandom the two 8-wide registers of a 16-element group share one hash.
template <int Mode, class V, class S, class Step>
FK_ALWAYS_INLINE void for_each_keep(const KeepRule& rule, int64_t j0, int64_t j1, Step&& step) {
  const uint32_t k = hash_key(rule, j0);
  int64_t j = j0;
  if constexpr (Mode == kKeepRandom && V::width == 8) {
    for (; j + 16 <= j1; j += 16) {
      const auto h = draw_hash<V>(j, k);
      step(V{}, j, [&](typename V::I) FK_INLINE_LAMBDA { return draw_keeps<V>(rule, h, false); });
      step(V{}, j + 8, [&](typename V::I) FK_INLINE_LAMBDA { return draw_keeps<V>(rule, h, true); });
    }
  }
  for (; j + V::width <= j1; j += V::width)
    step(V{}, j, [&](typename V::I key) FK_INLINE_LAMBDA { return keep_mask<Mode, V>(rule, j, key, k); });
  for (; j < j1; ++j) step(S{}, j, [&](typename S::I key) FK_INLINE_LAMBDA { return keep_mask<Mode, S>(rule, j, key, k); });
}

// Calls f(std::integral_constant<int, mode>{}): one branch per model, not per element.
template <class F>
FK_ALWAYS_INLINE void with_keep_mode(int mode, F&& f) {
  switch (mode) {
    case kKeepTopK:
      return f(std::integral_constant<int, kKeepTopK>{});
    case kKeepBand:
      return f(std::integral_constant<int, kKeepBand>{});
    case kKeepRandom:
      return f(std::integral_constant<int, kKeepRandom>{});
    case kKeepMask:
      return f(std::integral_constant<int, kKeepMask>{});
    default:
      return f(std::integral_constant<int, kKeepAll>{});
  }
}

// Mode argument of merge_chunk: the models' keep modes differ, dispatch per model.
constexpr int kMixedModes = -1;

// Keep masks of model rule over the U registers from j; tau: their task vectors. For kKeepRandom
// the two 8-wide registers of a 16-element group share one hash (j is a multiple of 16).
template <int Mode, int U, class L, class View>
FK_ALWAYS_INLINE void chunk_keeps(const KeepRule& rule, const View& v, int i, int64_t j, const typename L::R* tau,
                                  typename L::M* keep) {
  constexpr int W = L::width;
  const uint32_t k = Mode == kKeepRandom ? hash_key(rule, j) : 0;
  if constexpr (Mode == kKeepRandom && W == 8 && (U == 2 || U == 4)) {
    // Chunks step by U·8 from a multiple of 64, so bit 3 of j's counter c is 0 and the second
    // hash's inputs (c + 8 + lane) ^ k are the first's ^ 8: one broadcast serves both.
    const auto x = draw_input<L>(j, k);
    for (int u = 0; u < U; u += 2) {
      const auto h = mix32<L>(u == 0 ? x : L::ixor(x, L::iset1(8 * (u / 2))));
      keep[u] = draw_keeps<L>(rule, h, false);
      keep[u + 1] = draw_keeps<L>(rule, h, true);
    }
  } else if constexpr (Mode == kKeepRandom && W == 16 && U % 2 == 0) {
    // One 16-lane hash serves two groups (draw_input; 256-bit hashes beside 512-bit work cost
    // float16's DARE a fifth: they lose port 1 while 512-bit instructions are in flight).
    for (int u = 0; u < U; u += 2) {
      const auto h = draw_hash<L>(j + u * W, k);
      keep[u] = L::igt(L::iset1(rule.p16), L::template halves16_of<0>(h));
      keep[u + 1] = L::igt(L::iset1(rule.p16), L::template halves16_of<1>(h));
    }
  } else {
    for (int u = 0; u < U; ++u)
      keep[u] = keep_mask<Mode, L>(rule, j + u * W, v.template key<L>(i, j + u * W, tau[u]), k);
  }
}

// The fused merge (steps 1-5 of reference/sparse_merge.py), U registers of elements at a time
// across all models, with every running sum in registers. Summing the agreeing votes needs the
// elected sign, known only after the last model; so both candidates are summed as the votes
// arrive: up = the sum of w·k over votes > 0, down = over votes < 0, each in model order (a
// non-agreeing model adds +0, as the reference's masked sum does), and the election picks one.
// Agg 1: each side's agreement weight (1 for mean_count, w for mean_weight) is summed the same way;
// Agg 2 (combine max): each side keeps its largest |w·k| instead of the sum.
// Mode: the keep mode of every model, or kMixedModes.
template <int Consensus, int Agg, bool Divide, int Mode, int U, class L, class View, class T>
FK_ALWAYS_INLINE void merge_chunk(const SparseMergeArgs& a, const View& v, T* out, int64_t j) {
  using R = typename L::R;
  constexpr int W = L::width;
  const int n = a.task.n;
  const R zero = L::zero(), one = L::set1(1.f);
  R b[U], up[U], down[U], tally[U], agree_up[U], agree_down[U];
  for (int u = 0; u < U; ++u) {
    b[u] = v.template base_at<L>(j + u * W);
    up[u] = down[u] = tally[u] = agree_up[u] = agree_down[u] = zero;
  }
  for (int i = 0; i < n; ++i) {
    const KeepRule& rule = a.rules[i];
    const float w_i = a.weights[i];
    const R scale = L::set1(a.scales[i]), w = L::set1(w_i);
    const R agree_w = L::set1(a.combine == 2 ? w_i : 1.f);
    R tau[U];
    typename L::M keep[U];
    for (int u = 0; u < U; ++u) tau[u] = v.template tau<L>(i, j + u * W, b[u]);
    if constexpr (Mode == kMixedModes) {
      with_keep_mode(rule.mode, [&](auto mode) FK_INLINE_LAMBDA {
        chunk_keeps<decltype(mode)::value, U, L>(rule, v, i, j, tau, keep);
      });
    } else {
      chunk_keeps<Mode, U, L>(rule, v, i, j, tau, keep);
    }
    for (int u = 0; u < U; ++u) {
      // Divide: kept values are tau / scale (inverse_density), else tau · scale (x·1 is exact).
      const R kept = L::keep_if(keep[u], Divide ? L::div(tau[u], scale) : L::mul(tau[u], scale));
      const R weighted = L::mul(kept, w);
      if constexpr (Consensus == 0) {
        up[u] = L::add(up[u], weighted);
      } else {
        const R vote = a.elect_weighted ? weighted : kept;
        const auto is_up = L::fgt(vote, zero), is_down = L::fgt(zero, vote);  // a zero vote never agrees
        tally[u] = L::add(tally[u], Consensus == 2 ? L::sub(L::one_if(is_up), L::one_if(is_down)) : vote);
        if constexpr (Agg == 2) {
          up[u] = L::max(up[u], L::keep_if(is_up, L::abs(weighted)));
          down[u] = L::max(down[u], L::keep_if(is_down, L::abs(weighted)));
        } else {
          up[u] = L::add(up[u], L::keep_if(is_up, weighted));
          down[u] = L::add(down[u], L::keep_if(is_down, weighted));
        }
        if constexpr (Agg == 1) {
          agree_up[u] = L::add(agree_up[u], L::keep_if(is_up, agree_w));
          agree_down[u] = L::add(agree_down[u], L::keep_if(is_down, agree_w));
        }
      }
    }
  }
  for (int u = 0; u < U; ++u) {
    R r = up[u], agreeing = L::set1(float(n));
    if constexpr (Consensus != 0) {
      const auto elected_up = a.tie > 0 ? L::fge(tally[u], zero) : L::fgt(tally[u], zero);
      r = L::select(elected_up, up[u], Agg == 2 ? L::sub(zero, down[u]) : down[u]);
      if constexpr (Agg == 1) agreeing = L::select(elected_up, agree_up[u], agree_down[u]);
      if (a.tie == 0) r = L::select(L::feq(tally[u], zero), zero, r);  // a zero tally elects no one
    }
    if (a.combine == 1) {
      r = L::div(r, L::max(agreeing, one));
    } else if (a.combine == 2) {
      const R divisor = Consensus != 0 ? agreeing : L::set1(a.weight_total);
      r = L::div(r, L::select(L::feq(divisor, zero), one, divisor));
    }
    if (a.lam != 1.f) r = L::mul(r, L::set1(a.lam));
    L::store(out + j + u * W, v.template add_base<L>(b[u], r));
  }
}

// Registers per model per step: enough independent work to hide the hash's latency.
constexpr int kMergeUnroll = 4;

// The keep mode all models share, or kMixedModes.
inline int shared_keep_mode(const SparseMergeArgs& a) {
  for (int i = 1; i < a.task.n; ++i)
    if (a.rules[i].mode != a.rules[0].mode) return kMixedModes;
  return a.task.n > 0 ? a.rules[0].mode : kKeepAll;
}

template <class V, class S, class T>
void sparse_merge_range(const SparseMergeArgs& a, int64_t begin, int64_t end) {
  T* out = static_cast<T*>(a.out);
  with_task_view<T>(a.task, [&](const auto& v) {
    const auto run = [&](auto consensus, auto agree, auto divide, auto mode) {
      constexpr int c = decltype(consensus)::value, md = decltype(mode)::value, g = decltype(agree)::value;
      constexpr bool d = decltype(divide)::value;
      constexpr int U = kMergeUnroll;
      int64_t j = begin;  // a multiple of 64: every U-register step starts on a 16-element group
      for (; j + U * V::width <= end; j += U * V::width) {
        for (int u = 0; u < U; ++u) {  // each input once (the base is shared by the models)
          v.template prefetch_base<V>(j + u * V::width);
          for (int i = 0; i < a.task.n; ++i) prefetch_ahead<V>(v.xs[i] + j + u * V::width);
        }
        merge_chunk<c, g, d, md, U, V>(a, v, out, j);
      }
      for (; j + V::width <= end; j += V::width) merge_chunk<c, g, d, md, 1, V>(a, v, out, j);
      for (; j < end; ++j) merge_chunk<c, g, d, md, 1, S>(a, v, out, j);
    };
    const auto with_mode = [&](auto consensus, auto agree, auto divide) {
      const int mode = shared_keep_mode(a);
      if (mode == kMixedModes) return run(consensus, agree, divide, std::integral_constant<int, kMixedModes>{});
      with_keep_mode(mode, [&](auto m) { run(consensus, agree, divide, m); });
    };
    const auto with_divide = [&](auto consensus, auto agree) {
      if (a.divide) return with_mode(consensus, agree, std::true_type{});
      with_mode(consensus, agree, std::false_type{});
    };
    const auto with_agg = [&](auto consensus) {  // combine 3 (max): Agg 2; 1 and 2 (means): Agg 1
      if (a.combine == 3) return with_divide(consensus, std::integral_constant<int, 2>{});
      if (a.combine != 0) return with_divide(consensus, std::integral_constant<int, 1>{});
      with_divide(consensus, std::integral_constant<int, 0>{});
    };
    switch (a.consensus) {
      case 1:
        return with_agg(std::integral_constant<int, 1>{});
      case 2:
        return with_agg(std::integral_constant<int, 2>{});
      default:
        return with_divide(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
    }
  });
}

// Appends (key, index) of the lanes set in `inside` to query q's candidates, or marks q overflowed.
template <class L>
__attribute__((noinline)) void collect(const BracketOut& o, int q, int64_t j, typename L::I key, unsigned inside) {
  alignas(32) int32_t keys[kMaxLaneWidth];
  L::store_i(keys, key);
  for (; inside != 0; inside &= inside - 1) {
    if (o.count[q] == o.cap) {
      o.overflow[q] = 1;
      return;
    }
    const int lane = __builtin_ctz(inside);
    o.found[q][o.count[q]++] =
        (uint64_t(uint32_t(keys[lane])) << kCandidateIndexBits) | (kCandidateIndexMask - uint64_t(j + lane));
  }
}

// Query q over the whole vectors of [j, end), all inside one block of 2^kEqualBlockBits elements:
// counts kept in registers and added to counts[0..2] (above, == hi, == lo). Returns where it stopped.
template <class L, class View>
FK_ALWAYS_INLINE int64_t bracket_span(const BracketArgs& a, const BracketOut& o, const View& v, int q, int64_t j,
                                      int64_t end, int64_t* counts) {
  const int i = a.models[q];
  const auto hi = L::iset1(a.hi[q]), lo = L::iset1(a.lo[q]);
  const bool band = a.lo[q] != a.hi[q];  // lo == hi: everything is above, equal or below
  auto above_n = L::iset1(0), hi_n = L::iset1(0), lo_n = L::iset1(0);
  for (; j + L::width <= end; j += L::width) {
    v.template prefetch<L>(i, j);
    const auto key = v.template key<L>(i, j, v.template tau<L>(i, j, v.template base_at<L>(j)));
    const auto above = L::igt(key, hi), at_hi = L::ieq(key, hi);
    above_n = L::count_if(above_n, above);
    hi_n = L::count_if(hi_n, at_hi);
    if (!band) continue;
    lo_n = L::count_if(lo_n, L::ieq(key, lo));
    const unsigned inside = static_cast<unsigned>(L::movemask(L::mandnot(L::igt(key, lo), L::mor(above, at_hi))));
    if (inside != 0 && !o.overflow[q]) collect<L>(o, q, j, key, inside);
  }
  counts[0] += L::ihsum(above_n);
  counts[1] += L::ihsum(hi_n);
  counts[2] += L::ihsum(lo_n);
  return j;
}

// Block by block, query by query: a block's base values stay in cache while each query reads them.
template <class V, class S, class T>
void bracket_range(const BracketArgs& a, const BracketOut& o, int64_t begin, int64_t end) {
  with_task_view<T>(a.task, [&](const auto& v) {
    for (int64_t j0 = begin; j0 < end;) {
      const int64_t block = j0 >> kEqualBlockBits;
      const int64_t j1 = std::min(end, (block + 1) << kEqualBlockBits);
      for (int q = 0; q < a.queries; ++q) {
        int64_t counts[3] = {0, 0, 0};
        bracket_span<S>(a, o, v, q, bracket_span<V>(a, o, v, q, j0, j1, counts), j1, counts);
        o.above[q] += counts[0];
        o.equal[(q * o.blocks + block) * 2] += static_cast<int32_t>(counts[1]);
        o.equal[(q * o.blocks + block) * 2 + 1] += static_cast<int32_t>(counts[2]);
      }
      j0 = j1;
    }
  });
}

constexpr int64_t kL1Run = 256;  // elements summed in float before a double accumulation

// Adds |tau| and its kept part (keep_of(keys)) of model i's elements j .. j+width-1 to the lane sums.
template <class L, class View, class Keep>
FK_ALWAYS_INLINE void l1_chunk(const View& v, int i, int64_t j, typename L::R& all, typename L::R& kept,
                               Keep&& keep_of) {
  const auto tau = v.template tau<L>(i, j, v.template base_at<L>(j));
  const auto mag = L::abs(tau);
  all = L::add(all, mag);
  kept = L::add(kept, L::keep_if(keep_of(v.template key<L>(i, j, tau)), mag));
}

template <class V, class S, class T>
void kept_l1_range(const L1Args& a, int64_t begin, int64_t end, double* sums) {
  with_task_view<T>(a.task, [&](const auto& v) {
    for (int i = 0; i < a.task.n; ++i) {
      const KeepRule& rule = a.rules[i];
      with_keep_mode(rule.mode, [&](auto mode) FK_INLINE_LAMBDA {
        for (int64_t j0 = begin; j0 < end; j0 += kL1Run) {
          typename V::R all = V::zero(), kept = V::zero();
          float all_tail = 0.f, kept_tail = 0.f;
          for_each_keep<decltype(mode)::value, V, S>(rule, j0, std::min(end, j0 + kL1Run),
                                                     [&](auto lane, int64_t j, auto&& keep_of) FK_INLINE_LAMBDA {
                                                       if constexpr (std::is_same_v<decltype(lane), V>) {
                                                         v.template prefetch<V>(i, j);
                                                         l1_chunk<V>(v, i, j, all, kept, keep_of);
                                                       }
                                                       else
                                                         l1_chunk<S>(v, i, j, all_tail, kept_tail, keep_of);
                                                     });
          sums[2 * i] += double(V::hsum(all)) + double(all_tail);
          sums[2 * i + 1] += double(V::hsum(kept)) + double(kept_tail);
        }
      });
    }
  });
}

#undef FK_ALWAYS_INLINE
#undef FK_INLINE_LAMBDA

}  // namespace
}  // namespace fk
