// The small steps between the passes: the channel MLP (on BLAS for a batch, or in plain loops sample by
// sample, small_steps.h) and the spatial conv's backward with its BatchNorm. spatial_gate.py and
// torch_ops.py are the definition.
#include "small_steps.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/relu6.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/threshold_backward.h>

namespace cbam_cpu {
namespace {

// The P descriptors d_k = avg_coef[k] * avg + max_coef[k] * peak of avg, peak (B, C), stacked: (P * B, C).
at::Tensor descriptors(const at::Tensor& avg, const at::Tensor& peak, const std::vector<double>& avg_coef,
                       const std::vector<double>& max_coef) {
  std::vector<at::Tensor> found;
  for (size_t k = 0; k < avg_coef.size(); ++k) {
    if (avg_coef[k] == 1 && max_coef[k] == 0) {
      found.push_back(avg);
    } else if (avg_coef[k] == 0 && max_coef[k] == 1) {
      found.push_back(peak);
    } else {
      found.push_back(avg * avg_coef[k] + peak * max_coef[k]);
    }
  }
  return at::cat(found);
}

// The channel MLP's backward on BLAS, given mc = channel_gate(...) and d_mc (B, C): the gradients for
// avg, peak, W1, b1, W2, b2 (b1/b2 whether or not the MLP has them).
std::vector<at::Tensor> channel_backward_blas(const at::Tensor& avg, const at::Tensor& peak,
                                              std::vector<double> avg_coef, std::vector<double> max_coef,
                                              const at::Tensor& fc1_w, const std::optional<at::Tensor>& fc1_b,
                                              const at::Tensor& fc2_w, const at::Tensor& mc, const at::Tensor& d_mc,
                                              bool hard) {
  const int64_t P = static_cast<int64_t>(avg_coef.size()), B = avg.size(0), H = fc1_w.size(0);
  const auto stacked = descriptors(avg, peak, avg_coef, max_coef);   // (P * B, C)
  const auto pre = at::linear(stacked, fc1_w, fc1_b);                 // (P * B, H)
  const auto hidden_sum = at::relu(pre).view({P, B, H}).sum(0);      // (B, H)
  const auto d_z = hard ? d_mc.masked_fill((mc <= 0) | (mc >= 1), 0) / 6 : d_mc * (mc * (1 - mc));  // (B, C)
  const auto d_pre = at::threshold_backward(d_z.mm(fc2_w).repeat({P, 1}), pre, 0);  // (P * B, H): torch's ReLU's
  const auto d_descriptors = d_pre.mm(fc1_w).view({P, B, avg.size(1)});  // (P, B, C)
  auto d_avg = at::zeros_like(avg), d_peak = at::zeros_like(peak);
  for (int64_t k = 0; k < P; ++k) {  // a coefficient of 0 adds nothing (not 0 * inf)
    if (avg_coef[k] != 0) d_avg.add_(d_descriptors[k], avg_coef[k]);
    if (max_coef[k] != 0) d_peak.add_(d_descriptors[k], max_coef[k]);
  }
  return {d_avg, d_peak, d_pre.t().mm(stacked), d_pre.sum(0), d_z.t().mm(hidden_sum), d_z.sum(0) * P};
}

// The spatial BatchNorm's backward over the N logits z, in place on dz (the gradient at its output on
// entry, at its input on return): on the batch statistics of z, or on running_mean/running_var (weight
// optional). Writes its d_weight, d_bias to d_norm.
template <typename scalar_t>
void spatial_norm_backward(const scalar_t* z, scalar_t* dz, int64_t N, bool batch_statistics,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var, double eps, scalar_t* d_norm) {
  double mu = 0, var = 0;
  if (batch_statistics) {
    for (int64_t i = 0; i < N; ++i) mu += z[i];
    mu /= N;
    for (int64_t i = 0; i < N; ++i) var += (z[i] - mu) * (z[i] - mu);
    var /= N;
  } else {
    mu = running_mean->item<double>();
    var = running_var->item<double>();
  }
  const double inverse_std = 1 / std::sqrt(var + eps);
  double sum = 0, sum_centred = 0;  // of dy and of dy * centred
  for (int64_t i = 0; i < N; ++i) {
    sum += dz[i];
    sum_centred += dz[i] * (z[i] - mu) * inverse_std;
  }
  const double scale = inverse_std * (weight ? weight->item<double>() : 1.0);
  for (int64_t i = 0; i < N; ++i) {
    const double centred = (z[i] - mu) * inverse_std;
    dz[i] = batch_statistics ? scale * (dz[i] - sum / N - centred * sum_centred / N) : scale * dz[i];
  }
  d_norm[0] = sum_centred;
  d_norm[1] = sum;
}

// The conv's backward from the gated statistics mean, speak (B, S) and the logits' gradient dz (B, S):
// the maps' gradient d_maps (B, I, S) and each sample's share of the weight's, partial (B, taps).
template <typename scalar_t>
void stats_conv_backward(const scalar_t* mean, const scalar_t* speak, const scalar_t* dz, const scalar_t* conv_w,
                         int64_t B, int64_t I, int64_t S, int64_t taps, const std::vector<int64_t>& size,
                         const std::vector<int64_t>& kernel, scalar_t* maps, scalar_t* d_maps, scalar_t* partial) {
  for (int64_t b = 0; b < B; ++b) statistic_maps(mean + b * S, speak + b * S, I, S, maps + b * I * S);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      spatial_conv_backward(maps + b * I * S, dz + b * S, conv_w, I, size.data(), kernel.data(), d_maps + b * I * S,
                            partial + b * taps);
  });
}

}  // namespace

