// CPU kernels for the shapes MindSpore's own CPU kernels handle slowly: matmuls with few
// rows (decode), and the routed experts, which read only the experts each token chose,
// in place, with no padded rows. Called from compiled graphs as MindSpore AOT custom ops
// (deepseek_ms/kernels/cpu.py builds this file with the host compiler for the host CPU:
// the dot products use AVX-512 where it is available, else AVX2, else plain C++).
//
// Weights are [out, in] row-major, as in the checkpoint, so every output is a dot product
// of two contiguous rows. A work item is a block of weight rows: it comes from memory once
// per call and then streams from L2 while each group of activation rows, held in L1, walks
// it. The weights of `linear` and of the routed experts may be bfloat16 (a BF16 checkpoint's
// own values): they are widened to float32 in registers, exactly, and decode reads half the
// bytes. Where the CPU has AMX, products with bfloat16 weights and 8 or more rows run on its
// tile unit instead, at float32 accuracy (see "split rows" below), for any number of rows.
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// A small thread pool whose idle workers sleep instead of spinning. The kernels share a
// few cores with MindSpore's own thread pool, which runs the ops in between; spinning
// workers (OpenMP's default) starved those ops and made decode 2x slower. Work items are
// claimed from a shared counter and the caller claims too, so a worker that the OS has
// not scheduled yet costs nothing: the caller waits only for items already started.
// A forked child inherits the pool but not its threads, so it gets a pool of its own.
class Pool {
 public:
  static Pool &get() {
    // never destroyed: MindSpore threads may still call kernels while the process exits.
    // A parent's pool is left alone in a child: its mutexes may have been held at the fork.
    static std::atomic<Pool *> pool{nullptr};
    static std::mutex create_mu;
    Pool *p = pool.load(std::memory_order_acquire);
    if (p == nullptr || p->pid_ != getpid()) {
      std::lock_guard<std::mutex> lk(create_mu);
      p = pool.load(std::memory_order_acquire);
      if (p == nullptr || p->pid_ != getpid()) {
        p = new Pool();
        pool.store(p, std::memory_order_release);
      }
    }
    return *p;
  }
  // Calls f(i) for i in [0, n), spread over the calling thread and the workers.
  void run(int64_t n, const std::function<void(int64_t)> &f) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (n <= 1 || workers_ == 0 || !busy.owns_lock()) {  // a concurrent caller runs alone
      for (int64_t i = 0; i < n; ++i) f(i);
      return;
    }
    auto job = std::make_shared<Job>(f, n);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = job;
      ++generation_;
    }
    wake_.notify_all();
    job->work();
    while (job->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  }

 private:
  struct Job {
    Job(const std::function<void(int64_t)> &f, int64_t n) : f(f), n(n) {}
    void work() {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
        f(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
    const std::function<void(int64_t)> &f;  // only called for claimed items, while run() waits
    const int64_t n;
    std::atomic<int64_t> next{0}, done{0};
  };

  Pool() : pid_(getpid()) {
    cpu_set_t set;
    int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    for (workers_ = 0; workers_ < cpus - 1; ++workers_) std::thread([this] { loop(); }).detach();
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        wake_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      job->work();
    }
  }
  const pid_t pid_;
  int workers_ = 0;
  std::mutex run_mu_, mu_;
  std::condition_variable wake_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
};

inline void parallel_for(int64_t n, const std::function<void(int64_t)> &f) { Pool::get().run(n, f); }

// f(i0, i1) over [0, n) in pieces of `step`, spread over the pool.
inline void parallel_ranges(int64_t n, int64_t step, const std::function<void(int64_t, int64_t)> &f) {
  parallel_for((n + step - 1) / step, [&](int64_t i) { f(i * step, std::min(i * step + step, n)); });
}

// activation rows x weight rows per micro-kernel call: with AVX-512, 8x3 accumulators + 3
// weight vectors + 1 activation vector = 28 of the 32 zmm registers; with AVX2, 4x3 + 3 + 1 =
// the 16 ymm. More rows per weight vector loaded halves the weight traffic from L2.
#ifdef __AVX512F__
constexpr int kRows = 8;
#else
constexpr int kRows = 4;
#endif
constexpr int kCols = 3;
constexpr int kBlock = 48;  // weight rows per parallel work item (a multiple of kCols)
constexpr int64_t kChunk = 1 << 16;  // elements per work item of elementwise kernels
constexpr int kHeadGroup = kRows;  // attention heads per work item in absorbed decode: one
constexpr int kKeys = 3;           // walk of the cached latents serves kRows heads, kKeys at a time

using bf16 = uint16_t;  // a bfloat16: the high 16 bits of a float32

inline float to_f32(float v) { return v; }
inline float to_f32(bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#ifdef __AVX2__
inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16 *p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// Keeps v in a register: without it GCC folds the weight loads into the FMAs and reloads
// each weight vector once per activation row, which makes the loop load-bound (1.6x slower).
#define DSMS_PIN(v) __asm__("" : "+v"(v))

// exp for 8 lanes: x = n ln2 + r, a degree-6 polynomial for e^r (Cephes' coefficients),
// times 2^n; about 1 ulp on the softmax's range, several times faster than std::exp.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447504f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// The vector of the matrix products (dots, widen): 16 floats with AVX-512, else 8.
#ifdef __AVX512F__
using Vec = __m512;
constexpr int64_t kLanes = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float *p) { return _mm512_loadu_ps(p); }
inline Vec vload(const bf16 *p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void vstore(float *p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec vbroadcast(const float *p) { return _mm512_set1_ps(*p); }
#else
using Vec = __m256;
constexpr int64_t kLanes = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
template <typename W>
inline Vec vload(const W *p) { return load8(p); }
inline void vstore(float *p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return hsum(v); }
inline Vec vbroadcast(const float *p) { return _mm256_broadcast_ss(p); }
#endif
#endif

// out[r * C + c] = dot(a[r], b[c]) over K, for R activation rows and C weight rows. With
// `next`, also prefetches the C rows of K weights from there: each weight row is a page or
// so, and the hardware prefetcher, which stops at page boundaries, restarts cold on each.
template <int R, int C, typename W>
inline void dots(const float *const *a, const W *const *b, int64_t K, float *out, const W *next = nullptr) {
  int64_t k = 0;
#ifdef __AVX2__
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vzero();
  for (; k + kLanes <= K; k += kLanes) {
    if (next && k % kLine == 0)
      for (int c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char *>(next + c * K + k), _MM_HINT_T0);
    Vec bv[C];
    for (int c = 0; c < C; ++c) {
      bv[c] = vload(b[c] + k);
      DSMS_PIN(bv[c]);
    }
    for (int r = 0; r < R; ++r) {
      Vec av = vload(a[r] + k);
      DSMS_PIN(av);
      for (int c = 0; c < C; ++c) acc[r][c] = vfma(av, bv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * C + c] = vsum(acc[r][c]);
#else
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * C + c] = 0.0f;
#endif
  for (; k < K; ++k)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) out[r * C + c] += a[r][k] * to_f32(b[c][k]);
}

// R activation rows (x, y given as row pointers; y written at column n) against weight
// rows [n0, n1), kCols at a time, then the one or two weight rows left over.
// With `prefetch` (the first rows to walk the block, which bring it from memory), each
// group of weight rows prefetches the next.
template <int R, typename W>
void tile_row(const float *const *x, const W *w, int64_t K, int64_t n0, int64_t n1, float *const *y,
              bool prefetch) {
  float out[R * kCols];
  const W *b[kCols];
  int64_t n = n0;
  for (; n + kCols <= n1; n += kCols) {
    for (int c = 0; c < kCols; ++c) b[c] = w + (n + c) * K;
    dots<R, kCols>(x, b, K, out, prefetch && n + 2 * kCols <= n1 ? w + (n + kCols) * K : nullptr);
    for (int r = 0; r < R; ++r) std::memcpy(y[r] + n, out + r * kCols, sizeof(float) * kCols);
  }
  const int64_t left = n1 - n;
  for (int c = 0; c < left; ++c) b[c] = w + (n + c) * K;
  if (left == 2) dots<R, 2>(x, b, K, out);
  else if (left == 1) dots<R, 1>(x, b, K, out);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < left; ++c) y[r][n + c] = out[r * left + c];
}

#ifdef __AVX512F__
// Many activation rows (prefill through the routed experts): the dot products above load an
// activation vector per weight vector, which caps them near 60% of the FMA rate. From
// kPanelRows rows on, a block of weight rows is instead widened and transposed once into a
// panel [K][16 NV] in L2, and each activation value is broadcast against NV panel vectors
// (R x NV accumulators, no horizontal sums): about 1.4x faster at 256 rows. The two forms
// add the K products in different orders, so an expert's rounding depends on how many
// rows it had in the call, as a Linear's already does on MatMul vs `linear`.
constexpr int64_t kPanelRows = 48;

// 16 vectors (rows) -> their transpose: r[j] becomes column j.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane L: pairs of rows at columns 4L .. 4L+3
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  __m512 u[16];  // u[4g + c], lane L: rows 4g .. 4g+3 at column 4L + c
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 1]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; ++c) {  // a 4x4 transpose of 128-bit lanes across u[c], u[4+c], u[8+c], u[12+c]
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

// panel[k * 16 NV + j] = w[n0 + j][k] as float32 for j < n1 - n0, zero up to 16 NV.
template <typename W>
void pack_panel(const W *w, int64_t K, int64_t n0, int64_t n1, int NV, float *panel) {
  const int64_t P = 16 * NV;
  for (int g = 0; g < NV; ++g) {
    const int64_t rows = std::min<int64_t>(16, n1 - n0 - 16 * g);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = j < rows ? vload(w + (n0 + 16 * g + j) * K + k) : vzero();
      transpose16(r);
      for (int j = 0; j < 16; ++j) vstore(panel + (k + j) * P + 16 * g, r[j]);
    }
    for (; k < K; ++k)
      for (int j = 0; j < 16; ++j) panel[k * P + 16 * g + j] = j < rows ? to_f32(w[(n0 + 16 * g + j) * K + k]) : 0.0f;
  }
}

