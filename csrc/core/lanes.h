// How the shared per-element math of the ops (templates on a value type T) loads, splats
// and applies ReLU to a value. The default is a plain scalar (what CUDA threads and the
// CPU tail loops use); csrc/core/pack.h adds a fixed-width pack of lanes for the CPU
// loops, so the same templates also run 4-16 pixels at once there.
#pragma once
#include "core/macros.h"

namespace d2seg {

template <typename T>
struct Lanes {
  template <typename S>
  D2SEG_HOST_DEVICE static inline T load(const S* p) {
    return static_cast<T>(*p);
  }
  template <typename S>
  D2SEG_HOST_DEVICE static inline T splat(S s) {
    return static_cast<T>(s);
  }
  D2SEG_HOST_DEVICE static inline T relu(T x) { return x > T(0) ? x : T(0); }
  // ReLU's backward: g where the ReLU's output a is positive, else 0.
  D2SEG_HOST_DEVICE static inline T relu_grad(T g, T a) { return a > T(0) ? g : T(0); }
};

}  // namespace d2seg
