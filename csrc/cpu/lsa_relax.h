// The assignment solver's row scans: its Dijkstra step (relax every column of a range from one row,
// then pick the nearest unscanned column) and its bids (a row's two cheapest columns). Ties keep
// the lowest index, so every ISA, and every split of the columns over threads, picks the same.
#pragma once
#include <cstdint>

namespace fk {

// For all j < m: r = base + sign·ci[j] - v[j] (sign ±1: the cost or its negation, exactly);
// where r < shortest[j], set shortest[j] = r and path[j] = row. Returns the j of the smallest
// shortest[j] (the lowest such j; -1 when all are +inf), its value in *lowest. The solver takes a
// scanned column out by v[j] = -inf, shortest[j] = +inf. The costs are float32 or float64, the
// arithmetic float64 either way.
template <class T>
using LsaRelaxFn = int64_t (*)(const T* ci, double sign, const double* v, double base, double* shortest, int32_t* path,
                               int32_t row, int64_t m, double* lowest);

// The two smallest sign·ci[j] - v[j] over j < m in (value, index) order: top->low at top->at, then
// top->second at top->second_at (at -1 where there is none).
struct LsaTop2 {
  double low, second;
  int64_t at, second_at;
};
template <class T>
using LsaTop2Fn = void (*)(const T* ci, double sign, const double* v, int64_t m, LsaTop2* top);

// Adds the candidate (value, index) to top (index -1: none), keeping the two first in (value,
// index) order.
inline void lsa_top2_add(LsaTop2* top, double value, int64_t index) {
  const auto before = [](double a, int64_t ia, double b, int64_t ib) {
    return ib < 0 || a < b || (a == b && ia < ib);
  };
  if (index < 0) return;
  if (before(value, index, top->low, top->at)) {
    top->second = top->low, top->second_at = top->at, top->low = value, top->at = index;
  } else if (before(value, index, top->second, top->second_at)) {
    top->second = value, top->second_at = index;
  }
}

namespace {

template <class T>
inline int64_t lsa_relax_scalar(const T* ci, double sign, const double* v, double base, double* shortest,
                                int32_t* path, int32_t row, int64_t m, double* lowest) {
  double low = __builtin_inf();
  int64_t pick = -1;
  for (int64_t j = 0; j < m; ++j) {
    const double r = base + sign * double(ci[j]) - v[j];
    if (r < shortest[j]) shortest[j] = r, path[j] = row;
    if (shortest[j] < low) low = shortest[j], pick = j;
  }
  *lowest = low;
  return pick;
}

template <class T>
inline void lsa_top2_scalar(const T* ci, double sign, const double* v, int64_t m, LsaTop2* top) {
  double low = __builtin_inf(), second = __builtin_inf();
  int64_t at = -1, second_at = -1;
  for (int64_t j = 0; j < m; ++j) {  // strict <: each place keeps its first index
    const double r = sign * double(ci[j]) - v[j];
    if (r < second) {
      if (r < low)
        second = low, second_at = at, low = r, at = j;
      else
        second = r, second_at = j;
    }
  }
  *top = {low, second, at, second_at};
}

}  // namespace
}  // namespace fk