// y[r][n0 .. n0 + width) for R rows from a panel of NV vectors (width <= 16 NV).
template <int R, int NV>
inline void panel_tile(const float *const *x, const float *panel, int64_t K, int64_t n0, int64_t width,
                       float *const *y) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = vload(panel + k * 16 * NV + 16 * v);
      DSMS_PIN(bv[v]);
    }
    for (int r = 0; r < R; ++r) {
      const Vec a = vbroadcast(x[r] + k);
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(a, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      const int64_t left = width - 16 * v;
      if (left >= 16) vstore(y[r] + n0 + 16 * v, acc[r][v]);
      else if (left > 0) _mm512_mask_storeu_ps(y[r] + n0 + 16 * v, static_cast<__mmask16>((1u << left) - 1), acc[r][v]);
    }
}

template <int NV>
void rows_times_panel(const float *const *x, int64_t M, const float *panel, int64_t K, int64_t n0, int64_t width,
                      float *const *y) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) panel_tile<kRows, NV>(x + m, panel, K, n0, width, y + m);
  switch (M - m) {
    case 7: panel_tile<7, NV>(x + m, panel, K, n0, width, y + m); break;
    case 6: panel_tile<6, NV>(x + m, panel, K, n0, width, y + m); break;
    case 5: panel_tile<5, NV>(x + m, panel, K, n0, width, y + m); break;
    case 4: panel_tile<4, NV>(x + m, panel, K, n0, width, y + m); break;
    case 3: panel_tile<3, NV>(x + m, panel, K, n0, width, y + m); break;
    case 2: panel_tile<2, NV>(x + m, panel, K, n0, width, y + m); break;
    case 1: panel_tile<1, NV>(x + m, panel, K, n0, width, y + m); break;
    default: break;
  }
}

// rows_times_weight through panels of up to kCols vectors (48 weight rows)
template <typename W>
void rows_times_weight_panels(const float *const *x, int64_t M, const W *w, int64_t K, int64_t n0, int64_t n1,
                              float *const *y) {
  constexpr int64_t kWidth = 16 * kCols;
  thread_local std::vector<float> panel_buf;
  panel_buf.resize(K * kWidth);
  float *const panel = panel_buf.data();  // see dsms_mla_decode on thread_local inside loops
  for (int64_t n = n0; n < n1; n += kWidth) {
    const int64_t width = std::min(kWidth, n1 - n);
    const int NV = static_cast<int>((width + 15) / 16);
    pack_panel(w, K, n, n + width, NV, panel);
    if (NV == 3) rows_times_panel<3>(x, M, panel, K, n, width, y);
    else if (NV == 2) rows_times_panel<2>(x, M, panel, K, n, width, y);
    else rows_times_panel<1>(x, M, panel, K, n, width, y);
  }
}
#endif

