// CUDA kernels of the dynamic convolution ops; the per-element math is the same as on the
// CPU (dynamic_conv.h), evaluated with T = the scalar type, one thread per output value.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <type_traits>

#include "dynamic_conv/dynamic_conv.h"
#include "dynamic_conv/dynamic_conv_checks.h"

namespace d2seg {

namespace {

constexpr int kThreads = 256;

inline int num_blocks(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

// ------------------------------- instance_aware_conv ------------------------------------

// in(e, ky, kx): input of channel e at (y + ky - D/2, x + kx - D/2), zero outside.
template <typename S, int D>
struct CudaWindow {
  const S* in;
  int H, W, y, x;
  __device__ inline S operator()(int e, int ky, int kx) const {
    const int yy = y + ky - D / 2, xx = x + kx - D / 2;
    return (yy >= 0 && yy < H && xx >= 0 && xx < W) ? in[((int64_t)e * H + yy) * W + xx] : S(0);
  }
};

// go(b, ky, kx): output gradient of channel b at (y - ky + D/2, x - kx + D/2), zero outside.
template <typename S, int D>
struct CudaMirrorWindow {
  const S* go;
  int H, W, y, x;
  __device__ inline S operator()(int b, int ky, int kx) const {
    const int yy = y - ky + D / 2, xx = x - kx + D / 2;
    return (yy >= 0 && yy < H && xx >= 0 && xx < W) ? go[((int64_t)b * H + yy) * W + xx] : S(0);
  }
};

template <int D, typename S>
__global__ void instance_conv_forward_kernel(const S* in, const S* w, const S* bias, S* out,
                                             int64_t R, int B, int E, int H, int W) {
  const int64_t HW = (int64_t)H * W, n = R * B * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t pix = i % HW, rb = i / HW, r = rb / B;
    CudaWindow<S, D> win{in + r * E * HW, H, W, (int)(pix / W), (int)(pix % W)};
    S res;
    instance_conv_outputs<1, D>(w + rb * E * D * D, 0, bias ? bias + rb : nullptr, E, win, &res);
    out[i] = res;
  }
}

template <int D, typename S>
__global__ void instance_conv_grad_input_kernel(const S* go, const S* w, S* gin, int64_t R,
                                                int B, int E, int H, int W) {
  const int64_t HW = (int64_t)H * W, n = R * E * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t pix = i % HW, re = i / HW, r = re / E;
    const int e = (int)(re % E);
    CudaMirrorWindow<S, D> win{go + r * B * HW, H, W, (int)(pix / W), (int)(pix % W)};
    S res;
    instance_conv_grad_inputs<1, D>(w + r * B * E * D * D, B, E, e, win, &res);
    gin[i] = res;
  }
}

// One thread per (r, b, e): the D x D weight gradients of that input channel, summed over
// the pixels; the e == 0 thread also sums the bias gradient.
template <int D, typename S>
__global__ void instance_conv_grad_weight_kernel(const S* go, const S* in, S* gw, S* gb,
                                                 int64_t R, int B, int E, int H, int W) {
  const int64_t HW = (int64_t)H * W, n = R * B * E;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int e = (int)(i % E);
    const int64_t rb = i / E, r = rb / B;
    const S* g = go + rb * HW;
    S acc[D * D];
    for (int k = 0; k < D * D; ++k) acc[k] = S(0);
    S gsum = S(0);
    for (int64_t pix = 0; pix < HW; ++pix) {
      const S gv = g[pix];
      gsum += gv;
      CudaWindow<S, D> win{in + (r * E + e) * HW, H, W, (int)(pix / W), (int)(pix % W)};
      instance_conv_grad_weight_pixel<D>(gv, 1, win, acc);
    }
    for (int k = 0; k < D * D; ++k) gw[i * D * D + k] = acc[k];
    if (e == 0) gb[rb] = gsum;
  }
}

// --------------------------------- dynamic_mask_head ------------------------------------

