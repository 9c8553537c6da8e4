// A BatchNorm before CBAM, applied to CBAM's input as the passes read it: per-channel affine maps
// (or identities, known at compile time), so that the BatchNorm's output is never written.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace cbam_cpu {
namespace {

// An eval-mode BatchNorm's per-channel affine map a * x + b, applied to CBAM's input as the passes
// read it (so that its output is never written), or nothing (kNormed = false). The compiler
// contracts it into one fused multiply-add where the CPU has one, as in torch's own kernel.
template <typename scalar_t, bool kNormed>
struct Affine {
  static constexpr bool kIsNormed = kNormed;
  scalar_t a, b;
  template <typename V>
  __attribute__((always_inline)) V operator()(V v) const {
    if constexpr (kNormed) return v * a + b;
    return v;
  }
};

// Per-channel maps (scale, shift: (C) each) where kNormed; identities otherwise (null pointers).
template <typename scalar_t, bool kNormed>
struct InputNorm {
  const scalar_t* scale = nullptr;
  const scalar_t* shift = nullptr;
  __attribute__((always_inline)) Affine<scalar_t, kNormed> operator[](int64_t c) const {
    if constexpr (kNormed) return {scale[c], shift[c]};
    return {};
  }
};

// Runs work(InputNorm<scalar_t, kNormed>) with kNormed known at compile time: the per-channel maps of
// input_affine (2, C) — scale, then shift — where given, identities otherwise.
template <typename scalar_t, typename Work>
void with_input_norm(const std::optional<at::Tensor>& input_affine, int64_t C, Work work) {
  if (input_affine) {
    const scalar_t* scale = input_affine->data_ptr<scalar_t>();
    work(InputNorm<scalar_t, true>{scale, scale + C});
  } else {
    work(InputNorm<scalar_t, false>{});
  }
}

}  // namespace
}  // namespace cbam_cpu
