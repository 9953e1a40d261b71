// Batched Gram eigendecompositions and thin SVDs, one matrix per thread (see low_rank.h).
#include "low_rank.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime.h"

namespace fk {
namespace {

// SciPy's cython_blas / cython_lapack signatures (Fortran conventions: every argument by address).
template <class T>
using SyrkFn = void (*)(char*, char*, int*, int*, T*, T*, int*, T*, T*, int*);
template <class T>
using SyevrFn = void (*)(char*, char*, char*, int*, T*, int*, T*, T*, int*, int*, T*, int*, T*, T*, int*, int*, T*,
                         int*, int*, int*, int*);
template <class T>
using SyevdFn = void (*)(char*, char*, int*, T*, int*, T*, T*, int*, int*, int*, int*);
template <class T>
using GesddFn = void (*)(char*, int*, int*, T*, int*, T*, T*, int*, T*, int*, T*, int*, int*, int*);
template <class T>
using PotrfFn = void (*)(char*, int*, T*, int*, int*);

template <class T>
struct Lapack {
  SyrkFn<T> syrk = nullptr;
  SyevrFn<T> syevr = nullptr;
  SyevdFn<T> syevd = nullptr;
  GesddFn<T> gesdd = nullptr;
  PotrfFn<T> potrf = nullptr;
};

using SetThreadsFn = int (*)(int);

std::atomic<bool> ready{false};
Lapack<float> lapack32;
Lapack<double> lapack64;
// OpenBLAS's openblas_set_num_threads_local, when found: sets its thread count (process-wide in its
// pthreads builds) and returns the previous one
SetThreadsFn set_blas_threads = nullptr;

template <class T>
const Lapack<T>& lapack();
template <>
const Lapack<float>& lapack<float>() {
  return lapack32;
}
template <>
const Lapack<double>& lapack<double>() {
  return lapack64;
}

int to_int(int64_t v, const char* what) {
  if (v < 0 || v > std::numeric_limits<int>::max()) throw std::invalid_argument(std::string(what) + " out of range");
  return static_cast<int>(v);
}

// Largest Gram diagonal (squared column norm) for which the Gram is formed without overflow and
// its entries' underflow is below the type's rounding of the largest eigenvalue, and the smallest.
template <class T>
constexpr T gram_diagonal_max() {
  return sizeof(T) == 4 ? T(0x1p100) : T(0x1p900);
}
template <class T>
constexpr T gram_diagonal_min() {
  return sizeof(T) == 4 ? T(0x1p-80) : T(0x1p-900);
}

// One matrix: the Gram's upper triangle by syrk (a row-major [p, q] A is the column-major q×p Aᵀ,
// so AᵀA = Aᵀ·(Aᵀ)ᵀ; stored `transposed`, as a row-major [q, p], it is the column-major p×q A),
// then its top k eigenpairs: syevd when all are wanted (faster), syevr's
// index range otherwise. Column j of LAPACK's q×k eigenvector block is row j of a row-major [k, q].
template <class T>
bool gram_eigh_one(const T* a, bool transposed, int p, int q, int k, T min_ratio, T* lam, T* vecs) {
  const Lapack<T>& f = lapack<T>();
  std::vector<T> g(size_t(q) * q);
  char upper = 'U', trans = transposed ? 'T' : 'N', vectors = 'V';
  int info = 0, lda = transposed ? p : q;
  T one = 1, zero = 0;
  f.syrk(&upper, &trans, &q, &p, &one, const_cast<T*>(a), &lda, &zero, g.data(), &q);
  T diagonal = 0;
  for (int j = 0; j < q; ++j) diagonal = std::max(diagonal, g[size_t(j) * q + j]);
  if (!(diagonal >= gram_diagonal_min<T>() && diagonal <= gram_diagonal_max<T>())) return false;  // NaN too
  if (min_ratio > 0) {
    // λ_max >= the largest diagonal entry, so a Gram − min_ratio·diagonal·I that is not positive
    // definite has λ_min < min_ratio·λ_max: turned down at the cost of a Cholesky, not an eigh.
    std::vector<T> shifted(g);
    for (int j = 0; j < q; ++j) shifted[size_t(j) * q + j] -= min_ratio * diagonal;
    f.potrf(&upper, &q, shifted.data(), &q, &info);
    if (info != 0) return false;
  }
  std::vector<T> w(q);
  if (k == q) {
    int lwork = -1, liwork = -1, iwork_query = 0;
    T work_query = 0;
    f.syevd(&vectors, &upper, &q, g.data(), &q, w.data(), &work_query, &lwork, &iwork_query, &liwork, &info);
    lwork = static_cast<int>(work_query);
    liwork = iwork_query;
    std::vector<T> work(lwork);
    std::vector<int> iwork(liwork);
    f.syevd(&vectors, &upper, &q, g.data(), &q, w.data(), work.data(), &lwork, iwork.data(), &liwork, &info);
    if (info != 0) return false;
    std::memcpy(vecs, g.data(), sizeof(T) * g.size());
  } else {
    char by_index = 'I';
    int first = q - k + 1, last = q, found = 0, lwork = -1, liwork = -1, iwork_query = 0;
    T bound = 0, abstol = 0, work_query = 0;
    std::vector<int> support(2 * size_t(std::max(k, 1)));
    f.syevr(&vectors, &by_index, &upper, &q, g.data(), &q, &bound, &bound, &first, &last, &abstol, &found, w.data(),
            vecs, &q, support.data(), &work_query, &lwork, &iwork_query, &liwork, &info);
    lwork = static_cast<int>(work_query);
    liwork = iwork_query;
    std::vector<T> work(lwork);
    std::vector<int> iwork(liwork);
    f.syevr(&vectors, &by_index, &upper, &q, g.data(), &q, &bound, &bound, &first, &last, &abstol, &found, w.data(),
            vecs, &q, support.data(), work.data(), &lwork, iwork.data(), &liwork, &info);
    if (info != 0 || found != k) return false;
  }
  std::copy(w.begin(), w.begin() + k, lam);
  return true;
}

// One matrix: a row-major [m, n] A is the column-major n×m Aᵀ = V·S·Uᵀ; gesdd's "U" of Aᵀ
// (column-major n×r) is A's Vh as a row-major [r, n], its "Vᵀ" (column-major r×m) A's U as a
// row-major [m, r]. gesdd overwrites its input, so it works on a copy.
template <class T>
bool thin_svd_one(const T* a, int m, int n, T* u, T* s, T* vh) {
  const Lapack<T>& f = lapack<T>();
  int ldvt = std::max(1, std::min(m, n)), info = 0, lwork = -1;
  std::vector<T> x(a, a + size_t(m) * n);
  std::vector<int> iwork(8 * size_t(ldvt));
  char thin = 'S';
  T work_query = 0;
  f.gesdd(&thin, &n, &m, x.data(), &n, s, vh, &n, u, &ldvt, &work_query, &lwork, iwork.data(), &info);
  lwork = static_cast<int>(work_query);
  std::vector<T> work(lwork);
  f.gesdd(&thin, &n, &m, x.data(), &n, s, vh, &n, u, &ldvt, work.data(), &lwork, iwork.data(), &info);
  return info == 0;
}

// Holds OpenBLAS to one thread of its own while alive: its pool inside our threads would
// oversubscribe the cores (and it warns). Its setting is process-wide in its pthreads builds, so
// overlapping batches (from several Python threads) share one hold: the last to leave restores.
class OneBlasThread {
 public:
  OneBlasThread() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (users_++ == 0) saved_ = set_blas_threads(1);
  }
  ~OneBlasThread() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (--users_ == 0) set_blas_threads(saved_);
  }

