// CPU backward of RoIAlign (torchvision's `roi_align`, which Detectron2's ROIPooler calls),
// bit-identical to torchvision's own CPU backward and several times faster.
//
// Shapes: K regions (rows of rois: batch index, x0, y0, x1, y1), C channels, H x W feature
// pixels, PH x PW bins per region, GH x GW samples per bin.
//
// Why it is faster: torchvision's CPU backward visits every (region, channel, bin) and
// recomputes the sample coordinates and bilinear weights of that bin for each channel. Here
// the samples of every region are computed once (a table of corner offsets and weights) and
// every channel plane is scattered into with that table; the channels run in parallel
// (each gradient plane has a single writer).
//
// Memory: the table has one entry per sample (48 B in float16, 56 B in float32, 72 B in
// float64), regions x bins x samples in all, where torchvision's kernel needs none. The
// samples are therefore processed in chunks whose table holds at most max_table_bytes
// (4 MiB by default), so the extra memory is bounded whatever the number of regions.
//
// Why the result is bit-identical: for a fixed channel the contributions to the gradient
// plane are added in torchvision's order (region, bin row, bin column, sample row, sample
// column; corners 1-4), each computed with the same float operations in the same type (so
// the same roundings), including float16 where each operation rounds to half.
// tests/test_roi_align_backward.py checks equality with torchvision's kernel.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace d2seg {

