// CPU kernels of the dynamic convolution ops, and the ops' schemas.
//
// Shapes: R instances, N images, E template channels, B output channels, d kernel size,
// C mask-feature channels, H x W pixels, P parameters per instance.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "core/cpu_dispatch.h"
#include "core/pack.h"
#include "core/parallel.h"
#include "dynamic_conv/dynamic_conv.h"
#include "dynamic_conv/dynamic_conv_checks.h"
#include "dynamic_conv/instance_conv_winograd.h"

namespace d2seg {

namespace {

template <typename S, int V>
inline void add_lanes(S* p, const Pack<S, V>& v) {
  v.add_to(p);
}
template <typename S>
inline void add_lanes(S* p, S v) {
  *p += v;
}
template <typename S, int V>
inline void store_lanes(S* p, const Pack<S, V>& v) {
  v.store(p);
}
template <typename S>
inline void store_lanes(S* p, S v) {
  *p = v;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls body(TypeTag<T>{}, x) over [0, n): packs of one vector width, then scalars.
// (Packs wider than one machine vector compile to poor code, so there are none.)
template <typename S, typename Body>
inline void for_each_chunk(int64_t n, const Body& body) {
  constexpr int V = pack_width<S>();
  int64_t x = 0;
  for (; x + V <= n; x += V) body(TypeTag<Pack<S, V>>{}, x);
  for (; x < n; ++x) body(TypeTag<S>{}, x);
}

template <typename S, int V>
inline S lanes_sum(const Pack<S, V>& v) {
  return v.sum();
}
template <typename S>
inline S lanes_sum(S v) {
  return v;
}

// in(e, ky, kx) = base[e * plane + sign * (ky * row + kx)]: the window of a pixel in a
// zero-padded plane (sign +1), or the mirrored window of the transposed convolution (-1).
template <typename T, typename S>
struct PlaneWindow {
  const S* base;
  int64_t plane;
  int64_t row;
  int64_t sign;
  inline T operator()(int e, int ky, int kx) const {
    return Lanes<T>::load(base + e * plane + sign * (ky * row + kx));
  }
};

// Copies (E, H, W) into a zero-padded (E, H + 2 pad, W + 2 pad) buffer.
template <typename S>
void pad_planes(const S* src, int64_t E, int64_t H, int64_t W, int64_t pad, std::vector<S>& dst) {
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
  dst.assign(E * Hp * Wp, S(0));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t y = 0; y < H; ++y)
      std::copy(src + (e * H + y) * W, src + (e * H + y + 1) * W,
                dst.data() + (e * Hp + y + pad) * Wp + pad);
}

// ------------------------------- instance_aware_conv ------------------------------------

// Weights of B output channels are applied NB at a time (independent accumulators).
constexpr int kConvNB = 8;

template <int D, typename S>
void instance_conv_forward_cpu(const S* in, const S* w, const S* bias, S* out, int64_t R,
                               int64_t B, int64_t E, int64_t H, int64_t W) {
  constexpr int64_t pad = D / 2;
  // D == 1 reads the planes directly as one row of H*W pixels.
  const int64_t rows = D == 1 ? 1 : H, cols = D == 1 ? H * W : W;
  const int64_t Wp = D == 1 ? H * W : W + 2 * pad;
  const int64_t plane = D == 1 ? H * W : (H + 2 * pad) * Wp;
  const int64_t HW = H * W, wstride = E * D * D;
  parallel_instances(0, R, [&](const auto& take) { run_best([&] {
    std::vector<S> padded;
    for (int64_t r = take(); r >= 0; r = take()) {
      const S* src = in + r * E * HW;
      if (D > 1) {
        pad_planes(src, E, H, W, pad, padded);
        src = padded.data();
      }
      auto run_block = [&](auto nb_tag, int64_t b0) {
        constexpr int NB = decltype(nb_tag)::value;
        const S* wb = w + (r * B + b0) * wstride;
        const S* bb = bias ? bias + r * B + b0 : nullptr;
        S* o = out + (r * B + b0) * HW;
        for (int64_t y = 0; y < rows; ++y) {
          for_each_chunk<S>(cols, [&](auto tag, int64_t x) {
            using T = typename decltype(tag)::type;
            PlaneWindow<T, S> win{src + y * Wp + x, plane, Wp, 1};
            T res[NB];
            instance_conv_outputs<NB, D>(wb, wstride, bb, (int)E, win, res);
            for (int i = 0; i < NB; ++i) store_lanes(o + i * HW + y * cols + x, res[i]);
          });
        }
      };
      int64_t b = 0;
      for (; b + kConvNB <= B; b += kConvNB) run_block(std::integral_constant<int, kConvNB>{}, b);
      for (; b < B; ++b) run_block(std::integral_constant<int, 1>{}, b);
    }
  }); });
}

template <int D, typename S>
void instance_conv_backward_cpu(const S* go, const S* in, const S* w, S* gin, S* gw, S* gb,
                                int64_t R, int64_t B, int64_t E, int64_t H, int64_t W) {
  constexpr int V = pack_width<S>();
  using P = Pack<S, V>;
  constexpr int64_t pad = D / 2;
  const int64_t rows = D == 1 ? 1 : H, cols = D == 1 ? H * W : W;
  const int64_t Wp = D == 1 ? H * W : W + 2 * pad;
  const int64_t plane = D == 1 ? H * W : (H + 2 * pad) * Wp;
  const int64_t HW = H * W;
  const int K = (int)(E * D * D);
  parallel_instances(0, R, [&](const auto& take) { run_best([&] {
    std::vector<S> padded_in, padded_go;
    std::vector<P> acc(K);
    std::vector<S> acc_s(K);
    for (int64_t r = take(); r >= 0; r = take()) {
      const S* src = in + r * E * HW;
      const S* gsrc = go + r * B * HW;
      const S* wr = w + r * B * E * D * D;
      if (D > 1) {
        pad_planes(src, E, H, W, pad, padded_in);
        src = padded_in.data();
        pad_planes(gsrc, B, H, W, pad, padded_go);
      }
      // Input gradient: the transposed convolution of the output gradient, NE channels at
      // a time. In the padded output gradient the mirrored window of (y, x) starts at
      // (y + 2 pad, x + 2 pad) and walks back by (ky, kx).
      auto run_block = [&](auto ne_tag, int64_t e0) {
        constexpr int NE = decltype(ne_tag)::value;
        for (int64_t y = 0; y < rows; ++y) {
          for_each_chunk<S>(cols, [&](auto tag, int64_t x) {
            using T = typename decltype(tag)::type;
            const S* base = D > 1 ? padded_go.data() + (y + 2 * pad) * Wp + x + 2 * pad
                                  : gsrc + y * Wp + x;
            PlaneWindow<T, S> win{base, D > 1 ? plane : HW, Wp, -1};
            T res[NE];
            instance_conv_grad_inputs<NE, D>(wr, (int)B, (int)E, (int)e0, win, res);
            for (int i = 0; i < NE; ++i)
              store_lanes(gin + (r * E + e0 + i) * HW + y * cols + x, res[i]);
          });
        }
      };
      int64_t e = 0;
      for (; e + 3 <= E; e += 3) run_block(std::integral_constant<int, 3>{}, e);
      for (; e < E; ++e) run_block(std::integral_constant<int, 1>{}, e);
      // Weight and bias gradients: reductions over the pixels of each output channel.
      if (D == 1) {
        // accumulators in registers, NE input channels per pass over the row
        auto run_wblock = [&](auto ne_tag, int64_t b, int64_t e0, bool with_bias) {
          constexpr int NE = decltype(ne_tag)::value;
          const S* g = gsrc + b * HW;
          P a[NE], gsum(S(0));
          S as[NE], gsum_s = 0;
          for (int i = 0; i < NE; ++i) a[i] = P(S(0)), as[i] = 0;
          int64_t x = 0;
          for (; x + V <= HW; x += V) {
            PlaneWindow<P, S> win{src + x, HW, 0, 1};
            instance_conv_grad_weight_1x1<NE>(P::load(g + x), (int)e0, win, a, gsum);
          }
          for (; x < HW; ++x) {
            PlaneWindow<S, S> win{src + x, HW, 0, 1};
            instance_conv_grad_weight_1x1<NE>(g[x], (int)e0, win, as, gsum_s);
          }
          S* gwb = gw + (r * B + b) * K + e0;
          for (int i = 0; i < NE; ++i) gwb[i] = a[i].sum() + as[i];
          if (with_bias) gb[r * B + b] = gsum.sum() + gsum_s;
        };
        for (int64_t b = 0; b < B; ++b) {
          if (E == 0) {
            // no input channel to carry the bias sum along: the row sum on its own
            const S* g = gsrc + b * HW;
            S s = 0;
            for (int64_t x = 0; x < HW; ++x) s += g[x];
            gb[r * B + b] = s;
            continue;
          }
          int64_t e0 = 0;
          for (; e0 + 8 <= E; e0 += 8) run_wblock(std::integral_constant<int, 8>{}, b, e0, e0 == 0);
          for (; e0 + 4 <= E; e0 += 4) run_wblock(std::integral_constant<int, 4>{}, b, e0, e0 == 0);
          for (; e0 < E; ++e0) run_wblock(std::integral_constant<int, 1>{}, b, e0, e0 == 0);
        }
        continue;
      }
      for (int64_t b = 0; b < B; ++b) {
        const S* g = gsrc + b * HW;
        std::fill(acc.begin(), acc.end(), P(S(0)));
        std::fill(acc_s.begin(), acc_s.end(), S(0));
        P gsum(S(0));
        S gsum_s = 0;
        for (int64_t y = 0; y < H; ++y) {
          int64_t x = 0;
          const int64_t row = D > 1 ? Wp : W;
          for (; x + V <= W; x += V) {
            const P gv = P::load(g + y * W + x);
            gsum += gv;
            PlaneWindow<P, S> win{src + y * row + x, plane, row, 1};
            instance_conv_grad_weight_pixel<D>(gv, (int)E, win, acc.data());
          }
          for (; x < W; ++x) {
            const S gv = g[y * W + x];
            gsum_s += gv;
            PlaneWindow<S, S> win{src + y * row + x, plane, row, 1};
            instance_conv_grad_weight_pixel<D>(gv, (int)E, win, acc_s.data());
          }
        }
        S* gwb = gw + (r * B + b) * K;
        for (int k = 0; k < K; ++k) gwb[k] = acc[k].sum() + acc_s[k];
        gb[r * B + b] = gsum.sum() + gsum_s;
      }
    }
  }); });
}

// ------------------------- instance_aware_conv as per-instance GEMMs ---------------------
//
// Instance r's convolution is one matrix product: out[r] (B, HW) = W'[r] (B, E d^2 + 1) x
// col[r] (E d^2 + 1, HW), where col is the im2col of its templates with a row of ones and
// W' its weights with the bias as last column. The backward is two more products per
// instance, gcol = W[r]^T go[r] (then col2im into the template gradient) and
// gW[r] = go[r] col^T, plus row sums for the bias. Instances go in chunks: the products of
// a chunk are one batched BLAS call (at::bmm: MKL / OpenBLAS, which parallelise it; BLAS
// is not called from inside at::parallel_for, where MKL started nested thread teams and
// ran ~50x slower), the im2col / col2im / sums are at::parallel_for loops over the chunk's
// instances, and the column buffers are one chunk's worth.

// Which kernel runs: for d = 3 Winograd's F(2x2, 3x3) (instance_conv_winograd_cpu.cpp)
// when an instance has at least kInstanceConvWinogradMinMacs multiply-adds and its scratch
// is bounded; the GEMMs for d = 5, 7 (and d = 3 instances too large for Winograd's
// scratch) from this many multiply-adds on (a BLAS call costs microseconds of fixed
// overhead that tiny instances do not repay); else the direct kernel above. For d = 1 the
// direct kernel is as fast as the GEMMs (it is bound by writing the output) and its
// backward reads the output gradient once per pass from cache, so it is kept.
// instance_aware_conv_cpu_kernel says which; tests/test_ops_dynamic_conv.py covers all three.
constexpr int64_t kInstanceConvGemmMinMacs = 1 << 14;

inline bool instance_conv_use_gemm(int64_t B, int64_t E, int64_t D, int64_t HW) {
  return D > 1 && B * E * D * D * HW >= kInstanceConvGemmMinMacs;
}

// col[(e * D + ky) * D + kx, y * W + x] = in[e, y + ky - D/2, x + kx - D/2], zero outside.
template <int D, typename S>
void instance_conv_im2col(const S* in, int64_t E, int64_t H, int64_t W, S* col) {
  constexpr int pad = D / 2;
  const int64_t HW = H * W;
  for (int64_t e = 0; e < E; ++e) {
    const S* src = in + e * HW;
    for (int ky = 0; ky < D; ++ky) {
      int64_t y0, y1;
      instance_conv_tap_range<D>(ky, H, y0, y1);
      for (int kx = 0; kx < D; ++kx) {
        int64_t x0, x1;
        instance_conv_tap_range<D>(kx, W, x0, x1);
        S* row = col + ((e * D + ky) * D + kx) * HW;
        std::fill(row, row + y0 * W, S(0));
        for (int64_t y = y0; y < y1; ++y) {
          S* o = row + y * W;
          const S* s = src + (y + ky - pad) * W + (kx - pad);
          std::fill(o, o + x0, S(0));
          for (int64_t x = x0; x < x1; ++x) o[x] = s[x];
          std::fill(o + x1, o + W, S(0));
        }
        std::fill(row + y1 * W, row + HW, S(0));
      }
    }
  }
}

// The adjoint of instance_conv_im2col: gin[e, y + ky - D/2, x + kx - D/2] += gcol[row, y * W + x].
template <int D, typename S>
void instance_conv_col2im_add(const S* gcol, int64_t E, int64_t H, int64_t W, S* gin) {
  constexpr int pad = D / 2;
  const int64_t HW = H * W;
  for (int64_t e = 0; e < E; ++e) {
    S* dst = gin + e * HW;
    for (int ky = 0; ky < D; ++ky) {
      int64_t y0, y1;
      instance_conv_tap_range<D>(ky, H, y0, y1);
      for (int kx = 0; kx < D; ++kx) {
        int64_t x0, x1;
        instance_conv_tap_range<D>(kx, W, x0, x1);
        const S* row = gcol + ((e * D + ky) * D + kx) * HW;
        for (int64_t y = y0; y < y1; ++y) {
          S* o = dst + (y + ky - pad) * W + (kx - pad);
          const S* g = row + y * W;
          for (int64_t x = x0; x < x1; ++x) o[x] += g[x];
        }
      }
    }
  }
}

// sums[b] = sum of the n values of row b (rows n apart).
template <typename S>
void row_sums(const S* g, int64_t rows, int64_t n, S* sums) {
  constexpr int V = pack_width<S>();
  using P = Pack<S, V>;
  for (int64_t b = 0; b < rows; ++b) {
    const S* row = g + b * n;
    P a0(S(0)), a1(S(0));
    int64_t i = 0;
    for (; i + 2 * V <= n; i += 2 * V) {
      a0 += P::load(row + i);
      a1 += P::load(row + i + V);
    }
    for (; i + V <= n; i += V) a0 += P::load(row + i);
    S s = (a0 + a1).sum();
    for (; i < n; ++i) s += row[i];
    sums[b] = s;
  }
}

// Instances per chunk: as many as keep one chunk's scratch (columns and weights, K' values
// per pixel and per output channel) within 32 MiB, so all of PointINS's 128 instances
// (10.7 MiB each) go in one chunk. Few chunks matter on a busy machine: every chunk costs
// a few thread-pool barriers, and a barrier waits for the slowest thread.
inline int64_t instance_conv_chunk(int64_t B, int64_t HW, int64_t Kp, int64_t elem_size) {
  return std::max<int64_t>(1, (int64_t(32) << 20) / std::max<int64_t>(1, Kp * (HW + B) * elem_size));
}

// Builds the forward operands of instances [r0, r1): cols (n, K', HW) with the im2col of
// each instance's templates and, when with_bias, a last row of ones; wb (n, B, K') with each
// instance's (B, K) weights and, when with_bias, its bias as the last column (K' = K + 1).
// With the bias folded in, one product writes the output once.
template <int D, typename S>
void instance_conv_forward_operands(const S* in, const S* w, const S* bias, int64_t r0,
                                    int64_t r1, int64_t B, int64_t E, int64_t H, int64_t W,
                                    S* cols, S* wb) {
  const int64_t HW = H * W, K = E * D * D, Kp = K + (bias ? 1 : 0);
  parallel_instances(r0, r1, [&](const auto& take) { run_best([&] {
    for (int64_t r = take(); r >= 0; r = take()) {
      S* col = cols + (r - r0) * Kp * HW;
      instance_conv_im2col<D>(in + r * E * HW, E, H, W, col);
      if (!bias) continue;
      std::fill(col + K * HW, col + Kp * HW, S(1));
      S* wr = wb + (r - r0) * B * Kp;
      for (int64_t b = 0; b < B; ++b) {
        std::copy(w + (r * B + b) * K, w + (r * B + b + 1) * K, wr + b * Kp);
        wr[b * Kp + K] = bias[r * B + b];
      }
    }
  }); });
}

template <int D>
void instance_conv_forward_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                at::Tensor& out) {
  const int64_t R = x.size(0), E = x.size(1), H = x.size(2), W = x.size(3), B = w.size(1);
  const int64_t HW = H * W, K = E * D * D, Kp = K + (b.defined() ? 1 : 0);
  const int64_t chunk = std::min(R, instance_conv_chunk(B, HW, Kp, x.element_size()));
  at::Tensor cols = at::empty({chunk, Kp, HW}, x.options()), wb;
  if (b.defined()) wb = at::empty({chunk, B, Kp}, x.options());
  const at::Tensor wv = w.view({R, B, K});
  at::Tensor ov = out.view({R, B, HW});
  for (int64_t r0 = 0; r0 < R; r0 += chunk) {
    const int64_t r1 = std::min(R, r0 + chunk), n = r1 - r0;
    at::Tensor o = ov.narrow(0, r0, n);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "instance_aware_conv_cpu_operands", [&] {
      instance_conv_forward_operands<D, scalar_t>(
          x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
          b.defined() ? b.data_ptr<scalar_t>() : nullptr, r0, r1, B, E, H, W,
          cols.data_ptr<scalar_t>(), b.defined() ? wb.data_ptr<scalar_t>() : nullptr);
    });
    at::bmm_out(o, b.defined() ? wb.narrow(0, 0, n) : wv.narrow(0, r0, n), cols.narrow(0, 0, n));
  }
}