template <typename S>
__device__ inline S warp_sum(S v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Parameter gradients: summed over the warp, then into the block's shared accumulators;
// input gradients: atomically into the mask-feature gradient (instances share images).
template <typename S>
struct CudaDynSink {
  S* smem_grad;
  S* grad_in;
  int64_t stride;
  int rel;
  bool valid;
  __device__ inline void param(int k, S v) {
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) atomicAdd(smem_grad + k, v);
  }
  __device__ inline void input(int c, S v) {
    if (valid && c >= rel) atomicAdd(grad_in + (int64_t)(c - rel) * stride, v);
  }
};

template <typename S>
struct DynCudaArgs {
  const S* feat;
  const int64_t* inds;
  const S* params;
  const S* locs;
  const S* scales;
  int64_t N, C, H, W, stride;
};

// Grid (pixel blocks, R): every block serves one instance, whose parameters it keeps in
// shared memory.
template <int CH, typename S>
__global__ void dyn_forward_kernel(DynCudaArgs<S> a, DynLayout L, S* out) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem_raw[];
  S* p = reinterpret_cast<S*>(smem_raw);
  const int64_t r = blockIdx.y;
  for (int k = threadIdx.x; k < L.total; k += blockDim.x) p[k] = a.params[r * L.total + k];
  __syncthreads();
  const int64_t HW = a.H * a.W;
  const int64_t pix = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (pix >= HW) return;
  const int64_t n = a.inds[r];
  CUDA_KERNEL_ASSERT(n >= 0 && n < a.N);
  const int rel = a.locs ? 2 : 0;
  S rx = S(0), ry = S(0);
  if (a.locs) {
    const S sc = a.scales ? a.scales[r] : S(1);
    rx = dyn_relative_coord(a.locs[2 * r], pix % a.W, a.stride, sc);
    ry = dyn_relative_coord(a.locs[2 * r + 1], pix / a.W, a.stride, sc);
  }
  DynPixelInput<S, S> in{a.feat + n * a.C * HW + pix, HW, rel, rx, ry};
  out[r * HW + pix] = dyn_mlp_forward<CH>(p, L, in, (S*)nullptr);
}

template <int CH, typename S>
__global__ void dyn_backward_kernel(DynCudaArgs<S> a, DynLayout L, const S* go, S* grad_feat,
                                    S* grad_params) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem_raw[];
  S* p = reinterpret_cast<S*>(smem_raw);
  S* gp = p + L.total;
  const int64_t r = blockIdx.y;
  for (int k = threadIdx.x; k < L.total; k += blockDim.x) {
    p[k] = a.params[r * L.total + k];
    gp[k] = S(0);
  }
  __syncthreads();
  const int64_t HW = a.H * a.W;
  const int64_t pix_raw = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  // Threads past the end take part in the warp sums with a zero gradient.
  const bool valid = pix_raw < HW;
  const int64_t pix = valid ? pix_raw : HW - 1;
  const int64_t n = a.inds[r];
  CUDA_KERNEL_ASSERT(n >= 0 && n < a.N);
  const int rel = a.locs ? 2 : 0;
  S rx = S(0), ry = S(0);
  if (a.locs) {
    const S sc = a.scales ? a.scales[r] : S(1);
    rx = dyn_relative_coord(a.locs[2 * r], pix % a.W, a.stride, sc);
    ry = dyn_relative_coord(a.locs[2 * r + 1], pix / a.W, a.stride, sc);
  }
  DynPixelInput<S, S> in{a.feat + n * a.C * HW + pix, HW, rel, rx, ry};
  CudaDynSink<S> sink{gp, grad_feat + n * a.C * HW + pix, HW, rel, valid};
  const S g = valid ? go[r * HW + pix] : S(0);
  dyn_mlp_backward<CH>(p, L, in, g, sink);
  __syncthreads();
  for (int k = threadIdx.x; k < L.total; k += blockDim.x)
    atomicAdd(grad_params + r * L.total + k, gp[k]);
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

template <typename S>
DynCudaArgs<S> make_args(const at::Tensor& feat, const at::Tensor& inds, const at::Tensor& prm,
                         const at::Tensor& locs, const at::Tensor& sc, int64_t stride) {
  return DynCudaArgs<S>{feat.data_ptr<S>(),
                        inds.data_ptr<int64_t>(),
                        prm.data_ptr<S>(),
                        locs.defined() ? locs.data_ptr<S>() : nullptr,
                        sc.defined() ? sc.data_ptr<S>() : nullptr,
                        feat.size(0),
                        feat.size(1),
                        feat.size(2),
                        feat.size(3),
                        stride};
}

}  // namespace

