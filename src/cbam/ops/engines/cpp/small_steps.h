// The small steps between the passes, on vectors and maps of one sample rather than on x: the channel
// MLP in plain loops (for MLPs too small for BLAS) and the spatial conv, forward and backward.
#pragma once

#include "passes.h"
#include "vector.h"

namespace cbam_cpu {
namespace {

// The channel MLP's gate mc = gate(W2 sum_k relu(W1 d_k + b1) + P b2) of one sample, descriptor
// d_k = avg_coef[k] * avg + max_coef[k] * peak (each (C)), in plain loops: for small MLPs, where a
// BLAS call costs more than the product.
template <typename scalar_t>
struct ChannelMLP {
  const std::vector<double>& avg_coef;
  const std::vector<double>& max_coef;
  const scalar_t* w1;  // (H, C)
  const scalar_t* b1;  // (H) or null
  const scalar_t* w2;  // (C, H)
  const scalar_t* b2;  // (C) or null
  int64_t C, H;
  bool hard;

  // The hidden layer of one sample: its P descriptors (P, C) (a term of coefficient 0 left out: no
  // 0 * inf), their pre-activations (P, H) and hidden_sum (H) = sum_k relu(pre_k) (NaN kept, as torch's).
  void hidden(const scalar_t* avg, const scalar_t* peak, scalar_t* descriptors, scalar_t* pre,
              scalar_t* hidden_sum) const {
    std::fill(hidden_sum, hidden_sum + H, scalar_t(0));
    for (size_t k = 0; k < avg_coef.size(); ++k) {
      scalar_t* d = descriptors + k * C;
      const scalar_t a = scalar_t(avg_coef[k]), m = scalar_t(max_coef[k]);
      for (int64_t c = 0; c < C; ++c) d[c] = a == 0 ? m * peak[c] : m == 0 ? a * avg[c] : a * avg[c] + m * peak[c];
      for (int64_t j = 0; j < H; ++j) {
        pre[k * H + j] = dot(w1 + j * C, d, C) + (b1 ? b1[j] : scalar_t(0));
        hidden_sum[j] += pre[k * H + j] <= 0 ? scalar_t(0) : pre[k * H + j];
      }
    }
  }

  void gate(const scalar_t* avg, const scalar_t* peak, scalar_t* mc) const {
    const int64_t P = static_cast<int64_t>(avg_coef.size());
    std::vector<scalar_t> descriptors(P * C), pre(P * H), hidden_sum(H);
    hidden(avg, peak, descriptors.data(), pre.data(), hidden_sum.data());
    for (int64_t c = 0; c < C; ++c)
      mc[c] = squash(dot(w2 + c * H, hidden_sum.data(), H) + (b2 ? P * b2[c] : scalar_t(0)), hard);
  }