 private:
  static inline std::mutex mutex_;
  static inline int users_ = 0, saved_ = 0;
};

// Runs one(i) -> ok over the batch, a matrix per thread on up to `threads` threads with OpenBLAS
// held to one thread; without its setter, on the calling thread with LAPACK's own threading. A
// failed matrix's outputs are filled with NaN by fill(i). Returns the number of failures.
template <class One, class Fill>
int64_t over_batch(int64_t batch, int threads, One&& one, Fill&& fill) {
  if (!ready.load()) throw std::runtime_error("low-rank LAPACK routines were not handed over (set_lapack)");
  std::atomic<int64_t> failed{0};
  const int team = set_blas_threads == nullptr ? 1 : static_cast<int>(std::min<int64_t>(threads, batch));
  std::optional<OneBlasThread> hold;
  if (team > 1) hold.emplace();
  parallel_tasks(batch, team, [&](int64_t i) {
    if (!one(i)) {
      fill(i);
      failed.fetch_add(1);
    }
  });
  return failed.load();
}

template <class T>
int64_t gram_eigh_typed(const T* a, bool transposed, int64_t batch, int p, int q, int k, T min_ratio, T* lam,
                        T* vecs, int threads) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  return over_batch(
      batch, threads,
      [&](int64_t i) { return gram_eigh_one(a + i * int64_t(p) * q, transposed, p, q, k, min_ratio, lam + i * k, vecs + i * int64_t(k) * q); },
      [&](int64_t i) {
        std::fill(lam + i * k, lam + (i + 1) * k, nan);
        std::fill(vecs + i * int64_t(k) * q, vecs + (i + 1) * int64_t(k) * q, nan);
      });
}

