// y[M, N] = x[M, K] @ W[K, N] for small M (decode batches) on CPU, with W pre-packed into column
// panels: packed[P, K, NT] holds columns [p*NT, (p+1)*NT) of W, zero-padded past N. x and y are
// float32; W is float32 (PolarisCpuGemm) or bfloat16 (PolarisCpuGemmBf16, widened in registers, so
// products are exact and sums float32, as XLA's bf16 dot with a float32 result).
//
// Why: XLA CPU's GEMM reads weights at 20-28 GB/s when M is 2-16 on the 2-core machines we test on,
// against 35-40 GB/s for a plain read. Here each panel is one contiguous stream, every weight is loaded
// once for a block of up to 8 rows, and the panels are shared between the calling thread and XLA's
// intra-op pool through an atomic counter (a helper that starts late finds no work, so nothing waits
// on a task that has not run).
//
// PolarisCpuGemmMax[Bf16]: the same products, reduced per panel and row as they are computed (max, first
// column at it, sum of exp(logit - max)) instead of written: greedy decoding's argmax and logprob.
//
// Built by polaris_jax/models/cpu_gemm.py with -march=native; NT is 32 floats with AVX-512 and 16
// otherwise, so the accumulators (8 rows x NT) stay in registers.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int64_t kPanel = 32;
#else
constexpr int64_t kPanel = 16;
#endif
constexpr int kVec = 16;                 // floats per vector type below
constexpr int kVecs = kPanel / kVec;     // vectors per panel row
constexpr int kRows = 8;
constexpr int64_t kPrefetch = 2048;      // floats ahead in the panel stream
constexpr int64_t kChunksPerThread = 4;  // panels are claimed in runs: long streams, yet balanced

typedef float vfloat __attribute__((vector_size(64), aligned(4)));
typedef uint16_t vbf16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t vuint __attribute__((vector_size(64), aligned(4)));

// kVec consecutive weights as floats: float32 as is, bfloat16 widened (its bits are float32's top half).
inline vfloat load_vec(const float* w) {
  vfloat out;
  std::memcpy(&out, w, sizeof(out));
  return out;
}
inline vfloat load_vec(const uint16_t* w) {
  vbf16 half;
  std::memcpy(&half, w, sizeof(half));
  const vuint bits = __builtin_convertvector(half, vuint) << 16;
  vfloat out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

extern "C" int64_t polaris_cpu_gemm_panel() { return kPanel; }

namespace {

// One panel against rows [0, MB) of xt, the transposed block [K][kRows]: acc[m] = x[m] @ panel.
template <int MB, typename W>
inline void accumulate(const float* xt, const W* panel, int64_t k_dim, vfloat (&acc)[kRows][kVecs]) {
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < kVecs; ++v) acc[m][v] = vfloat{};
  for (int64_t k = 0; k < k_dim; ++k) {
    const W* w = panel + k * kPanel;
    __builtin_prefetch(w + kPrefetch);
    vfloat wv[kVecs];
    for (int v = 0; v < kVecs; ++v) wv[v] = load_vec(w + v * kVec);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const float xm = xt[k * kRows + m];
      for (int v = 0; v < kVecs; ++v) acc[m][v] += xm * wv[v];
    }
  }
}

// Where the panel's products go: y[:, cols] (Out), or each row's reductions over the panel (Reduce).
struct Out {
  float* y;
  int64_t n_dim;
};
struct Reduce {
  float *max_mp, *sum_mp;  // [M, P]: the panel's max logit, sum(exp(logit - that max))
  int32_t* arg_mp;         // [M, P]: the first column at the max, or -1 below the row's running max
  float* running_m;        // [M] per thread: the largest panel max this thread has seen
  int64_t panels;
  bool mass;  // false: argmax only (sum_mp left 0), when no row of the call wants its logprob
};

typedef int32_t vint __attribute__((vector_size(64), aligned(4)));

