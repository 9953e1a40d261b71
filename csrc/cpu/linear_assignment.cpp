// One matrix: start from feasible duals (cold: v_j = min_i C_ij; warm: the given v), set
// u_i = min_j (C_ij - v_j), assign each row to its first tight column if that column is free,
// then let the free rows bid for columns (Jonker & Volgenant's augmenting row reduction: a row
// takes its cheapest column and lowers that column's v until its second cheapest is as good,
// evicting the owner; two passes), and route every row still free to a free column along a
// shortest path of reduced costs, updating the duals so assigned edges stay tight. Each
// augmentation is O(n·m), each bid O(m): the bids settle most rows that the start leaves free.
#include "linear_assignment.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "runtime.h"

namespace fk {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

class Solver {
 public:
  Solver(const double* cost, int64_t n, int64_t m, double* v)
      : c_(cost), n_(n), m_(m), v_(v), u_(n), col4row_(n, -1), row4col_(m, -1), shortest_(m), path_(m),
        blocked_(m, 0.0) {}

  void solve(bool warm, int64_t* perm) {
    if (!warm) column_reduction();
    greedy_start();
    augmenting_row_reduction();
    for (int64_t row = 0; row < n_; ++row)
      if (col4row_[row] < 0) augment(row);
    std::copy(col4row_.begin(), col4row_.end(), perm);
  }

 private:
  const double* row(int64_t i) const { return c_ + i * m_; }

  void column_reduction() {
    std::fill(v_, v_ + m_, kInf);
    for (int64_t i = 0; i < n_; ++i)
      for (int64_t j = 0; j < m_; ++j) v_[j] = std::min(v_[j], row(i)[j]);
    if (n_ < m_) std::fill(v_, v_ + m_, 0.0);  // unassigned columns must keep v_j <= 0 to stay optimal
  }

  void greedy_start() {
    for (int64_t i = 0; i < n_; ++i) {
      const double* ci = row(i);
      double best = kInf;
      int64_t at = 0;
      for (int64_t j = 0; j < m_; ++j) {
        const double r = ci[j] - v_[j];
        if (r < best) best = r, at = j;
      }
      u_[i] = best;
      if (row4col_[at] < 0) row4col_[at] = i, col4row_[i] = at;
    }
  }

  // A free row i takes its cheapest column j1 (reduced c_ij - v_j) and lowers v_j1 by the gap to
  // its second cheapest, so that i stays tight there whatever the others do; j1's owner is
  // evicted and bids next (when the gap was > 0) or in the next pass. Lowering v_j only raises
  // other rows' reduced costs, and j1 stays assigned, so the duals stay feasible (v_j <= 0 for
  // n < m). A bid budget bounds chains of tiny gaps; what is left goes to `augment`.
  void augmenting_row_reduction() {
    if (m_ < 2) return;
    std::vector<int64_t> free, next;
    for (int64_t i = 0; i < n_; ++i)
      if (col4row_[i] < 0) free.push_back(i);
    for (int pass = 0; pass < 2 && !free.empty(); ++pass) {
      int64_t budget = 8 * n_;  // 2n to 32n measured at n = 4096 and 11008: 8n was fastest
      next.clear();
      for (size_t k = 0; k < free.size();) {
        const int64_t i = free[k++];
        const double* ci = row(i);
        double u1 = kInf, u2 = kInf;
        int64_t j1 = 0, j2 = 0;
        for (int64_t j = 0; j < m_; ++j) {
          const double r = ci[j] - v_[j];
          if (r < u2) {
            if (r < u1)
              u2 = u1, j2 = j1, u1 = r, j1 = j;
            else
              u2 = r, j2 = j;
          }
        }
        int64_t evicted = row4col_[j1];
        const bool gap = u1 < u2;
        if (gap)
          v_[j1] -= u2 - u1;
        else if (evicted >= 0)  // a tie: the second column may be free
          j1 = j2, evicted = row4col_[j2];
        row4col_[j1] = i;
        col4row_[i] = j1;
        if (evicted < 0) continue;
        col4row_[evicted] = -1;
        if (gap && --budget > 0)
          free[--k] = evicted;
        else
          next.push_back(evicted);
      }
      free.swap(next);
    }
    for (int64_t i = 0; i < n_; ++i)  // assigned edges exactly tight
      if (col4row_[i] >= 0) u_[i] = row(i)[col4row_[i]] - v_[col4row_[i]];
  }

  // Dijkstra from free row `start` over columns, by reduced cost C_ij - u_i - v_j >= 0, to the
  // nearest free column; then shift the duals and flip the path.
  void augment(int64_t start) {
    std::fill(shortest_.begin(), shortest_.end(), kInf);
    int64_t sink = -1, i = start;
    double min_val = 0;
    sr_.clear();
    sc_.clear();
    while (sink < 0) {
      sr_.push_back(i);
      double lowest;
      const int64_t j =
          relax_(row(i), v_, blocked_.data(), min_val - u_[i], shortest_.data(), path_.data(), i, m_, &lowest);
      min_val = lowest;
      sc_.push_back(j);
      blocked_[j] = kInf;
      if (row4col_[j] < 0)
        sink = j;
      else
        i = row4col_[j];
    }
    for (int64_t j : sc_) blocked_[j] = 0;
    u_[start] += min_val;
    for (int64_t r : sr_)
      if (r != start) u_[r] += min_val - shortest_[col4row_[r]];
    for (int64_t j : sc_) v_[j] -= min_val - shortest_[j];
    for (int64_t j = sink;;) {
      const int64_t r = path_[j];
      row4col_[j] = r;
      std::swap(col4row_[r], j);
      if (r == start) break;
    }
  }

  const double* c_;
  int64_t n_, m_;
  double* v_;
  std::vector<double> u_;
  std::vector<int64_t> col4row_, row4col_;
  std::vector<double> shortest_;
  std::vector<int64_t> path_;
  std::vector<double> blocked_;  // +inf for columns scanned in the current search, else 0
  LsaRelaxFn relax_ = active_kernels().lsa_relax;
  std::vector<int64_t> sr_, sc_;
};

}  // namespace

void linear_assignment(const double* cost, int64_t batch, int64_t n, int64_t m, bool warm, double* v, int64_t* perm,
                       int threads) {
  parallel_tasks(batch, std::min<int64_t>(threads, batch), [&](int64_t b) {
    Solver(cost + b * n * m, n, m, v + b * m).solve(warm, perm + b * n);
  });
}

}  // namespace fk
