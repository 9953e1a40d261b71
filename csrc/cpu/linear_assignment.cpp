// One matrix: start from feasible duals (cold: v_j = min_i C_ij; warm: the given v), set
// u_i = min_j (C_ij - v_j), assign each row to its first tight column if that column is free,
// then let the free rows bid for columns (Jonker & Volgenant's augmenting row reduction: a row
// takes its cheapest column and lowers that column's v until its second cheapest is as good,
// evicting the owner; two passes), and route every row still free to a free column along a
// shortest path of reduced costs, updating the duals so assigned edges stay tight. Each
// augmentation is O(n·m), each bid O(m): the bids settle most rows that the start leaves free.
//
// Every step reads one row of the cost matrix, which is far larger than the caches: the solver is
// bound by memory bandwidth. So the costs stay in their own precision (float32 costs are read as
// float32 and widened in registers: the same float64 arithmetic on half the bytes), and a single
// matrix spreads each row scan over a team of threads that own contiguous column ranges (one
// core's share of the bandwidth is about half of two cores' on the 2-core VM we measure on). The
// ranges are merged in index order, so the result does not depend on the number of threads.
#include "linear_assignment.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "runtime.h"

namespace fk {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kMinTeamColumns = 2048;  // below this a row scan is shorter than a hand-off

inline void spin_pause() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Threads that each scan one contiguous column range for the calling thread (member 0), which runs
// the solver and hands out one scan at a time; the others spin between scans (a scan is a few
// microseconds, too short to sleep through). Member t's range is [begin(t), begin(t + 1)).
class ScanTeam {
 public:
  ScanTeam(int size, int64_t m) : size_(size), bounds_(size + 1), done_(size) {
    const int64_t per = (m + size - 1) / size;
    for (int t = 0; t <= size; ++t) bounds_[t] = std::min(m, (per + 7) / 8 * 8 * t);
  }
  int size() const { return size_; }
  int64_t begin(int t) const { return bounds_[t]; }
  int64_t end(int t) const { return bounds_[t + 1]; }

  // Runs scan(t) for every member t (member 0's on the calling thread) and returns when all ran.
  // The scan is handed over as a function pointer and its address: no allocation per scan.
  template <class F>
  void run(F&& scan) {
    if (size_ == 1) return scan(0);
    call_ = [](const void* f, int t) { (*static_cast<const std::remove_reference_t<F>*>(f))(t); };
    scan_ = &scan;
    const uint64_t g = generation_.load(std::memory_order_relaxed) + 1;
    generation_.store(g, std::memory_order_release);
    scan(0);
    for (int t = 1; t < size_; ++t)
      for (int spins = 0; done_[t].value.load(std::memory_order_acquire) != g;) wait(spins);
  }
  void stop() {
    call_ = nullptr;
    generation_.store(generation_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  }
  void serve(int t) {  // the loop of member t > 0, until stop()
    for (uint64_t seen = 0;;) {
      uint64_t g;
      for (int spins = 0; (g = generation_.load(std::memory_order_acquire)) == seen;) wait(spins);
      seen = g;
      if (call_ == nullptr) return;
      call_(scan_, t);
      done_[t].value.store(g, std::memory_order_release);
    }
  }

 private:
  static void wait(int& spins) {  // spin, then give the core away (a member may not have one)
    if (++spins < 4096)
      spin_pause();
    else
      std::this_thread::yield();
  }
  struct alignas(64) Flag {
    std::atomic<uint64_t> value{0};
  };
  int size_;
  std::vector<int64_t> bounds_;
  std::vector<Flag> done_;
  alignas(64) std::atomic<uint64_t> generation_{0};
  void (*call_)(const void*, int) = nullptr;  // the scan of the current generation, and its closure
  const void* scan_ = nullptr;
};

struct alignas(64) Best {  // one member's result of a scan: its two smallest keys and their columns
  LsaTop2 top{kInf, kInf, -1, -1};
};

template <class T>
class Solver {
 public:
  Solver(const T* cost, double sign, int64_t n, int64_t m, double* v, ScanTeam& team, LsaRelaxFn<T> relax,
         LsaTop2Fn<T> top2)
      : c_(cost), sign_(sign), n_(n), m_(m), v_(v), team_(team), relax_(relax), top2_(top2), u_(n), col4row_(n, -1),
        row4col_(m, -1), shortest_(m), path_(m), best_(team.size()) {}