namespace {

// One sample of one bin: its bin (as an offset into a region's grad_output plane, which
// uses grad_output's strides) and its four corners (offsets into a feature plane, -1 when
// the sample lies outside the map and contributes nothing) with their weights.
template <typename T>
struct Sample {
  int64_t bin;
  int64_t pos[4];
  T w[4];
};

// The bilinear corners and weights of point (y, x), exactly as torchvision's backward
// computes them (clamping at the border, zero outside [-1, H] x [-1, W]).
template <typename T>
void corners(int64_t height, int64_t width, T y, T x, Sample<T>& s) {
  if (y < -1.0 || y > height || x < -1.0 || x > width) {
    s.w[0] = s.w[1] = s.w[2] = s.w[3] = 0.;
    s.pos[0] = s.pos[1] = s.pos[2] = s.pos[3] = -1;
    return;
  }
  if (y <= 0) y = 0;
  if (x <= 0) x = 0;
  int y_low = (int)y, x_low = (int)x, y_high, x_high;
  if (y_low >= height - 1) {
    y_high = y_low = height - 1;
    y = (T)y_low;
  } else {
    y_high = y_low + 1;
  }
  if (x_low >= width - 1) {
    x_high = x_low = width - 1;
    x = (T)x_low;
  } else {
    x_high = x_low + 1;
  }
  T ly = y - y_low;
  T lx = x - x_low;
  T hy = 1. - ly, hx = 1. - lx;
  s.w[0] = hy * hx;
  s.w[1] = hy * lx;
  s.w[2] = ly * hx;
  s.w[3] = ly * lx;
  s.pos[0] = y_low * width + x_low;
  s.pos[1] = y_low * width + x_high;
  s.pos[2] = y_high * width + x_low;
  s.pos[3] = y_high * width + x_high;
}

// One region: where its samples lie (torchvision's arithmetic) and how many it has.
template <typename T>
struct Region {
  int64_t image;            // batch index
  T start_h, start_w;       // top-left corner on the feature map
  T bin_h, bin_w;           // bin size
  int grid_h, grid_w;       // samples per bin along y and x
  T count;                  // samples per bin (the average's divisor)
  int64_t num_samples;      // PH * PW * grid_h * grid_w
};

template <typename T>
Region<T> region_of(const T* roi, T spatial_scale, int64_t PH, int64_t PW, int64_t sampling_ratio, bool aligned) {
  Region<T> reg;
  reg.image = (int64_t)roi[0];
  T offset = aligned ? (T)0.5 : (T)0.0;
  T roi_start_w = roi[1] * spatial_scale - offset;
  T roi_start_h = roi[2] * spatial_scale - offset;
  T roi_end_w = roi[3] * spatial_scale - offset;
  T roi_end_h = roi[4] * spatial_scale - offset;
  T roi_width = roi_end_w - roi_start_w;
  T roi_height = roi_end_h - roi_start_h;
  if (!aligned) {
    roi_width = std::max(roi_width, (T)1.);
    roi_height = std::max(roi_height, (T)1.);
  }
  reg.start_h = roi_start_h;
  reg.start_w = roi_start_w;
  reg.bin_h = static_cast<T>(roi_height) / static_cast<T>(PH);
  reg.bin_w = static_cast<T>(roi_width) / static_cast<T>(PW);
  reg.grid_h = (sampling_ratio > 0) ? sampling_ratio : std::ceil(roi_height / PH);
  reg.grid_w = (sampling_ratio > 0) ? sampling_ratio : std::ceil(roi_width / PW);
  reg.count = reg.grid_h * reg.grid_w;
  // (a region of negative size has no samples: torchvision's loops do not run)
  reg.num_samples = (reg.grid_h > 0 && reg.grid_w > 0) ? PH * PW * (int64_t)reg.grid_h * reg.grid_w : 0;
  return reg;
}

// Sample j of a region, in torchvision's order (bin row, bin column, sample row, sample
// column), with torchvision's float operations.
template <typename T>
Sample<T> sample_at(const Region<T>& reg, int64_t j, int64_t PW, int64_t H, int64_t W, int64_t sh,
                    int64_t sw) {
  const int64_t per_bin = (int64_t)reg.grid_h * reg.grid_w;
  const int64_t bin = j / per_bin, k = j % per_bin;
  const int64_t ph = bin / PW, pw = bin % PW;
  const int iy = (int)(k / reg.grid_w), ix = (int)(k % reg.grid_w);
  const T y = reg.start_h + ph * reg.bin_h + static_cast<T>(iy + .5f) * reg.bin_h / static_cast<T>(reg.grid_h);
  const T x = reg.start_w + pw * reg.bin_w + static_cast<T>(ix + .5f) * reg.bin_w / static_cast<T>(reg.grid_w);
  Sample<T> s;
  s.bin = ph * sh + pw * sw;
  corners<T>(H, W, y, x, s);
  return s;
}

// Samples the table of one chunk holds: as many as fit in max_table_bytes, at least one.
template <typename T>
int64_t table_capacity(int64_t max_table_bytes) {
  return std::max<int64_t>(1, max_table_bytes / (int64_t)sizeof(Sample<T>));
}

// The samples of all regions, in order, are cut into chunks of at most table_capacity()
// samples (a chunk may end or start inside a region). Each chunk's table is built, then
// every channel plane is scattered into with it. For a fixed channel the contributions are
// still added in the unchunked order, so chunking changes no bit of the result; it only
// bounds the table's memory (regions x bins x samples would otherwise be held at once).
template <typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale_d,
                   int64_t PH, int64_t PW, int64_t C, int64_t H, int64_t W,
                   int64_t sampling_ratio, bool aligned, int64_t max_table_bytes, at::Tensor& grad_input) {
  const T spatial_scale = spatial_scale_d;
  const int64_t K = rois.size(0);
  const T* r = rois.data_ptr<T>();
  const int64_t sn = grad.stride(0), sc = grad.stride(1), sh = grad.stride(2), sw = grad.stride(3);

  std::vector<Region<T>> regions(K);
  int64_t total = 0;
  for (int64_t n = 0; n < K; ++n) {
    regions[n] = region_of<T>(r + n * 5, spatial_scale, PH, PW, sampling_ratio, aligned);
    total += regions[n].num_samples;
  }
  const int64_t capacity = table_capacity<T>(max_table_bytes);
  std::vector<Sample<T>> table;
  table.reserve(std::min(capacity, total));

  const T* g = grad.data_ptr<T>();
  T* gi = grad_input.data_ptr<T>();
  int64_t n = 0, next = 0;  // the first sample not yet scattered: sample `next` of region n
  while (n < K) {
    // fill the table: the chunk starts at sample `first_offset` of region `first`
    const int64_t first = n, first_offset = next;
    table.clear();
    while (n < K && (int64_t)table.size() < capacity) {
      const Region<T>& reg = regions[n];
      const int64_t end = std::min(reg.num_samples, next + capacity - (int64_t)table.size());
      for (int64_t j = next; j < end; ++j) table.push_back(sample_at<T>(reg, j, PW, H, W, sh, sw));
      next = end;
      if (next == reg.num_samples) {
        ++n;
        next = 0;
      }
    }
    const int64_t size = (int64_t)table.size();
    if (size == 0) break;  // only regions without samples were left
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t pos = 0;  // table[pos] is sample `begin` of region m
        for (int64_t m = first; pos < size; ++m) {
          const Region<T>& reg = regions[m];
          const int64_t begin = (m == first) ? first_offset : 0;
          const int64_t stop = pos + std::min(reg.num_samples - begin, size - pos);
          const T* gout = g + m * sn + c * sc;
          T* plane = gi + (reg.image * C + c) * H * W;
          const T count = reg.count;
          for (int64_t i = pos; i < stop; ++i) {
            const Sample<T>& s = table[i];
            if (s.pos[0] < 0) continue;  // outside the map: torchvision adds nothing either
            const T v = gout[s.bin];
            T g1 = v * s.w[0] / count;
            T g2 = v * s.w[1] / count;
            T g3 = v * s.w[2] / count;
            T g4 = v * s.w[3] / count;
            plane[s.pos[0]] += static_cast<T>(g1);
            plane[s.pos[1]] += static_cast<T>(g2);
            plane[s.pos[2]] += static_cast<T>(g3);
            plane[s.pos[3]] += static_cast<T>(g4);
          }
          pos = stop;
        }
      }
    });
  }
}

}  // namespace

