// Host-memory helpers shared by the CPU kernels: large outputs come from a pool of recycled buffers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__)
#include <pthread.h>
#endif

namespace mim_fast {

// Why a pool. The CPU kernels' large outputs (∂L/∂x of the gate, ∂L/∂h and the saved h of the KGS loss:
// tens of MB) are fresh buffers written once per step. glibc serves them with mmap and returns them to the
// kernel on free, so every step pays a page fault and a kernel zero-fill per page before our write: on the
// 2-core CI VM a 39 MB fill takes 17 ms into fresh memory and 2 ms into memory already touched (one
// thread; benchmarks/page_fault_cost.py) — the faults cost several times the writes themselves. Like the CUDA caching allocator, we keep freed large
// buffers and hand them out again for a request of the same (2 MiB-rounded) size, which is what a training
// loop at a fixed shape asks for every step. Bounded: at most MIM_FAST_CPU_CACHE_MB (default 512) MiB
// are kept idle, the oldest released first; MIM_FAST_CPU_CACHE_MB=0 turns the pool off; and
// mim_fast.empty_cpu_cache() frees what is idle. Tensors from the pool are ordinary CPU tensors (their
// storage's allocator is this one, so resize_ and sharing work); only requests of ≥ 8 MiB use it.
class LargeBufferPool final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(8) << 20;
  static constexpr size_t kHuge = size_t(2) << 20;

  static LargeBufferPool& get() {
    static LargeBufferPool* pool = new LargeBufferPool();  // never destroyed: tensors may outlive statics
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || cap_ == 0) return c10::GetCPUAllocator()->allocate(n);
    const size_t size = (n + kHuge - 1) / kHuge * kHuge;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        if (it->size == size) {
          Block* b = new Block(*it);
          idle_.erase(it);
          idle_bytes_ -= size;
          ++hits_;
          live_bytes_ += size;
          report(b->ptr, static_cast<int64_t>(size));
          return {b->ptr, b, &LargeBufferPool::release, c10::Device(c10::DeviceType::CPU)};
        }
      }
      ++misses_;
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, size) != 0 || p == nullptr) {
      // let the caching go: free what is idle and try once more before reporting
      empty_cache();
      if (posix_memalign(&p, kHuge, size) != 0 || p == nullptr) {
        TORCH_CHECK(false, "mim_fast: could not allocate ", size, " bytes of host memory");
      }
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // 2 MiB pages where transparent huge pages are in "madvise" mode: fewer faults on the first touch.
    if (!no_huge_pages_) (void)madvise(p, size, MADV_HUGEPAGE);
#endif
    Block* b = new Block{p, size};
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_bytes_ += size;
      report(p, static_cast<int64_t>(size));
    }
    return {p, b, &LargeBufferPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }  // the context, not the pointer, frees

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every idle buffer; returns the bytes freed.
  size_t empty_cache() {
    std::deque<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(idle_);
      idle_bytes_ = 0;
    }
    size_t freed = 0;
    for (const Block& b : drop) {
      std::free(b.ptr);
      freed += b.size;
    }
    return freed;
  }

  struct Stats {
    size_t idle_bytes, idle_blocks, cap_bytes, hits, misses;
  };
  Stats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {idle_bytes_, idle_.size(), cap_, hits_, misses_};
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  LargeBufferPool() {
    const char* mb = std::getenv("MIM_FAST_CPU_CACHE_MB");
    cap_ = (mb != nullptr ? static_cast<size_t>(std::strtoull(mb, nullptr, 10)) : size_t(512)) << 20;
    no_huge_pages_ = std::getenv("MIM_FAST_NO_HUGE_PAGES") != nullptr;
#if defined(__unix__)
    // fork() while another thread holds mu_ (a DataLoader forking as a pooled tensor dies) would leave the
    // child's copy locked forever: hold it across the fork, release it on both sides.
    pthread_atfork([] { get().mu_.lock(); }, [] { get().mu_.unlock(); }, [] { get().mu_.unlock(); });
#endif
  }

  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    get().put(*b);
    delete b;
  }

  // Tells torch.profiler(profile_memory=True) about a buffer handed out (+) or given back (−), as torch's
  // own CPU allocator does, so memory profiles and peak-memory figures see the pooled outputs. Under mu_.
  void report(void* p, int64_t delta) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, delta, live_bytes_, live_bytes_ + idle_bytes_,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  void put(const Block& b) {
    std::deque<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_bytes_ -= b.size;
      if (b.size > cap_) {
        drop.push_back(b);
      } else {
        while (idle_bytes_ + b.size > cap_ && !idle_.empty()) {  // the oldest idle buffers go first
          drop.push_back(idle_.front());
          idle_bytes_ -= idle_.front().size;
          idle_.pop_front();
        }
        idle_.push_back(b);
        idle_bytes_ += b.size;
      }
      report(b.ptr, -static_cast<int64_t>(b.size));  // after the bookkeeping: totals include this block
    }
    for (const Block& d : drop) std::free(d.ptr);  // outside the lock
  }

  std::mutex mu_;
  std::deque<Block> idle_;
  size_t idle_bytes_ = 0, live_bytes_ = 0, cap_ = 0, hits_ = 0, misses_ = 0;
  bool no_huge_pages_ = false;
};

// A CPU tensor for a large output: from the pool (see above) when CPU and ≥ 8 MiB, else at::empty.
// Strides as at::empty_like's "preserve" when `like` is given and dense (e.g. a batch-first view).
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opts,
                              const at::Tensor* like = nullptr) {
  if (!opts.device().is_cpu()) {
    return like != nullptr ? at::empty_like(*like, opts) : at::empty(sizes, opts);
  }
  const c10::DispatchKeySet cpu(c10::DispatchKey::CPU);
  const at::ScalarType dtype = c10::typeMetaToScalarType(opts.dtype());
  if (like != nullptr && like->is_non_overlapping_and_dense() && like->sizes() == sizes) {
    return at::detail::empty_strided_generic(sizes, like->strides(), &LargeBufferPool::get(), cpu, dtype);
  }
  return at::detail::empty_generic(sizes, &LargeBufferPool::get(), cpu, dtype, c10::nullopt);
}

inline at::Tensor empty_large_like(const at::Tensor& x) { return empty_large(x.sizes(), x.options(), &x); }

}  // namespace mim_fast
