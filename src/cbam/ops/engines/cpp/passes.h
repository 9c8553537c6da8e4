// The large-tensor passes of the fused CBAM for CPU tensors x: (B, C, S), float, double or bfloat16 (read and
// written as stored, computed in float: with_storage), contiguous or channels-last. Same functions and semantics as torch_ops.py (the definition), each one read of x
// (and of the incoming gradient) instead of several: loops run over contiguous rows (a channel's
// positions, or channels-last, a position's channels) so the compiler vectorises them;
// at::parallel_for splits batches, rows, channel blocks or position chunks across threads.
//
// This header declares what bindings.cpp exposes, file by file (each definition carries its full
// comment), and the few helpers every pass file shares. The helpers live in an unnamed namespace, as
// they did when the passes were one file: each pass file gets its own copy with internal linkage, so
// the compiler inlines and vectorises them as it did then (the bitwise tests depend on it).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "vector.h"

namespace output_cache {  // output_cache.cpp
at::Tensor empty_like(const at::Tensor& x);
void set_limit(size_t bytes);
size_t cached();
}  // namespace output_cache

namespace cbam_cpu {

// forward.cpp: the forward passes and the whole forward in one call.
std::vector<at::Tensor> pool(const at::Tensor& x);
std::vector<at::Tensor> gated_stats(const at::Tensor& x, const at::Tensor& mc);
at::Tensor apply(const at::Tensor& x, const at::Tensor& mc, const at::Tensor& ms,
                 const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& input_affine);
std::vector<at::Tensor> forward(const at::Tensor& x, std::vector<int64_t> size, std::vector<double> avg_coef,
                                std::vector<double> max_coef, const at::Tensor& fc1_w,
                                const std::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
                                const std::optional<at::Tensor>& fc2_b, const at::Tensor& conv_w,
                                std::vector<int64_t> kernel, bool hard, bool finish,
                                const std::optional<at::Tensor>& norm_weight,
                                const std::optional<at::Tensor>& norm_bias,
                                const std::optional<at::Tensor>& running_mean,
                                const std::optional<at::Tensor>& running_var, double eps,
                                const std::optional<at::Tensor>& residual,
                                const std::optional<at::Tensor>& input_affine, bool overwrite,
                                const std::vector<at::Tensor>& pooled, bool indices);

// backward.cpp: the backward passes over the large tensors.
std::vector<at::Tensor> gate_grads(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mc,
                                   const at::Tensor& ms, const std::optional<at::Tensor>& rectified,
                                   const at::Tensor& channel_index, const std::optional<at::Tensor>& input_affine,
                                   const std::optional<at::Tensor>& centre);
std::vector<at::Tensor> stats_grad(const at::Tensor& x, const at::Tensor& d_mean, const at::Tensor& d_peak,
                                   const at::Tensor& index, const std::optional<at::Tensor>& input_affine,
                                   const std::optional<at::Tensor>& centre);
at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mc, const at::Tensor& ms,
                      const at::Tensor& d_mean, const at::Tensor& d_peak, const at::Tensor& index,
                      const at::Tensor& d_avg, const at::Tensor& d_max, const at::Tensor& channel_index);
std::vector<at::Tensor> batch_norm_input_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mc,
                                              const at::Tensor& ms, const at::Tensor& d_mean,
                                              const at::Tensor& d_peak, const at::Tensor& index,
                                              const at::Tensor& d_avg, const at::Tensor& d_max,
                                              const at::Tensor& channel_index, const at::Tensor& gated,
                                              const at::Tensor& centred, const at::Tensor& mean,
                                              const at::Tensor& invstd, const std::optional<at::Tensor>& weight);

// small_steps.cpp: the channel MLP and the spatial conv, on vectors and maps rather than on x.
at::Tensor channel_gate(const at::Tensor& avg, const at::Tensor& peak, std::vector<double> avg_coef,
                        std::vector<double> max_coef, const at::Tensor& fc1_w, const std::optional<at::Tensor>& fc1_b,
                        const at::Tensor& fc2_w, const std::optional<at::Tensor>& fc2_b, bool hard);
std::vector<at::Tensor> channel_backward(const at::Tensor& avg, const at::Tensor& peak, std::vector<double> avg_coef,
                                         std::vector<double> max_coef, const at::Tensor& fc1_w,
                                         const std::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
                                         const at::Tensor& mc, const at::Tensor& d_mc, bool hard);
std::vector<at::Tensor> conv_backward(const at::Tensor& maps, const at::Tensor& d_out, const at::Tensor& weight,
                                      std::vector<int64_t> size, std::vector<int64_t> kernel);
