#pragma once

#if defined(__CUDACC__)
#define D2SEG_HOST_DEVICE __host__ __device__
#else
#define D2SEG_HOST_DEVICE
#endif

// Checks that raise a Python-visible error (RuntimeError / ValueError) with a message,
// instead of crashing inside a kernel.
#define D2SEG_CHECK_SAME_DEVICE(a, b)                                                  \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b                            \
              " must be on the same device, got ", (a).device(), " and ", (b).device())

// Full unrolling of a loop with a small compile-time trip count.
#if defined(__CUDACC__)
#define D2SEG_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define D2SEG_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define D2SEG_UNROLL _Pragma("GCC unroll 16")
#else
#define D2SEG_UNROLL
#endif
