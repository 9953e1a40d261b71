// The inner step of the assignment solver's Dijkstra: relax every column from one row, then pick
// the nearest unscanned column. Columns run in index order and ties keep the lowest index, so
// every ISA picks the same column.
#pragma once
#include <cstdint>

namespace fk {

// For all j < m: r = base + ci[j] - v[j] + blocked[j] (blocked: 0, or +inf once column j is
// scanned); where r < shortest[j], set shortest[j] = r and path[j] = row. Returns the j minimising
// shortest[j] + blocked[j] (the lowest such j), its value in *lowest.
using LsaRelaxFn = int64_t (*)(const double* ci, const double* v, const double* blocked, double base, double* shortest,
                               int64_t* path, int64_t row, int64_t m, double* lowest);

namespace {

inline int64_t lsa_relax_scalar(const double* ci, const double* v, const double* blocked, double base,
                                double* shortest, int64_t* path, int64_t row, int64_t m, double* lowest) {
  double low = __builtin_inf();
  int64_t pick = -1;
  for (int64_t j = 0; j < m; ++j) {
    const double r = base + ci[j] - v[j] + blocked[j];
    if (r < shortest[j]) shortest[j] = r, path[j] = row;
    const double key = shortest[j] + blocked[j];
    if (key < low) low = key, pick = j;
  }
  *lowest = low;
  return pick;
}

}  // namespace
}  // namespace fk