// y[m][n] = dot(x[m], w[n]) for n in [n0, n1): x and y given as row pointers (y rows are
// written at column n). Activation rows go kRows at a time over the whole weight block, so
// the block streams from L2 while the rows stay in L1, then a tail of fewer rows.
template <typename W>
void rows_times_weight(const float *const *x, int64_t M, const W *w, int64_t K, int64_t n0, int64_t n1,
                       float *const *y) {
#ifdef __AVX512F__
  if (M >= kPanelRows) {
    rows_times_weight_panels(x, M, w, K, n0, n1, y);
    return;
  }
#endif
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) tile_row<kRows>(x + m, w, K, n0, n1, y + m, m == 0);
  switch (M - m) {
    case 7: tile_row<7>(x + m, w, K, n0, n1, y + m, m == 0); break;
    case 6: tile_row<6>(x + m, w, K, n0, n1, y + m, m == 0); break;
    case 5: tile_row<5>(x + m, w, K, n0, n1, y + m, m == 0); break;
    case 4: tile_row<4>(x + m, w, K, n0, n1, y + m, m == 0); break;
    case 3: tile_row<3>(x + m, w, K, n0, n1, y + m, m == 0); break;
    case 2: tile_row<2>(x + m, w, K, n0, n1, y + m, m == 0); break;
    case 1: tile_row<1>(x + m, w, K, n0, n1, y + m, m == 0); break;
    default: break;
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define DSMS_AMX 1
// AMX (Sapphire Rapids on): a tile unit that multiplies bfloat16 into float32 at about 20x
// the FMA rate of AVX-512. A bfloat16 weight enters it exactly. A float32 activation is split
// into three bfloat16 parts, hi + mid + lo == x exactly (8 significant bits each, 24 in all),
// so each product w * x is exact and the sums are float32's: float32 accuracy at a third of
// the tile unit's rate, several times the FMA rate. Weight tiles load straight from the
// checkpoint's [out, in] rows; the activations are split and laid out for the tile unit once
// per call ("split rows").
constexpr int64_t kAmxK = 32;     // bfloat16 values per tile row: 64 bytes
constexpr int64_t kAmxTile = 16;  // rows per tile
constexpr int64_t kAmxTileValues = kAmxTile * kAmxK;  // bfloat16 values per tile of split rows: 1 KB
constexpr int64_t kAmxChunk = 8;  // activation tiles (128 rows) walked per weight-block pass: L2-resident
constexpr int64_t kAmxPrefetch = 4;  // chunks of 32 columns ahead: about a DRAM latency of tile work

// Whether this process may use the tile registers (Linux grants them on request, once).
bool amx_granted() {
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return granted;
}

constexpr int64_t kAmxMinRows = 8;  // fewer rows are memory-bound, and faster on the FMAs (dots)

// Whether a product of M rows over K columns with bfloat16 weights runs on the tile unit.
bool amx_applies(int64_t M, int64_t K) { return M >= kAmxMinRows && K % kAmxK == 0 && amx_granted(); }

// bfloat16 values per split tile of 16 rows: K / 32 chunks x 3 parts x [16 k-pairs][16 rows][2]
inline int64_t split_tile_size(int64_t K) { return 3 * kAmxTile * K; }

// Splits `rows` (<= 16) activation rows into one split tile at dst (missing rows are zero).
// Each chunk of 32 columns and each part is the tile unit's B operand: row i holds, for each
// activation row m, the pair of columns (2i, 2i + 1), a 16 x 16 transpose of 32-bit pairs.
void split_tile(const float *const *x, int64_t rows, int64_t K, bf16 *dst) {
  for (int64_t c = 0; c < K / kAmxK; ++c) {
    __m512 part[3][16];
    for (int m = 0; m < 16; ++m) {
      if (m >= rows) {
        for (int p = 0; p < 3; ++p) part[p][m] = _mm512_setzero_ps();
        continue;
      }
      __m512 a = _mm512_loadu_ps(x[m] + c * kAmxK), b = _mm512_loadu_ps(x[m] + c * kAmxK + 16);
      for (int p = 0; p < 3; ++p) {
        const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // columns 0..31, rounded
        part[p][m] = _mm512_castsi512_ps(h);
        const __m512 ha = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
        const __m512 hb =
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
        a = _mm512_sub_ps(a, ha);  // exact: the bits below the part just taken
        b = _mm512_sub_ps(b, hb);
      }
    }
    for (int p = 0; p < 3; ++p) {
      transpose16(part[p]);
      for (int i = 0; i < 16; ++i)
        _mm512_storeu_ps(reinterpret_cast<float *>(dst + (c * 3 + p) * kAmxTileValues + i * kAmxK), part[p][i]);
    }
  }
}

// Splits M rows into ceil(M / 16) consecutive split tiles at dst, over the pool.
void split_rows(const float *const *x, int64_t M, int64_t K, bf16 *dst) {
  parallel_for((M + kAmxTile - 1) / kAmxTile, [&](int64_t t) {
    split_tile(x + t * kAmxTile, std::min(kAmxTile, M - t * kAmxTile), K, dst + t * split_tile_size(K));
  });
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes: accumulators 0-3 (fp32 [16 weight rows][16 activation
// rows]), weights 4-5, split activations 6-7. Loaded per amx_rows_times_weight call and
// released after it, since the calling threads are MindSpore's as well as the pool's.
inline void amx_begin() {
  static const TileConfig config = [] {
    TileConfig c;
    for (int i = 0; i < 8; ++i) {
      c.rows[i] = kAmxTile;
      c.colsb[i] = 64;
    }
    return c;
  }();
  _tile_loadconfig(&config);
}

// NB blocks of 16 weight rows (w, then w + 16 K) x MT split tiles (xs[0], xs[1]) into
// out[b + NB t] (each [16 weight rows][16 activation rows]).
template <int NB, int MT>
inline void amx_kernel(const bf16 *w, int64_t K, const bf16 *const *xs, float (*out)[256]) {
  _tile_zero(0);
  if (NB > 1) _tile_zero(1);
  if (MT > 1) _tile_zero(2);
  if (NB > 1 && MT > 1) _tile_zero(3);
  const int64_t stride = K * static_cast<int64_t>(sizeof(bf16));
  for (int64_t c = 0; c < K / kAmxK; ++c) {
    if (c + kAmxPrefetch < K / kAmxK)  // each weight row is its own stream: the hardware prefetcher lags
      for (int r = 0; r < NB * kAmxTile; ++r)
        _mm_prefetch(reinterpret_cast<const char *>(w + r * K + (c + kAmxPrefetch) * kAmxK), _MM_HINT_T0);
    _tile_loadd(4, w + c * kAmxK, stride);
    if (NB > 1) _tile_loadd(5, w + kAmxTile * K + c * kAmxK, stride);
    for (int p = 0; p < 3; ++p) {
      _tile_loadd(6, xs[0] + (c * 3 + p) * kAmxTileValues, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (NB > 1) _tile_dpbf16ps(1, 5, 6);
      if (MT > 1) {
        _tile_loadd(7, xs[1] + (c * 3 + p) * kAmxTileValues, 64);
        _tile_dpbf16ps(2, 4, 7);
        if (NB > 1) _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, out[0], 64);
  if (NB > 1) _tile_stored(1, out[1], 64);
  if (MT > 1) _tile_stored(2, out[NB], 64);
  if (NB > 1 && MT > 1) _tile_stored(3, out[NB + 1], 64);
}

// y[m][n .. n + width) from an accumulator [16 weight rows][16 activation rows], for its
// first `rows` activation rows.
inline void amx_scatter(const float *acc, int64_t rows, int64_t n, int64_t width, float *const *y) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(acc + 16 * i);
  transpose16(r);
  const __mmask16 mask = static_cast<__mmask16>(width >= 16 ? 0xFFFF : (1u << width) - 1);
  for (int64_t m = 0; m < rows; ++m) _mm512_mask_storeu_ps(y[m] + n, mask, r[m]);
}

// rows_times_weight for bfloat16 weights on the tile unit: the M rows' split tiles `split`,
// y[m][n] for n in [n0, n1). K is a multiple of 32.
void amx_rows_times_weight(const bf16 *split, int64_t M, const bf16 *w, int64_t K, int64_t n0, int64_t n1,
                           float *const *y) {
  amx_begin();
  const int64_t T = (M + kAmxTile - 1) / kAmxTile, tile_size = split_tile_size(K);
  thread_local std::vector<bf16> pad;  // a last block of fewer than 16 weight rows, zero-filled
  alignas(64) float out[4][256];
  for (int64_t t0 = 0; t0 < T; t0 += kAmxChunk) {
    const int64_t t1 = std::min(T, t0 + kAmxChunk);
    for (int64_t n = n0; n < n1;) {
      const int64_t left = n1 - n;
      const int NB = left >= 2 * kAmxTile ? 2 : 1;
      const int64_t width = std::min(left, NB * kAmxTile);
      const bf16 *wb = w + n * K;
      if (width < kAmxTile) {  // the tile would read past the tensor
        pad.assign(kAmxTile * K, 0);
        std::memcpy(pad.data(), wb, sizeof(bf16) * width * K);
        wb = pad.data();
      }
      for (int64_t t = t0; t < t1; t += 2) {
        const bf16 *xs[2] = {split + t * tile_size, split + (t + 1) * tile_size};
        const int MT = t + 1 < t1 ? 2 : 1;
        if (NB == 2 && MT == 2) amx_kernel<2, 2>(wb, K, xs, out);
        else if (NB == 2) amx_kernel<2, 1>(wb, K, xs, out);
        else if (MT == 2) amx_kernel<1, 2>(wb, K, xs, out);
        else amx_kernel<1, 1>(wb, K, xs, out);
        for (int mt = 0; mt < MT; ++mt) {
          const int64_t rows = std::min(kAmxTile, M - (t + mt) * kAmxTile);
          for (int b = 0; b < NB; ++b)
            amx_scatter(out[b + NB * mt], rows, n + b * kAmxTile, std::min(kAmxTile, width - b * kAmxTile),
                        y + (t + mt) * kAmxTile);
        }
      }
      n += width;
    }
  }
  _tile_release();
}
#endif

// A product's activation rows: row pointers and, when it runs on the tile unit, their split
// tiles, made once per kernel call (make_rows) and read by all its work items.
struct Rows {
  const float *const *x;
  int64_t M;
  const bf16 *split;
  // rows [m0, m0 + m) of these, m0 a multiple of 16 (a split tile's first row); K: their columns
  Rows part(int64_t m0, int64_t m, int64_t K) const {
#ifdef DSMS_AMX
    return {x + m0, m, split ? split + m0 / kAmxTile * split_tile_size(K) : nullptr};
#else
    (void)K;
    return {x + m0, m, split};
#endif
  }
};

// Rows x [M] for products with K-column weights (`any_bf16`: bfloat16 ones among them),
// split into `buf` when the tile unit applies.
Rows make_rows(const float *const *x, int64_t M, int64_t K, bool any_bf16, std::vector<bf16> &buf) {
#ifdef DSMS_AMX
  if (any_bf16 && amx_applies(M, K)) {
    buf.resize((M + kAmxTile - 1) / kAmxTile * split_tile_size(K));
    split_rows(x, M, K, buf.data());
    return {x, M, buf.data()};
  }
#endif
  return {x, M, nullptr};
}

// Weight rows per work item: on the tile unit, two pairs of 16-row tiles.
inline int64_t block_rows(const Rows &x) {
#ifdef DSMS_AMX
  if (x.split) return 4 * kAmxTile;
#endif
  return kBlock;
}

// A float32 or bfloat16 weight tensor of a kernel's inputs.
struct AnyWeight {
  const void *data;
  bool is_bf16;
  static bool parse(const char *dtype, bool *is_bf16) {
    *is_bf16 = std::strcmp(dtype, "bfloat16") == 0;
    return *is_bf16 || std::strcmp(dtype, "float32") == 0;
  }
  // rows_times_weight on the matrix that starts `offset` elements in
  void times(const Rows &x, int64_t offset, int64_t K, int64_t n0, int64_t n1, float *const *y) const {
#ifdef DSMS_AMX
    if (is_bf16 && x.split) {
      amx_rows_times_weight(x.split, x.M, static_cast<const bf16 *>(data) + offset, K, n0, n1, y);
      return;
    }
#endif
    if (is_bf16) rows_times_weight(x.x, x.M, static_cast<const bf16 *>(data) + offset, K, n0, n1, y);
    else rows_times_weight(x.x, x.M, static_cast<const float *>(data) + offset, K, n0, n1, y);
  }
};

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// h[i] = silu(h[i]) * u[i] for n values (exp8 for 8 at a time: about 1 ulp)
inline void silu_times(float *h, const float *u, int64_t n) {
  int64_t i = 0;
#ifdef __AVX2__
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(h + i);
    const __m256 sig = _mm256_div_ps(v, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
    _mm256_storeu_ps(h + i, _mm256_mul_ps(sig, _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) h[i] = silu(h[i]) * u[i];
}

// h[r][n0, n1) = silu(x[r] . gate[n]) * (x[r] . up[n]) for M activation rows: a block of a
// SwiGLU's intermediate features (u: scratch rows for the up projection).
inline void swiglu_block(const AnyWeight &gate, const AnyWeight &up, const Rows &x, int64_t offset, int64_t K,
                         int64_t n0, int64_t n1, float *const *h, float *const *u) {
  gate.times(x, offset, K, n0, n1, h);
  up.times(x, offset, K, n0, n1, u);
  for (int64_t r = 0; r < x.M; ++r) silu_times(h[r] + n0, u[r] + n0, n1 - n0);
}

int64_t numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

}  // namespace

// For tests: the float lanes of the dot products this build uses (16 AVX-512, 8 AVX2, 1).
extern "C" int dsms_vector_width() {
#ifdef __AVX2__
  return static_cast<int>(kLanes);
#else
  return 1;
#endif
}

// For tests and the model: 1 when bfloat16-weight products run on the tile unit (AMX).
extern "C" int dsms_matrix_unit() {
#ifdef DSMS_AMX
  return amx_granted() ? 1 : 0;
#else
  return 0;
#endif
}

// For tests of the pool: runs n work items of 20 ms each and returns how many distinct
// threads ran them (the caller plus every worker, when all take part).
extern "C" int dsms_pool_threads_used(int n) {
  std::mutex mu;
  std::vector<std::thread::id> ids;
  parallel_for(n, [&](int64_t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::lock_guard<std::mutex> lk(mu);
    ids.push_back(std::this_thread::get_id());
  });
  std::sort(ids.begin(), ids.end());
  return static_cast<int>(std::unique(ids.begin(), ids.end()) - ids.begin());
}

// y [M,N] = x [M,K] @ w [N,K]^T; x and y float32, w float32 or bfloat16.
extern "C" int dsms_linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != 3) return 1;
  const float *x = static_cast<const float *>(params[0]);
  AnyWeight w{params[1], false};
  if (!AnyWeight::parse(dtypes[1], &w.is_bf16)) return 2;
  float *y = static_cast<float *>(params[2]);
  const int64_t K = shapes[0][ndims[0] - 1];
  const int64_t M = numel(ndims[0], shapes[0]) / K;
  const int64_t N = shapes[1][0];
  std::vector<const float *> xr(M);
  std::vector<float *> yr(M);
  for (int64_t m = 0; m < M; ++m) {
    xr[m] = x + m * K;
    yr[m] = y + m * N;
  }
  thread_local std::vector<bf16> split;  // the calling thread's, shared with the workers
  const Rows rows = make_rows(xr.data(), M, K, w.is_bf16, split);
  if (!rows.split) {
    parallel_ranges(N, kBlock, [&](int64_t n0, int64_t n1) { w.times(rows, 0, K, n0, n1, yr.data()); });
    return 0;
  }
#ifdef DSMS_AMX
  // on the tile unit, many rows (prefill) go in chunks that stay in L2 while the weights
  // stream past: work items are (chunk, block of weight rows), chunk-major
  const int64_t chunk = kAmxChunk * kAmxTile, chunks = (M + chunk - 1) / chunk, block = block_rows(rows);
  const int64_t blocks = (N + block - 1) / block;
  parallel_for(chunks * blocks, [&](int64_t item) {
    const int64_t m0 = item / blocks * chunk, n0 = item % blocks * block;
    w.times(rows.part(m0, std::min(chunk, M - m0), K), 0, K, n0, std::min(n0 + block, N), yr.data() + m0);
  });
#endif
  return 0;
}

// h [M,I] = silu(x Wg^T) * (x Wu^T) for x [M,K] and gate/up weights [I,K] (float32 or
// bfloat16): a SwiGLU MLP's first half in one call for few rows (decode), where the two
// projections and the activation would otherwise be four graph ops.
extern "C" int dsms_swiglu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  AnyWeight gate{params[1], false}, up{params[2], false};
  if (!AnyWeight::parse(dtypes[1], &gate.is_bf16) || !AnyWeight::parse(dtypes[2], &up.is_bf16)) return 2;
  float *h = static_cast<float *>(params[3]);
  const int64_t K = shapes[0][ndims[0] - 1];
  const int64_t M = numel(ndims[0], shapes[0]) / K;
  const int64_t I = shapes[1][0];
  thread_local std::vector<float> ubuf;  // the calling thread's, shared with the workers
  ubuf.resize(M * I);
  std::vector<const float *> xr(M);
  std::vector<float *> hr(M), ur(M);
  for (int64_t m = 0; m < M; ++m) {
    xr[m] = x + m * K;
    hr[m] = h + m * I;
    ur[m] = ubuf.data() + m * I;
  }
  thread_local std::vector<bf16> split;
  const Rows rows = make_rows(xr.data(), M, K, gate.is_bf16 || up.is_bf16, split);
  parallel_ranges(I, block_rows(rows), [&](int64_t n0, int64_t n1) {
    swiglu_block(gate, up, rows, 0, K, n0, n1, hr.data(), ur.data());
  });
  return 0;
}

// h = silu(g) * u elementwise (float32): a SwiGLU MLP's activation after MindSpore's MatMuls
// for many rows (prefill), one threaded pass instead of three graph ops.
extern "C" int dsms_silu_mul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 3) return 1;
  const float *g = static_cast<const float *>(params[0]), *u = static_cast<const float *>(params[1]);
  float *h = static_cast<float *>(params[2]);
  const int64_t n = numel(ndims[0], shapes[0]);
  parallel_ranges(n, kChunk, [&](int64_t i0, int64_t i1) {
    std::memcpy(h + i0, g + i0, sizeof(float) * (i1 - i0));
    silu_times(h + i0, u + i0, i1 - i0);
  });
  return 0;
}

// y = x widened from bfloat16 to float32 (exact), for MindSpore's MatMul over a weight kept
// in bf16: its own Cast took 13 ms on a 2816 x 1024 weight, this 1 ms.
extern "C" int dsms_widen_bf16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 2 || std::strcmp(dtypes[0], "bfloat16") != 0) return 1;
  const bf16 *x = static_cast<const bf16 *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t n = numel(ndims[0], shapes[0]);
  parallel_ranges(n, kChunk, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
#ifdef __AVX2__
    for (; i + kLanes <= i1; i += kLanes) vstore(y + i, vload(x + i));
#endif
    for (; i < i1; ++i) y[i] = to_f32(x[i]);
  });
  return 0;
}