template <class T>
int64_t thin_svd_typed(const T* a, int64_t batch, int m, int n, T* u, T* s, T* vh, int threads) {
  const int64_t r = std::min(m, n);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  return over_batch(
      batch, threads,
      [&](int64_t i) { return thin_svd_one(a + i * int64_t(m) * n, m, n, u + i * m * r, s + i * r, vh + i * r * n); },
      [&](int64_t i) {
        std::fill(u + i * m * r, u + (i + 1) * m * r, nan);
        std::fill(s + i * r, s + (i + 1) * r, nan);
        std::fill(vh + i * r * n, vh + (i + 1) * r * n, nan);
      });
}

}  // namespace

void set_lapack(const void* const fns[10], const void* set_threads_local) {
  for (int i = 0; i < 10; ++i)
    if (fns[i] == nullptr) throw std::invalid_argument("set_lapack: a null routine");
  set_blas_threads = reinterpret_cast<SetThreadsFn>(const_cast<void*>(set_threads_local));
  lapack32.syrk = reinterpret_cast<SyrkFn<float>>(const_cast<void*>(fns[0]));
  lapack64.syrk = reinterpret_cast<SyrkFn<double>>(const_cast<void*>(fns[1]));
  lapack32.syevr = reinterpret_cast<SyevrFn<float>>(const_cast<void*>(fns[2]));
  lapack64.syevr = reinterpret_cast<SyevrFn<double>>(const_cast<void*>(fns[3]));
  lapack32.syevd = reinterpret_cast<SyevdFn<float>>(const_cast<void*>(fns[4]));
  lapack64.syevd = reinterpret_cast<SyevdFn<double>>(const_cast<void*>(fns[5]));
  lapack32.gesdd = reinterpret_cast<GesddFn<float>>(const_cast<void*>(fns[6]));
  lapack64.gesdd = reinterpret_cast<GesddFn<double>>(const_cast<void*>(fns[7]));
  lapack32.potrf = reinterpret_cast<PotrfFn<float>>(const_cast<void*>(fns[8]));
  lapack64.potrf = reinterpret_cast<PotrfFn<double>>(const_cast<void*>(fns[9]));
  ready.store(true);
}

bool lapack_ready() { return ready.load(); }

int64_t gram_eigh(const void* a, bool transposed, bool f64, int64_t batch, int64_t p, int64_t q, int64_t k,
                  double min_ratio, void* lam, void* vecs, int threads) {
  const int pi = to_int(p, "p"), qi = to_int(q, "q"), ki = to_int(k, "k");
  if (ki < 1 || ki > qi || batch < 0) throw std::invalid_argument("gram_eigh: need 1 <= k <= q and batch >= 0");
  if (f64)
    return gram_eigh_typed(static_cast<const double*>(a), transposed, batch, pi, qi, ki, min_ratio,
                           static_cast<double*>(lam),
                           static_cast<double*>(vecs), threads);
  return gram_eigh_typed(static_cast<const float*>(a), transposed, batch, pi, qi, ki, static_cast<float>(min_ratio),
                         static_cast<float*>(lam),
                         static_cast<float*>(vecs), threads);
}

int64_t thin_svd(const void* a, bool f64, int64_t batch, int64_t m, int64_t n, void* u, void* s, void* vh,
                 int threads) {
  const int mi = to_int(m, "m"), ni = to_int(n, "n");
  if (mi < 1 || ni < 1 || batch < 0) throw std::invalid_argument("thin_svd: need m, n >= 1 and batch >= 0");
  if (f64)
    return thin_svd_typed(static_cast<const double*>(a), batch, mi, ni, static_cast<double*>(u),
                          static_cast<double*>(s), static_cast<double*>(vh), threads);
  return thin_svd_typed(static_cast<const float*>(a), batch, mi, ni, static_cast<float*>(u), static_cast<float*>(s),
                        static_cast<float*>(vh), threads);
}

}  // namespace fk
