// The large-tensor passes of the fused CBAM for contiguous CPU tensors x: (B, C, S), float or double.
// Same functions and semantics as torch_passes.py (the definition), each one read of x (and of the
// incoming gradient) instead of several: loops run over contiguous rows so the compiler vectorises
// them; at::parallel_for splits batches, rows or position chunks across threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kChunk = 512;  // positions per task in the position-major passes
constexpr int kLanes = 16;       // independent accumulators per row in the row reductions

int64_t chunks(int64_t positions) { return (positions + kChunk - 1) / kChunk; }

// Spatial mean, max and first arg-max of every row (b, c).
std::vector<at::Tensor> pool(const at::Tensor& x) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  auto avg = at::empty({B, C}, x.options());
  auto peak = at::empty({B, C}, x.options());
  auto index = at::empty({B, C}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_pool", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* ap = avg.data_ptr<scalar_t>();
    scalar_t* pp = peak.data_ptr<scalar_t>();
    int64_t* ip = index.data_ptr<int64_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * S;
        // kLanes independent partial sums and maxima: vectorisable without reordering any one of them
        scalar_t sums[kLanes] = {}, bests[kLanes];
        std::fill(bests, bests + kLanes, row[0]);
        int64_t s = 0;
        for (; s + kLanes <= S; s += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            sums[l] += row[s + l];
            bests[l] = row[s + l] > bests[l] ? row[s + l] : bests[l];
          }
        }
        scalar_t sum = 0, best = row[0];
        for (; s < S; ++s) {
          sum += row[s];
          best = row[s] > best ? row[s] : best;
        }
        for (int l = 0; l < kLanes; ++l) {
          sum += sums[l];
          best = bests[l] > best ? bests[l] : best;
        }
        int64_t at = 0;
        while (at < S - 1 && row[at] != best) ++at;  // the row is in cache now: first index of the maximum
        ap[r] = sum / S;
        pp[r] = best;
        ip[r] = at;
      }
    });
  });
  return {avg, peak, index};
}

// Channel-wise mean, max and first arg-max of y = x * mc at every position, without writing y.
std::vector<at::Tensor> gated_stats(const at::Tensor& x, const at::Tensor& mc) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2), K = chunks(S);
  auto mean = at::empty({B, S}, x.options());
  auto peak = at::empty({B, S}, x.options());
  auto index = at::empty({B, S}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_gated_stats", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = mc.data_ptr<scalar_t>();
    at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> sum(kChunk), best(kChunk);
      std::vector<int32_t> arg(kChunk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / K, s0 = (task % K) * kChunk, n = std::min(kChunk, S - s0);
        const scalar_t* base = xp + b * C * S + s0;
        const scalar_t m0 = mp[b * C];
        for (int64_t s = 0; s < n; ++s) {
          sum[s] = best[s] = m0 * base[s];
          arg[s] = 0;
        }
        for (int64_t c = 1; c < C; ++c) {
          const scalar_t m = mp[b * C + c];
          const scalar_t* row = base + c * S;
          for (int64_t s = 0; s < n; ++s) {
            const scalar_t v = m * row[s];
            const bool above = v > best[s];
            sum[s] += v;
            best[s] = above ? v : best[s];
            arg[s] = above ? static_cast<int32_t>(c) : arg[s];
          }
        }
        scalar_t* mean_out = mean.data_ptr<scalar_t>() + b * S + s0;
        scalar_t* peak_out = peak.data_ptr<scalar_t>() + b * S + s0;
        int64_t* index_out = index.data_ptr<int64_t>() + b * S + s0;
        for (int64_t s = 0; s < n; ++s) {
          mean_out[s] = sum[s] / C;
          peak_out[s] = best[s];
          index_out[s] = arg[s];
        }
      }
    });
  });
  return {mean, peak, index};
}

// out = x * mc * ms; out has x's shape (the caller passes x unflattened but contiguous).
at::Tensor apply(const at::Tensor& x, const at::Tensor& mc, const at::Tensor& ms) {
  const int64_t B = x.size(0), C = x.size(1), S = x.numel() / std::max<int64_t>(B * C, 1);
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_apply", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = mc.data_ptr<scalar_t>();
    const scalar_t* sp = ms.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t m = mp[r];
        const scalar_t* gate = sp + (r / C) * S;
        for (int64_t s = 0; s < S; ++s) op[r * S + s] = xp[r * S + s] * m * gate[s];
      }
    });
  });
  return out;
}

