// Per-point math of bilinear point sampling, shared by the CPU (point_sample_cpu.cpp) and
// CUDA (point_sample_cuda.cu) implementations. It reproduces F.grid_sample with
// mode="bilinear", padding_mode="zeros", align_corners=False, in grid_sample's own
// arithmetic, for Detectron2's point coordinates in [0, 1] (grid = 2 * p - 1).
#pragma once
#include <cmath>
#include <cstdint>

#include "core/macros.h"

namespace d2seg {

// Pixel coordinate of a point p in [0, 1] along an axis of `size` pixels:
// grid g = 2p - 1, then grid_sample's unnormalisation ((g + 1) * size - 1) / 2.
template <typename S>
D2SEG_HOST_DEVICE inline S point_to_pixel(S p, int64_t size) {
  const S g = p * S(2) - S(1);
  return ((g + S(1)) * static_cast<S>(size) - S(1)) / S(2);
}

// Pixel coordinate of a box-normalised point, Detectron2 PointRend's way: the point in
// image coordinates (lo + p * (hi - lo)), normalised by the padded image size
// size / feature_scale of this level, then as point_to_pixel.
template <typename S>
D2SEG_HOST_DEVICE inline S box_point_to_pixel(S p, S lo, S hi, int64_t size, S feature_scale) {
  const S image_coord = p * (hi - lo) + lo;
  const S normalized = image_coord / (static_cast<S>(size) / feature_scale);
  return point_to_pixel(normalized, size);
}

// The four corners of the bilinear interpolation at pixel coordinate (ix, iy), in the
// order north-west, north-east, south-west, south-east: offsets into an H x W plane and
// weights. A corner outside the plane gets weight 0 and the offset of a corner inside it
// (or 0), so reading it is always safe and adds nothing.
template <typename S>
struct BilinearCorners {
  int64_t offset[4];
  S weight[4];
  S ix, iy;             // the pixel coordinate
  S ix_nw, iy_nw;       // its floor
  bool inside[4];
};

template <typename S>
D2SEG_HOST_DEVICE inline BilinearCorners<S> bilinear_corners(S ix, S iy, int64_t H, int64_t W) {
  BilinearCorners<S> c;
  c.ix = ix;
  c.iy = iy;
  const S ix_nw = ::floor(ix), iy_nw = ::floor(iy);
  const S ix_se = ix_nw + S(1), iy_se = iy_nw + S(1);
  c.ix_nw = ix_nw;
  c.iy_nw = iy_nw;
  // grid_sample's weights: each corner is weighted by the area of the opposite rectangle.
  const S w[4] = {(ix_se - ix) * (iy_se - iy), (ix - ix_nw) * (iy_se - iy),
                  (ix_se - ix) * (iy - iy_nw), (ix - ix_nw) * (iy - iy_nw)};
  const S xs[4] = {ix_nw, ix_se, ix_nw, ix_se};
  const S ys[4] = {iy_nw, iy_nw, iy_se, iy_se};
  int64_t any_inside = 0;
  for (int k = 0; k < 4; ++k) {
    c.inside[k] = xs[k] >= S(0) && xs[k] < static_cast<S>(W) && ys[k] >= S(0) &&
                  ys[k] < static_cast<S>(H);
    if (c.inside[k]) any_inside = static_cast<int64_t>(ys[k]) * W + static_cast<int64_t>(xs[k]);
  }
  for (int k = 0; k < 4; ++k) {
    c.weight[k] = c.inside[k] ? w[k] : S(0);
    c.offset[k] = c.inside[k] ? static_cast<int64_t>(ys[k]) * W + static_cast<int64_t>(xs[k])
                              : any_inside;
  }
  return c;
}

// The interpolated value of one plane of storage type F (float16 / bfloat16 planes are read
// into the arithmetic type S, float32).
template <typename S, typename F>
D2SEG_HOST_DEVICE inline S bilinear_value(const F* plane, const int64_t* offset, const S* weight) {
  return weight[0] * static_cast<S>(plane[offset[0]]) + weight[1] * static_cast<S>(plane[offset[1]]) +
         weight[2] * static_cast<S>(plane[offset[2]]) + weight[3] * static_cast<S>(plane[offset[3]]);
}

// Gradient of the interpolated value of one plane (storage type F) w.r.t. the pixel coordinate (ix, iy),
// times the output gradient g, added to (gx, gy); as grid_sample's backward.
template <typename S, typename F>
D2SEG_HOST_DEVICE inline void bilinear_coord_grad(const F* plane, const BilinearCorners<S>& c,
                                                  S g, S& gx, S& gy) {
  const S ix_se = c.ix_nw + S(1), iy_se = c.iy_nw + S(1);
  S v[4];
  for (int k = 0; k < 4; ++k) v[k] = c.inside[k] ? static_cast<S>(plane[c.offset[k]]) : S(0);
  gx += g * (-v[0] * (iy_se - c.iy) + v[1] * (iy_se - c.iy) - v[2] * (c.iy - c.iy_nw) +
             v[3] * (c.iy - c.iy_nw));
  gy += g * (-v[0] * (ix_se - c.ix) - v[1] * (c.ix - c.ix_nw) + v[2] * (ix_se - c.ix) +
             v[3] * (c.ix - c.ix_nw));
}

// Where the points of row r sample: the image and the pixel coordinates of point p.
// Without boxes, row r is image r and the points are image-normalised; with boxes, row r
// is box r of image batch_index[r] and the points are box-normalised.
template <typename S>
struct PointRows {
  const S* coords;            // (R, P, 2)
  const S* boxes;             // (R, 4) x0, y0, x1, y1 in image pixels, or null
  const int64_t* batch_index; // (R,) or null
  S feature_scale;            // 1 / stride of the level (box form only)
  int64_t P, H, W;

  D2SEG_HOST_DEVICE inline int64_t image(int64_t r) const {
    return batch_index ? batch_index[r] : r;
  }
  D2SEG_HOST_DEVICE inline void pixel(int64_t r, int64_t p, S& ix, S& iy) const {
    const S px = coords[(r * P + p) * 2], py = coords[(r * P + p) * 2 + 1];
    if (boxes) {
      const S* b = boxes + r * 4;
      ix = box_point_to_pixel(px, b[0], b[2], W, feature_scale);
      iy = box_point_to_pixel(py, b[1], b[3], H, feature_scale);
    } else {
      ix = point_to_pixel(px, W);
      iy = point_to_pixel(py, H);
    }
  }
};

}  // namespace d2seg
