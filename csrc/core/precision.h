// float16 / bfloat16 in the compiled ops: they accumulate in float32 and return the input's
// dtype. Point sampling reads half-precision feature maps directly (its kernels are
// templates on the storage type, with float32 arithmetic); the dynamic convolutions widen
// half-precision inputs to float32 at the op boundary, run their float32 kernels and narrow
// the results (their inputs are small next to their work, see docs/ops.md).
#pragma once
#include <torch/types.h>

#include <tuple>

namespace d2seg {

inline bool is_reduced_precision(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

// The dtype the op computes in for inputs of dtype t: float32 for float16 / bfloat16.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return is_reduced_precision(t) ? at::kFloat : t;
}

// t in dtype `to` (t itself when it already has it, or is undefined).
inline at::Tensor cast_to(const at::Tensor& t, at::ScalarType to) {
  return t.defined() && t.scalar_type() != to ? t.to(to) : t;
}

inline c10::optional<at::Tensor> cast_to(const c10::optional<at::Tensor>& t, at::ScalarType to) {
  if (!t.has_value() || !t->defined()) return t;
  return cast_to(*t, to);
}

// Whether a tensor of dtype `aux` (coordinates, boxes, locations, scales) may accompany
// data of dtype `data`: the same dtype, or float32 beside float16 / bfloat16 data.
inline bool aux_dtype_ok(at::ScalarType data, at::ScalarType aux) {
  return aux == data || (is_reduced_precision(data) && aux == at::kFloat);
}

// Widening of an op's arguments: floating tensors of a half-precision dtype become float32,
// everything else passes unchanged.
inline at::Tensor widen(const at::Tensor& t) {
  return t.defined() && is_reduced_precision(t.scalar_type()) ? t.to(at::kFloat) : t;
}
inline c10::optional<at::Tensor> widen(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return t;
  return widen(*t);
}
template <typename T>
inline const T& widen(const T& v) {
  return v;
}

// Narrowing of an op's results to dtype dt (each tensor of a tuple).
inline at::Tensor narrow_to(const at::Tensor& t, at::ScalarType dt) { return cast_to(t, dt); }
template <typename... Ts>
inline std::tuple<Ts...> narrow_to(const std::tuple<Ts...>& t, at::ScalarType dt) {
  return std::apply([&](const auto&... x) { return std::make_tuple(narrow_to(x, dt)...); }, t);
}

// The float16 / bfloat16 path of an op whose kernels compute in float32 or float64: op on
// the widened arguments, results narrowed to dt (the dtype of the op's data input).
template <typename Op, typename... Args>
inline auto call_widened(at::ScalarType dt, const Op& op, const Args&... args) {
  return narrow_to(op(widen(args)...), dt);
}

}  // namespace d2seg
