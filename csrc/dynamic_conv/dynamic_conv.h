// Per-element math of the instance-aware dynamic convolutions, shared by the CPU
// (dynamic_conv_cpu.cpp) and CUDA (dynamic_conv_cuda.cu) implementations.
//
// Every function is a template on the value type T: a scalar on CUDA (one thread, one
// pixel) and in the CPU tail loops, or a Pack of lanes (csrc/core/pack.h) in the CPU main
// loops. S is the storage scalar of weights and parameters.
//
// Two op families:
//  * instance_aware_conv (PointINS): every instance r has its own (B, E, d, d) weights
//    applied to its own (E, H, W) input.
//  * dynamic_mask_head (CondInst; SparseInst is the one-layer case): every instance r has a
//    flat parameter vector for a stack of 1x1 layers with ReLU between them, applied at
//    every pixel of the mask features of its image, optionally with two relative
//    coordinate channels prepended.
#pragma once
#include <cstdint>

#include "core/lanes.h"

namespace d2seg {

// ---------------------------------------------------------------------------------------
// instance_aware_conv
// ---------------------------------------------------------------------------------------

// Output positions whose tap k (0 <= k < D) of the size-D window centred on them reads
// inside [0, n) (padding D / 2): lo = max(0, D/2 - k) <= pos < hi = min(n, n + D/2 - k),
// an empty range with lo = hi <= n when no position does (kernel larger than the image).
// Used by the im2col / col2im of the GEMM formulation (dynamic_conv_cpu.cpp), where
// column (e * D + ky) * D + kx of pixel (y, x) is the input at (y + ky - D/2, x + kx - D/2).
template <int D>
D2SEG_HOST_DEVICE inline void instance_conv_tap_range(int k, int64_t n, int64_t& lo,
                                                      int64_t& hi) {
  lo = D / 2 - k > 0 ? D / 2 - k : 0;
  if (lo > n) lo = n;
  hi = n + D / 2 - k < n ? n + D / 2 - k : n;
  if (hi < lo) hi = lo;
}

// NB output channels at one pixel (or pack of pixels), kernel size D:
// out[i] = bias[i] + sum_{e, ky, kx} w[i * wstride + (e * D + ky) * D + kx] * in(e, ky, kx),
// where in(e, ky, kx) returns the input of channel e at (y + ky - D/2, x + kx - D/2), zero
// outside the image. The NB accumulators are independent, so they pipeline.
template <int NB, int D, typename T, typename S, typename Input>
D2SEG_HOST_DEVICE inline void instance_conv_outputs(const S* w, int64_t wstride, const S* bias,
                                                    int E, const Input& in, T* out) {
  T acc[NB];
D2SEG_UNROLL
  for (int i = 0; i < NB; ++i) acc[i] = Lanes<T>::splat(bias ? bias[i] : S(0));
  for (int e = 0; e < E; ++e) {
D2SEG_UNROLL
    for (int ky = 0; ky < D; ++ky) {
D2SEG_UNROLL
      for (int kx = 0; kx < D; ++kx) {
        const T v = in(e, ky, kx);
        const int k = (e * D + ky) * D + kx;
D2SEG_UNROLL
        for (int i = 0; i < NB; ++i) acc[i] = acc[i] + Lanes<T>::splat(w[i * wstride + k]) * v;
      }
    }
  }
D2SEG_UNROLL
  for (int i = 0; i < NB; ++i) out[i] = acc[i];
}

// Gradient of NE input channels e0 .. e0 + NE - 1 at one pixel:
// out[i] = sum_{b, ky, kx} w[b, e0 + i, ky, kx] * go(b, ky, kx), where w is the instance's
// (B, E, D, D) weights and go(b, ky, kx) the output gradient of channel b at
// (y - ky + D/2, x - kx + D/2), zero outside. Even and odd b go to separate partial sums.
template <int NE, int D, typename T, typename S, typename GradOut>
D2SEG_HOST_DEVICE inline void instance_conv_grad_inputs(const S* w, int B, int E, int e0,
                                                        const GradOut& go, T* out) {
  T a0[NE], a1[NE];
D2SEG_UNROLL
  for (int i = 0; i < NE; ++i) a0[i] = a1[i] = Lanes<T>::splat(S(0));
  const int64_t wb = (int64_t)E * D * D;
  int b = 0;
  for (; b + 1 < B; b += 2) {
D2SEG_UNROLL
    for (int ky = 0; ky < D; ++ky) {
D2SEG_UNROLL
      for (int kx = 0; kx < D; ++kx) {
        const T g0 = go(b, ky, kx);
        const T g1 = go(b + 1, ky, kx);
        const S* w0 = w + b * wb + ((int64_t)e0 * D + ky) * D + kx;
D2SEG_UNROLL
        for (int i = 0; i < NE; ++i) {
          a0[i] = a0[i] + Lanes<T>::splat(w0[i * D * D]) * g0;
          a1[i] = a1[i] + Lanes<T>::splat(w0[wb + i * D * D]) * g1;
        }
      }
    }
  }
  for (; b < B; ++b) {
D2SEG_UNROLL
    for (int ky = 0; ky < D; ++ky) {
D2SEG_UNROLL
      for (int kx = 0; kx < D; ++kx) {
        const T g0 = go(b, ky, kx);
        const S* w0 = w + b * wb + ((int64_t)e0 * D + ky) * D + kx;
D2SEG_UNROLL
        for (int i = 0; i < NE; ++i) a0[i] = a0[i] + Lanes<T>::splat(w0[i * D * D]) * g0;
      }
    }
  }
D2SEG_UNROLL
  for (int i = 0; i < NE; ++i) out[i] = a0[i] + a1[i];
}

// Accumulates one pixel's contribution to the weight gradient of one output channel:
// acc[(e * D + ky) * D + kx] += g * in(e, ky, kx), with in as in instance_conv_outputs.
template <int D, typename T, typename Input>
D2SEG_HOST_DEVICE inline void instance_conv_grad_weight_pixel(T g, int E, const Input& in,
                                                              T* acc) {
  for (int e = 0; e < E; ++e) {
D2SEG_UNROLL
    for (int ky = 0; ky < D; ++ky) {
D2SEG_UNROLL
      for (int kx = 0; kx < D; ++kx) {
        const int k = (e * D + ky) * D + kx;
        acc[k] = acc[k] + g * in(e, ky, kx);
      }
    }
  }
}

// 1x1 case (D == 1) of the weight and bias gradients of one output channel, with the NE
// accumulators in registers: for one pixel (or pack of pixels) with output gradient g,
// acc[i] += g * in(e0 + i, 0, 0) and gsum += g.
template <int NE, typename T, typename Input>
D2SEG_HOST_DEVICE inline void instance_conv_grad_weight_1x1(T g, int e0, const Input& in, T* acc,
                                                            T& gsum) {
  gsum = gsum + g;
D2SEG_UNROLL
  for (int i = 0; i < NE; ++i) acc[i] = acc[i] + g * in(e0 + i, 0, 0);
}

// ---------------------------------------------------------------------------------------
// dynamic_mask_head
// ---------------------------------------------------------------------------------------

constexpr int kDynMaxLayers = 8;
constexpr int kDynMaxChannels = 32;

// Where each layer's weights and biases sit in an instance's flat parameter vector, in
// AdelaiDet CondInst's layout: all layers' weights first (layer l as (out, in) row-major),
// then all layers' biases. The last layer has one output channel.
struct DynLayout {
  int num_layers;
  int in_channels;  // inputs of the first layer: C, plus 2 with relative coordinates
  int channels;     // width of the hidden layers
  int weight_offset[kDynMaxLayers];
  int bias_offset[kDynMaxLayers];
  int total;        // number of parameters per instance