std::vector<at::Tensor> spatial_backward(const at::Tensor& logits, const at::Tensor& ms, const at::Tensor& d_ms,
                                         const at::Tensor& mean, const at::Tensor& speak, const at::Tensor& conv_w,
                                         std::vector<int64_t> size, std::vector<int64_t> kernel, bool hard, bool norm,
                                         bool batch_statistics, const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& running_mean,
                                         const std::optional<at::Tensor>& running_var, double eps);

// batch_norm.cpp: a BatchNorm before CBAM, folded into its passes.
at::Tensor batch_norm_affine(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var, double eps);
std::vector<at::Tensor> batch_norm_pool(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, double eps);

namespace {

constexpr int64_t kChunk = 512;  // positions per task in the position-major passes

inline int64_t chunks(int64_t positions) { return (positions + kChunk - 1) / kChunk; }

// Whether the passes read x: (B, C, *spatial) channels-last, each sample S rows of C channels (its
// (B, C, S) view has strides (S C, 1, C)), rather than contiguous, C rows of S positions. A tensor that
// is both (C = 1 or S = 1) is read as contiguous; one that is neither is refused.
inline bool channels_last(const at::Tensor& x) {
  if (x.is_contiguous()) return false;
  const int64_t B = x.size(0), C = x.size(1);
  bool rows_last = x.dim() >= 3 && x.stride(1) == 1 && (B == 1 || x.stride(0) == x.numel() / B);
  int64_t expected = C;  // the stride of the next spatial dim outwards
  for (int64_t d = x.dim() - 1; rows_last && d >= 2; --d) {
    rows_last = x.size(d) == 1 || x.stride(d) == expected;
    expected *= x.size(d);
  }
  TORCH_CHECK(rows_last, "cbam: the CPU passes read contiguous or channels-last tensors, got strides ", x.strides(),
              " for sizes ", x.sizes());
  return true;
}

// t (a residual) laid out as x: itself where its strides are x's, else a copy with x's strides.
inline at::Tensor laid_out_as(const at::Tensor& t, const at::Tensor& x) {
  return t.strides() == x.strides() ? t : at::empty_like(x).copy_(t);
}

// The positions of one sample must fit the 32-bit lane positions of the vector passes.
inline void check_positions(int64_t S) {
  TORCH_CHECK(S < std::numeric_limits<int32_t>::max(), "cbam: at most 2^31 - 1 positions per sample, got ", S);
}

// A tensor's data as T (a storage type: Bf16 for bfloat16).
template <typename T>
T* data_as(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// An optional tensor's data (a residual, a centre), or null without one.
template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t ? data_as<const T>(*t) : nullptr;
}

// Runs work(scalar_t{}, storage_t{}) for the large tensor x's dtype: float32 and float64 computed and stored as
// themselves, bfloat16 stored as Bf16 (widened as read, narrowed as written) and computed in float.
template <typename Work>
void with_storage(const at::Tensor& x, Work work) {
  if (x.scalar_type() == at::kBFloat16) {
    work(float{}, Bf16{});
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_pass", [&] { work(scalar_t{}, scalar_t{}); });
}

// Checks that t (a gradient, an output) has the large tensor x's dtype, as the passes read both as one storage type.
inline void check_stored_as(const at::Tensor& x, const at::Tensor& t, const char* pass, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "cbam: ", pass, " reads ", name, " in x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
}

// The options of the vectors the passes compute for the large tensor x: x's, float32 for bfloat16.
inline at::TensorOptions compute_options(const at::Tensor& x) {
  return x.options().dtype(x.scalar_type() == at::kBFloat16 ? at::kFloat : x.scalar_type());
}

// The gate: sigmoid, or hard-sigmoid relu6(z + 3) / 6.
template <typename scalar_t>
scalar_t squash(scalar_t z, bool hard) {
  if (hard) return std::min(std::max(z + scalar_t(3), scalar_t(0)), scalar_t(6)) / scalar_t(6);
  return scalar_t(1) / (scalar_t(1) + std::exp(-z));
}

// The gate's backward from its output y and the gradient d of y (in the order of the torch and Triton
// engines' gate_grad): sigmoid d y (1 - y); hard-sigmoid 0 where y <= 0 or y >= 1, also for a NaN d, else d / 6
// (torch's relu6 backward selects, never multiplies).
template <typename scalar_t>
scalar_t gate_grad(scalar_t y, scalar_t d, bool hard) {
  if (hard) return (y <= 0 || y >= 1) ? scalar_t(0) : d / 6;
  return d * (y * (1 - y));
}

}  // namespace
}  // namespace cbam_cpu
