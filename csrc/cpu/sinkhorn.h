// Batched log-domain Sinkhorn on [batch, n, m] cost matrices. Semantics:
// fusion_kernels/reference/sinkhorn.py.
#pragma once
#include <cstdint>

namespace fk {

struct SinkhornProblem {
  const void* cost = nullptr;  // [batch, n, m]
  const void* log_a = nullptr; // [batch, n]
  const void* log_b = nullptr; // [batch, m]
  void* plan = nullptr;        // [batch, n, m] out: the plan, or its log
  void* f = nullptr;           // [batch, n] out: potentials
  void* g = nullptr;           // [batch, m] out
  int64_t* iterations = nullptr;  // [batch] out
  double* error = nullptr;        // [batch] out: the row-marginal L1 error of the returned plan
  int64_t batch = 0, n = 0, m = 0;
  double reg = 1.0, tol = 0.0;
  int64_t max_iter = 1, check_every = 1;
  bool log_plan = false;
};

// dtype: kFloat32 or kFloat64 (the compute and storage type of every array above).
void sinkhorn(const SinkhornProblem& problem, int dtype, int threads);

}  // namespace fk