template <int D>
void instance_conv_backward_gemm(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w,
                                 at::Tensor& gin, at::Tensor& gw, at::Tensor& gb) {
  const int64_t R = x.size(0), E = x.size(1), H = x.size(2), W = x.size(3), B = w.size(1);
  const int64_t HW = H * W, K = E * D * D;
  const int64_t chunk = std::min(R, instance_conv_chunk(B, HW, K, x.element_size()));
  const at::Tensor gov = go.view({R, B, HW});
  const at::Tensor wt = w.view({R, B, K}).transpose(1, 2);
  at::Tensor gwv = gw.view({R, B, K});
  at::Tensor cols = at::empty({chunk, K, HW}, x.options());
  at::Tensor gcols = at::empty({chunk, K, HW}, x.options());
  for (int64_t r0 = 0; r0 < R; r0 += chunk) {
    const int64_t r1 = std::min(R, r0 + chunk), n = r1 - r0;
    const at::Tensor g = gov.narrow(0, r0, n);
    at::Tensor gc = gcols.narrow(0, 0, n), gwc = gwv.narrow(0, r0, n);
    at::bmm_out(gc, wt.narrow(0, r0, n), g);
    // one pass over the chunk's instances: template gradients (col2im), columns for the
    // weight gradients (im2col) and bias gradients (row sums)
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "instance_aware_conv_backward_cpu_cols", [&] {
      const scalar_t* in = x.data_ptr<scalar_t>();
      const scalar_t* gp = go.data_ptr<scalar_t>();
      const scalar_t* gcp = gcols.data_ptr<scalar_t>();
      scalar_t* cp = cols.data_ptr<scalar_t>();
      scalar_t* gip = gin.data_ptr<scalar_t>();
      scalar_t* sums = gb.data_ptr<scalar_t>();
      parallel_instances(r0, r1, [&](const auto& take) { run_best([&] {
        for (int64_t r = take(); r >= 0; r = take()) {
          scalar_t* dst = gip + r * E * HW;
          std::fill(dst, dst + E * HW, scalar_t(0));
          instance_conv_col2im_add<D>(gcp + (r - r0) * K * HW, E, H, W, dst);
          instance_conv_im2col<D>(in + r * E * HW, E, H, W, cp + (r - r0) * K * HW);
          row_sums(gp + r * B * HW, B, HW, sums + r * B);
        }
      }); });
    });
    at::bmm_out(gwc, g, cols.narrow(0, 0, n).transpose(1, 2));
  }
}