at::Tensor instance_aware_conv_cuda(const at::Tensor& input, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias) {
  check_instance_aware_conv_args(input, weight, bias);
  if (is_reduced_precision(input.scalar_type()))
    return call_widened(input.scalar_type(), instance_aware_conv_cuda, input, weight, bias);
  at::cuda::CUDAGuard guard(input.device());
  auto x = input.contiguous();
  auto w = weight.contiguous();
  auto b = contiguous_or_undefined(bias);
  const int64_t R = x.size(0), E = x.size(1), H = x.size(2), W = x.size(3), B = w.size(1);
  auto out = at::empty({R, B, H, W}, x.options());
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "instance_aware_conv_cuda", [&] {
    dispatch_kernel_size((int)w.size(3), [&](auto d) {
      constexpr int D = decltype(d)::value;
      instance_conv_forward_kernel<D, scalar_t><<<num_blocks(out.numel()), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
          b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), R, (int)B,
          (int)E, (int)H, (int)W);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_aware_conv_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight) {
  check_instance_aware_conv_args(input, weight, c10::nullopt);
  if (is_reduced_precision(input.scalar_type()))
    return call_widened(input.scalar_type(), instance_aware_conv_backward_cuda, grad_out, input,
                        weight);
  D2SEG_CHECK_SAME_DEVICE(grad_out, input);
  at::cuda::CUDAGuard guard(input.device());
  const int64_t R = input.size(0), E = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t B = weight.size(1);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({R, B, H, W}),
              "instance_aware_conv_backward: grad_out must be ", at::IntArrayRef({R, B, H, W}),
              ", got ", grad_out.sizes());
  auto go = grad_out.contiguous();
  auto x = input.contiguous();
  auto w = weight.contiguous();
  auto gin = at::zeros_like(x);
  auto gw = at::zeros_like(w);
  auto gb = at::zeros({R, B}, x.options());
  if (go.numel() == 0) return {gin, gw, gb};
  // No input channel: nothing to launch a thread per (r, b, e) for; the bias gradient is
  // the output gradient's sum over the pixels.
  if (E == 0) return {gin, gw, go.sum({2, 3})};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "instance_aware_conv_backward_cuda", [&] {
    dispatch_kernel_size((int)w.size(3), [&](auto d) {
      constexpr int D = decltype(d)::value;
      instance_conv_grad_input_kernel<D, scalar_t><<<num_blocks(gin.numel()), kThreads, 0, stream>>>(
          go.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), gin.data_ptr<scalar_t>(), R, (int)B,
          (int)E, (int)H, (int)W);
      instance_conv_grad_weight_kernel<D, scalar_t><<<num_blocks(R * B * E), kThreads, 0, stream>>>(
          go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(),
          gb.data_ptr<scalar_t>(), R, (int)B, (int)E, (int)H, (int)W);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gin, gw, gb};
}

at::Tensor dynamic_mask_head_cuda(const at::Tensor& mask_feats, const at::Tensor& im_inds,
                                  const at::Tensor& params,
                                  const c10::optional<at::Tensor>& instance_locations,
                                  const c10::optional<at::Tensor>& scales, int64_t channels,
                                  int64_t num_layers, int64_t stride) {
  const DynLayout L = check_dynamic_mask_head_args(mask_feats, im_inds, params,
                                                   instance_locations, scales, channels,
                                                   num_layers, stride);
  if (is_reduced_precision(mask_feats.scalar_type()))
    return call_widened(mask_feats.scalar_type(), dynamic_mask_head_cuda, mask_feats, im_inds,
                        params, instance_locations, scales, channels, num_layers, stride);
  at::cuda::CUDAGuard guard(mask_feats.device());
  auto feat = mask_feats.contiguous();
  auto inds = im_inds.contiguous();
  auto prm = params.contiguous();
  auto locs = contiguous_or_undefined(instance_locations);
  auto sc = contiguous_or_undefined(scales);
  const int64_t R = prm.size(0), H = feat.size(2), W = feat.size(3);
  TORCH_CHECK(R <= 65535, "dynamic_mask_head: at most 65535 instances per call on CUDA, got ", R);
  auto out = at::empty({R, 1, H, W}, feat.options());
  if (out.numel() == 0) return out;
  const dim3 grid((unsigned)((H * W + kThreads - 1) / kThreads), (unsigned)R);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "dynamic_mask_head_cuda", [&] {
    auto a = make_args<scalar_t>(feat, inds, prm, locs, sc, stride);
    const size_t smem = L.total * sizeof(scalar_t);
    TORCH_CHECK(smem <= 48 * 1024, "dynamic_mask_head: too many parameters per instance for CUDA (", L.total, ")");
    if (channels == 8)
      dyn_forward_kernel<8, scalar_t><<<grid, kThreads, smem, stream>>>(a, L, out.data_ptr<scalar_t>());
    else
      dyn_forward_kernel<0, scalar_t><<<grid, kThreads, smem, stream>>>(a, L, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> dynamic_mask_head_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& mask_feats, const at::Tensor& im_inds,
    const at::Tensor& params, const c10::optional<at::Tensor>& instance_locations,
    const c10::optional<at::Tensor>& scales, int64_t channels, int64_t num_layers,
    int64_t stride) {
  const DynLayout L = check_dynamic_mask_head_args(mask_feats, im_inds, params,
                                                   instance_locations, scales, channels,
                                                   num_layers, stride);
  if (is_reduced_precision(mask_feats.scalar_type()))
    return call_widened(mask_feats.scalar_type(), dynamic_mask_head_backward_cuda, grad_out,
                        mask_feats, im_inds, params, instance_locations, scales, channels,
                        num_layers, stride);
  D2SEG_CHECK_SAME_DEVICE(grad_out, mask_feats);
  at::cuda::CUDAGuard guard(mask_feats.device());
  const int64_t R = params.size(0), H = mask_feats.size(2), W = mask_feats.size(3);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({R, 1, H, W}),
              "dynamic_mask_head_backward: grad_out must be ", at::IntArrayRef({R, 1, H, W}),
              ", got ", grad_out.sizes());
  TORCH_CHECK(R <= 65535, "dynamic_mask_head: at most 65535 instances per call on CUDA, got ", R);
  auto go = grad_out.contiguous();
  auto feat = mask_feats.contiguous();
  auto inds = im_inds.contiguous();
  auto prm = params.contiguous();
  auto locs = contiguous_or_undefined(instance_locations);
  auto sc = contiguous_or_undefined(scales);
  auto grad_feat = at::zeros_like(feat);
  auto grad_params = at::zeros_like(prm);
  if (go.numel() == 0) return {grad_feat, grad_params};
  const dim3 grid((unsigned)((H * W + kThreads - 1) / kThreads), (unsigned)R);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "dynamic_mask_head_backward_cuda", [&] {
    auto a = make_args<scalar_t>(feat, inds, prm, locs, sc, stride);
    const size_t smem = 2 * L.total * sizeof(scalar_t);
    TORCH_CHECK(smem <= 48 * 1024, "dynamic_mask_head: too many parameters per instance for CUDA (", L.total, ")");
    if (channels == 8)
      dyn_backward_kernel<8, scalar_t><<<grid, kThreads, smem, stream>>>(
          a, L, go.data_ptr<scalar_t>(), grad_feat.data_ptr<scalar_t>(),
          grad_params.data_ptr<scalar_t>());
    else
      dyn_backward_kernel<0, scalar_t><<<grid, kThreads, smem, stream>>>(
          a, L, go.data_ptr<scalar_t>(), grad_feat.data_ptr<scalar_t>(),
          grad_params.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_feat, grad_params};
}

TORCH_LIBRARY_IMPL(d2seg, CUDA, m) {
  m.impl("instance_aware_conv", &instance_aware_conv_cuda);
  m.impl("instance_aware_conv_backward", &instance_aware_conv_backward_cuda);
  m.impl("dynamic_mask_head", &dynamic_mask_head_cuda);
  m.impl("dynamic_mask_head_backward", &dynamic_mask_head_backward_cuda);
}

}  // namespace d2seg