  D2SEG_HOST_DEVICE int layer_in(int l) const { return l == 0 ? in_channels : channels; }
  D2SEG_HOST_DEVICE int layer_out(int l) const { return l == num_layers - 1 ? 1 : channels; }
};

D2SEG_HOST_DEVICE inline DynLayout make_dyn_layout(int in_channels, int channels,
                                                   int num_layers) {
  DynLayout L;
  L.num_layers = num_layers;
  L.in_channels = in_channels;
  L.channels = channels;
  int off = 0;
  for (int l = 0; l < num_layers; ++l) {
    L.weight_offset[l] = off;
    off += L.layer_in(l) * L.layer_out(l);
  }
  for (int l = 0; l < num_layers; ++l) {
    L.bias_offset[l] = off;
    off += L.layer_out(l);
  }
  for (int l = num_layers; l < kDynMaxLayers; ++l) L.weight_offset[l] = L.bias_offset[l] = off;
  L.total = off;
  return L;
}

// Relative coordinate of one pixel index along one axis, as AdelaiDet computes it:
// (instance_location - (index * stride + stride // 2)) / scale.
template <typename S>
D2SEG_HOST_DEVICE inline S dyn_relative_coord(S location, int64_t index, int64_t stride,
                                              S scale) {
  return (location - static_cast<S>(index * stride + stride / 2)) / scale;
}

// Input of the first layer at one pixel (or a pack of pixels): the rel relative-coordinate
// channels (0 or 2: x then y) followed by the C feature channels, stride apart from feat.
template <typename T, typename S>
struct DynPixelInput {
  const S* feat;
  int64_t stride;
  int rel;
  T rel_x, rel_y;
  D2SEG_HOST_DEVICE inline T operator()(int c) const {
    if (c < rel) return c == 0 ? rel_x : rel_y;
    return Lanes<T>::load(feat + (int64_t)(c - rel) * stride);
  }
};

// Width of the hidden layers: the compile-time CH when it is positive (the CondInst
// default 8 gets unrolled loops and registers), else the runtime value.
template <int CH>
D2SEG_HOST_DEVICE inline int dyn_width(const DynLayout& L) {
  return CH > 0 ? CH : L.channels;
}
template <int CH>
struct DynArray {
  static constexpr int size = CH > 0 ? CH : kDynMaxChannels;
};

// Hidden layer l >= 1 (not the first, not the last): out = W_l a + b_l.
template <int CH, typename T, typename S>
D2SEG_HOST_DEVICE inline void dyn_hidden_layer(const S* p, const DynLayout& L, int l,
                                               const T* a, T* out) {
  const int ch = dyn_width<CH>(L);
  const S* w = p + L.weight_offset[l];
  const S* b = p + L.bias_offset[l];
  for (int j = 0; j < ch; ++j) {
    T acc = Lanes<T>::splat(b[j]);
    for (int i = 0; i < ch; ++i) acc = acc + Lanes<T>::splat(w[j * ch + i]) * a[i];
    out[j] = acc;
  }
}

// The stack at one pixel; returns the logit. When acts is not null it receives the
// post-ReLU activations of the hidden layers, acts[l * size + j] for l < num_layers - 1.
template <int CH, typename T, typename S, typename Input>
D2SEG_HOST_DEVICE inline T dyn_mlp_forward(const S* p, const DynLayout& L, const Input& x,
                                           T* acts) {
  constexpr int N = DynArray<CH>::size;
  const int ch = dyn_width<CH>(L);
  const int in = L.in_channels;
  if (L.num_layers == 1) {
    const S* w = p + L.weight_offset[0];
    T acc = Lanes<T>::splat(p[L.bias_offset[0]]);
    for (int c = 0; c < in; ++c) acc = acc + Lanes<T>::splat(w[c]) * x(c);
    return acc;
  }
  T h[N];
  T z[N];
  {
    const S* w = p + L.weight_offset[0];
    const S* b = p + L.bias_offset[0];
    for (int j = 0; j < ch; ++j) h[j] = Lanes<T>::splat(b[j]);
    for (int c = 0; c < in; ++c) {
      const T xc = x(c);
      for (int j = 0; j < ch; ++j) h[j] = h[j] + Lanes<T>::splat(w[j * in + c]) * xc;
    }
  }
  for (int l = 1; l < L.num_layers; ++l) {
    for (int j = 0; j < ch; ++j) {
      h[j] = Lanes<T>::relu(h[j]);
      if (acts) acts[(l - 1) * N + j] = h[j];
    }
    if (l == L.num_layers - 1) {
      const S* w = p + L.weight_offset[l];
      T acc = Lanes<T>::splat(p[L.bias_offset[l]]);
      for (int i = 0; i < ch; ++i) acc = acc + Lanes<T>::splat(w[i]) * h[i];
      return acc;
    }
    dyn_hidden_layer<CH>(p, L, l, h, z);
    for (int j = 0; j < ch; ++j) h[j] = z[j];
  }
  return h[0];  // not reached: the last layer returns above
}

// Backward of the stack at one pixel given the logit's gradient g. Gradients are handed to
// the sink: sink.param(k, v) for parameter k of the flat vector, sink.input(c, v) for
// input channel c of the first layer (relative-coordinate channels included; the sink
// drops them). The forward is recomputed here, never stored.
template <int CH, typename T, typename S, typename Input, typename Sink>
D2SEG_HOST_DEVICE inline void dyn_mlp_backward(const S* p, const DynLayout& L, const Input& x,
                                               T g, Sink& sink) {
  constexpr int N = DynArray<CH>::size;
  const int ch = dyn_width<CH>(L);
  const int in = L.in_channels;
  T acts[(kDynMaxLayers - 1) * N];
  dyn_mlp_forward<CH>(p, L, x, L.num_layers > 1 ? acts : (T*)nullptr);

  T dz[N];   // gradient at the pre-activations of the current layer
  T da[N];
  dz[0] = g;
  for (int l = L.num_layers - 1; l >= 0; --l) {
    const int nout = L.layer_out(l);
    const S* w = p + L.weight_offset[l];
    for (int j = 0; j < nout; ++j) sink.param(L.bias_offset[l] + j, dz[j]);
    if (l == 0) {
      for (int c = 0; c < in; ++c) {
        const T xc = x(c);
        T dx = Lanes<T>::splat(S(0));
        for (int j = 0; j < nout; ++j) {
          sink.param(L.weight_offset[0] + j * in + c, dz[j] * xc);
          dx = dx + Lanes<T>::splat(w[j * in + c]) * dz[j];
        }
        sink.input(c, dx);
      }
    } else {
      const T* a = acts + (l - 1) * N;
      for (int i = 0; i < ch; ++i) da[i] = Lanes<T>::splat(S(0));
      for (int j = 0; j < nout; ++j) {
        for (int i = 0; i < ch; ++i) {
          sink.param(L.weight_offset[l] + j * ch + i, dz[j] * a[i]);
          da[i] = da[i] + Lanes<T>::splat(w[j * ch + i]) * dz[j];
        }
      }
      for (int i = 0; i < ch; ++i) dz[i] = Lanes<T>::relu_grad(da[i], a[i]);
    }
  }
}

}  // namespace d2seg
