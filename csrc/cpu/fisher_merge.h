// fisher_merge: out = sum_k w[k] F[k] x[k] / (sum_k w[k] F[k] + eps), and where
// sum_k w[k] F[k] == 0 (no model has Fisher mass there) the weighted average sum_k wavg[k] x[k].
#pragma once
#include "lanes.h"

namespace fk {
namespace {

template <class V, class S, class T>
void fisher_merge_range(const MergeArgs& a, int64_t begin, int64_t end) {
  using Elem = typename V::Elem;
  const T* const* xs = reinterpret_cast<const T* const*>(a.xs);
  const T* const* fs = reinterpret_cast<const T* const*>(a.fs);
  T* out = static_cast<T*>(a.out);
  const Elem* w = weights<Elem>(a);
  const Elem* wavg = average_weights<Elem>(a);
  const Elem e = eps<Elem>(a);
  for_each_lane<V, S>(begin, end, [&](auto lane, int64_t i) {
    using L = decltype(lane);
    auto num = L::zero(), den = L::zero(), avg = L::zero();
    for (int k = 0; k < a.n; ++k) {
      const auto x = L::load(xs[k] + i);
      const auto wf = L::mul(L::set1(w[k]), L::load(fs[k] + i));
      num = L::fma(wf, x, num);
      den = L::add(den, wf);
      avg = L::fma(L::set1(wavg[k]), x, avg);
    }
    L::store(out + i, L::select_nonzero(den, L::div(num, L::add(den, L::set1(e))), avg));
  });
}

}  // namespace
}  // namespace fk
