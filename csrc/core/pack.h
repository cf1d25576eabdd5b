// A fixed-width pack of V lanes for the CPU loops (host only), built on the compiler's
// vector extension so that packs live in SIMD registers (one or several per pack); with
// it the shared per-element templates evaluate V neighbouring pixels at once.
#pragma once
#include <cstdint>
#include <cstring>

#include "core/lanes.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace d2seg {

template <typename S, int V>
struct Pack {
  // Only scalar-aligned: packs are loaded from and stored to any offset, and held in
  // std::vector, whose allocations need not be SIMD-aligned.
  typedef S vec_t __attribute__((vector_size(V * sizeof(S)), aligned(sizeof(S))));
  vec_t v;

  Pack() = default;
  explicit Pack(S s) { v = vec_t{} + s; }
  static Pack load(const S* p) {
    Pack r;
    std::memcpy(&r.v, p, sizeof(vec_t));
    return r;
  }
  void store(S* p) const { std::memcpy(p, &v, sizeof(vec_t)); }
  // p[i] += v[i]
  void add_to(S* p) const { (load(p) + *this).store(p); }
  S sum() const {
    S s = 0;
    for (int i = 0; i < V; ++i) s += v[i];
    return s;
  }
  friend Pack operator+(const Pack& a, const Pack& b) {
    Pack r;
    r.v = a.v + b.v;
    return r;
  }
  friend Pack operator*(const Pack& a, const Pack& b) {
    Pack r;
    r.v = a.v * b.v;
    return r;
  }
  Pack& operator+=(const Pack& b) {
    v += b.v;
    return *this;
  }
};

template <typename S, int V>
struct Lanes<Pack<S, V>> {
  using T = Pack<S, V>;
  static inline T load(const S* p) { return T::load(p); }
  static inline T splat(S s) { return T(s); }
  static inline T relu(const T& x) {
    T r;
    r.v = x.v > S(0) ? x.v : S(0);
    return r;
  }
  static inline T relu_grad(const T& g, const T& a) {
    T r;
    r.v = a.v > S(0) ? g.v : S(0);
    return r;
  }
};

// Lanes per pack: 32 bytes (8 floats, 4 doubles).
template <typename S>
constexpr int pack_width() {
  return static_cast<int>(32 / sizeof(S));
}

}  // namespace d2seg
