// The 3x3 instance-aware convolution on the CPU with Winograd's F(2x2, 3x3)
// (dynamic_conv/winograd.h has the transforms and the derivation of the backward).
//
// Per instance: the input is transformed once into V[xi][e][t] (16 transform positions xi,
// E channels, the 2x2 output tiles t, padded to whole packs of lanes), the weights of a block
// of output channels into U[xi][b][e], and for every position one small matrix product
// M[xi][b][t] = sum_e U[xi][b][e] V[xi][e][t] (register-blocked, lanes over tiles) before
// the inverse transform writes the 2x2 tiles of the block's output planes. That is 16 x E
// multiply-adds per tile and output channel instead of 36 x E, and every intermediate stays
// in the cache of the thread that owns the instance.
//
// The backward recomputes V and U, transforms the output gradient of a block into
// dM[xi][b][t] = (A dy A^T), and forms, again with lanes over tiles:
//   dU[xi][b][e] = sum_t dM[xi][b][t] V[xi][e][t]   -> weight gradients G^T dU G,
//   dV[xi][e][t] += sum_b U[xi][b][e] dM[xi][b][t]   -> template gradients B dV B^T,
// plus the bias gradients (sums of the output gradient).
//
// Tiles are laid out row by row, each row of tiles padded to whole packs: tile (ty, tx)
// has index (ty * tg + tx / V) * V + tx % V, so that one pack holds V horizontally
// neighbouring tiles. The input planes are first copied, zero-padded, into a
// "deinterleaved" form (even and odd columns apart), from which the 4 columns of V
// neighbouring tiles are 4 plain pack loads.
#include <torch/types.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/cpu_dispatch.h"
#include "core/pack.h"
#include "core/parallel.h"
#include "dynamic_conv/instance_conv_winograd.h"
#include "dynamic_conv/winograd.h"