  // The backward of gate() for one sample, given its mc and d_mc: writes d_avg, d_peak (C) and adds
  // to the weight gradients d_w1 (H, C), d_b1 (H), d_w2 (C, H), d_b2 (C).
  void backward(const scalar_t* avg, const scalar_t* peak, const scalar_t* mc, const scalar_t* d_mc, scalar_t* d_avg,
                scalar_t* d_peak, scalar_t* d_w1, scalar_t* d_b1, scalar_t* d_w2, scalar_t* d_b2) const {
    const int64_t P = static_cast<int64_t>(avg_coef.size());
    std::vector<scalar_t> descriptors(P * C), pre(P * H), hidden_sum(H), d_hidden(H, scalar_t(0));
    hidden(avg, peak, descriptors.data(), pre.data(), hidden_sum.data());
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t d_z = gate_grad(mc[c], d_mc[c], hard);
      d_b2[c] += P * d_z;
      for (int64_t j = 0; j < H; ++j) {
        d_w2[c * H + j] += d_z * hidden_sum[j];
        d_hidden[j] += w2[c * H + j] * d_z;
      }
    }
    std::fill(d_avg, d_avg + C, scalar_t(0));
    std::fill(d_peak, d_peak + C, scalar_t(0));
    for (int64_t k = 0; k < P; ++k) {
      const scalar_t* d = descriptors.data() + k * C;
      for (int64_t j = 0; j < H; ++j) {
        const scalar_t d_pre = pre[k * H + j] <= 0 ? scalar_t(0) : d_hidden[j];  // as torch's ReLU backward
        d_b1[j] += d_pre;
        const scalar_t* row = w1 + j * C;
        scalar_t* d_row = d_w1 + j * C;
        const scalar_t to_avg = avg_coef[k] == 0 ? scalar_t(0) : scalar_t(avg_coef[k]) * d_pre;
        const scalar_t to_peak = max_coef[k] == 0 ? scalar_t(0) : scalar_t(max_coef[k]) * d_pre;
        for (int64_t c = 0; c < C; ++c) {
          d_row[c] += d_pre * d[c];
          d_avg[c] += to_avg * row[c];
          d_peak[c] += to_peak * row[c];
        }
      }
    }
  }
};

template <typename scalar_t>
ChannelMLP<scalar_t> channel_mlp(const std::vector<double>& avg_coef, const std::vector<double>& max_coef,
                                 const at::Tensor& fc1_w, const std::optional<at::Tensor>& fc1_b,
                                 const at::Tensor& fc2_w, const std::optional<at::Tensor>& fc2_b, bool hard) {
  return {avg_coef, max_coef, fc1_w.data_ptr<scalar_t>(), fc1_b ? fc1_b->data_ptr<scalar_t>() : nullptr,
          fc2_w.data_ptr<scalar_t>(), fc2_b ? fc2_b->data_ptr<scalar_t>() : nullptr, fc1_w.size(1), fc1_w.size(0),
          hard};
}

// The spatial conv's input maps (I, S) of one sample from its gated statistics mean, speak (S):
// I = 2 stacks them, I = 1 averages them.
template <typename scalar_t>
void statistic_maps(const scalar_t* mean, const scalar_t* speak, int64_t I, int64_t S, scalar_t* maps) {
  for (int64_t s = 0; s < S; ++s) {
    if (I == 2) {
      maps[s] = mean[s];
      maps[S + s] = speak[s];
    } else {
      maps[s] = (mean[s] + speak[s]) / 2;
    }
  }
}

// Every (output row, input row, kernel tap) of the size-keeping correlation of maps (I, D, H, W) with
// a kernel (I, kd, kh, kw), zero padding k // 2: visit(out, in, tap, shift, lo, hi) pairs position
// out + ow of the output with in + ow + shift of the maps for ow in [lo, hi), under weight[tap].
template <typename Visit>
void for_each_tap(int64_t I, const int64_t* size, const int64_t* kernel, Visit visit) {
  const int64_t D = size[0], H = size[1], W = size[2], S = D * H * W;
  for (int64_t od = 0; od < D; ++od)
    for (int64_t oh = 0; oh < H; ++oh)
      for (int64_t i = 0; i < I; ++i)
        for (int64_t a = 0; a < kernel[0]; ++a) {
          const int64_t id = od + a - kernel[0] / 2;
          if (id < 0 || id >= D) continue;
          for (int64_t e = 0; e < kernel[1]; ++e) {
            const int64_t ih = oh + e - kernel[1] / 2;
            if (ih < 0 || ih >= H) continue;
            const int64_t first_tap = ((i * kernel[0] + a) * kernel[1] + e) * kernel[2];
            for (int64_t f = 0; f < kernel[2]; ++f) {
              const int64_t shift = f - kernel[2] / 2;
              visit((od * H + oh) * W, i * S + (id * H + ih) * W, first_tap + f, shift,
                    std::max<int64_t>(0, -shift), std::min(W, W - shift));
            }
          }
        }
}

// The correlation itself: out (S) from maps (I, S) and weight (I, kd, kh, kw).
template <typename scalar_t>
void spatial_conv(const scalar_t* maps, const scalar_t* weight, int64_t I, const int64_t* size,
                  const int64_t* kernel, scalar_t* out) {
  std::fill(out, out + size[0] * size[1] * size[2], scalar_t(0));
  for_each_tap(I, size, kernel, [&](int64_t o, int64_t in, int64_t tap, int64_t shift, int64_t lo, int64_t hi) {
    for (int64_t ow = lo; ow < hi; ++ow) out[o + ow] += weight[tap] * maps[in + ow + shift];
  });
}

// Its gradients for one sample: d_maps (I, S) = conv^T(d_out), d_weight (I, kd, kh, kw) += the
// correlation of maps with d_out.
template <typename scalar_t>
void spatial_conv_backward(const scalar_t* maps, const scalar_t* d_out, const scalar_t* weight, int64_t I,
                           const int64_t* size, const int64_t* kernel, scalar_t* d_maps, scalar_t* d_weight) {
  std::fill(d_maps, d_maps + I * size[0] * size[1] * size[2], scalar_t(0));
  for_each_tap(I, size, kernel, [&](int64_t o, int64_t in, int64_t tap, int64_t shift, int64_t lo, int64_t hi) {
    scalar_t sum = 0;
    for (int64_t ow = lo; ow < hi; ++ow) {
      d_maps[in + ow + shift] += weight[tap] * d_out[o + ow];
      sum += d_out[o + ow] * maps[in + ow + shift];
    }
    d_weight[tap] += sum;
  });
}

}  // namespace
}  // namespace cbam_cpu