// --------------------------------- dynamic_mask_head ------------------------------------

template <typename S>
struct DynProblem {
  const S* feat;      // (N, C, H, W)
  const int64_t* inds;  // (R,)
  const S* params;    // (R, P)
  const S* locs;      // (R, 2) or null
  const S* scales;    // (R,) or null
  int64_t R, N, C, H, W, stride;
  DynLayout L;
  bool rel() const { return locs != nullptr; }
  S scale(int64_t r) const { return scales ? scales[r] : S(1); }
  void relative_x(int64_t r, std::vector<S>& relx) const {
    relx.assign(W + pack_width<S>(), S(0));
    if (!rel()) return;
    for (int64_t x = 0; x < W; ++x) relx[x] = dyn_relative_coord(locs[2 * r], x, stride, scale(r));
  }
  S relative_y(int64_t r, int64_t y) const {
    return rel() ? dyn_relative_coord(locs[2 * r + 1], y, stride, scale(r)) : S(0);
  }
};

template <int CH, typename S>
void dyn_forward_cpu(const DynProblem<S>& pb, S* out) {
  constexpr int V = pack_width<S>();
  using P = Pack<S, V>;
  const int64_t H = pb.H, W = pb.W, HW = H * W;
  const int rel = pb.rel() ? 2 : 0;
  at::parallel_for(0, pb.R * H, 4, [&](int64_t begin, int64_t end) { run_best([&] {
    std::vector<S> relx;
    int64_t last_r = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / H, y = t % H;
      if (r != last_r) pb.relative_x(r, relx), last_r = r;
      const S rely = pb.relative_y(r, y);
      const S* p = pb.params + r * pb.L.total;
      const S* f = pb.feat + pb.inds[r] * pb.C * HW + y * W;
      S* o = out + r * HW + y * W;
      int64_t x = 0;
      for (; x + V <= W; x += V) {
        DynPixelInput<P, S> in{f + x, HW, rel, P::load(relx.data() + x), P(rely)};
        dyn_mlp_forward<CH>(p, pb.L, in, (P*)nullptr).store(o + x);
      }
      for (; x < W; ++x) {
        DynPixelInput<S, S> in{f + x, HW, rel, relx[x], rely};
        o[x] = dyn_mlp_forward<CH>(p, pb.L, in, (S*)nullptr);
      }
    }
  }); });
}