// d/d ms (B, S) and d/d mc (B, C) of sum(grad * x * mc * ms), in one read of grad and x.
std::vector<at::Tensor> gate_grads(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mc,
                                   const at::Tensor& ms) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2), K = chunks(S);
  auto d_ms = at::empty({B, S}, x.options());
  auto partial = at::empty({B, K, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_gate_grads", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = mc.data_ptr<scalar_t>();
    const scalar_t* sp = ms.data_ptr<scalar_t>();
    at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acc(kChunk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / K, k = task % K, s0 = k * kChunk, n = std::min(kChunk, S - s0);
        const scalar_t* gate = sp + b * S + s0;
        std::fill(acc.begin(), acc.begin() + n, scalar_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t m = mp[b * C + c];
          const scalar_t* g = gp + (b * C + c) * S + s0;
          const scalar_t* xr = xp + (b * C + c) * S + s0;
          scalar_t dot = 0;
          for (int64_t s = 0; s < n; ++s) {
            const scalar_t t = g[s] * xr[s];
            acc[s] += t * m;
            dot += t * gate[s];
          }
          partial.data_ptr<scalar_t>()[(b * K + k) * C + c] = dot;
        }
        std::copy(acc.begin(), acc.begin() + n, d_ms.data_ptr<scalar_t>() + b * S + s0);
      }
    });
  });
  return {d_ms, partial.sum(1)};
}

// d/d mc (B, C) through gated_stats: mean term sum_s d_mean * x / C, max term at each position's arg-max.
at::Tensor stats_grad(const at::Tensor& x, const at::Tensor& d_mean, const at::Tensor& d_peak,
                      const at::Tensor& index) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  auto d_mc = at::empty({B, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_stats_grad", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dm = d_mean.data_ptr<scalar_t>();
    const scalar_t* dp = d_peak.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    scalar_t* out = d_mc.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* row = xp + (b * C + c) * S;
          const scalar_t* w = dm + b * S;
          scalar_t dot = 0;
          for (int64_t s = 0; s < S; ++s) dot += w[s] * row[s];
          out[b * C + c] = dot / C;
        }
        for (int64_t s = 0; s < S; ++s) {
          const int64_t c = ip[b * S + s];
          out[b * C + c] += dp[b * S + s] * xp[(b * C + c) * S + s];
        }
      }
    });
  });
  return d_mc;
}

// d/d x (B, C, S): through the output, the gated statistics and the pooling, in one write of dx.
at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mc, const at::Tensor& ms,
                      const at::Tensor& d_mean, const at::Tensor& d_peak, const at::Tensor& index,
                      const at::Tensor& d_avg, const at::Tensor& d_max, const at::Tensor& channel_index) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  auto dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_input_grad", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* mp = mc.data_ptr<scalar_t>();
    const scalar_t* sp = ms.data_ptr<scalar_t>();
    const scalar_t* dm = d_mean.data_ptr<scalar_t>();
    const scalar_t* dp = d_peak.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    const scalar_t* da = d_avg.data_ptr<scalar_t>();
    const scalar_t* dx_max = d_max.data_ptr<scalar_t>();
    const int64_t* cp = channel_index.data_ptr<int64_t>();
    scalar_t* out = dx.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / C;
        const scalar_t m = mp[r], m_over_c = mp[r] / C, avg_share = da[r] / S;
        const scalar_t* gate = sp + b * S;
        const scalar_t* w = dm + b * S;
        for (int64_t s = 0; s < S; ++s) out[r * S + s] = gp[r * S + s] * m * gate[s] + m_over_c * w[s] + avg_share;
        out[r * S + cp[r]] += dx_max[r];
      }
    });
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t c = ip[b * S + s];
          out[(b * C + c) * S + s] += dp[b * S + s] * mp[b * C + c];
        }
      }
    });
  });
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pool", &pool);
  m.def("gated_stats", &gated_stats);
  m.def("apply", &apply);
  m.def("gate_grads", &gate_grads);
  m.def("stats_grad", &stats_grad);
  m.def("input_grad", &input_grad);
}
