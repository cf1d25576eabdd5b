// Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for
// Convolutional Neural Networks", 2016) for the 3x3 instance-aware convolution, and the
// adjoints its backward needs. Host/device templates on the value type T (a scalar, or a
// Pack of lanes on the CPU), like the rest of dynamic_conv.h.
//
// A 2x2 output tile y of a 3x3 correlation (out[y, x] = sum g[ky, kx] in[y + ky - 1, x + kx - 1])
// is computed from the 4x4 input tile d around it as
//     y = A^T [ (G g G^T) (.) (B^T d B) ] A
// where (.) is the elementwise product of two 4x4 matrices (16 "transform positions"), with
//     B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//     G   = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
//     A^T = [1 1 1 0; 0 1 -1 -1].
// Over C input channels the elementwise products become, per transform position, a sum over
// channels: one small matrix product per position, 16 / 36 of the multiplications of the
// direct convolution. The transforms only add, subtract and halve, so float32 results stay
// within a few ulp of the direct sum.
//
// Since y is linear in U = G g G^T and in V = B^T d B, the gradients are the adjoints:
//     dM = A dy A^T,  dU = sum over tiles of dM (.) V,  dg = G^T dU G,
//     dV = dM (.) U (summed over output channels),  dd = B dV B^T (tiles overlap by 2).
// Matrices are 16 values row-major: m[4 * i + j].
#pragma once

#include "core/macros.h"

namespace d2seg {

// ---- 1-D transforms (a column or a row of the 2-D ones) ----

// v = B^T d (4 -> 4)
template <typename T>
D2SEG_HOST_DEVICE inline void wino_bt(const T& d0, const T& d1, const T& d2, const T& d3, T& v0,
                                      T& v1, T& v2, T& v3) {
  v0 = d0 - d2;
  v1 = d1 + d2;
  v2 = d2 - d1;
  v3 = d1 - d3;
}

// d = B v (4 -> 4), the adjoint of wino_bt
template <typename T>
D2SEG_HOST_DEVICE inline void wino_b(const T& v0, const T& v1, const T& v2, const T& v3, T& d0,
                                     T& d1, T& d2, T& d3) {
  d0 = v0;
  d1 = v1 - v2 + v3;
  d2 = v1 + v2 - v0;
  d3 = T(0) - v3;
}

// u = G g (3 -> 4)
template <typename T, typename S>
D2SEG_HOST_DEVICE inline void wino_g(const T& g0, const T& g1, const T& g2, const S half, T& u0,
                                     T& u1, T& u2, T& u3) {
  const T s = (g0 + g2) * half, h1 = g1 * half;
  u0 = g0;
  u1 = s + h1;
  u2 = s - h1;
  u3 = g2;
}

// g = G^T u (4 -> 3), the adjoint of wino_g
template <typename T, typename S>
D2SEG_HOST_DEVICE inline void wino_gt(const T& u0, const T& u1, const T& u2, const T& u3,
                                      const S half, T& g0, T& g1, T& g2) {
  const T s = (u1 + u2) * half;
  g0 = u0 + s;
  g1 = (u1 - u2) * half;
  g2 = s + u3;
}

// y = A^T m (4 -> 2)
template <typename T>
D2SEG_HOST_DEVICE inline void wino_at(const T& m0, const T& m1, const T& m2, const T& m3, T& y0,
                                      T& y1) {
  y0 = m0 + m1 + m2;
  y1 = m1 - m2 - m3;
}

// m = A y (2 -> 4), the adjoint of wino_at
template <typename T>
D2SEG_HOST_DEVICE inline void wino_a(const T& y0, const T& y1, T& m0, T& m1, T& m2, T& m3) {
  m0 = y0;
  m1 = y0 + y1;
  m2 = y0 - y1;
  m3 = T(0) - y1;
}

// ---- 2-D transforms ----

// v = B^T d B for a 4x4 input tile d
template <typename T>
D2SEG_HOST_DEVICE inline void wino_input_tile(const T* d, T* v) {
  T t[16];
D2SEG_UNROLL
  for (int j = 0; j < 4; ++j) wino_bt(d[j], d[4 + j], d[8 + j], d[12 + j], t[j], t[4 + j], t[8 + j], t[12 + j]);
D2SEG_UNROLL
  for (int i = 0; i < 4; ++i)
    wino_bt(t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3], v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}

// d = B v B^T (the adjoint of wino_input_tile)
template <typename T>
D2SEG_HOST_DEVICE inline void wino_input_tile_adjoint(const T* v, T* d) {
  T t[16];
D2SEG_UNROLL
  for (int j = 0; j < 4; ++j) wino_b(v[j], v[4 + j], v[8 + j], v[12 + j], t[j], t[4 + j], t[8 + j], t[12 + j]);
D2SEG_UNROLL
  for (int i = 0; i < 4; ++i)
    wino_b(t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3], d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]);
}

// u = G g G^T for a 3x3 kernel g (9 values row-major)
template <typename T, typename S>
D2SEG_HOST_DEVICE inline void wino_weight(const T* g, T* u) {
  const S half = S(0.5);
  T t[12];  // G g: 4 x 3
D2SEG_UNROLL
  for (int j = 0; j < 3; ++j) wino_g(g[j], g[3 + j], g[6 + j], half, t[j], t[3 + j], t[6 + j], t[9 + j]);
D2SEG_UNROLL
  for (int i = 0; i < 4; ++i)
    wino_g(t[3 * i], t[3 * i + 1], t[3 * i + 2], half, u[4 * i], u[4 * i + 1], u[4 * i + 2], u[4 * i + 3]);
}

// g = G^T u G (the adjoint of wino_weight)
template <typename T, typename S>
D2SEG_HOST_DEVICE inline void wino_weight_adjoint(const T* u, T* g) {
  const S half = S(0.5);
  T t[12];  // G^T u: 3 x 4
D2SEG_UNROLL
  for (int j = 0; j < 4; ++j) wino_gt(u[j], u[4 + j], u[8 + j], u[12 + j], half, t[j], t[4 + j], t[8 + j]);
D2SEG_UNROLL
  for (int i = 0; i < 3; ++i)
    wino_gt(t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3], half, g[3 * i], g[3 * i + 1], g[3 * i + 2]);
}

// y = A^T m A: the 2x2 output tile (y[2 * i + j]) of the 16 transform-domain sums m
template <typename T>
D2SEG_HOST_DEVICE inline void wino_output_tile(const T* m, T* y) {
  T t[8];  // A^T m: 2 x 4
D2SEG_UNROLL
  for (int j = 0; j < 4; ++j) wino_at(m[j], m[4 + j], m[8 + j], m[12 + j], t[j], t[4 + j]);
D2SEG_UNROLL
  for (int i = 0; i < 2; ++i) wino_at(t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3], y[2 * i], y[2 * i + 1]);
}

// m = A y A^T (the adjoint of wino_output_tile)
template <typename T>
D2SEG_HOST_DEVICE inline void wino_output_tile_adjoint(const T* y, T* m) {
  T t[8];  // A y: 4 x 2
D2SEG_UNROLL
  for (int j = 0; j < 2; ++j) wino_a(y[j], y[2 + j], t[j], t[2 + j], t[4 + j], t[6 + j]);
D2SEG_UNROLL
  for (int i = 0; i < 4; ++i) wino_a(t[2 * i], t[2 * i + 1], m[4 * i], m[4 * i + 1], m[4 * i + 2], m[4 * i + 3]);
}

}  // namespace d2seg
