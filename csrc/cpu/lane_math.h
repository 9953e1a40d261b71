// e^x and ln x on a vector lane (AVX2, AVX-512), to about 1 ulp, from the lane's primitives: one
// body, so every ISA gives the same values. Cephes' expf/logf coefficients.
#pragma once
#include <cmath>

namespace fk {
namespace {

// x = k·ln2 + r with k = round(x·log2 e) (ln2 split in two so r is exact), e^r by a degree-7
// Taylor-like polynomial, 2^k via the exponent bits. Below ln(FLT_MIN) the result is 0 (no
// subnormals); above ln(FLT_MAX), +inf.
template <class L>
typename L::R lane_exp(typename L::R x) {
  const auto xc = L::min(x, L::set1(88.7228391f));
  const auto k = L::round(L::mul(xc, L::set1(1.44269504088896341f)));
  auto r = L::fma(k, L::set1(-0.693359375f), xc);
  r = L::fma(k, L::set1(2.12194440e-4f), r);
  auto p = L::set1(1.9875691500e-4f);
  p = L::fma(p, r, L::set1(1.3981999507e-3f));
  p = L::fma(p, r, L::set1(8.3334519073e-3f));
  p = L::fma(p, r, L::set1(4.1665795894e-2f));
  p = L::fma(p, r, L::set1(1.6666665459e-1f));
  p = L::fma(p, r, L::set1(5.0000001201e-1f));
  p = L::fma(p, L::mul(r, r), L::add(r, L::set1(1.f)));
  // 2^k as two factors so k = 128 (x just below ln FLT_MAX) does not overflow the exponent field.
  const auto ki = L::to_int(k);
  const auto half = L::template isra<1>(ki);
  const auto s1 = L::from_bits(L::template isll<23>(L::iadd(half, L::iset1(127))));
  const auto s2 = L::from_bits(L::template isll<23>(L::iadd(L::isub(ki, half), L::iset1(127))));
  const auto result = L::mul(L::mul(p, s1), s2);
  const auto tiny = L::fgt(L::set1(-87.3365447f), x), huge = L::fgt(x, L::set1(88.7228391f));
  return L::select(huge, L::set1(INFINITY), L::keep_if(L::mandnot(L::mall(), tiny), result));
}

// ln x for positive normal x: x = m·2^e with m in [√½, √2), ln(m) = ln(1 + f) by Cephes' logf
// polynomial in f = m − 1, e·ln2 added in two parts (as lane_exp's split of ln2).
template <class L>
typename L::R lane_log(typename L::R x) {
  const auto bits = L::to_bits(x);
  auto e = L::isub(L::template isrl<23>(bits), L::iset1(127));
  auto m = L::from_bits(L::ior(L::iand(bits, L::iset1(0x007fffff)), L::iset1(0x3f800000)));
  const auto above = L::fgt(m, L::set1(1.41421356237f));
  m = L::select(above, L::mul(m, L::set1(0.5f)), m);
  e = L::iadd(e, L::ione_if(above));
  const auto f = L::sub(m, L::set1(1.f)), ef = L::to_float(e);
  const auto z = L::mul(f, f);
  auto p = L::set1(7.0376836292e-2f);
  p = L::fma(p, f, L::set1(-1.1514610310e-1f));
  p = L::fma(p, f, L::set1(1.1676998740e-1f));
  p = L::fma(p, f, L::set1(-1.2420140846e-1f));
  p = L::fma(p, f, L::set1(1.4249322787e-1f));
  p = L::fma(p, f, L::set1(-1.6668057665e-1f));
  p = L::fma(p, f, L::set1(2.0000714765e-1f));
  p = L::fma(p, f, L::set1(-2.4999993993e-1f));
  p = L::fma(p, f, L::set1(3.3333331174e-1f));
  auto y = L::mul(L::mul(p, f), z);
  y = L::fma(ef, L::set1(-2.12194440e-4f), y);
  y = L::fma(z, L::set1(-0.5f), y);
  return L::fma(ef, L::set1(0.693359375f), L::add(f, y));
}

}  // namespace
}  // namespace fk
