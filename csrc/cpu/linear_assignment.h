// Exact linear assignment by shortest augmenting paths (Dijkstra on reduced costs), with column
// potentials that can be carried from one solve to the next. Semantics:
// fusion_kernels/reference/linear_assignment.py.
#pragma once
#include <cstdint>

namespace fk {

// For each of `batch` row-major [n, m] float64 costs (n <= m): perm[b, i] = the column of row i in
// a minimum-cost assignment. v [batch, m] holds column potentials: read as the start when `warm`,
// always written with the final ones (valid duals: C_ij - u_i - v_j >= 0, equality on the assignment).
void linear_assignment(const double* cost, int64_t batch, int64_t n, int64_t m, bool warm, double* v, int64_t* perm,
                       int threads);

}  // namespace fk
