// Runtime choice of the CPU instruction set for the hot loops (host only).
//
// The extension is compiled for the baseline ISA (so it runs on every x86-64 CPU); the
// loop bodies of the CPU kernels are additionally compiled for AVX2 + FMA by wrapping them
// in run_best(): the wrapper carries `target("avx2,fma")` and `flatten`, so the whole body
// (the shared per-element templates included) is inlined and vectorised for AVX2 inside
// it. Out-of-line copies stay baseline, so nothing AVX2 leaks to other callers.
#pragma once

namespace d2seg {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define D2SEG_CPU_AVX2_CLONE 1
inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
template <typename Fn>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(const Fn& fn) {
  fn();
}
#endif

#if defined(__GNUC__)
template <typename Fn>
__attribute__((flatten)) void run_baseline(const Fn& fn) {
  fn();
}
#else
template <typename Fn>
void run_baseline(const Fn& fn) {
  fn();
}
#endif

// Runs fn() compiled for the best instruction set this CPU has.
template <typename Fn>
void run_best(const Fn& fn) {
#ifdef D2SEG_CPU_AVX2_CLONE
  if (cpu_has_avx2_fma()) return run_avx2(fn);
#endif
  run_baseline(fn);
}

}  // namespace d2seg
