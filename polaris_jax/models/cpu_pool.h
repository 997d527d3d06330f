// Sharing one kernel call's tasks between the calling thread and XLA's intra-op pool (cpu_gemm.cc,
// cpu_paged.cc): workers claim tasks through an atomic counter, so a helper that starts late finds no work
// and nothing waits on a task that has not run; the caller then waits for the tasks still being computed.
#ifndef POLARIS_JAX_MODELS_CPU_POOL_H_
#define POLARIS_JAX_MODELS_CPU_POOL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace polaris_cpu {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Runs work(0) on the calling thread and work(i), i = 1.., on up to min(pool threads, tasks) - 1 helpers;
// returns once `done` (each worker's count of finished tasks) reaches `tasks`. `work` must be safe to call
// after this returns (hold the shared state by value: a helper may start after every task is claimed).
template <typename Work>
void run_on_pool(xla::ffi::ThreadPool& pool, int64_t tasks, const std::atomic<int64_t>& done, Work work) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work, i] { work(i + 1); });
  work(0);
  while (done.load(std::memory_order_acquire) < tasks) cpu_relax();
}

}  // namespace polaris_cpu

#endif  // POLARIS_JAX_MODELS_CPU_POOL_H_