// Routed SwiGLU experts, exact: y [N,H] = sum_j weight[t,j] * expert_{idx[t,j]}(x[t]).
// Inputs: x [N,H], idx [N,k] int32 global expert ids, first [1] int32 (this rank holds
// experts [first, first + E)), weight [N,k], gate/up [E,I,H], down [E,H,I] (each float32 or
// bfloat16), then optionally the shared experts' gate/up [Is,H] and down [H,Is], which every
// token takes with weight 1, added last (a single rank's decode: three graph ops fewer per
// layer). Output y [N,H].
extern "C" int dsms_moe_experts(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 8 && nparam != 11) return 1;
  const bool shared = nparam == 11;
  const float *x = static_cast<const float *>(params[0]);
  const int32_t *global_idx = static_cast<const int32_t *>(params[1]);
  const int32_t first = *static_cast<const int32_t *>(params[2]);
  const float *weight = static_cast<const float *>(params[3]);
  AnyWeight w[6] = {};  // routed gate, up, down, then the shared ones'
  for (int i = 0; i < (shared ? 6 : 3); ++i) {
    w[i].data = params[4 + i];
    if (!AnyWeight::parse(dtypes[4 + i], &w[i].is_bf16)) return 2;
  }
  float *y = static_cast<float *>(params[nparam - 1]);
  const int64_t N = shapes[0][0], H = shapes[0][1], k = shapes[1][1];
  const int64_t E = shapes[4][0], I = shapes[4][1], Is = shared ? shapes[7][0] : 0;
  std::vector<int32_t> idx(N * k);  // local expert ids; out of [0, E): another rank's
  for (int64_t p = 0; p < N * k; ++p) idx[p] = global_idx[p] - first;

  // counting sort of the (token, choice) pairs by expert; the shared expert's rows follow
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t p = 0; p < N * k; ++p)
    if (idx[p] >= 0 && idx[p] < E) ++start[idx[p] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const int64_t P = start[E], rows = P + (shared ? N : 0);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  std::vector<int64_t> slot(N * k, -1);   // pair -> row in the sorted order
  std::vector<const float *> xrows(rows);
  for (int64_t p = 0; p < N * k; ++p) {
    const int32_t e = idx[p];
    if (e < 0 || e >= E) continue;
    slot[p] = fill[e]++;
    xrows[slot[p]] = x + (p / k) * H;
  }
  for (int64_t t = 0; t < rows - P; ++t) xrows[P + t] = x + t * H;
  // per calling thread, reused across calls: gate/up activations, outputs [rows,H]
  const int64_t width = std::max(I, Is);
  thread_local std::vector<float> hbuf, ubuf, ybuf;
  hbuf.resize(rows * width);
  ubuf.resize(rows * width);
  ybuf.resize(rows * H);
  std::vector<float *> hrows(rows), urows(rows), yrows(rows);
  for (int64_t r = 0; r < rows; ++r) {
    hrows[r] = hbuf.data() + r * width;
    urows[r] = ubuf.data() + r * width;
    yrows[r] = ybuf.data() + r * H;
  }
  // one SwiGLU per expert with rows: E routed ones (weights at an offset in the stacked
  // tensors), then the shared one
  struct Expert {
    const AnyWeight *gate, *up, *down;
    int64_t gu_offset, down_offset, inter, r0, m;
  };
  std::vector<Expert> experts;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e])
      experts.push_back({&w[0], &w[1], &w[2], e * I * H, e * H * I, I, start[e], start[e + 1] - start[e]});
  if (shared) experts.push_back({&w[3], &w[4], &w[5], 0, 0, Is, P, N});
  // work items: an expert's block of output features against all its rows; past one chunk of
  // rows on the tile unit (prefill) instead a chunk of its rows (which then stays in L2)
  // against all its weights, which would otherwise stream all its rows from L3 per block
  struct Item {
    int64_t expert, n0, n1, m0, m;
  };
  auto items_of = [&](bool down, const std::vector<Rows> &rows) {
    std::vector<Item> items;
    for (int64_t i = 0; i < static_cast<int64_t>(experts.size()); ++i) {
      const int64_t width = down ? H : experts[i].inter, M = experts[i].m;
#ifdef DSMS_AMX
      if (rows[i].split && M > kAmxChunk * kAmxTile) {
        for (int64_t m0 = 0; m0 < M; m0 += kAmxChunk * kAmxTile)
          items.push_back({i, 0, width, m0, std::min(kAmxChunk * kAmxTile, M - m0)});
        continue;
      }
#endif
      const int64_t block = block_rows(rows[i]);
      for (int64_t b = 0; b < width; b += block) items.push_back({i, b, std::min(b + block, width), 0, M});
    }
    return items;
  };
  // each expert's rows, split for the tile unit where it applies: x for gate/up, then h for down
  thread_local std::vector<bf16> xsplit, hsplit;
  auto rows_of = [&](bool down, std::vector<bf16> &buf) {
    const float *const *x = down ? hrows.data() : xrows.data();
    std::vector<Rows> expert_rows;
    for (const Expert &ex : experts) expert_rows.push_back({x + ex.r0, ex.m, nullptr});
#ifdef DSMS_AMX
    std::vector<int64_t> offset;  // of each expert's split tiles in buf; -1: not split
    int64_t size = 0;
    for (const Expert &ex : experts) {
      const int64_t K = down ? ex.inter : H;
      const bool split = (down ? ex.down->is_bf16 : ex.gate->is_bf16 || ex.up->is_bf16) && amx_applies(ex.m, K);
      offset.push_back(split ? size : -1);
      if (split) size += (ex.m + kAmxTile - 1) / kAmxTile * split_tile_size(K);
    }
    buf.resize(size);
    std::vector<std::pair<int64_t, int64_t>> tiles;  // (expert, first row)
    for (int64_t i = 0; i < static_cast<int64_t>(experts.size()); ++i)
      if (offset[i] >= 0)
        for (int64_t r = 0; r < experts[i].m; r += kAmxTile) tiles.emplace_back(i, r);
    parallel_for(static_cast<int64_t>(tiles.size()), [&](int64_t it) {
      const int64_t i = tiles[it].first, r = tiles[it].second, K = down ? experts[i].inter : H;
      split_tile(expert_rows[i].x + r, std::min(kAmxTile, expert_rows[i].M - r), K,
                 buf.data() + offset[i] + r / kAmxTile * split_tile_size(K));
    });
    for (size_t i = 0; i < expert_rows.size(); ++i)
      if (offset[i] >= 0) expert_rows[i].split = buf.data() + offset[i];
#else
    (void)buf;
#endif
    return expert_rows;
  };
  std::vector<Rows> expert_rows = rows_of(false, xsplit);
  auto items = items_of(false, expert_rows);
  parallel_for(static_cast<int64_t>(items.size()), [&](int64_t it) {
    const Item &item = items[it];
    const Expert &ex = experts[item.expert];
    const int64_t r = ex.r0 + item.m0;
    swiglu_block(*ex.gate, *ex.up, expert_rows[item.expert].part(item.m0, item.m, H), ex.gu_offset, H, item.n0,
                 item.n1, hrows.data() + r, urows.data() + r);
  });
  expert_rows = rows_of(true, hsplit);
  items = items_of(true, expert_rows);
  parallel_for(static_cast<int64_t>(items.size()), [&](int64_t it) {
    const Item &item = items[it];
    const Expert &ex = experts[item.expert];
    ex.down->times(expert_rows[item.expert].part(item.m0, item.m, ex.inter), ex.down_offset, ex.inter, item.n0,
                   item.n1, yrows.data() + ex.r0 + item.m0);
  });
  parallel_ranges(N, std::max<int64_t>(1, kChunk / H), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float *out = y + t * H;
      std::memset(out, 0, sizeof(float) * H);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = slot[t * k + j];
        if (r < 0) continue;
        const float wt = weight[t * k + j];
        const float *src = yrows[r];
        for (int64_t h = 0; h < H; ++h) out[h] += wt * src[h];
      }
      if (shared)
        for (int64_t h = 0; h < H; ++h) out[h] += yrows[P + t][h];
    }
  });
  return 0;
}

