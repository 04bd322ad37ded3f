// The CPU kernels' run-time choice of instruction set, shared by the gate and the KGS loss: their
// feature loops are compiled for AVX-512, AVX2 and baseline x86-64 (the same IEEE operations at every
// width, so the results do not depend on the CPU) and dispatch on cpu_isa().
#pragma once

#include <cstdlib>
#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#define MIM_ISA_DISPATCH 1
#define MIM_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MIM_ISA_DISPATCH 0
#define MIM_ALWAYS_INLINE inline
#endif

namespace mim_fast {

enum class Isa { kDefault, kAvx2, kAvx512 };

// The widest ISA this CPU has; MIM_FAST_CPU_ISA=default|avx2|avx512 caps it (tests compare them).
inline Isa cpu_isa() {
#if MIM_ISA_DISPATCH
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa best = __builtin_cpu_supports("avx512f") ? Isa::kAvx512
               : __builtin_cpu_supports("avx2")  ? Isa::kAvx2
                                                 : Isa::kDefault;
    const char* cap = std::getenv("MIM_FAST_CPU_ISA");
    if (cap != nullptr) {
      const std::string c(cap);
      const Isa want = c == "avx512" ? Isa::kAvx512 : c == "avx2" ? Isa::kAvx2 : Isa::kDefault;
      if (static_cast<int>(want) < static_cast<int>(best)) best = want;
    }
    return best;
  }();
  return isa;
#else
  return Isa::kDefault;
#endif
}

}  // namespace mim_fast
