// cast: out = x in another floating format, through the lane's float32: exact for every pair of
// float32, float16 and bfloat16 (float32 holds both 16-bit formats), one rounding to nearest even,
// as tensor.to(dtype). torch converts bfloat16 <-> float16 an element at a time.
#pragma once
#include "lanes.h"

namespace fk {
namespace {

template <class V, class S, class From, class To>
void cast_range(const MergeArgs& a, int64_t begin, int64_t end) {
  const From* x = static_cast<const From*>(a.xs[0]);
  To* out = static_cast<To*>(a.out);
  for_each_lane<V, S>(begin, end, [&](auto lane, int64_t i) {
    using L = decltype(lane);
    prefetch_ahead<L>(x + i);
    L::store(out + i, L::load(x + i));
  });
}

}  // namespace
}  // namespace fk