namespace {

// y = x / sqrt(mean(x^2) + eps) * weight over the first D columns of each of `rows` rows of
// width W, in fp32; the other columns are copied. x and y may be the same.
void rms_norm_rows(const float *x, float *y, int64_t rows, int64_t W, const float *w, int64_t D, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * W;
    float *yr = y + r * W;
    int64_t d = 0;
    float ss = 0.0f;
#ifdef __AVX2__
    Vec acc = vzero();  // the sum of squares in kLanes partial sums: a serial one is latency-bound
    for (; d + kLanes <= D; d += kLanes) acc = vfma(vload(xr + d), vload(xr + d), acc);
    ss = vsum(acc);
#endif
    for (; d < D; ++d) ss += xr[d] * xr[d];
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * scale * w[d];
    if (yr != xr)
      for (int64_t d = D; d < W; ++d) yr[d] = xr[d];
  }
}

// DeepSeek's rotary embedding on interleaved pairs of the last 2h columns of each of `rows`
// rows of width W; `per_token` consecutive rows (heads) share a token's cos/sin [h]; the
// other columns are copied. x and y may be the same.
void rope_rows(const float *x, float *y, int64_t rows, int64_t W, const float *cs, const float *sn, int64_t h,
               int64_t per_token) {
  const int64_t start = W - 2 * h;
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * W;
    float *yr = y + r * W;
    const float *c = cs + (r / per_token) * h;
    const float *s = sn + (r / per_token) * h;
    if (yr != xr) std::memcpy(yr, xr, sizeof(float) * start);
    for (int64_t i = 0; i < h; ++i) {
      const float x0 = xr[start + 2 * i], x1 = xr[start + 2 * i + 1];
      yr[start + 2 * i] = x0 * c[i] - x1 * s[i];
      yr[start + 2 * i + 1] = x0 * s[i] + x1 * c[i];
    }
  }
}

}  // namespace

// RMSNorm over the first D columns of each row of x [..., W] (D = len(weight)), in fp32:
// y = x / sqrt(mean(x^2) + eps) * weight; columns past D are copied unchanged (MLA's
// kv_a output carries the rope key there). Inputs: x, weight [D], eps [1]. Output y.
extern "C" int dsms_rms_norm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 4) return 1;
  const int64_t W = shapes[0][ndims[0] - 1];
  const float *x = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[3]);
  const float eps = *static_cast<const float *>(params[2]);
  parallel_ranges(numel(ndims[0], shapes[0]) / W, std::max<int64_t>(1, kChunk / W), [&](int64_t r0, int64_t r1) {
    rms_norm_rows(x + r0 * W, y + r0 * W, r1 - r0, W, w, shapes[1][0], eps);
  });
  return 0;
}

// DeepSeek's rotary embedding on interleaved pairs, applied to the last 2h columns of each
// row of x [B,S,(heads,)W]; the other columns are copied. cos/sin [B,S,h] per token.
extern "C" int dsms_rope(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  if (nparam != 4) return 1;
  const int64_t W = shapes[0][ndims[0] - 1], h = shapes[1][ndims[1] - 1];
  const int64_t rows = numel(ndims[0], shapes[0]) / W, per_token = rows / (numel(ndims[1], shapes[1]) / h);
  const float *x = static_cast<const float *>(params[0]), *cs = static_cast<const float *>(params[1]);
  const float *sn = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  // whole tokens per work item: a token's rows share its cos/sin
  const int64_t step = per_token * std::max<int64_t>(1, kChunk / (W * per_token));
  parallel_ranges(rows, step, [&](int64_t r0, int64_t r1) {
    rope_rows(x + r0 * W, y + r0 * W, r1 - r0, W, cs + r0 / per_token * h, sn + r0 / per_token * h, h, per_token);
  });
  return 0;
}

