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
  // the same vector as seen through a pointer into an array of S (like the intrinsics'
  // __m256_u): unaligned, and allowed to alias S. Plain vector loads and stores compile to
  // single (v)movups; memcpy of a whole vector was sometimes split into 16-byte pieces
  // through the stack.
  typedef S mem_t __attribute__((vector_size(V * sizeof(S)), aligned(sizeof(S)), may_alias));
  vec_t v;

  Pack() = default;
  // A broadcast. (Written as a vector plus a scalar: other spellings, a vector
  // constructor or an element-wise loop, were assembled lane by lane in the baseline
  // helpers before they were inlined into the AVX2 loops.)
  explicit Pack(S s) { v = vec_t{} + s; }
  static Pack load(const S* p) {
    Pack r;
    r.v = *reinterpret_cast<const mem_t*>(p);
    return r;
  }
  void store(S* p) const { *reinterpret_cast<mem_t*>(p) = v; }
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
  friend Pack operator-(const Pack& a, const Pack& b) {
    Pack r;
    r.v = a.v - b.v;
    return r;
  }
  friend Pack operator*(const Pack& a, const Pack& b) {
    Pack r;
    r.v = a.v * b.v;
    return r;
  }
  friend Pack operator*(const Pack& a, S s) {
    Pack r;
    r.v = a.v * s;
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

// Lane permutations of two packs (a, b) viewed as one list of 2V values: lo and hi
// interleave them (a0 b0 a1 b1 ... | ...), even and odd undo that. Constant masks, so the
// compiler emits a few shuffle instructions.
namespace pack_detail {
template <int V, int Width>
struct Masks;
#define D2SEG_PACK_MASKS(V, ITYPE, LO, HI, EVEN, ODD)                   \
  template <>                                                          \
  struct Masks<V, sizeof(ITYPE)> {                                     \
    typedef ITYPE mask_t __attribute__((vector_size(V * sizeof(ITYPE)))); \
    static constexpr mask_t lo = LO, hi = HI, even = EVEN, odd = ODD;  \
  };
D2SEG_PACK_MASKS(8, int, (mask_t{0, 8, 1, 9, 2, 10, 3, 11}), (mask_t{4, 12, 5, 13, 6, 14, 7, 15}),
                 (mask_t{0, 2, 4, 6, 8, 10, 12, 14}), (mask_t{1, 3, 5, 7, 9, 11, 13, 15}))
D2SEG_PACK_MASKS(4, long long, (mask_t{0, 4, 1, 5}), (mask_t{2, 6, 3, 7}), (mask_t{0, 2, 4, 6}),
                 (mask_t{1, 3, 5, 7}))
#undef D2SEG_PACK_MASKS

template <typename S, int V>
using MasksOf = Masks<V, sizeof(S) == 4 ? sizeof(int) : sizeof(long long)>;

template <typename Vec, typename Mask>
inline Vec shuffle2(const Vec& a, const Vec& b, const Mask& m) {
#if defined(__clang__)
  Vec r;
  for (int i = 0; i < (int)(sizeof(Vec) / sizeof(a[0])); ++i) {
    const int k = m[i];
    r[i] = k < (int)(sizeof(Vec) / sizeof(a[0])) ? a[k] : b[k - sizeof(Vec) / sizeof(a[0])];
  }
  return r;
#else
  return __builtin_shuffle(a, b, m);
#endif
}
}  // namespace pack_detail

template <typename S, int V>
inline void interleave(const Pack<S, V>& a, const Pack<S, V>& b, Pack<S, V>& lo, Pack<S, V>& hi) {
  using M = pack_detail::MasksOf<S, V>;
  lo.v = pack_detail::shuffle2(a.v, b.v, M::lo);
  hi.v = pack_detail::shuffle2(a.v, b.v, M::hi);
}

// r[i] = a[i].sum() for V packs a[0..V).
template <typename S, int V>
inline Pack<S, V> transpose_sum(const Pack<S, V>* a) {
  Pack<S, V> r;
  if constexpr (V == 8 && sizeof(S) == 4) {
    using pack_detail::shuffle2;
    typedef int m_t __attribute__((vector_size(32)));
    // three rounds of pairwise "halves": after round k every lane holds a partial sum of
    // one input over 8 / 2^k lanes; the input order makes the last round come out in order
    const int order[8] = {0, 4, 1, 5, 2, 6, 3, 7};
    typename Pack<S, V>::vec_t c[4], d[2];
    for (int i = 0; i < 4; ++i) {
      const auto& x = a[order[2 * i]].v;
      const auto& y = a[order[2 * i + 1]].v;
      c[i] = shuffle2(x, y, m_t{0, 1, 2, 3, 8, 9, 10, 11}) + shuffle2(x, y, m_t{4, 5, 6, 7, 12, 13, 14, 15});
    }
    for (int i = 0; i < 2; ++i)
      d[i] = shuffle2(c[2 * i], c[2 * i + 1], m_t{0, 1, 8, 9, 4, 5, 12, 13}) +
             shuffle2(c[2 * i], c[2 * i + 1], m_t{2, 3, 10, 11, 6, 7, 14, 15});
    r.v = shuffle2(d[0], d[1], m_t{0, 2, 8, 10, 4, 6, 12, 14}) +
          shuffle2(d[0], d[1], m_t{1, 3, 9, 11, 5, 7, 13, 15});
  } else {
    for (int i = 0; i < V; ++i) r.v[i] = a[i].sum();
  }
  return r;
}

// Transposes the V x V matrix whose rows are r[0..V) in place (r[i].v[j] <-> r[j].v[i]).
template <typename S, int V>
inline void transpose_square(Pack<S, V>* r) {
  if constexpr (V == 8 && sizeof(S) == 4) {
    using pack_detail::shuffle2;
    typedef int m_t __attribute__((vector_size(32)));
    typename Pack<S, V>::vec_t t[8], u[8];
    for (int i = 0; i < 8; i += 2) {  // pairs of rows, interleaved within 4-lane halves
      t[i] = shuffle2(r[i].v, r[i + 1].v, m_t{0, 8, 1, 9, 4, 12, 5, 13});
      t[i + 1] = shuffle2(r[i].v, r[i + 1].v, m_t{2, 10, 3, 11, 6, 14, 7, 15});
    }
    for (int h = 0; h < 8; h += 4)  // quadruples of rows
      for (int k = 0; k < 2; ++k) {
        u[h + 2 * k] = shuffle2(t[h + k], t[h + 2 + k], m_t{0, 1, 8, 9, 4, 5, 12, 13});
        u[h + 2 * k + 1] = shuffle2(t[h + k], t[h + 2 + k], m_t{2, 3, 10, 11, 6, 7, 14, 15});
      }
    for (int k = 0; k < 4; ++k) {  // halves
      r[k].v = shuffle2(u[k], u[4 + k], m_t{0, 1, 2, 3, 8, 9, 10, 11});
      r[4 + k].v = shuffle2(u[k], u[4 + k], m_t{4, 5, 6, 7, 12, 13, 14, 15});
    }
  } else {
    for (int i = 0; i < V; ++i)
      for (int j = i + 1; j < V; ++j) {
        const S a = r[i].v[j];
        r[i].v[j] = r[j].v[i];
        r[j].v[i] = a;
      }
  }
}

template <typename S, int V>
inline void deinterleave(const Pack<S, V>& lo, const Pack<S, V>& hi, Pack<S, V>& even,
                         Pack<S, V>& odd) {
  using M = pack_detail::MasksOf<S, V>;
  even.v = pack_detail::shuffle2(lo.v, hi.v, M::even);
  odd.v = pack_detail::shuffle2(lo.v, hi.v, M::odd);
}

}  // namespace d2seg
