// The CPU kernels' run-time choice of instruction set, shared by the gate and the KGS loss: their
// feature loops are compiled for AVX-512, AVX2 and baseline x86-64 (the same IEEE operations at every
// width, so the results do not depend on the CPU) and dispatch on cpu_isa().
#pragma once

#include <cstdlib>
#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#define MIM_ISA_DISPATCH 1
#define MIM_ALWAYS_INLINE inline __attribute__((always_inline))
#define MIM_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#else
#define MIM_ISA_DISPATCH 0
#define MIM_ALWAYS_INLINE inline
#define MIM_ALWAYS_INLINE_LAMBDA
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

// MIM_ISA_VARIANTS((template params), (template args), NAME, (params), (args)) compiles NAME##_body —
// an always-inline function template with those template parameters — as NAME##_default, NAME##_avx2
// and NAME##_avx512 (target attributes: the same source, vectorized as wide as each ISA allows), and
// defines NAME(Isa isa, params...) that runs the one for isa. Every variant computes the same IEEE
// operations in the same order, so results do not depend on the CPU.
#define MIM_UNPAREN(...) __VA_ARGS__
#define MIM_ISA_VARIANTS(TPARAMS, TARGS, NAME, PARAMS, ARGS)                                         \
  template <MIM_UNPAREN TPARAMS>                                                                     \
  void NAME##_default PARAMS { NAME##_body<MIM_UNPAREN TARGS> ARGS; }                                \
  MIM_ISA_TARGETS(TPARAMS, TARGS, NAME, PARAMS, ARGS)                                                \
  template <MIM_UNPAREN TPARAMS>                                                                     \
  void NAME(Isa isa, MIM_UNPAREN PARAMS) {                                                           \
    MIM_ISA_SWITCH(TARGS, NAME, ARGS)                                                                \
    NAME##_default<MIM_UNPAREN TARGS> ARGS;                                                          \
  }
#if MIM_ISA_DISPATCH
#define MIM_ISA_TARGETS(TPARAMS, TARGS, NAME, PARAMS, ARGS)                                          \
  template <MIM_UNPAREN TPARAMS>                                                                     \
  __attribute__((target("avx2"))) void NAME##_avx2 PARAMS { NAME##_body<MIM_UNPAREN TARGS> ARGS; }   \
  template <MIM_UNPAREN TPARAMS>                                                                     \
  __attribute__((target("avx512f"))) void NAME##_avx512 PARAMS { NAME##_body<MIM_UNPAREN TARGS> ARGS; }
#define MIM_ISA_SWITCH(TARGS, NAME, ARGS)                                                            \
  if (isa == Isa::kAvx512) return NAME##_avx512<MIM_UNPAREN TARGS> ARGS;                             \
  if (isa == Isa::kAvx2) return NAME##_avx2<MIM_UNPAREN TARGS> ARGS;
#else
#define MIM_ISA_TARGETS(TPARAMS, TARGS, NAME, PARAMS, ARGS)
#define MIM_ISA_SWITCH(TARGS, NAME, ARGS) (void)isa;
#endif

}  // namespace mim_fast
