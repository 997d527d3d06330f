// Paged-attention decode on CPU: one query token per row against that row's pages, read in place through
// its page table (an XLA FFI kernel beside cpu_gemm.cc, built into the same library).
//
// Why: the plain-JAX reference (paged_attention.py) gathers each block of pages into a fresh buffer before
// its two batched dots, and XLA CPU neither fuses the gather into the dot nor skips a short row's masked
// positions: at the Qwen3-0.6B shape that was 35-50% of a decode call (BENCHMARKS.md). Here each (row, kv
// head) task streams the row's filled pages once, for all query heads that share the kv head, with an
// online softmax per page; tasks are shared by the calling thread and XLA's pool through an atomic counter.
//
// q [B, H, D] float32, already scaled; k, v [KV, P, S, D] float32 (head-major pages, as the engine's pool);
// table [B, NP] int32; visible [B] int32: how many of a row's first positions its query sees (0: zeros).
// out [B, H, D] float32. Query head h reads kv head h / (H / KV).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
constexpr int64_t kMaxGroup = 64;         // query heads per kv head
constexpr int64_t kMaxGroupDims = 8192;   // query heads per kv head x head_dim held in the accumulator
constexpr int64_t kMaxPageSize = 1024;

typedef float vfloat __attribute__((vector_size(64), aligned(4)));

inline vfloat load(const float* p) {
  vfloat out;
  std::memcpy(&out, p, sizeof(out));
  return out;
}
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

inline float hsum(vfloat v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof(lanes));
  float total = 0.0f;
  for (int i = 0; i < kLanes; ++i) total += lanes[i];
  return total;
}

inline float dot(const float* a, const float* b, int64_t d) {
  vfloat acc{};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) acc += load(a + i) * load(b + i);
  float total = hsum(acc);
  for (; i < d; ++i) total += a[i] * b[i];
  return total;
}

// y = y * keep + p * x over d floats.
inline void scale_add(float* y, float keep, float p, const float* x, int64_t d) {
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) store(y + i, load(y + i) * keep + p * load(x + i));
  for (; i < d; ++i) y[i] = y[i] * keep + p * x[i];
}

struct Shapes {
  int64_t rows, heads, kv_heads, group, pages, page_size, head_dim, table_width;
};

// One (row, kv head): the online softmax of its `group` query heads over the row's visible positions.
void attend(const Shapes& s, const float* q, const float* k, const float* v, const int32_t* table,
            const int32_t* visible, float* out, int64_t task) {
  const int64_t b = task / s.kv_heads, kv = task % s.kv_heads, d = s.head_dim, g = s.group;
  const float* q_gd = q + (b * s.heads + kv * g) * d;
  float* out_gd = out + (b * s.heads + kv * g) * d;
  const int64_t seen = std::clamp<int64_t>(visible[b], 0, s.table_width * s.page_size);
  float acc[kMaxGroupDims], m[kMaxGroup], l[kMaxGroup];
  float scores[kMaxPageSize];
  std::fill(acc, acc + g * d, 0.0f);
  std::fill(m, m + g, -INFINITY);
  std::fill(l, l + g, 0.0f);
  for (int64_t i = 0; i * s.page_size < seen; ++i) {
    const int64_t page = table[b * s.table_width + i];
    if (page < 0 || page >= s.pages) continue;  // out of the pool: nothing to read (the null page is 0)
    const int64_t n = std::min(s.page_size, seen - i * s.page_size);
    const float* k_sd = k + (kv * s.pages + page) * s.page_size * d;
    const float* v_sd = v + (kv * s.pages + page) * s.page_size * d;
    for (int64_t j = 0; j < g; ++j) {
      float top = m[j];
      for (int64_t t = 0; t < n; ++t) {
        scores[t] = dot(q_gd + j * d, k_sd + t * d, d);
        top = std::max(top, scores[t]);
      }
      const float keep = std::exp(m[j] - top);  // 0 on the first page (m = -inf)
      m[j] = top;
      l[j] *= keep;
      float* acc_d = acc + j * d;
      for (int64_t t = 0; t < n; ++t) {
        const float p = std::exp(scores[t] - top);
        l[j] += p;
        scale_add(acc_d, t == 0 ? keep : 1.0f, p, v_sd + t * d, d);
      }
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    const float inv = l[j] > 0.0f ? 1.0f / l[j] : 0.0f;
    for (int64_t e = 0; e < d; ++e) out_gd[j * d + e] = acc[j * d + e] * inv;
  }
}

struct Tasks {
  Shapes shapes;
  const float *q, *k, *v;
  const int32_t *table, *visible;
  float* out;
  int64_t count;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      attend(shapes, q, k, v, table, visible, out, task);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PagedDecode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> visible,
                       ffi::ResultBuffer<ffi::F32> out) {
  const auto q_dims = q.dimensions(), k_dims = k.dimensions(), t_dims = table.dimensions();
  if (q_dims.size() != 3 || k_dims.size() != 4 || t_dims.size() != 2 || visible.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("polaris_cpu_paged_decode wants q [B,H,D], pages [KV,P,S,D], table [B,NP]");
  const Shapes s{q_dims[0], q_dims[1], k_dims[0], q_dims[1] / std::max<int64_t>(k_dims[0], 1), k_dims[1],
                 k_dims[2],  k_dims[3], t_dims[1]};
  const auto v_dims = v.dimensions();
  bool same_pages = v_dims.size() == 4;
  for (size_t i = 0; same_pages && i < 4; ++i) same_pages = v_dims[i] == k_dims[i];
  if (s.kv_heads < 1 || s.heads % s.kv_heads || s.head_dim != q_dims[2] || t_dims[0] != s.rows ||
      visible.dimensions()[0] != s.rows || !same_pages)
    return ffi::Error::InvalidArgument("polaris_cpu_paged_decode: q, pages, table and visible do not agree");
  if (s.group > kMaxGroup || s.group * s.head_dim > kMaxGroupDims || s.page_size > kMaxPageSize)
    return ffi::Error::InvalidArgument("polaris_cpu_paged_decode: heads per kv head x head_dim or page size too big");
  auto tasks = std::make_shared<Tasks>();
  tasks->shapes = s;
  tasks->q = q.typed_data();
  tasks->k = k.typed_data();
  tasks->v = v.typed_data();
  tasks->table = table.typed_data();
  tasks->visible = visible.typed_data();
  tasks->out = out->typed_data();
  tasks->count = s.rows * s.kv_heads;
  polaris_cpu::run_on_pool(pool, tasks->count, tasks->done, [tasks](int64_t) { tasks->run(); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PolarisCpuPagedDecode, PagedDecode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