template <typename T, typename S>
struct CpuDynSink {
  T* acc;         // parameter gradient accumulators
  S* grad_in;     // input gradient at this pixel, channel 0 (stride apart)
  int64_t stride;
  int rel;
  inline void param(int k, const T& v) { acc[k] += v; }
  inline void input(int c, const T& v) {
    if (c >= rel) add_lanes(grad_in + (int64_t)(c - rel) * stride, v);
  }
};

// Each task owns a band of rows of one image, so the mask-feature gradient has one writer;
// parameter gradients are summed per task and added under a lock.
template <int CH, typename S>
void dyn_backward_cpu(const DynProblem<S>& pb, const S* go, S* grad_feat, S* grad_params) {
  constexpr int V = pack_width<S>();
  using P = Pack<S, V>;
  const int64_t H = pb.H, W = pb.W, HW = H * W, total = pb.L.total;
  const int rel = pb.rel() ? 2 : 0;
  // instances of each image
  std::vector<std::vector<int64_t>> of_image(pb.N);
  for (int64_t r = 0; r < pb.R; ++r) of_image[pb.inds[r]].push_back(r);
  const int64_t band = 8;
  const int64_t nbands = (H + band - 1) / band;
  std::mutex lock;
  at::parallel_for(0, pb.N * nbands, 1, [&](int64_t begin, int64_t end) { run_best([&] {
    std::vector<S> gp(pb.R * total, S(0));
    std::vector<P> acc(total);
    std::vector<S> acc_s(total);
    std::vector<S> relx;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / nbands;
      const int64_t y0 = (t % nbands) * band, y1 = std::min(H, y0 + band);
      for (int64_t r : of_image[n]) {
        pb.relative_x(r, relx);
        const S* p = pb.params + r * total;
        std::fill(acc.begin(), acc.end(), P(S(0)));
        std::fill(acc_s.begin(), acc_s.end(), S(0));
        CpuDynSink<P, S> sink{acc.data(), nullptr, HW, rel};
        CpuDynSink<S, S> sink_s{acc_s.data(), nullptr, HW, rel};
        for (int64_t y = y0; y < y1; ++y) {
          const S rely = pb.relative_y(r, y);
          const S* f = pb.feat + n * pb.C * HW + y * W;
          const S* g = go + r * HW + y * W;
          S* gf = grad_feat + n * pb.C * HW + y * W;
          int64_t x = 0;
          for (; x + V <= W; x += V) {
            DynPixelInput<P, S> in{f + x, HW, rel, P::load(relx.data() + x), P(rely)};
            sink.grad_in = gf + x;
            dyn_mlp_backward<CH>(p, pb.L, in, P::load(g + x), sink);
          }
          for (; x < W; ++x) {
            DynPixelInput<S, S> in{f + x, HW, rel, relx[x], rely};
            sink_s.grad_in = gf + x;
            dyn_mlp_backward<CH>(p, pb.L, in, g[x], sink_s);
          }
        }
        S* gpr = gp.data() + r * total;
        for (int64_t k = 0; k < total; ++k) gpr[k] += acc[k].sum() + acc_s[k];
      }
    }
    std::lock_guard<std::mutex> guard(lock);
    for (int64_t i = 0; i < pb.R * total; ++i) grad_params[i] += gp[i];
  }); });
}

