// Host-memory helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mim_fast {

// Large outputs (∂L/∂x, ∂L/∂h: tens of MB) are fresh buffers written once; with 4 KiB pages their
// first-touch page faults cost about as much as the writes themselves (measured here: a 38 MB copy into
// fresh memory 28 ms, into touched memory 10 ms). Ask for transparent huge pages on the 2 MiB-aligned
// interior of the buffer before writing it. A hint only: no effect where THP is off or the memory was
// already touched; MIM_FAST_NO_HUGE_PAGES=1 turns it off.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t bytes = static_cast<uintptr_t>(t.nbytes());
  if (!t.is_cpu() || bytes < 4 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t start = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
  static const bool disabled = std::getenv("MIM_FAST_NO_HUGE_PAGES") != nullptr;
  if (end > start && !disabled) {
    (void)madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
}

}  // namespace mim_fast
