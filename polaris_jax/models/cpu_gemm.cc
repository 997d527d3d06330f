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
// Built by polaris_jax/models/cpu_gemm.py with -march=native; NT is 32 floats with AVX-512 and 16
// otherwise, so the accumulators (8 rows x NT) stay in registers.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

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

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

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

// One panel against rows [0, MB) of xt, the transposed block [K][kRows]; writes y[:, cols].
template <int MB, typename W>
void panel_block(const float* xt, const W* panel, int64_t k_dim, float* y, int64_t n_dim,
                 int64_t col, int64_t cols) {
  vfloat acc[MB][kVecs] = {};
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
  for (int m = 0; m < MB; ++m) {
    float out[kPanel];
    std::memcpy(out, acc[m], sizeof(out));
    std::memcpy(y + m * n_dim + col, out, cols * sizeof(float));
  }
}

template <typename W>
struct Job {
  using BlockFn = void (*)(const float*, const W*, int64_t, float*, int64_t, int64_t, int64_t);
  static constexpr BlockFn kBlocks[kRows + 1] = {
      nullptr, panel_block<1, W>, panel_block<2, W>, panel_block<3, W>, panel_block<4, W>,
      panel_block<5, W>, panel_block<6, W>, panel_block<7, W>, panel_block<8, W>};

  std::vector<float> xt;  // [row blocks][K][kRows]
  const W* packed;
  float* y;
  int64_t m_dim, k_dim, n_dim, panels, chunk;
  std::atomic<int64_t> next{0}, done{0};

  void panel(int64_t p) {
    const int64_t col = p * kPanel, cols = std::min(kPanel, n_dim - col);
    for (int64_t m0 = 0; m0 < m_dim; m0 += kRows) {
      const int mb = static_cast<int>(std::min<int64_t>(kRows, m_dim - m0));
      kBlocks[mb](xt.data() + (m0 / kRows) * k_dim * kRows, packed + p * k_dim * kPanel, k_dim, y + m0 * n_dim,
                  n_dim, col, cols);
    }
  }

  void run() {
    for (int64_t first; (first = next.fetch_add(chunk, std::memory_order_relaxed)) < panels;) {
      const int64_t last = std::min(first + chunk, panels);
      for (int64_t p = first; p < last; ++p) panel(p);
      done.fetch_add(last - first, std::memory_order_release);
    }
  }
};

template <ffi::DataType WeightType>
ffi::Error SmallMGemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<WeightType> packed,
                      ffi::ResultBuffer<ffi::F32> y) {
  using W = ffi::NativeType<WeightType>;
  const auto x_dims = x.dimensions(), w_dims = packed.dimensions(), y_dims = y->dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3 || y_dims.size() != 2)
    return ffi::Error::InvalidArgument("polaris_cpu_gemm wants x [M, K], packed [P, K, NT], y [M, N]");
  const int64_t m_dim = x_dims[0], k_dim = x_dims[1], n_dim = y_dims[1];
  if (w_dims[1] != k_dim || w_dims[2] != kPanel || y_dims[0] != m_dim || n_dim > w_dims[0] * kPanel ||
      n_dim <= (w_dims[0] - 1) * kPanel)
    return ffi::Error::InvalidArgument("polaris_cpu_gemm: packed weight does not match x or y");
  auto job = std::make_shared<Job<W>>();
  job->packed = packed.typed_data();
  job->y = y->typed_data();
  job->m_dim = m_dim, job->k_dim = k_dim, job->n_dim = n_dim, job->panels = w_dims[0];
  job->chunk = std::max<int64_t>(1, job->panels / (kChunksPerThread * std::max<int64_t>(1, pool.num_threads())));
  const int64_t blocks = (m_dim + kRows - 1) / kRows;
  job->xt.assign(blocks * k_dim * kRows, 0.0f);
  const float* xs = x.typed_data();
  for (int64_t m = 0; m < m_dim; ++m)
    for (int64_t k = 0; k < k_dim; ++k)
      job->xt[((m / kRows) * k_dim + k) * kRows + m % kRows] = xs[m * k_dim + k];

  const int64_t helpers = std::min<int64_t>(pool.num_threads(), job->panels) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->run(); });
  job->run();
  // Every panel is claimed by now; wait for those a running helper still computes.
  while (job->done.load(std::memory_order_acquire) < job->panels) cpu_relax();
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