template <typename S>
DynProblem<S> make_problem(const at::Tensor& feat, const at::Tensor& inds,
                           const at::Tensor& params, const at::Tensor& locs,
                           const at::Tensor& scales, const DynLayout& L, int64_t stride) {
  DynProblem<S> pb;
  pb.feat = feat.data_ptr<S>();
  pb.inds = inds.data_ptr<int64_t>();
  pb.params = params.data_ptr<S>();
  pb.locs = locs.defined() ? locs.data_ptr<S>() : nullptr;
  pb.scales = scales.defined() ? scales.data_ptr<S>() : nullptr;
  pb.R = params.size(0);
  pb.N = feat.size(0);
  pb.C = feat.size(1);
  pb.H = feat.size(2);
  pb.W = feat.size(3);
  pb.stride = stride;
  pb.L = L;
  return pb;
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

void check_image_indices(const at::Tensor& inds, int64_t N) {
  if (inds.numel() == 0) return;
  const int64_t lo = inds.min().item<int64_t>(), hi = inds.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < N, "dynamic_mask_head: im_inds must be in [0, N) with N = ", N,
              " images, got values in [", lo, ", ", hi, "]");
}

}  // namespace

std::string instance_aware_conv_cpu_kernel(int64_t B, int64_t E, int64_t d, int64_t H, int64_t W,
                                           int64_t element_size) {
  if (instance_conv_use_winograd(B, E, d, H, W, element_size)) return "winograd";
  if (instance_conv_use_gemm(B, E, d, H * W)) return "gemm";
  return "direct";
}