// MLA's input side for few tokens (decode), as one call instead of seven graph ops:
//   q      = rope(q_b(rms_norm(q_a(x))))       per head, on its last dr columns
//   latent = rope(kv_norm'd(kv_a(x)))          [c_kv ; k_pe]: norm on c_kv, rope on k_pe
// Inputs: x [B,S,H], q_a [R,H], q_a norm [R], q_b [N,R], kv_a [L,H], kv norm [r] (the
// projections float32 or bfloat16, the norms float32), cos/sin [B,S,dr/2], eps [1] (both
// norms'). Outputs: q [B,S,heads,dn+dr] (N = heads x (dn + dr)), latent [B,S,L].
extern "C" int dsms_mla_project(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 11) return 1;
  const float *x = static_cast<const float *>(params[0]);
  AnyWeight q_a{params[1], false}, q_b{params[3], false}, kv_a{params[4], false};
  if (!AnyWeight::parse(dtypes[1], &q_a.is_bf16) || !AnyWeight::parse(dtypes[3], &q_b.is_bf16) ||
      !AnyWeight::parse(dtypes[4], &kv_a.is_bf16))
    return 2;
  const float *q_norm = static_cast<const float *>(params[2]), *kv_norm = static_cast<const float *>(params[5]);
  const float *cs = static_cast<const float *>(params[6]), *sn = static_cast<const float *>(params[7]);
  const float eps = *static_cast<const float *>(params[8]);
  float *q = static_cast<float *>(params[9]), *latent = static_cast<float *>(params[10]);
  const int64_t H = shapes[0][ndims[0] - 1], M = numel(ndims[0], shapes[0]) / H;
  const int64_t R = shapes[1][0], N = shapes[3][0], L = shapes[4][0], r = shapes[5][0];
  const int64_t h = shapes[6][ndims[6] - 1], dq = shapes[9][ndims[9] - 1];  // q is [B,S,heads,dq]
  thread_local std::vector<float> qa_buf;  // the calling thread's, shared with the workers
  qa_buf.resize(M * R);
  std::vector<const float *> xr(M);
  std::vector<float *> qaw(M), lw(M), qw(M);
  for (int64_t m = 0; m < M; ++m) {
    xr[m] = x + m * H;
    qaw[m] = qa_buf.data() + m * R;
    lw[m] = latent + m * L;
    qw[m] = q + m * N;
  }
  // q_a and kv_a share x: their blocks are one set of work items
  thread_local std::vector<bf16> split;
  const Rows xrows = make_rows(xr.data(), M, H, q_a.is_bf16 || kv_a.is_bf16, split);
  const int64_t block = block_rows(xrows), qa_blocks = (R + block - 1) / block, kv_blocks = (L + block - 1) / block;
  parallel_for(qa_blocks + kv_blocks, [&](int64_t blk) {
    if (blk < qa_blocks) {
      q_a.times(xrows, 0, H, blk * block, std::min((blk + 1) * block, R), qaw.data());
    } else {
      const int64_t b = blk - qa_blocks;
      kv_a.times(xrows, 0, H, b * block, std::min((b + 1) * block, L), lw.data());
    }
  });
  rms_norm_rows(qa_buf.data(), qa_buf.data(), M, R, q_norm, R, eps);
  rms_norm_rows(latent, latent, M, L, kv_norm, r, eps);
  rope_rows(latent, latent, M, L, cs, sn, h, 1);
  const Rows qa_rows = make_rows(qaw.data(), M, R, q_b.is_bf16, split);
  parallel_ranges(N, block_rows(qa_rows), [&](int64_t n0, int64_t n1) { q_b.times(qa_rows, 0, R, n0, n1, qw.data()); });
  rope_rows(q, q, M * (N / dq), dq, cs, sn, h, N / dq);
  return 0;
}

namespace {

inline float dot(const float *a, const float *b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#ifdef __AVX2__
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}


// p[t] = p[t] * scale + mask[t] in place; returns the row's max.
inline float scale_mask_max(float *p, const float *mask, int64_t T, float scale) {
  int64_t t = 0;
  float mx = -INFINITY;
#ifdef __AVX2__
  const __m256 vs = _mm256_set1_ps(scale);
  __m256 vmx = _mm256_set1_ps(-INFINITY);
  for (; t + 8 <= T; t += 8) {
    const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(p + t), vs, _mm256_loadu_ps(mask + t));
    _mm256_storeu_ps(p + t, v);
    vmx = _mm256_max_ps(vmx, v);
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#endif
  for (; t < T; ++t) {
    p[t] = p[t] * scale + mask[t];
    mx = p[t] > mx ? p[t] : mx;
  }
  return mx;
}

// p[t] = exp(p[t] - mx), and exactly 0 where the additive mask removed the entry (as
// exp(-1e30 - mx) is in the reference), unless the whole row is masked. Returns the sum.
inline float exp_shifted(float *p, const float *mask, int64_t T, float mx) {
  const bool live = mx > -1e29f;
  int64_t t = 0;
  float sum = 0.0f;
#ifdef __AVX2__
  const __m256 vmx = _mm256_set1_ps(mx), cut = _mm256_set1_ps(-1e29f);
  __m256 vsum = _mm256_setzero_ps();
  for (; t + 8 <= T; t += 8) {
    __m256 v = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), vmx));
    if (live) v = _mm256_and_ps(v, _mm256_cmp_ps(_mm256_loadu_ps(mask + t), cut, _CMP_GT_OQ));
    _mm256_storeu_ps(p + t, v);
    vsum = _mm256_add_ps(vsum, v);
  }
  sum = hsum(vsum);
#endif
  for (; t < T; ++t) {
    p[t] = (live && mask[t] <= -1e29f) ? 0.0f : std::exp(p[t] - mx);
    sum += p[t];
  }
  return sum;
}

// Rows of b for rows_times_rows: strided in one block, or through a table of row pointers.
struct StridedRows {
  const float *base;
  int64_t ld;
  const float *operator()(int64_t k) const { return base + k * ld; }
};
struct TableRows {
  const float *const *rows;
  const float *operator()(int64_t k) const { return rows[k]; }
};

#ifdef __AVX2__
// rows_times_rows over columns [c, c + V * kLanes): R x V accumulators
template <int R, int V, typename Rows>
inline void rows_times_rows_cols(const float *const *a, int64_t K, Rows b, int64_t c, float *const *y) {
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    const float *bk = b(k) + c;
    Vec bv[V];
    for (int v = 0; v < V; ++v) {
      bv[v] = vload(bk + v * kLanes);
      DSMS_PIN(bv[v]);
    }
    for (int r = 0; r < R; ++r) {
      const Vec ar = vbroadcast(a[r] + k);
      for (int v = 0; v < V; ++v) acc[r][v] = vfma(ar, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) vstore(y[r] + c + v * kLanes, acc[r][v]);
}
#endif

// y[r][0, n) = sum over k < K of a[r][k] * b(k)[0, n) for R rows of a against the rows of b,
// up to 4 vectors of columns at a time: the R rows share each vector of b loaded, and no
// horizontal sums are needed. Attention's score and value products take this form.
template <int R, typename Rows>
inline void rows_times_rows(const float *const *a, int64_t K, Rows b, int64_t n, float *const *y) {
  int64_t c = 0;
#ifdef __AVX2__
  // vectors of b per pass over the K rows: R x V accumulators, about half the registers
  constexpr int V = std::max(1, std::min(4, 2 * kRows / R));
  const int64_t wide = n / (V * kLanes) * (V * kLanes), whole = n / kLanes * kLanes;
  for (; c < wide; c += V * kLanes) rows_times_rows_cols<R, V>(a, K, b, c, y);
  for (; c < whole; c += kLanes) rows_times_rows_cols<R, 1>(a, K, b, c, y);
#endif
  for (; c < n; ++c)
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += a[r][k] * b(k)[c];
      y[r][c] = s;
    }
}

// One past the last position the additive mask leaves visible (0 if none).
inline int64_t visible_length(const float *mask, int64_t T) {
#ifdef __AVX2__
  const __m256 cut = _mm256_set1_ps(-1e29f);
  while (T >= 8 && _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(mask + T - 8), cut, _CMP_GT_OQ)) == 0) T -= 8;
#endif
  while (T > 0 && mask[T - 1] <= -1e29f) --T;
  return T;
}

}  // namespace

