// Sparse kernel bodies, written once against lanes (lanes.h) and instantiated per ISA by
// kernel_table.h: the fused sparse merge, the bracket pass of magnitude_select and the kept-L1
// sums of the "l1" rescale. Each processes one register of elements at a time across all
// models, so a model's kept value, vote and agreement never leave registers or L1.
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
// Loops over a chunk's registers must unroll fully so that their arrays live in registers.
#define FK_UNROLL _Pragma("GCC unroll 8")

// Typed access to the task vectors. HasBase: tau = x - base; Keys16: keys are x's own 16-bit
// magnitude bits (16-bit task vectors), otherwise the float32 bits of |tau|.
template <class T, bool HasBase, bool Keys16>
struct TaskView {
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

// mix32 after its first product: x ^= x >> 15; x *= B; x ^= x >> 16.
template <class L>
FK_ALWAYS_INLINE typename L::I mix32_tail(typename L::I x) {
  x = L::ixor(x, L::template isrl<15>(x));
  x = L::imul(x, L::iset1(static_cast<int32_t>(kMixB)));
  return L::ixor(x, L::template isrl<16>(x));
}

template <class L>
FK_ALWAYS_INLINE typename L::I mix32(typename L::I x) {
  x = L::ixor(x, L::template isrl<16>(x));
  return mix32_tail<L>(L::imul(x, L::iset1(static_cast<int32_t>(kMixA))));
}

// Row c holds (c ^ lane)·A for each lane: the first product of mix32 over one register, up to
// a broadcast term (see keep_mask).
struct LaneProducts {
  alignas(32) int32_t row[kMaxLaneWidth][kMaxLaneWidth];
};
constexpr LaneProducts make_lane_products() {
  LaneProducts p{};
  for (uint32_t c = 0; c < kMaxLaneWidth; ++c)
    for (uint32_t lane = 0; lane < kMaxLaneWidth; ++lane) p.row[c][lane] = static_cast<int32_t>((c ^ lane) * kMixA);
  return p;
}
constexpr LaneProducts kLaneProducts = make_lane_products();

// Which of elements j .. j+width-1 model rule r keeps, for r.mode == Mode. j is a multiple of
// the lane width (every range starts at a multiple of 64), so a vector never straddles the hash's
// 2^32 index split.
template <int Mode, class L>
FK_ALWAYS_INLINE typename L::M keep_mask(const KeepRule& r, int64_t j, typename L::I key) {
  if constexpr (Mode == kKeepTopK) {
    return in_topk<L>(key, r.hi_key, r.hi.cut, j);
  } else if constexpr (Mode == kKeepBand) {
    return L::mandnot(in_topk<L>(key, r.hi_key, r.hi.cut, j), in_topk<L>(key, r.lo_key, r.lo.cut, j));
  } else if constexpr (Mode == kKeepRandom) {
    const uint32_t high = uint32_t(uint64_t(j) >> 32);
    const uint32_t k = high == 0 ? r.key0 : r.s1 ^ uint32_t(mix32<ScalarLane>(static_cast<int32_t>(high ^ r.s2)));
    // mix32((j + lane) ^ k) with its first xor-shift and product done once per register: j's low
    // bits are 0, so the input is x ^ lane with x = j ^ k; its high half, hence s = x ^ (x >> 16)
    // up to the lane, is the same in every lane; and s ^ lane = (s - c) + (c ^ lane), c = s's low bits.
    const uint32_t x = uint32_t(j) ^ k;
    const uint32_t s = x ^ (x >> 16);
    const uint32_t c = s & uint32_t(L::width - 1);
    const auto first = L::iadd(L::iset1(static_cast<int32_t>((s - c) * kMixA)), L::load_i(kLaneProducts.row[c]));
    const auto h = mix32_tail<L>(first);
    return L::igt(L::iset1(r.hash_cut), L::ixor(h, L::iset1(static_cast<int32_t>(0x80000000u))));
  } else if constexpr (Mode == kKeepMask) {
    return L::load_mask8(r.mask + j);
  } else {
    return L::mall();
  }
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

template <class L>
FK_ALWAYS_INLINE typename L::R sign_of(typename L::R v) {
  return L::sub(L::one_if(L::fgt(v, L::zero())), L::one_if(L::fgt(L::zero(), v)));
}

// Elements j .. j+U*width-1 of the fused merge (steps 1-5 of reference/sparse_merge.py): U
// registers per model at a time, so a model's pointer, rule and weights are read once per U.
// kept: U * width * n floats holding each model's votes between election and combine.
template <int Consensus, int U, class L, class View, class T>
FK_ALWAYS_INLINE void merge_chunk(const SparseMergeArgs& a, const View& v, T* out, int64_t j, float* kept) {
  using R = typename L::R;
  constexpr int W = L::width;
  const int n = a.task.n;
  const R zero = L::zero(), one = L::set1(1.f);
  R b[U], merged[U], tally[U];
  FK_UNROLL
  for (int u = 0; u < U; ++u) {
    b[u] = v.template base_at<L>(j + u * W);
    merged[u] = tally[u] = zero;
  }
  for (int i = 0; i < n; ++i) {
    const KeepRule& rule = a.rules[i];
    const float scale_i = a.scales[i];
    const R scale = L::set1(scale_i), w = L::set1(a.weights[i]);
    with_keep_mode(rule.mode, [&](auto mode) {
      FK_UNROLL
      for (int u = 0; u < U; ++u) {
        const int64_t ju = j + u * W;
        const R tau = v.template tau<L>(i, ju, b[u]);
        const auto keep = keep_mask<decltype(mode)::value, L>(rule, ju, v.template key<L>(i, ju, tau));
        const R scaled = a.divide ? L::div(tau, scale) : scale_i == 1.f ? tau : L::mul(tau, scale);  // x·1 is exact
        const R k = L::select(keep, scaled, zero);
        if constexpr (Consensus == 0) {
          merged[u] = L::add(merged[u], L::mul(k, w));
        } else {
          const R vote = a.elect_weighted ? L::mul(k, w) : k;
          L::store(kept + (i * U + u) * W, vote);
          tally[u] = L::add(tally[u], Consensus == 2 ? sign_of<L>(vote) : vote);
        }
      }
    });
  }
  R agreeing[U], agreeing_w[U];
  FK_UNROLL
  for (int u = 0; u < U; ++u) {
    agreeing[u] = L::set1(float(n));
    agreeing_w[u] = zero;
  }
  if constexpr (Consensus != 0) {
    R elected[U];
    FK_UNROLL
    for (int u = 0; u < U; ++u) {
      elected[u] = L::select(L::fge(tally[u], zero), one, L::set1(-1.f));
      agreeing[u] = zero;
    }
    for (int i = 0; i < n; ++i) {
      const R w = L::set1(a.weights[i]);
      FK_UNROLL
      for (int u = 0; u < U; ++u) {
        const R vote = L::load(kept + (i * U + u) * W);
        const R weighted = a.elect_weighted ? vote : L::mul(vote, w);  // w·k either way
        const auto agree = L::fgt(L::mul(vote, elected[u]), zero);   // a zero vote never agrees
        merged[u] = L::add(merged[u], L::select(agree, weighted, zero));
        if (a.combine == 1) agreeing[u] = L::add(agreeing[u], L::one_if(agree));
        if (a.combine == 2) agreeing_w[u] = L::add(agreeing_w[u], L::select(agree, w, zero));
      }
    }
  }
  FK_UNROLL
  for (int u = 0; u < U; ++u) {
    R r = merged[u];
    if (a.combine == 1) {
      r = L::div(r, L::max(agreeing[u], one));
    } else if (a.combine == 2) {
      const R divisor = Consensus != 0 ? agreeing_w[u] : L::set1(a.weight_total);
      r = L::div(r, L::select(L::feq(divisor, zero), one, divisor));
    }
    if (a.lam != 1.f) r = L::mul(r, L::set1(a.lam));
    L::store(out + j + u * W, v.template add_base<L>(b[u], r));
  }
}

template <class V, class S, class T>
void sparse_merge_range(const SparseMergeArgs& a, int64_t begin, int64_t end, float* kept) {
  T* out = static_cast<T*>(a.out);
  with_task_view<T>(a.task, [&](const auto& v) {
    const auto run = [&](auto consensus) {
      constexpr int c = decltype(consensus)::value;
      int64_t j = begin;
      for (; j + kMergeUnroll * V::width <= end; j += kMergeUnroll * V::width)
        merge_chunk<c, kMergeUnroll, V>(a, v, out, j, kept);
      for (; j + V::width <= end; j += V::width) merge_chunk<c, 1, V>(a, v, out, j, kept);
      for (; j < end; ++j) merge_chunk<c, 1, S>(a, v, out, j, kept);
    };
    switch (a.consensus) {
      case 1:
        return run(std::integral_constant<int, 1>{});
      case 2:
        return run(std::integral_constant<int, 2>{});
      default:
        return run(std::integral_constant<int, 0>{});
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

// Adds |tau| and its kept part of model i's elements j .. j+width-1 to the lane sums.
template <class L, class View>
FK_ALWAYS_INLINE void l1_chunk(const L1Args& a, const View& v, int i, int64_t j, typename L::R& all,
                               typename L::R& kept) {
  const auto tau = v.template tau<L>(i, j, v.template base_at<L>(j));
  const auto mag = L::abs(tau);
  all = L::add(all, mag);
  with_keep_mode(a.rules[i].mode, [&](auto mode) {
    const auto keep = keep_mask<decltype(mode)::value, L>(a.rules[i], j, v.template key<L>(i, j, tau));
    kept = L::add(kept, L::select(keep, mag, L::zero()));
  });
}

template <class V, class S, class T>
void kept_l1_range(const L1Args& a, int64_t begin, int64_t end, double* sums) {
  with_task_view<T>(a.task, [&](const auto& v) {
    for (int i = 0; i < a.task.n; ++i) {
      for (int64_t j0 = begin; j0 < end; j0 += kL1Run) {
        const int64_t j1 = std::min(end, j0 + kL1Run);
        typename V::R all = V::zero(), kept = V::zero();
        float all_tail = 0.f, kept_tail = 0.f;
        int64_t j = j0;
        for (; j + V::width <= j1; j += V::width) l1_chunk<V>(a, v, i, j, all, kept);
        for (; j < j1; ++j) l1_chunk<S>(a, v, i, j, all_tail, kept_tail);
        sums[2 * i] += double(V::hsum(all)) + double(all_tail);
        sums[2 * i + 1] += double(V::hsum(kept)) + double(kept_tail);
      }
    }
  });
}

#undef FK_ALWAYS_INLINE
#undef FK_UNROLL

}  // namespace
}  // namespace fk