// The channel MLP's gate for a batch, on BLAS: mc = gate(W2 sum_k relu(W1 d_k + b1) + P b2) (B, C).
at::Tensor channel_gate(const at::Tensor& avg, const at::Tensor& peak, std::vector<double> avg_coef,
                        std::vector<double> max_coef, const at::Tensor& fc1_w, const std::optional<at::Tensor>& fc1_b,
                        const at::Tensor& fc2_w, const std::optional<at::Tensor>& fc2_b, bool hard) {
  const int64_t P = static_cast<int64_t>(avg_coef.size());
  const auto hidden = at::relu(at::linear(descriptors(avg, peak, avg_coef, max_coef), fc1_w, fc1_b));
  auto z = at::linear(hidden.view({P, avg.size(0), fc1_w.size(0)}).sum(0), fc2_w);
  if (fc2_b) z.add_(*fc2_b, static_cast<double>(P));
  return (hard ? at::relu6(z + 3) / 6 : at::sigmoid(z)).contiguous();
}

// The channel MLP's backward, given mc = channel_gate(...) and d_mc (B, C): the gradients for avg,
// peak, W1, b1, W2, b2 (b1/b2 whether or not the MLP has them). Small MLPs (W1 of at most 2^14
// weights, ResNet-50's first two stages) in plain loops, sample after sample; larger ones on BLAS.
std::vector<at::Tensor> channel_backward(const at::Tensor& avg, const at::Tensor& peak, std::vector<double> avg_coef,
                                         std::vector<double> max_coef, const at::Tensor& fc1_w,
                                         const std::optional<at::Tensor>& fc1_b, const at::Tensor& fc2_w,
                                         const at::Tensor& mc, const at::Tensor& d_mc, bool hard) {
  if (fc1_w.numel() > (1 << 14))
    return channel_backward_blas(avg, peak, avg_coef, max_coef, fc1_w, fc1_b, fc2_w, mc, d_mc, hard);
  const int64_t B = avg.size(0), C = avg.size(1), H = fc1_w.size(0);
  auto d_avg = at::empty_like(avg), d_peak = at::empty_like(peak);
  auto d_w1 = at::zeros_like(fc1_w), d_b1 = at::zeros({H}, fc1_w.options());
  auto d_w2 = at::zeros_like(fc2_w), d_b2 = at::zeros({C}, fc2_w.options());
  AT_DISPATCH_FLOATING_TYPES(avg.scalar_type(), "cbam_channel_backward", [&] {
    const auto mlp = channel_mlp<scalar_t>(avg_coef, max_coef, fc1_w, fc1_b, fc2_w, std::nullopt, hard);
    for (int64_t b = 0; b < B; ++b)
      mlp.backward(avg.data_ptr<scalar_t>() + b * C, peak.data_ptr<scalar_t>() + b * C, mc.data_ptr<scalar_t>() + b * C,
                   d_mc.data_ptr<scalar_t>() + b * C, d_avg.data_ptr<scalar_t>() + b * C,
                   d_peak.data_ptr<scalar_t>() + b * C, d_w1.data_ptr<scalar_t>(), d_b1.data_ptr<scalar_t>(),
                   d_w2.data_ptr<scalar_t>(), d_b2.data_ptr<scalar_t>());
  });
  return {d_avg, d_peak, d_w1, d_b1, d_w2, d_b2};
}

