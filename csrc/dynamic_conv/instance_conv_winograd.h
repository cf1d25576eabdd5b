// The CPU kernels of the 3x3 instance-aware convolution with Winograd's F(2x2, 3x3)
// (instance_conv_winograd_cpu.cpp), called by dynamic_conv_cpu.cpp.
#pragma once
#include <torch/types.h>

#include <cstdint>

namespace d2seg {

// Instances smaller than this many multiply-adds (output channels x taps x pixels) go to the
// direct kernel, which has no per-instance set-up.
constexpr int64_t kInstanceConvWinogradMinMacs = 1 << 14;
// Largest per-thread scratch (transformed templates, their gradients, one block of products)
// the Winograd kernels take on; larger instances (big images) go to the GEMM kernel.
constexpr int64_t kInstanceConvWinogradMaxScratch = int64_t(16) << 20;

// Whether the Winograd kernels take this problem: d == 3, large enough, and at most
// kInstanceConvWinogradMaxScratch bytes of scratch per thread.
bool instance_conv_use_winograd(int64_t B, int64_t E, int64_t d, int64_t H, int64_t W,
                                int64_t elem_size);

// out (R, B, H, W) of contiguous x (R, E, H, W), w (R, B, E, 3, 3) and b (R, B) or undefined.
void instance_conv_forward_winograd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                    at::Tensor& out);

// Writes every value of gin (R, E, H, W), gw (R, B, E, 3, 3) and gb (R, B).
void instance_conv_backward_winograd(const at::Tensor& go, const at::Tensor& x,
                                     const at::Tensor& w, at::Tensor& gin, at::Tensor& gw,
                                     at::Tensor& gb);

}  // namespace d2seg