// exp(x) for x <= 0, 0 below -87 (float's normal range): 2^n * e^r with |r| <= ln2 / 2, degree-7 Taylor
// (truncation 5e-9 relative), so sums of it match a library exp to float rounding.
inline vfloat exp_nonpositive(vfloat x) {
  const vint under = x < -87.0f;
  x = under ? vfloat{} - 87.0f : x;
  const vint n = __builtin_convertvector(x * 1.44269504f - 0.5f, vint);  // round to nearest for x <= 0
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = (x - nf * 0.693145752f) - nf * 1.42860677e-6f;
  vfloat p = vfloat{} + 1.0f / 5040.0f;
  p = 1.0f / 720.0f + r * p;
  p = 1.0f / 120.0f + r * p;
  p = 1.0f / 24.0f + r * p;
  p = 1.0f / 6.0f + r * p;
  p = 0.5f + r * p;
  p = 1.0f + r * p;
  p = 1.0f + r * p;
  vint bits = (n + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return under ? vfloat{} : p * scale;
}

template <int MB>
inline void store(const vfloat (&acc)[kRows][kVecs], Out out, int64_t, int64_t col, int64_t cols) {
  for (int m = 0; m < MB; ++m) {
    float row[kPanel];
    std::memcpy(row, acc[m], sizeof(row));
    std::memcpy(out.y + m * out.n_dim + col, row, cols * sizeof(float));
  }
}

// Horizontal max and sum of one vector in log2(kVec) shuffle steps.
inline float max_of(vfloat v) {
  vfloat s = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = v > s ? v : s;
  s = __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = v > s ? v : s;
  s = __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v = v > s ? v : s;
  s = __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return (v > s ? v : s)[0];
}
inline float sum_of(vfloat v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

template <int MB>
inline void store(const vfloat (&acc)[kRows][kVecs], Reduce out, int64_t p, int64_t col, int64_t cols) {
  constexpr float kLow = -__builtin_huge_valf();
  for (int m = 0; m < MB; ++m) {
    float row[kPanel];
    std::memcpy(row, acc[m], sizeof(row));
    for (int64_t c = cols; c < kPanel; ++c) row[c] = kLow;  // the zero padding past N
    vfloat lanes[kVecs];
    std::memcpy(lanes, row, sizeof(lanes));
    vfloat top = lanes[0];
    for (int v = 1; v < kVecs; ++v) top = lanes[v] > top ? lanes[v] : top;
    const float best = max_of(top);
    vfloat sum{};
    if (out.mass)
      for (int v = 0; v < kVecs; ++v) sum += exp_nonpositive(lanes[v] - best);
    const float total = sum_of(sum);
    int32_t arg = -1;  // the first index only where this panel can hold the row's maximum
    if (best >= out.running_m[m]) {
      out.running_m[m] = best;
      for (int64_t c = 0; c < cols; ++c)
        if (row[c] == best) {
          arg = static_cast<int32_t>(col + c);
          break;
        }
    }
    out.max_mp[m * out.panels + p] = best;
    out.sum_mp[m * out.panels + p] = total;
    out.arg_mp[m * out.panels + p] = arg;
  }
}

template <int MB, typename W, typename Sink>
void panel_block(const float* xt, const W* panel, int64_t k_dim, Sink out, int64_t p, int64_t col, int64_t cols) {
  vfloat acc[kRows][kVecs];
  accumulate<MB, W>(xt, panel, k_dim, acc);
  store<MB>(acc, out, p, col, cols);
}

// The panels of one call, claimed in runs by the calling thread and XLA's pool (see the top).
template <typename W, typename Sink>
struct Job {
  using BlockFn = void (*)(const float*, const W*, int64_t, Sink, int64_t, int64_t, int64_t);
  static constexpr BlockFn kBlocks[kRows + 1] = {
      nullptr,
      panel_block<1, W, Sink>,
      panel_block<2, W, Sink>,
      panel_block<3, W, Sink>,
      panel_block<4, W, Sink>,
      panel_block<5, W, Sink>,
      panel_block<6, W, Sink>,
      panel_block<7, W, Sink>,
      panel_block<8, W, Sink>};

  std::vector<float> xt;  // [row blocks][K][kRows]
  const W* packed;
  Sink sink;
  int64_t m_dim, k_dim, n_dim, panels, chunk;
  std::atomic<int64_t> next{0}, done{0};

  Job(const float* x, const W* packed_, Sink sink_, int64_t m, int64_t k, int64_t n, int64_t p, int64_t threads)
      : packed(packed_), sink(sink_), m_dim(m), k_dim(k), n_dim(n), panels(p) {
    chunk = std::max<int64_t>(1, panels / (kChunksPerThread * std::max<int64_t>(1, threads)));
    const int64_t blocks = (m_dim + kRows - 1) / kRows;
    xt.assign(blocks * k_dim * kRows, 0.0f);
    for (int64_t i = 0; i < m_dim; ++i)
      for (int64_t j = 0; j < k_dim; ++j) xt[((i / kRows) * k_dim + j) * kRows + i % kRows] = x[i * k_dim + j];
  }

  // Rows [m0, m0 + kRows) see the sink shifted to their first row.
  static Out rows_of(Out out, int64_t m0) { return {out.y + m0 * out.n_dim, out.n_dim}; }
  static Reduce rows_of(Reduce out, int64_t m0) {
    const int64_t at = m0 * out.panels;
    return {out.max_mp + at, out.sum_mp + at, out.arg_mp + at, out.running_m + m0, out.panels, out.mass};
  }

  void run(Sink own) {
    for (int64_t first; (first = next.fetch_add(chunk, std::memory_order_relaxed)) < panels;) {
      const int64_t last = std::min(first + chunk, panels);
      for (int64_t p = first; p < last; ++p) {
        const int64_t col = p * kPanel, cols = std::min(kPanel, n_dim - col);
        for (int64_t m0 = 0; m0 < m_dim; m0 += kRows) {
          const int mb = static_cast<int>(std::min<int64_t>(kRows, m_dim - m0));
          kBlocks[mb](xt.data() + (m0 / kRows) * k_dim * kRows, packed + p * k_dim * kPanel, k_dim,
                      rows_of(own, m0), p, col, cols);
        }
      }
      done.fetch_add(last - first, std::memory_order_release);
    }
  }
};

// Runs `job` on the calling thread and XLA's pool (cpu_pool.h); `sink_for(i)` is worker i's sink.
template <typename J, typename SinkFor>
void run_job(ffi::ThreadPool& pool, std::shared_ptr<J> job, SinkFor sink_for) {
  polaris_cpu::run_on_pool(pool, job->panels, job->done, [job, sink_for](int64_t i) { job->run(sink_for(i)); });
}

ffi::Error check_shapes(ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> w_dims, int64_t n_dim) {
  if (x_dims.size() != 2 || w_dims.size() != 3)
    return ffi::Error::InvalidArgument("polaris_cpu_gemm wants x [M, K] and packed [P, K, NT]");
  if (w_dims[1] != x_dims[1] || w_dims[2] != kPanel || n_dim > w_dims[0] * kPanel || n_dim <= (w_dims[0] - 1) * kPanel)
    return ffi::Error::InvalidArgument("polaris_cpu_gemm: packed weight does not match x or y");
  return ffi::Error::Success();
}

template <ffi::DataType WeightType>
ffi::Error SmallMGemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<WeightType> packed,
                      ffi::ResultBuffer<ffi::F32> y) {
  using W = ffi::NativeType<WeightType>;
  const auto x_dims = x.dimensions(), w_dims = packed.dimensions(), y_dims = y->dimensions();
  if (y_dims.size() != 2 || (x_dims.size() == 2 && y_dims[0] != x_dims[0]))
    return ffi::Error::InvalidArgument("polaris_cpu_gemm wants y [M, N]");
  if (auto err = check_shapes(x_dims, w_dims, y_dims[1]); err.failure()) return err;
  const Out out{y->typed_data(), y_dims[1]};
  auto job = std::make_shared<Job<W, Out>>(x.typed_data(), packed.typed_data(), out, x_dims[0], x_dims[1],
                                           y_dims[1], w_dims[0], pool.num_threads());
  run_job(pool, job, [out](int64_t) { return out; });
  return ffi::Error::Success();
}

// x @ W's per-panel reductions for greedy decoding and its logprob, the [M, N] logits never written:
// max_mp, sum_mp [M, P] float32 and arg_mp [M, P] int32 (see Reduce); `n` is N (a padded panel's tail is
// not a column); `mass` 0 skips the sums (argmax only).
template <ffi::DataType WeightType>
ffi::Error SmallMGemmMax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<WeightType> packed,
                         int64_t mass, int64_t n, ffi::ResultBuffer<ffi::F32> max_mp, ffi::ResultBuffer<ffi::F32> sum_mp,
                         ffi::ResultBuffer<ffi::S32> arg_mp) {
  using W = ffi::NativeType<WeightType>;
  const auto x_dims = x.dimensions(), w_dims = packed.dimensions();
  if (auto err = check_shapes(x_dims, w_dims, n); err.failure()) return err;
  const int64_t m_dim = x_dims[0], panels = w_dims[0];
  if (max_mp->dimensions()[0] != m_dim || max_mp->dimensions()[1] != panels)
    return ffi::Error::InvalidArgument("polaris_cpu_gemm_max wants outputs [M, P]");
  const int64_t workers = std::min<int64_t>(pool.num_threads(), panels);
  // Each worker's running maxima, so that a panel's first index is found only where it can matter.
  auto running = std::make_shared<std::vector<float>>(std::max<int64_t>(workers, 1) * m_dim, -__builtin_huge_valf());
  const Reduce base{max_mp->typed_data(), sum_mp->typed_data(), arg_mp->typed_data(), nullptr, panels, mass != 0};
  auto job = std::make_shared<Job<W, Reduce>>(x.typed_data(), packed.typed_data(), base, m_dim, x_dims[1], n,
                                              panels, pool.num_threads());
  run_job(pool, job, [base, running, m_dim](int64_t i) {
    Reduce own = base;
    own.running_m = running->data() + i * m_dim;
    return own;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PolarisCpuGemm, SmallMGemm<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PolarisCpuGemmBf16, SmallMGemm<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PolarisCpuGemmMax, SmallMGemmMax<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("mass")  // attributes bind in name order
                                  .Attr<int64_t>("n")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PolarisCpuGemmMaxBf16, SmallMGemmMax<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("mass")  // attributes bind in name order
                                  .Attr<int64_t>("n")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