// spatial_conv's backward for a batch: maps (B, I, S), d_out (B, S), weight (I, kd, kh, kw).
std::vector<at::Tensor> conv_backward(const at::Tensor& maps, const at::Tensor& d_out, const at::Tensor& weight,
                                      std::vector<int64_t> size, std::vector<int64_t> kernel) {
  const int64_t B = maps.size(0), I = maps.size(1), S = maps.size(2), taps = weight.numel();
  auto d_maps = at::empty_like(maps);
  auto partial = at::zeros({B, taps}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "cbam_conv_backward", [&] {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        spatial_conv_backward(maps.data_ptr<scalar_t>() + b * I * S, d_out.data_ptr<scalar_t>() + b * S,
                              weight.data_ptr<scalar_t>(), I, size.data(), kernel.data(),
                              d_maps.data_ptr<scalar_t>() + b * I * S, partial.data_ptr<scalar_t>() + b * taps);
    });
  });
  return {d_maps, partial.sum(0).view(weight.sizes())};
}

// Everything between the backward's gate gradients and the statistics' gradients, in one call: given
// d_ms (B, S), the gradient through the gate (from ms, the gate's output), the spatial BatchNorm if
// any (norm: on the batch statistics of logits (B, S), or on running_mean/running_var; weight
// optional) and the conv of the gated statistics mean, speak (B, S) with conv_w (1, I, *kernel): I = 2
// stacks [mean, speak], I = 1 averages them. Returns d_mean, d_speak, d_conv_w, and the norm's
// d_weight, d_bias (1) (zeros without a norm). spatial_gate.py and conv_backward are the definition.
std::vector<at::Tensor> spatial_backward(const at::Tensor& logits, const at::Tensor& ms, const at::Tensor& d_ms,
                                         const at::Tensor& mean, const at::Tensor& speak, const at::Tensor& conv_w,
                                         std::vector<int64_t> size, std::vector<int64_t> kernel, bool hard, bool norm,
                                         bool batch_statistics, const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& running_mean,
                                         const std::optional<at::Tensor>& running_var, double eps) {
  const int64_t B = logits.size(0), S = logits.size(1), N = B * S, taps = conv_w.numel();
  const int64_t I = taps / (kernel[0] * kernel[1] * kernel[2]);
  auto d_logits = at::empty_like(logits);
  auto d_norm = at::zeros({2}, logits.options());  // d_weight, d_bias
  auto maps = at::empty({B, I, S}, logits.options());
  auto d_maps = at::empty({B, I, S}, logits.options());
  auto partial = at::zeros({B, taps}, conv_w.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cbam_spatial_backward", [&] {
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const scalar_t* g = ms.data_ptr<scalar_t>();
    const scalar_t* dg = d_ms.data_ptr<scalar_t>();
    scalar_t* dz = d_logits.data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i)
      dz[i] = gate_grad(g[i], dg[i], hard);
    if (norm)
      spatial_norm_backward(z, dz, N, batch_statistics, weight, running_mean, running_var, eps,
                            d_norm.data_ptr<scalar_t>());
    stats_conv_backward(mean.data_ptr<scalar_t>(), speak.data_ptr<scalar_t>(), dz, conv_w.data_ptr<scalar_t>(), B, I,
                        S, taps, size, kernel, maps.data_ptr<scalar_t>(), d_maps.data_ptr<scalar_t>(),
                        partial.data_ptr<scalar_t>());
  });
  at::Tensor d_mean, d_speak;
  if (I == 2) {
    d_mean = d_maps.select(1, 0).contiguous();
    d_speak = d_maps.select(1, 1).contiguous();
  } else {
    d_mean = d_speak = (d_maps.select(1, 0) / 2).contiguous();
  }
  return {d_mean, d_speak, partial.sum(0).view(conv_w.sizes()), d_norm.slice(0, 0, 1), d_norm.slice(0, 1, 2)};
}

}  // namespace cbam_cpu