namespace d2seg {

namespace {

constexpr int kXi = 16;  // transform positions of F(2x2, 3x3)
constexpr int64_t kBlockB = 24;  // output channels per block of transformed weights
constexpr int64_t kSubB = 3;     // output channels per block of forward products (in L1)

// Sizes of one instance's problem and of its scratch.
template <typename S>
struct WinoGeom {
  static constexpr int V = pack_width<S>();
  int64_t E, B, H, W;
  int64_t th, tw, tg, Tp;  // tile rows, tiles per row, packs per tile row, padded tile count
  int64_t Hp, Lh;          // rows of the padded plane, length of its even / odd half rows
  // Distance between transform positions in V / dV and in a block's products. Padded by a
  // cache line: at a multiple of 4 KiB (PointINS: 16 x 64 floats) the 16 loads of one tile
  // would all fall into one L1 set and evict each other.
  int64_t vstride, mstride, fstride;
  WinoGeom(int64_t E_, int64_t B_, int64_t H_, int64_t W_) : E(E_), B(B_), H(H_), W(W_) {
    th = (H + 1) / 2;
    tw = (W + 1) / 2;
    tg = (tw + V - 1) / V;
    Tp = th * tg * V;
    Hp = 2 * th + 2;
    Lh = tg * V + 1;
    vstride = E * Tp + 16;
    mstride = kBlockB * Tp + 16;
    fstride = kSubB * Tp + 16;
  }
  int64_t plane() const { return Hp * 2 * Lh; }
  // bytes of one thread's WinoScratch (backward, the larger pass)
  int64_t scratch_bytes() const {
    const int64_t values = 2 * E * plane() + 2 * kXi * vstride + kXi * mstride + 2 * kXi * kBlockB * E;
    return values * int64_t(sizeof(S));
  }
};

// Padded row pr, padded column 2 c + parity (padded = image + 1) of the deinterleaved plane.
inline int64_t plane_index(int64_t pr, int64_t parity, int64_t c, int64_t Lh) {
  return (pr * 2 + parity) * Lh + c;
}

// Copies the (E, H, W) input into E zero-padded deinterleaved planes.
template <typename S>
void fill_planes(const S* in, const WinoGeom<S>& G, S* planes) {
  for (int64_t e = 0; e < G.E; ++e) {
    S* p = planes + e * G.plane();
    const S* src = in + e * G.H * G.W;
    for (int64_t pr = 0; pr < G.Hp; ++pr) {
      const int64_t y = pr - 1;
      for (int parity = 0; parity < 2; ++parity) {
        S* row = p + plane_index(pr, parity, 0, G.Lh);
        if (y < 0 || y >= G.H) {
          std::fill(row, row + G.Lh, S(0));
          continue;
        }
        for (int64_t c = 0; c < G.Lh; ++c) {
          const int64_t x = 2 * c + parity - 1;
          row[c] = x >= 0 && x < G.W ? src[y * G.W + x] : S(0);
        }
      }
    }
  }
}

// The 16 packs of the 4x4 input tiles of the V tiles starting at (ty, pack g).
template <typename P, typename S>
inline void load_input_tiles(const S* plane, int64_t Lh, int64_t ty, int64_t g, P* d) {
  constexpr int V = sizeof(P) / sizeof(S);
  for (int jy = 0; jy < 4; ++jy) {
    const S* even = plane + plane_index(2 * ty + jy, 0, g * V, Lh);
    const S* odd = even + Lh;
    d[4 * jy + 0] = P::load(even);
    d[4 * jy + 1] = P::load(odd);
    d[4 * jy + 2] = P::load(even + 1);
    d[4 * jy + 3] = P::load(odd + 1);
  }
}

// V[xi * vstride + e * Tp + t] for all channels and tiles.
template <typename S>
void transform_inputs(const S* planes, const WinoGeom<S>& G, S* Vt) {
  constexpr int V = WinoGeom<S>::V;
  using P = Pack<S, V>;
  for (int64_t e = 0; e < G.E; ++e)
    for (int64_t ty = 0; ty < G.th; ++ty)
      for (int64_t g = 0; g < G.tg; ++g) {
        P d[16], v[16];
        load_input_tiles<P>(planes + e * G.plane(), G.Lh, ty, g, d);
        wino_input_tile(d, v);
        const int64_t t = (ty * G.tg + g) * V;
        for (int xi = 0; xi < kXi; ++xi) v[xi].store(Vt + xi * G.vstride + e * G.Tp + t);
      }
}

// U[(xi * nb + bi) * E + e] for output channels [0, nb) of w (rows of E * 9 weights), with
// lanes over the nb * E kernels. Their 9 taps are transposed to lanes 8 kernels at a time:
// an 8 x 8 in-register transpose of taps 0-7 plus 8 loads of tap 8 (float); double packs
// (4 lanes) go through the scratch wt.
template <typename S>
void transform_weights(const S* w, int64_t nb, int64_t E, S* U, std::vector<S>& wt) {
  constexpr int V = pack_width<S>();
  using P = Pack<S, V>;
  const int64_t np = nb * E;
  int64_t p = 0;
  if constexpr (V == 8) {
    for (; p + V <= np; p += V) {
      P g[9], u[16];
      for (int i = 0; i < 8; ++i) g[i] = P::load(w + (p + i) * 9);
      transpose_square(g);
      S tap8[8];
      for (int i = 0; i < 8; ++i) tap8[i] = w[(p + i) * 9 + 8];
      g[8] = P::load(tap8);
      wino_weight<P, S>(g, u);
      for (int xi = 0; xi < kXi; ++xi) u[xi].store(U + xi * np + p);
    }
  } else {
    wt.resize(9 * np);
    for (int64_t q = 0; q < np; ++q)
      for (int k = 0; k < 9; ++k) wt[k * np + q] = w[q * 9 + k];
    for (; p + V <= np; p += V) {
      P g[9], u[16];
      for (int k = 0; k < 9; ++k) g[k] = P::load(wt.data() + k * np + p);
      wino_weight<P, S>(g, u);
      for (int xi = 0; xi < kXi; ++xi) u[xi].store(U + xi * np + p);
    }
  }
  for (; p < np; ++p) {
    S u[16];
    wino_weight<S, S>(w + p * 9, u);
    for (int xi = 0; xi < kXi; ++xi) U[xi * np + p] = u[xi];
  }
}

// Calls fn(std::integral_constant<int, N>{}, i) for the blocks [i, i + N) that cover [0, n):
// blocks of Max, then one of the remainder.
template <int K, typename Fn>
inline void call_rest(int64_t rest, int64_t i, const Fn& fn) {
  if constexpr (K >= 1) {
    if (rest == K) return fn(std::integral_constant<int, K>{}, i);
    call_rest<K - 1>(rest, i, fn);
  }
}

template <int Max, typename Fn>
inline void for_blocks(int64_t n, const Fn& fn) {
  int64_t i = 0;
  for (; i + Max <= n; i += Max) fn(std::integral_constant<int, Max>{}, i);
  call_rest<Max - 1>(n - i, i, fn);
}

// M[i][t..] = sum_e U[i][e] * X[e][t..] for NB rows i and NT packs of tiles:
// the forward products (U: weights, X: transformed inputs) and the template-gradient
// products (U: transposed weights, X: transformed output gradients), with accumulate = the
// latter's running sum over blocks of output channels.
template <int NB, int NT, typename S>
inline void products_rows(const S* U, int64_t ustride, int64_t ukstride, const S* X,
                          int64_t xstride, int64_t K, S* M, int64_t mstride, bool accumulate) {
  constexpr int V = pack_width<S>();
  using P = Pack<S, V>;
  P acc[NB][NT];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = accumulate ? P::load(M + i * mstride + j * V) : P(S(0));
  for (int64_t k = 0; k < K; ++k) {
    P x[NT];
    for (int j = 0; j < NT; ++j) x[j] = P::load(X + k * xstride + j * V);
    for (int i = 0; i < NB; ++i) {
      const P u(U[i * ustride + k * ukstride]);
      for (int j = 0; j < NT; ++j) acc[i][j] += u * x[j];
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j].store(M + i * mstride + j * V);
}

// M (rows x Tp) = U (rows x K, element (i, k) at U[i * ustride + k * ukstride]) X (K x Tp),
// in register blocks of NB rows x NT packs. Both passes take 3 x 4: 12 accumulators, each
// broadcast weight used for 4 packs (4 x 2 measured ~8% slower), and E = 9 rows of the
// template gradients in 3 whole blocks.
template <int NB, int NT, typename S>
void products(const S* U, int64_t ustride, int64_t ukstride, const S* X, int64_t K, int64_t rows,
              int64_t Tp, S* M, bool accumulate) {
  constexpr int V = pack_width<S>();
  for_blocks<NB>(rows, [&](auto nb, int64_t i) {
    for_blocks<NT>(Tp / V, [&](auto nt, int64_t j) {
      products_rows<decltype(nb)::value, decltype(nt)::value>(
          U + i * ustride, ustride, ukstride, X + j * V, Tp, K, M + i * Tp + j * V, Tp, accumulate);
    });
  });
}

// Stores the 2V values (lo, hi) of image row y from column x0 on, clipped to the image.
template <typename P, typename S>
inline void store_row_pair(const P& lo, const P& hi, S* row, int64_t x0, int64_t W) {
  constexpr int V = sizeof(P) / sizeof(S);
  if (x0 + 2 * V <= W) {
    lo.store(row + x0);
    hi.store(row + x0 + V);
    return;
  }
  S tmp[2 * V];
  lo.store(tmp);
  hi.store(tmp + V);
  std::copy(tmp, tmp + (W - x0), row + x0);
}

// The 2V values of image row y (zero outside) from column x0 on, as (lo, hi).
template <typename P, typename S>
inline void load_row_pair(const S* plane, int64_t y, int64_t x0, int64_t H, int64_t W, P& lo,
                          P& hi) {
  constexpr int V = sizeof(P) / sizeof(S);
  if (y >= H) {
    lo = hi = P(S(0));
    return;
  }
  const S* row = plane + y * W;
  if (x0 + 2 * V <= W) {
    lo = P::load(row + x0);
    hi = P::load(row + x0 + V);
    return;
  }
  S tmp[2 * V];
  std::fill(tmp, tmp + 2 * V, S(0));
  std::copy(row + x0, row + W, tmp);
  lo = P::load(tmp);
  hi = P::load(tmp + V);
}

// Scratch of one thread, reused over its instances.
template <typename S>
struct WinoScratch {
  std::vector<S> planes, Vt, U, M, dVt, dU, gplanes, wt;

  // Sizes the buffers both passes use and transforms the instance's templates into Vt.
  void start(const S* in, const WinoGeom<S>& G) {
    planes.resize(G.E * G.plane());
    Vt.resize(kXi * G.vstride);
    U.resize(kXi * kBlockB * G.E);
    M.resize(kXi * G.mstride);
    fill_planes(in, G, planes.data());
    transform_inputs(planes.data(), G, Vt.data());
  }
};

template <typename S>
void forward_instance(const S* in, const S* w, const S* bias, S* out, const WinoGeom<S>& G,
                      WinoScratch<S>& s) {
  constexpr int V = WinoGeom<S>::V;
  using P = Pack<S, V>;
  const int64_t E = G.E, Tp = G.Tp, HW = G.H * G.W;
  s.start(in, G);
  for (int64_t b0 = 0; b0 < G.B; b0 += kBlockB) {
    const int64_t nb = std::min(kBlockB, G.B - b0);
    transform_weights(w + b0 * E * 9, nb, E, s.U.data(), s.wt);
    // products and output tiles kSubB output channels at a time: their products stay in L1
    for (int64_t s0 = 0; s0 < nb; s0 += kSubB) {
      const int64_t ns = std::min(kSubB, nb - s0);
      for (int xi = 0; xi < kXi; ++xi)
        products<3, 4>(s.U.data() + xi * nb * E + s0 * E, E, int64_t(1), s.Vt.data() + xi * G.vstride, E,
                 ns, Tp, s.M.data() + xi * G.fstride, false);
      for (int64_t bi = 0; bi < ns; ++bi) {
        const P bb(bias ? bias[b0 + s0 + bi] : S(0));
        S* o = out + (b0 + s0 + bi) * HW;
        for (int64_t ty = 0; ty < G.th; ++ty)
          for (int64_t g = 0; g < G.tg; ++g) {
            const int64_t t = (ty * G.tg + g) * V;
            P m[16], y[4];
            for (int xi = 0; xi < kXi; ++xi) m[xi] = P::load(s.M.data() + xi * G.fstride + bi * Tp + t);
            wino_output_tile(m, y);
            for (int i = 0; i < 2 && 2 * ty + i < G.H; ++i) {
              P lo, hi;
              interleave(y[2 * i] + bb, y[2 * i + 1] + bb, lo, hi);
              store_row_pair(lo, hi, o + (2 * ty + i) * G.W, 2 * g * V, G.W);
            }
          }
      }
    }
  }
}

template <typename S>
void backward_instance(const S* go, const S* in, const S* w, S* gin, S* gw, S* gb,
                       const WinoGeom<S>& G, WinoScratch<S>& s) {
  constexpr int V = WinoGeom<S>::V;
  using P = Pack<S, V>;
  const int64_t E = G.E, Tp = G.Tp, HW = G.H * G.W;
  s.start(in, G);
  s.dVt.assign(kXi * G.vstride, S(0));
  s.dU.resize(kXi * kBlockB * E);
  s.gplanes.assign(E * G.plane(), S(0));
  for (int64_t b0 = 0; b0 < G.B; b0 += kBlockB) {
    const int64_t nb = std::min(kBlockB, G.B - b0);
    transform_weights(w + b0 * E * 9, nb, E, s.U.data(), s.wt);
    // dM = A dy A^T for every tile of the block's output gradients; bias gradients
    for (int64_t bi = 0; bi < nb; ++bi) {
      const S* g_plane = go + (b0 + bi) * HW;
      P sum(S(0));
      for (int64_t ty = 0; ty < G.th; ++ty)
        for (int64_t g = 0; g < G.tg; ++g) {
          P dy[4], m[16];
          for (int i = 0; i < 2; ++i) {
            P lo, hi;
            load_row_pair(g_plane, 2 * ty + i, 2 * g * V, G.H, G.W, lo, hi);
            deinterleave(lo, hi, dy[2 * i], dy[2 * i + 1]);
            sum += lo + hi;
          }
          wino_output_tile_adjoint(dy, m);
          const int64_t t = (ty * G.tg + g) * V;
          for (int xi = 0; xi < kXi; ++xi) m[xi].store(s.M.data() + xi * G.mstride + bi * Tp + t);
        }
      gb[b0 + bi] = sum.sum();
    }
    for (int xi = 0; xi < kXi; ++xi) {
      const S* dM = s.M.data() + xi * G.mstride;
      const S* Vx = s.Vt.data() + xi * G.vstride;
      // dU[e][xi][bi] = sum_t dM[bi][t] V[e][t]: 8 output channels at a time (lanes over
      // tiles, summed across lanes at the end)
      for (int64_t e = 0; e < E; ++e) {
        const S* Ve = Vx + e * Tp;
        S* dU = s.dU.data() + (e * kXi + xi) * nb;
        int64_t bi = 0;
        for (; bi + V <= nb; bi += V) {
          P acc[V];
          for (int i = 0; i < V; ++i) acc[i] = P(S(0));
          for (int64_t t = 0; t < Tp; t += V) {
            const P v = P::load(Ve + t);
            for (int i = 0; i < V; ++i) acc[i] += P::load(dM + (bi + i) * Tp + t) * v;
          }
          transpose_sum(acc).store(dU + bi);
        }
        for (; bi < nb; ++bi) {
          P acc(S(0));
          for (int64_t t = 0; t < Tp; t += V) acc += P::load(dM + bi * Tp + t) * P::load(Ve + t);
          dU[bi] = acc.sum();
        }
      }
      // dV[e][t] += sum_bi U[bi][e] dM[bi][t]: rows e, K = nb, U transposed
      products<3, 4>(s.U.data() + xi * nb * E, int64_t(1), E, dM, nb, E, Tp, s.dVt.data() + xi * G.vstride,
               true);
    }
    // weight gradients G^T dU G, lanes over output channels
    for (int64_t e = 0; e < E; ++e) {
      const S* dU = s.dU.data() + e * kXi * nb;
      int64_t bi = 0;
      for (; bi + V <= nb; bi += V) {
        P du[16], dg[9];
        for (int xi = 0; xi < kXi; ++xi) du[xi] = P::load(dU + xi * nb + bi);
        wino_weight_adjoint<P, S>(du, dg);
        S tmp[9][V];
        for (int k = 0; k < 9; ++k) dg[k].store(tmp[k]);
        for (int i = 0; i < V; ++i) {
          S* dst = gw + ((b0 + bi + i) * E + e) * 9;
          for (int k = 0; k < 9; ++k) dst[k] = tmp[k][i];
        }
      }
      for (; bi < nb; ++bi) {
        S du[16];
        for (int xi = 0; xi < kXi; ++xi) du[xi] = dU[xi * nb + bi];
        wino_weight_adjoint<S, S>(du, gw + ((b0 + bi) * E + e) * 9);
      }
    }
  }
  // template gradients: B dV B^T of every tile, added into the padded planes (tiles overlap)
  for (int64_t e = 0; e < E; ++e) {
    S* plane = s.gplanes.data() + e * G.plane();
    for (int64_t ty = 0; ty < G.th; ++ty)
      for (int64_t g = 0; g < G.tg; ++g) {
        const int64_t t = (ty * G.tg + g) * V;
        P dv[16], dd[16];
        for (int xi = 0; xi < kXi; ++xi) dv[xi] = P::load(s.dVt.data() + xi * G.vstride + e * Tp + t);
        wino_input_tile_adjoint(dv, dd);
        for (int jy = 0; jy < 4; ++jy) {
          S* even = plane + plane_index(2 * ty + jy, 0, g * V, G.Lh);
          S* odd = even + G.Lh;
          dd[4 * jy + 0].add_to(even);
          dd[4 * jy + 1].add_to(odd);
          dd[4 * jy + 2].add_to(even + 1);
          dd[4 * jy + 3].add_to(odd + 1);
        }
      }
    S* dst = gin + e * HW;
    for (int64_t y = 0; y < G.H; ++y)
      for (int64_t x = 0; x < G.W; ++x)
        dst[y * G.W + x] = plane[plane_index(y + 1, (x + 1) & 1, (x + 1) >> 1, G.Lh)];
  }
}

// Calls fn(r, scratch) for every instance r of [0, R), on all threads, each thread with
// its own scratch, in the loop body compiled for the best instruction set.
template <typename S, typename Fn>
void for_each_instance(int64_t R, const Fn& fn) {
  parallel_instances(0, R, [&](const auto& take) { run_best([&] {
    WinoScratch<S> s;
    for (int64_t r = take(); r >= 0; r = take()) fn(r, s);
  }); });
}

}  // namespace

bool instance_conv_use_winograd(int64_t B, int64_t E, int64_t d, int64_t H, int64_t W,
                                int64_t elem_size) {
  if (d != 3 || B * E * 9 * H * W < kInstanceConvWinogradMinMacs) return false;
  // a bounded per-thread scratch; larger images go to the GEMM kernel, which works in chunks
  const int64_t bytes = elem_size == 4 ? WinoGeom<float>(E, B, H, W).scratch_bytes()
                                       : WinoGeom<double>(E, B, H, W).scratch_bytes();
  return bytes <= kInstanceConvWinogradMaxScratch;
}

void instance_conv_forward_winograd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                    at::Tensor& out) {
  const int64_t R = x.size(0), E = x.size(1), H = x.size(2), W = x.size(3), B = w.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "instance_aware_conv_winograd", [&] {
    using S = scalar_t;
    const WinoGeom<S> G(E, B, H, W);
    const S* in = x.data_ptr<S>();
    const S* wp = w.data_ptr<S>();
    const S* bp = b.defined() ? b.data_ptr<S>() : nullptr;
    S* op = out.data_ptr<S>();
    for_each_instance<S>(R, [&](int64_t r, WinoScratch<S>& s) {
      forward_instance(in + r * E * H * W, wp + r * B * E * 9, bp ? bp + r * B : nullptr,
                       op + r * B * H * W, G, s);
    });
  });
}

void instance_conv_backward_winograd(const at::Tensor& go, const at::Tensor& x,
                                     const at::Tensor& w, at::Tensor& gin, at::Tensor& gw,
                                     at::Tensor& gb) {
  const int64_t R = x.size(0), E = x.size(1), H = x.size(2), W = x.size(3), B = w.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "instance_aware_conv_backward_winograd", [&] {
    using S = scalar_t;
    const WinoGeom<S> G(E, B, H, W);
    const S* gop = go.data_ptr<S>();
    const S* in = x.data_ptr<S>();
    const S* wp = w.data_ptr<S>();
    S* gip = gin.data_ptr<S>();
    S* gwp = gw.data_ptr<S>();
    S* gbp = gb.data_ptr<S>();
    for_each_instance<S>(R, [&](int64_t r, WinoScratch<S>& s) {
      backward_instance(gop + r * B * H * W, in + r * E * H * W, wp + r * B * E * 9,
                        gip + r * E * H * W, gwp + r * B * E * 9, gbp + r * B, G, s);
    });
  });
}

}  // namespace d2seg
