// Exact linear assignment by shortest augmenting paths (Dijkstra on reduced costs), with column
// potentials that can be carried from one solve to the next. Semantics:
// fusion_kernels/reference/linear_assignment.py.
#pragma once
#include <cstdint>

namespace fk {

// For each of `batch` row-major [n, m] costs (n <= m; float32 when `float32`, else float64),
// C = sign·cost with sign ±1: perm[b, i] = the column of row i in a minimum-cost assignment of C.
// v [batch, m] holds column potentials: read as the start when `warm`, always written with the
// final ones (valid duals: C_ij - u_i - v_j >= 0, equality on the assignment). Fewer matrices than
// threads: each matrix's row scans are split over the threads.
void linear_assignment(const void* cost, bool float32, double sign, int64_t batch, int64_t n, int64_t m, bool warm,
                       double* v, int64_t* perm, int threads);

}  // namespace fk