// Absorbed MLA for a few new tokens per sequence (decode), in three passes:
//   1. q_lat = W_UK^T q_nope for every (query row, head), head by head, so each head's
//      W_UK (from kv_b_proj's weight [nh*(dn+dv), r]) is read once per call and then
//      reused by every row from L1/L2, instead of once per row;
//   2. per (query row, group of kHeadGroup heads): scores against the cached latents and
//      the new ones (additive masks), softmax, o_lat = probs @ latents[:, :r] / denom.
//      The heads of a group share every latent row they read, so each row is loaded once
//      per group; cached positions after the last visible one are skipped (their weight is
//      exactly 0 in the reference), so a short sequence in a wide block table costs only
//      its length. The cached latents are read in place from the paged pool;
//   3. out = W_UV o_lat, head by head over all query rows, like pass 1.
// Inputs: q [B,S,nh,dn+dr] (rope applied), new [B,S,L], pool [num_blocks,bs,L], tables
// [B,MB] int32 (cached position t of sequence b is row t % bs of block tables[b, t / bs]),
// past_mask [B,S,MB*bs], self_mask [B,S,S], kv_b [nh*(dn+dv), r], scale [1].
// Output: out [B,S,nh*dv].
extern "C" int dsms_mla_decode(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 9) return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *nw = static_cast<const float *>(params[1]);
  const float *pool = static_cast<const float *>(params[2]);
  const int32_t *tables = static_cast<const int32_t *>(params[3]);
  const float *past_mask = static_cast<const float *>(params[4]);
  const float *self_mask = static_cast<const float *>(params[5]);
  const float *kv_b = static_cast<const float *>(params[6]);
  const float scale = *static_cast<const float *>(params[7]);
  float *out = static_cast<float *>(params[8]);
  const int64_t B = shapes[0][0], S = shapes[0][1], nh = shapes[0][2], dq = shapes[0][3];
  const int64_t L = shapes[1][2], block_size = shapes[2][1], MB = shapes[3][1], r = shapes[6][1];
  const int64_t T = MB * block_size, dr = L - r, dn = dq - dr;
  const int64_t dv = shapes[6][0] / nh - dn;
  const int64_t R = B * S;  // query rows
  constexpr int G = kHeadGroup;
  const int64_t groups = (nh + G - 1) / G;
  // the calling thread's buffers, shared with the workers through plain pointers: q_lat
  // [R, groups*G, L] (the absent heads of a short last group stay zero), o_lat [R, nh, r]
  thread_local std::vector<float> lat_buf;
  lat_buf.resize(R * groups * G * L + R * nh * r);
  float *const q_lat = lat_buf.data(), *const o_lat = q_lat + R * groups * G * L;
  for (int64_t row = 0; row < R; ++row)
    std::fill(q_lat + (row * groups * G + nh) * L, q_lat + (row + 1) * groups * G * L, 0.0f);

  parallel_for(nh, [&](int64_t h) {
    const float *w_uk = kv_b + h * (dn + dv) * r;
    int64_t c = 0;
#ifdef __AVX2__
    for (; c + 32 <= r; c += 32)  // a [dn, 32] slice of W_UK stays in L1 across the rows
      for (int64_t row = 0; row < R; ++row) {
        const float *qh = q + (row * nh + h) * dq;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t d = 0; d < dn; ++d) {
          const __m256 qd = _mm256_broadcast_ss(qh + d);
          for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(w_uk + d * r + c + 8 * j), acc[j]);
        }
        float *qg = q_lat + (row * groups * G + h) * L;
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(qg + c + 8 * j, acc[j]);
      }
#endif
    for (int64_t row = 0; row < R; ++row) {
      const float *qh = q + (row * nh + h) * dq;
      float *qg = q_lat + (row * groups * G + h) * L;
      for (int64_t cc = c; cc < r; ++cc) {
        float sum = 0.0f;
        for (int64_t d = 0; d < dn; ++d) sum += qh[d] * w_uk[d * r + cc];
        qg[cc] = sum;
      }
      std::memcpy(qg + r, qh + dn, sizeof(float) * dr);
    }
  });

  parallel_for(R * groups, [&](int64_t item) {
    const int64_t h0 = (item % groups) * G, row = item / groups, b = row / S;
    const int64_t heads = nh - h0 < G ? nh - h0 : G;
    const float *pm = past_mask + row * T, *sm = self_mask + row * S;
    const int64_t Tv = visible_length(pm, T);
    const int64_t n = Tv + S;  // keys: the visible cached latents, then the new ones
    thread_local std::vector<float> buf;
    thread_local std::vector<const float *> key_buf;
    buf.resize(G * n + n + r);
    key_buf.resize(n);
    // plain pointers: a thread_local named inside the loops costs a __tls_get_addr call per
    // use in this shared library, and the call spills every accumulator around it
    float *p = buf.data(), *mask = p + G * n, *scratch = mask + n;
    const float **keys = key_buf.data();
    std::memcpy(mask, pm, sizeof(float) * Tv);
    std::memcpy(mask + Tv, sm, sizeof(float) * S);
    for (int64_t t = 0; t < Tv; ++t) keys[t] = pool + (tables[b * MB + t / block_size] * block_size + t % block_size) * L;
    for (int64_t j = 0; j < S; ++j) keys[Tv + j] = nw + (b * S + j) * L;
    const float *qrows[G];
    for (int g = 0; g < G; ++g) qrows[g] = q_lat + (row * groups * G + h0 + g) * L;
    float tile[G * kKeys];
    int64_t t = 0;
    for (; t + kKeys <= n; t += kKeys) {
      dots<G, kKeys>(qrows, keys + t, L, tile);
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < kKeys; ++c) p[g * n + t + c] = tile[g * kKeys + c];
    }
    for (; t < n; ++t)
      for (int g = 0; g < G; ++g) p[g * n + t] = dot(qrows[g], keys[t], L);
    float inv_denom[G];
    for (int g = 0; g < G; ++g) {
      float *pg = p + g * n;
      const float mx = scale_mask_max(pg, mask, n, scale);
      inv_denom[g] = 1.0f / exp_shifted(pg, mask, n, mx);
    }
    // o_lat rows of the group's heads; an absent head of a short last group writes scratch
    const float *prows[G];
    float *orows[G];
    for (int g = 0; g < G; ++g) {
      prows[g] = p + g * n;
      orows[g] = g < heads ? o_lat + (row * nh + h0 + g) * r : scratch;
    }
    rows_times_rows<G>(prows, n, TableRows{keys}, r, orows);
    for (int64_t g = 0; g < heads; ++g)
      for (int64_t c = 0; c < r; ++c) orows[g][c] *= inv_denom[g];
  });

  parallel_for(nh, [&](int64_t h) {
    const float *w_uv = kv_b + (h * (dn + dv) + dn) * r;
    std::vector<const float *> orows(R);
    std::vector<float *> yrows(R);
    for (int64_t row = 0; row < R; ++row) {
      orows[row] = o_lat + (row * nh + h) * r;
      yrows[row] = out + (row * nh + h) * dv;
    }
    rows_times_weight(orows.data(), R, w_uv, r, 0, dv, yrows.data());
  });
  return 0;
}