at::Tensor instance_aware_conv_cpu(const at::Tensor& input, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias) {
  check_instance_aware_conv_args(input, weight, bias);
  if (is_reduced_precision(input.scalar_type()))
    return call_widened(input.scalar_type(), instance_aware_conv_cpu, input, weight, bias);
  auto x = input.contiguous();
  auto w = weight.contiguous();
  auto b = contiguous_or_undefined(bias);
  const int64_t R = x.size(0), E = x.size(1), H = x.size(2), W = x.size(3), B = w.size(1);
  auto out = at::empty({R, B, H, W}, x.options());
  if (out.numel() == 0) return out;
  const int64_t d = w.size(3);
  if (instance_conv_use_winograd(B, E, d, H, W, x.element_size())) {
    instance_conv_forward_winograd(x, w, b, out);
    return out;
  }
  if (instance_conv_use_gemm(B, E, d, H * W)) {
    dispatch_kernel_size((int)d, [&](auto dt) {
      instance_conv_forward_gemm<decltype(dt)::value>(x, w, b, out);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "instance_aware_conv_cpu", [&] {
    dispatch_kernel_size((int)w.size(3), [&](auto d) {
      instance_conv_forward_cpu<decltype(d)::value, scalar_t>(
          x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
          b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), R, B, E, H,
          W);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_aware_conv_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight) {
  check_instance_aware_conv_args(input, weight, c10::nullopt);
  if (is_reduced_precision(input.scalar_type()))
    return call_widened(input.scalar_type(), instance_aware_conv_backward_cpu, grad_out, input,
                        weight);
  const int64_t R = input.size(0), E = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t B = weight.size(1);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({R, B, H, W}),
              "instance_aware_conv_backward: grad_out must be ", at::IntArrayRef({R, B, H, W}),
              ", got ", grad_out.sizes());
  auto go = grad_out.contiguous();
  auto x = input.contiguous();
  auto w = weight.contiguous();
  const int64_t d = w.size(3);
  const bool winograd = instance_conv_use_winograd(B, E, d, H, W, x.element_size());
  if (go.numel() > 0 && (winograd || instance_conv_use_gemm(B, E, d, H * W))) {
    // every value of the three gradients is written
    auto gin = at::empty_like(x);
    auto gw = at::empty_like(w);
    auto gb = at::empty({R, B}, x.options());
    if (winograd) {
      instance_conv_backward_winograd(go, x, w, gin, gw, gb);
    } else {
      dispatch_kernel_size((int)d, [&](auto dt) {
        instance_conv_backward_gemm<decltype(dt)::value>(go, x, w, gin, gw, gb);
      });
    }
    return {gin, gw, gb};
  }
  auto gin = at::zeros_like(x);
  auto gw = at::zeros_like(w);
  auto gb = at::zeros({R, B}, x.options());
  if (go.numel() == 0) return {gin, gw, gb};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "instance_aware_conv_backward_cpu", [&] {
    dispatch_kernel_size((int)w.size(3), [&](auto d) {
      instance_conv_backward_cpu<decltype(d)::value, scalar_t>(
          go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
          gin.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(), R, B, E,
          H, W);
    });
  });
  return {gin, gw, gb};
}

at::Tensor dynamic_mask_head_cpu(const at::Tensor& mask_feats, const at::Tensor& im_inds,
                                 const at::Tensor& params,
                                 const c10::optional<at::Tensor>& instance_locations,
                                 const c10::optional<at::Tensor>& scales, int64_t channels,
                                 int64_t num_layers, int64_t stride) {
  const DynLayout L = check_dynamic_mask_head_args(mask_feats, im_inds, params,
                                                   instance_locations, scales, channels,
                                                   num_layers, stride);
  if (is_reduced_precision(mask_feats.scalar_type()))
    return call_widened(mask_feats.scalar_type(), dynamic_mask_head_cpu, mask_feats, im_inds,
                        params, instance_locations, scales, channels, num_layers, stride);
  check_image_indices(im_inds, mask_feats.size(0));
  auto feat = mask_feats.contiguous();
  auto inds = im_inds.contiguous();
  auto prm = params.contiguous();
  auto locs = contiguous_or_undefined(instance_locations);
  auto sc = contiguous_or_undefined(scales);
  const int64_t R = prm.size(0), H = feat.size(2), W = feat.size(3);
  auto out = at::empty({R, 1, H, W}, feat.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "dynamic_mask_head_cpu", [&] {
    auto pb = make_problem<scalar_t>(feat, inds, prm, locs, sc, L, stride);
    if (channels == 8)
      dyn_forward_cpu<8>(pb, out.data_ptr<scalar_t>());
    else
      dyn_forward_cpu<0>(pb, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dynamic_mask_head_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& mask_feats, const at::Tensor& im_inds,
    const at::Tensor& params, const c10::optional<at::Tensor>& instance_locations,
    const c10::optional<at::Tensor>& scales, int64_t channels, int64_t num_layers,
    int64_t stride) {
  const DynLayout L = check_dynamic_mask_head_args(mask_feats, im_inds, params,
                                                   instance_locations, scales, channels,
                                                   num_layers, stride);
  if (is_reduced_precision(mask_feats.scalar_type()))
    return call_widened(mask_feats.scalar_type(), dynamic_mask_head_backward_cpu, grad_out,
                        mask_feats, im_inds, params, instance_locations, scales, channels,
                        num_layers, stride);
  check_image_indices(im_inds, mask_feats.size(0));
  const int64_t R = params.size(0), H = mask_feats.size(2), W = mask_feats.size(3);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({R, 1, H, W}),
              "dynamic_mask_head_backward: grad_out must be ", at::IntArrayRef({R, 1, H, W}),
              ", got ", grad_out.sizes());
  auto go = grad_out.contiguous();
  auto feat = mask_feats.contiguous();
  auto inds = im_inds.contiguous();
  auto prm = params.contiguous();
  auto locs = contiguous_or_undefined(instance_locations);
  auto sc = contiguous_or_undefined(scales);
  auto grad_feat = at::zeros_like(feat);
  auto grad_params = at::zeros_like(prm);
  if (go.numel() == 0) return {grad_feat, grad_params};
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "dynamic_mask_head_backward_cpu", [&] {
    auto pb = make_problem<scalar_t>(feat, inds, prm, locs, sc, L, stride);
    if (channels == 8)
      dyn_backward_cpu<8>(pb, go.data_ptr<scalar_t>(), grad_feat.data_ptr<scalar_t>(),
                          grad_params.data_ptr<scalar_t>());
    else
      dyn_backward_cpu<0>(pb, go.data_ptr<scalar_t>(), grad_feat.data_ptr<scalar_t>(),
                          grad_params.data_ptr<scalar_t>());
  });
  return {grad_feat, grad_params};
}

TORCH_LIBRARY_FRAGMENT(d2seg, m) {
  m.def("instance_aware_conv(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "instance_aware_conv_backward(Tensor grad_out, Tensor input, Tensor weight) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "dynamic_mask_head(Tensor mask_feats, Tensor im_inds, Tensor params, "
      "Tensor? instance_locations, Tensor? scales, int channels, int num_layers, "
      "int stride) -> Tensor");
  m.def(
      "dynamic_mask_head_backward(Tensor grad_out, Tensor mask_feats, Tensor im_inds, "
      "Tensor params, Tensor? instance_locations, Tensor? scales, int channels, "
      "int num_layers, int stride) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(d2seg, CPU, m) {
  m.impl("instance_aware_conv", &instance_aware_conv_cpu);
  m.impl("instance_aware_conv_backward", &instance_aware_conv_backward_cpu);
  m.impl("dynamic_mask_head", &dynamic_mask_head_cpu);
  m.impl("dynamic_mask_head_backward", &dynamic_mask_head_backward_cpu);
}

}  // namespace d2seg