  void solve(bool warm, int64_t* perm) {
    if (!warm) column_reduction();
    greedy_start();
    augmenting_row_reduction();
    for (int64_t row = 0; row < n_; ++row)
      if (col4row_[row] < 0) augment(row);
    std::copy(col4row_.begin(), col4row_.end(), perm);
  }

 private:
  double cost(int64_t i, int64_t j) const { return sign_ * double(c_[i * m_ + j]); }

  void column_reduction() {
    if (n_ < m_) {  // unassigned columns must keep v_j <= 0 to stay optimal
      std::fill(v_, v_ + m_, 0.0);
      return;
    }
    team_.run([&](int t) {
      const int64_t lo = team_.begin(t), hi = team_.end(t);
      std::fill(v_ + lo, v_ + hi, kInf);
      for (int64_t i = 0; i < n_; ++i)
        for (int64_t j = lo; j < hi; ++j) v_[j] = std::min(v_[j], cost(i, j));
    });
  }

  void greedy_start() {
    std::vector<int64_t> cheapest(n_);
    team_.run([&](int t) {  // rows split like the columns: each row's scan is independent here
      const int64_t lo = n_ * t / team_.size(), hi = n_ * (t + 1) / team_.size();
      for (int64_t i = lo; i < hi; ++i) {
        double best = kInf;
        int64_t at = 0;
        for (int64_t j = 0; j < m_; ++j) {
          const double r = cost(i, j) - v_[j];
          if (r < best) best = r, at = j;
        }
        u_[i] = best;
        cheapest[i] = at;
      }
    });
    for (int64_t i = 0; i < n_; ++i)
      if (row4col_[cheapest[i]] < 0) row4col_[cheapest[i]] = i, col4row_[i] = cheapest[i];
  }

  // The two smallest reduced costs C_ij - v_j of row i in (value, index) order, over the team.
  LsaTop2 cheapest_two(int64_t i) {
    team_.run([&](int t) {
      const int64_t lo = team_.begin(t);
      LsaTop2& top = best_[t].top;
      top2_(c_ + i * m_ + lo, sign_, v_ + lo, team_.end(t) - lo, &top);
      top.at = top.at < 0 ? -1 : lo + top.at;
      top.second_at = top.second_at < 0 ? -1 : lo + top.second_at;
    });
    LsaTop2 all = best_[0].top;
    for (int t = 1; t < team_.size(); ++t) {
      lsa_top2_add(&all, best_[t].top.low, best_[t].top.at);
      lsa_top2_add(&all, best_[t].top.second, best_[t].top.second_at);
    }
    return all;
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
        const LsaTop2 two = cheapest_two(i);
        int64_t j1 = two.at, evicted = row4col_[j1];
        const bool gap = two.low < two.second;
        if (gap)
          v_[j1] -= two.second - two.low;
        else if (evicted >= 0)  // a tie: the second column may be free
          j1 = two.second_at, evicted = row4col_[j1];
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
      if (col4row_[i] >= 0) u_[i] = cost(i, col4row_[i]) - v_[col4row_[i]];
  }

