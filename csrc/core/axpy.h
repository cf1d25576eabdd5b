// Per-element math of the `axpy` op, shared by the CPU and CUDA implementations.
// A trivial op that exists so the build, the op registration and their tests are real
// from day one; the method ops (dynamic convolution, point sampling) follow the same shape.
#pragma once
#include "core/macros.h"

namespace d2seg {

template <typename T>
D2SEG_HOST_DEVICE inline T axpy_element(T x, T y, T alpha) {
  return alpha * x + y;
}

}  // namespace d2seg
