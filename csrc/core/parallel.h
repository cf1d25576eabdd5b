// Work sharing for the CPU kernels (host only).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace d2seg {

// Runs body(take) once on each worker thread; take() hands out the items of [begin, end)
// (instances) one at a time (an atomic counter), -1 when none is left. Unlike equal static
// shares, on a busy machine a thread that loses its core leaves its items to the others
// instead of holding up the whole pass. Each item is still processed by exactly one thread.
template <typename Body>
void parallel_instances(int64_t begin, int64_t end, const Body& body) {
  if (end <= begin) return;
  std::atomic<int64_t> next{begin};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), end - begin);
  at::parallel_for(0, std::max<int64_t>(1, workers), 1, [&](int64_t, int64_t) {
    body([&]() -> int64_t {
      const int64_t r = next.fetch_add(1, std::memory_order_relaxed);
      return r < end ? r : -1;
    });
  });
}

}  // namespace d2seg