// DeepSeek's router for every token, in fp32 (deepseek_ms/model/moe.py Router is the
// reference): logits = x W^T; scores = sigmoid or softmax; selection scores (+ correction
// bias for noaux_tc); group-limited masking; top-k; weights from the unbiased scores.
// Inputs: x [N,H], weight [E,H], bias [E], config [8] float:
//   top_k, n_group, topk_group, method (0 greedy, 1 group_limited_greedy, 2 noaux_tc),
//   sigmoid (1) or softmax (0), v3 weighting (1) or v2 (0), norm_topk_prob, routed_scaling_factor.
// Outputs: idx [N,top_k] int32 (best first), weights [N,top_k] float32.
extern "C" int dsms_router(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != 6) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *wt = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]);
  const float *cfg = static_cast<const float *>(params[3]);
  int32_t *idx = static_cast<int32_t *>(params[4]);
  float *out_w = static_cast<float *>(params[5]);
  const int64_t N = shapes[0][0], H = shapes[0][1], E = shapes[1][0];
  const int top_k = static_cast<int>(cfg[0]), n_group = static_cast<int>(cfg[1]);
  const int topk_group = static_cast<int>(cfg[2]), method = static_cast<int>(cfg[3]);
  const bool sigmoid = cfg[4] != 0.0f, v3 = cfg[5] != 0.0f, norm = cfg[6] != 0.0f;
  const float scale = cfg[7];
  const int64_t per_group = E / n_group;
  std::vector<const float *> xr(N);
  std::vector<std::vector<float>> logits(N, std::vector<float>(E));
  std::vector<float *> lr(N);
  for (int64_t n = 0; n < N; ++n) {
    xr[n] = x + n * H;
    lr[n] = logits[n].data();
  }
  rows_times_weight(xr.data(), N, wt, H, 0, E, lr.data());
  std::vector<float> scores(E), select(E), group_score(n_group);
  std::vector<char> keep(n_group);
  for (int64_t n = 0; n < N; ++n) {
    const float *l = lr[n];
    if (sigmoid) {
      for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-l[e]));
    } else {
      float m = l[0], s = 0.0f;
      for (int64_t e = 1; e < E; ++e) m = l[e] > m ? l[e] : m;
      for (int64_t e = 0; e < E; ++e) s += (scores[e] = std::exp(l[e] - m));
      for (int64_t e = 0; e < E; ++e) scores[e] /= s;
    }
    for (int64_t e = 0; e < E; ++e) select[e] = scores[e] + (method == 2 ? bias[e] : 0.0f);
    if (method != 0 && n_group > 1) {
      for (int g = 0; g < n_group; ++g) {
        const float *v = select.data() + g * per_group;
        float best = -INFINITY, second = -INFINITY;
        for (int64_t j = 0; j < per_group; ++j) {
          if (v[j] > best) {
            second = best;
            best = v[j];
          } else if (v[j] > second) {
            second = v[j];
          }
        }
        group_score[g] = method == 2 ? best + second : best;
        keep[g] = 0;
      }
      for (int t = 0; t < topk_group; ++t) {  // best groups; ties go to the lower index
        int arg = -1;
        for (int g = 0; g < n_group; ++g)
          if (!keep[g] && (arg < 0 || group_score[g] > group_score[arg])) arg = g;
        keep[arg] = 1;
      }
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per_group]) select[e] = -1e30f;
    }
    int32_t *ix = idx + n * top_k;
    float *w = out_w + n * top_k;
    float sum = 0.0f;
    for (int t = 0; t < top_k; ++t) {
      int64_t arg = -1;
      for (int64_t e = 0; e < E; ++e)
        if (select[e] > -INFINITY && (arg < 0 || select[e] > select[arg])) arg = e;
      ix[t] = static_cast<int32_t>(arg);
      w[t] = scores[arg];
      select[arg] = -INFINITY;
      sum += w[t];
    }
    const bool renorm = v3 ? norm : (top_k > 1 && norm);
    for (int t = 0; t < top_k; ++t) {
      if (renorm) w[t] = w[t] / (sum + 1e-20f);
      if (v3 || !renorm) w[t] *= scale;
    }
  }
  return 0;
}

namespace {

// rows_times_rows for the 1 to kQueryRows rows of a query group
inline void group_times_rows(int R, const float *const *a, int64_t K, const float *b, int64_t ld, int64_t n,
                             float *const *y) {
  switch (R) {
    case 6: rows_times_rows<6>(a, K, StridedRows{b, ld}, n, y); break;
    case 5: rows_times_rows<5>(a, K, StridedRows{b, ld}, n, y); break;
    case 4: rows_times_rows<4>(a, K, StridedRows{b, ld}, n, y); break;
    case 3: rows_times_rows<3>(a, K, StridedRows{b, ld}, n, y); break;
    case 2: rows_times_rows<2>(a, K, StridedRows{b, ld}, n, y); break;
    default: rows_times_rows<1>(a, K, StridedRows{b, ld}, n, y); break;
  }
}

constexpr int64_t kPanel = 16;  // keys per packed panel in prefill attention
constexpr int kQueryRows = 6;   // query rows per group in prefill attention: 12 accumulators

}  // namespace

// Expanded MLA attention over a prompt with no cached past (prefill), fused:
//   out[b,i,h,:] = softmax((q[b,i,h] . k[b,:,h]) * scale + mask[b,i,:]) @ v[b,:,h]
// where a key is [k_nope (kv_b_proj's per-head key half) ; k_pe (the one shared rope key)].
// A work item is one (sequence, head): its keys are first packed into panels and its values
// copied into a contiguous block (in kv_b_proj's output a head's rows are strided by all
// heads, which thrashes the caches), then query rows go kQueryRows at a time, sharing each
// key and value vector loaded. A group reads only the keys up to its rows' last visible
// one, so a causal prompt costs half of the full score and value products; masked entries
// are exactly 0 as in the reference, and a wholly masked row (padding) keeps the
// reference's uniform softmax. The value sum is divided by the softmax denominator once
// per output row instead of once per probability.
// Inputs: q [B,S,nh,dn+dr] (rope applied), kv [B,T,nh*(dn+dv)] (kv_b_proj's output), k_pe
// [B,T,dr] (rope applied), mask [B,S,T] additive, scale [1]. Output out [B,S,nh*dv].
extern "C" int dsms_mla_prefill(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 6 || ndims[0] != 4 || ndims[1] != 3 || ndims[2] != 3) return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *kv = static_cast<const float *>(params[1]);
  const float *k_pe = static_cast<const float *>(params[2]);
  const float *mask = static_cast<const float *>(params[3]);
  const float scale = *static_cast<const float *>(params[4]);
  float *out = static_cast<float *>(params[5]);
  const int64_t B = shapes[0][0], S = shapes[0][1], nh = shapes[0][2], dq = shapes[0][3];
  const int64_t T = shapes[1][1], dr = shapes[2][2], dn = dq - dr, dv = shapes[1][2] / nh - dn;
  if (dn < 0 || dv <= 0 || shapes[1][2] != nh * (dn + dv) || shapes[3][1] != S || shapes[3][2] != T) return 1;
  // every head of a query row sees the same keys: one past the last visible one, or all T
  // for a wholly masked row
  std::vector<int64_t> visible(B * S);
  for (int64_t row = 0; row < B * S; ++row) {
    const int64_t Tv = visible_length(mask + row * T, T);
    visible[row] = Tv == 0 ? T : Tv;
  }
  parallel_for(B * nh, [&](int64_t item) {
    const int64_t b = item / nh, h = item % nh;
    thread_local std::vector<float> key_buf, value_buf, prob_buf;
    // keys in panels of kPanel: panel j holds keys [j*kPanel, (j+1)*kPanel) as [dq, kPanel],
    // so a group's score loop reads one contiguous panel per 16 keys (zeros past T)
    const int64_t panels = (T + kPanel - 1) / kPanel;
    key_buf.assign(panels * dq * kPanel, 0.0f);
    value_buf.resize(T * dv);
    prob_buf.resize(kQueryRows * panels * kPanel);
    float *keys = key_buf.data(), *values = value_buf.data(), *probs = prob_buf.data();  // see mla_decode
    for (int64_t t = 0; t < T; ++t) {
      const float *row = kv + ((b * T + t) * nh + h) * (dn + dv);
      const float *pe = k_pe + (b * T + t) * dr;
      float *key = keys + (t / kPanel) * dq * kPanel + t % kPanel;
      for (int64_t d = 0; d < dn; ++d) key[d * kPanel] = row[d];
      for (int64_t d = 0; d < dr; ++d) key[(dn + d) * kPanel] = pe[d];
      std::memcpy(values + t * dv, row + dn, sizeof(float) * dv);
    }
    for (int64_t i0 = 0; i0 < S; i0 += kQueryRows) {
      const int rows = static_cast<int>(S - i0 < kQueryRows ? S - i0 : kQueryRows);
      const float *x[kQueryRows];
      float *p[kQueryRows], *o[kQueryRows], inv_denom[kQueryRows];
      const int64_t *seen = visible.data() + b * S + i0;
      int64_t group = 0;
      for (int r = 0; r < rows; ++r) {
        group = seen[r] > group ? seen[r] : group;
        x[r] = q + ((b * S + i0 + r) * nh + h) * dq;
        p[r] = probs + r * panels * kPanel;
        o[r] = out + ((b * S + i0 + r) * nh + h) * dv;
      }
      for (int64_t j = 0; j * kPanel < group; ++j) {
        float *pj[kQueryRows];
        for (int r = 0; r < rows; ++r) pj[r] = p[r] + j * kPanel;
        group_times_rows(rows, x, dq, keys + j * dq * kPanel, kPanel, kPanel, pj);
      }
      for (int r = 0; r < rows; ++r) {
        const float *m = mask + (b * S + i0 + r) * T;
        const float mx = scale_mask_max(p[r], m, seen[r], scale);
        inv_denom[r] = 1.0f / exp_shifted(p[r], m, seen[r], mx);
        std::fill(p[r] + seen[r], p[r] + group, 0.0f);  // the rows share the value loop
      }
      group_times_rows(rows, p, group, values, dv, dv, o);
      for (int r = 0; r < rows; ++r)
        for (int64_t c = 0; c < dv; ++c) o[r][c] *= inv_denom[r];
    }
  });
  return 0;
}
