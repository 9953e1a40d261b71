// Shared by every translation unit: dtype codes, storage types, the kernel argument block and
// exact scalar conversions between float and the 16-bit formats.
#pragma once
#include <cstdint>
#include <cstring>

namespace fk {

// Dtype codes shared with fusion_kernels/_native.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kNumDTypes = 4 };

// 16-bit storage types: distinct types so overloads pick the right conversion.
struct f16 { uint16_t bits; };
struct bf16 { uint16_t bits; };

// Everything an elementwise merge kernel reads. Plain pointers only: this struct crosses into
// translation units compiled for other ISAs, where no standard-library code may be instantiated.
struct MergeArgs {
  int64_t numel = 0;
  int n = 0;                          // number of models
  void* out = nullptr;
  const void* base = nullptr;         // task_arithmetic
  bool add_base = true;               // task_arithmetic: false sums the task vectors from zero
  const void* const* xs = nullptr;    // n pointers
  const void* const* fs = nullptr;    // fisher_merge: n pointers
  const float* w32 = nullptr;         // n weights, float32 (for 16/32-bit data)
  const double* w64 = nullptr;        // the same weights in float64 (for float64 data)
  const float* wavg32 = nullptr;      // fisher_merge fallback: w / sum(w)
  const double* wavg64 = nullptr;
  float eps32 = 0.f;
  double eps64 = 0.0;
  const uint8_t* mask = nullptr;      // sce_energies: the kept elements (null: all)
};

using RangeFn = void (*)(const MergeArgs&, int64_t begin, int64_t end);

namespace {  // internal linkage: each ISA's translation unit keeps its own copy (no ODR mixing)

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round to nearest even, NaN -> 0x7FC0: bit-identical to torch's float -> bfloat16.
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float v = float(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even with overflow to inf, NaN -> quiet NaN: matches torch and F16C.
inline uint16_t float_to_f16(float f) {
  const uint32_t x = float_to_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00;
  if (ax >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {
    // Below 2^-14 the result is subnormal: adding 0.5 (ulp 2^-24) makes the FPU round for us.
    return sign | uint16_t(float_to_bits(bits_to_float(ax) + 0.5f) - 0x3f000000u);
  }
  ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias exponent (-112 << 23) and round 23 -> 10 bits
  return sign | uint16_t(ax >> 13);
}

}  // namespace
}  // namespace fk