  // Dijkstra from free row `start` over columns, by reduced cost C_ij - u_i - v_j >= 0, to the
  // nearest free column; then shift the duals and flip the path. A scanned column leaves the
  // search by v_j = -inf and shortest_j = +inf (its v_j and distance kept aside until the end).
  void augment(int64_t start) {
    team_.run([&](int t) { std::fill(shortest_.begin() + team_.begin(t), shortest_.begin() + team_.end(t), kInf); });
    int64_t sink = -1, i = start;
    double min_val = 0;
    scanned_.clear();
    while (sink < 0) {
      const T* ci = c_ + i * m_;
      const double base = min_val - u_[i];
      team_.run([&](int t) {
        const int64_t lo = team_.begin(t);
        LsaTop2& top = best_[t].top;
        const int64_t at = relax_(ci + lo, sign_, v_ + lo, base, shortest_.data() + lo, path_.data() + lo, int32_t(i),
                                  team_.end(t) - lo, &top.low);
        top.at = at < 0 ? -1 : lo + at;
      });
      int64_t j = -1;
      for (int t = 0; t < team_.size(); ++t) {  // ascending ranges, strict <: the lowest column wins ties
        const LsaTop2& top = best_[t].top;
        if (top.at >= 0 && (j < 0 || top.low < min_val)) min_val = top.low, j = top.at;
      }
      scanned_.push_back({j, i, min_val, v_[j]});
      v_[j] = -kInf;
      shortest_[j] = kInf;
      if (row4col_[j] < 0)
        sink = j;
      else
        i = row4col_[j];
    }
    u_[start] += min_val;
    for (size_t k = 0; k < scanned_.size(); ++k) {
      const Scanned& s = scanned_[k];
      v_[s.column] = s.v - (min_val - s.distance);
      if (k + 1 < scanned_.size()) u_[scanned_[k + 1].row] += min_val - s.distance;  // reached through s.column
    }
    for (int64_t j = sink;;) {
      const int64_t r = path_[j];
      row4col_[j] = r;
      std::swap(col4row_[r], j);
      if (r == start) break;
    }
  }

  struct Scanned {  // one step of a search: the column it took, the row it relaxed, the column's distance and v
    int64_t column, row;
    double distance, v;
  };

  const T* c_;
  double sign_;
  int64_t n_, m_;
  double* v_;
  ScanTeam& team_;
  LsaRelaxFn<T> relax_;
  LsaTop2Fn<T> top2_;
  std::vector<double> u_;
  std::vector<int64_t> col4row_, row4col_;
  std::vector<double> shortest_;
  std::vector<int32_t> path_;  // the row each column was last relaxed from (n < 2^31)
  std::vector<Best> best_;  // one per team member
  std::vector<Scanned> scanned_;
};

template <class T>
void solve_all(const T* cost, double sign, int64_t batch, int64_t n, int64_t m, bool warm, double* v, int64_t* perm,
               int threads, LsaRelaxFn<T> relax, LsaTop2Fn<T> top2) {
  const auto one = [&](int64_t b, ScanTeam& team) {
    Solver<T>(cost + b * n * m, sign, n, m, v + b * m, team, relax, top2).solve(warm, perm + b * n);
  };
  const int team_size = std::min<int64_t>(threads, std::max<int64_t>(1, m / kMinTeamColumns));
  if (batch >= threads || team_size < 2) {  // a matrix per thread
    parallel_tasks(batch, std::min<int64_t>(threads, batch), [&](int64_t b) {
      ScanTeam alone(1, m);
      one(b, alone);
    });
    return;
  }
#ifdef _OPENMP
  std::unique_ptr<ScanTeam> team;
#pragma omp parallel num_threads(team_size)
  {
#pragma omp single
    team = std::make_unique<ScanTeam>(omp_get_num_threads(), m);  // however many OpenMP gives
    if (omp_get_thread_num() == 0) {
      for (int64_t b = 0; b < batch; ++b) one(b, *team);
      team->stop();
    } else {
      team->serve(omp_get_thread_num());
    }
  }
#else
  ScanTeam alone(1, m);
  for (int64_t b = 0; b < batch; ++b) one(b, alone);
#endif
}

}  // namespace

void linear_assignment(const void* cost, bool float32, double sign, int64_t batch, int64_t n, int64_t m, bool warm,
                       double* v, int64_t* perm, int threads) {
  const KernelTable& k = active_kernels();
  if (float32)
    solve_all(static_cast<const float*>(cost), sign, batch, n, m, warm, v, perm, threads, k.lsa_relax32, k.lsa_top2_32);
  else
    solve_all(static_cast<const double*>(cost), sign, batch, n, m, warm, v, perm, threads, k.lsa_relax64, k.lsa_top2_64);
}

}  // namespace fk