// torchvision::_roi_align_backward's arguments and result, plus the bound on the sample
// table (bytes; the kernel holds at most max(1, max_table_bytes / entry size) samples).
at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                  int64_t channels, int64_t height, int64_t width,
                                  int64_t sampling_ratio, bool aligned, int64_t max_table_bytes) {
  TORCH_CHECK(grad.device().is_cpu() && rois.device().is_cpu(),
              "d2seg roi_align_backward: grad and rois must be CPU tensors");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "d2seg roi_align_backward: rois must be (K, 5), got ",
              rois.sizes());
  TORCH_CHECK(grad.scalar_type() == rois.scalar_type(),
              "d2seg roi_align_backward: grad and rois must have the same dtype, got ",
              grad.scalar_type(), " and ", rois.scalar_type());
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_height && grad.size(3) == pooled_width,
              "d2seg roi_align_backward: grad must be (K, C, PH, PW) = (", rois.size(0), ", ", channels,
              ", ", pooled_height, ", ", pooled_width, "), got ", grad.sizes());
  TORCH_CHECK(max_table_bytes > 0, "d2seg roi_align_backward: max_table_bytes must be > 0, got ",
              max_table_bytes);
  auto grad_input = at::zeros({batch_size, channels, height, width}, grad.options());
  if (grad.numel() == 0) return grad_input;
  auto rois_ = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad.scalar_type(), "d2seg_roi_align_backward", [&] {
    backward_impl<scalar_t>(grad, rois_, spatial_scale, pooled_height, pooled_width, channels, height,
                            width, sampling_ratio, aligned, max_table_bytes, grad_input);
  });
  return grad_input;
}

// (bytes of one table entry, samples per chunk) for a dtype and a bound: what the kernel
// above holds at most, exposed for the tests and for documentation.
std::vector<int64_t> roi_align_backward_table(at::ScalarType dtype, int64_t max_table_bytes) {
  TORCH_CHECK(max_table_bytes > 0, "roi_align_backward_table: max_table_bytes must be > 0");
  std::vector<int64_t> out;
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(dtype, "d2seg_roi_align_backward_table", [&] {
    out = {(int64_t)sizeof(Sample<scalar_t>), table_capacity<scalar_t>(max_table_bytes)};
  });
  return out;
}

}  // namespace d2seg

// The default bound, 4 MiB, is written in the schema (d2seg.layers.roi_align.MAX_TABLE_BYTES
// says the same).
TORCH_LIBRARY_FRAGMENT(d2seg, m) {
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int batch_size, int channels, int height, int width, int sampling_ratio, "
      "bool aligned, int max_table_bytes=4194304) -> Tensor");
  m.def("roi_align_backward_table(ScalarType dtype, int max_table_bytes) -> int[]",
        &d2seg::roi_align_backward_table);
}

TORCH_LIBRARY_IMPL(d2seg, CPU, m) {
  m.impl("roi_align_backward", &d2seg::roi_align_backward_cpu);
}
