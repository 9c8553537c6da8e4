// The backward passes over the large tensors: the gates' gradients (gate_grads), the gated statistics'
// (stats_grad), and the input gradient in one write (input_grad; batch_norm_input_grad through a
// BatchNorm on batch statistics before CBAM). torch_ops.py is the definition. The large tensors hold
// storage_t: scalar_t, or (bfloat16) Bf16, widened as read and narrowed as written, computed in float.
#include "input_norm.h"
#include "passes.h"

namespace cbam_cpu {
namespace {

// What one row of gate_grads sums over its positions: sum_s g[s] y[s] gate[s] and, for a BatchNorm's
// backward (kCentred), sum_s g[s] gate[s] and sum_s g[s] gate[s] (x[s] - centre).
template <typename scalar_t>
struct GateSums {
  scalar_t dot = 0, gated = 0, centred = 0;
};

// One row of gate_grads over n positions, y = norm(x): acc[s] += g[s] y[s] m, and the row's GateSums.
// With rectified, g is first zeroed where rectified <= 0 (torch's threshold_backward at 0) and written
// to through.
template <typename scalar_t, typename storage_t, bool kRectified, bool kNormed, bool kCentred>
GateSums<scalar_t> gate_grads_row(const storage_t* __restrict grad, const storage_t* __restrict x,
                                  Affine<scalar_t, kNormed> norm, scalar_t centre, const scalar_t* __restrict gate,
                                  scalar_t m, int64_t n, scalar_t* __restrict acc,
                                  const storage_t* __restrict rectified, storage_t* __restrict through) {
  scalar_t dot = 0, gated = 0, centred = 0;
  for (int64_t s = 0; s < n; ++s) {
    scalar_t g = widen(grad[s]);
    if (kRectified) {
      g = widen(rectified[s]) <= 0 ? scalar_t(0) : g;
      through[s] = narrow<storage_t>(g);
    }
    const scalar_t v = widen(x[s]);
    const scalar_t t = g * norm(v);
    acc[s] += t * m;
    dot += t * gate[s];
    if (kCentred) {
      const scalar_t u = g * gate[s];
      gated += u;
      centred += u * (v - centre);
    }
  }
  return {dot, gated, centred};
}

// gate_grads' work, task by task: grad, x, rectified and through (B, C, S), all contiguous or (rows_last)
// all channels-last, mc (B, C), ms (B, S), centre (C) or null, channel_index and peaks (B, C).
template <typename scalar_t, typename storage_t>
struct GateGrads {
  const storage_t *grad, *x, *rectified;
  const scalar_t *mc, *ms, *centre;
  const int64_t* channel_index;
  storage_t* through;
  scalar_t* peaks;
  int64_t C, S;
  bool rows_last;

  // gate_grads_row from element row = (b, c, s0) on, with the ReLU and the centred sums known at
  // compile time.
  template <bool kRectified, bool kCentred, typename Norm>
  GateSums<scalar_t> sums_of(Norm norm, int64_t row, int64_t c, const scalar_t* gate, scalar_t* acc, int64_t n) const {
    return gate_grads_row<scalar_t, storage_t, kRectified, decltype(norm[0])::kIsNormed, kCentred>(
        grad + row, x + row, norm[c], centre ? centre[c] : scalar_t(0), gate, mc[row / S], n, acc,
        rectified ? rectified + row : nullptr, rectified ? through + row : nullptr);
  }

  // Sample b's positions s0 .. s0 + n - 1 over every channel: acc (n), its share of d_ms; found (sums, C),
  // each row's GateSums; and the row maxima that lie among these positions.
  template <typename Norm>
  void task(Norm norm, int64_t b, int64_t s0, int64_t n, scalar_t* acc, scalar_t* found) const {
    if (rows_last) {
      if (rectified)
        centre ? rows_task<true, true>(norm, b, s0, n, acc, found) : rows_task<true, false>(norm, b, s0, n, acc, found);
      else
        centre ? rows_task<false, true>(norm, b, s0, n, acc, found) : rows_task<false, false>(norm, b, s0, n, acc, found);
      return;
    }
    const scalar_t* gate = ms + b * S + s0;
    std::fill(acc, acc + n, scalar_t(0));
    for (int64_t c = 0; c < C; ++c) {
      const int64_t row = (b * C + c) * S + s0;
      const GateSums<scalar_t> got =
          rectified ? (centre ? sums_of<true, true>(norm, row, c, gate, acc, n)
                              : sums_of<true, false>(norm, row, c, gate, acc, n))
                    : (centre ? sums_of<false, true>(norm, row, c, gate, acc, n)
                              : sums_of<false, false>(norm, row, c, gate, acc, n));
      found[c] = got.dot;
      if (centre) {
        found[C + c] = got.gated;
        found[2 * C + c] = got.centred;
      }
      const int64_t at = channel_index[b * C + c] - s0;  // the row's maximum, if in this task's positions
      if (at >= 0 && at < n) peaks[b * C + c] = norm[c](widen(x[row + at]));
    }
  }

  // task() for channels-last tensors: position by position, a row of C channels each; the position's share
  // of d_ms summed along its row, the channels' GateSums in arrays along the channels (found).
  template <bool kRectified, bool kCentred, typename Norm>
  void rows_task(Norm norm, int64_t b, int64_t s0, int64_t n, scalar_t* acc, scalar_t* found) const {
    scalar_t* __restrict dot = found;
    scalar_t* __restrict gated = found + C;
    scalar_t* __restrict centred = found + 2 * C;
    std::fill(found, found + (kCentred ? 3 : 1) * C, scalar_t(0));
    const scalar_t* __restrict m = mc + b * C;
    for (int64_t s = 0; s < n; ++s) {
      const int64_t row = (b * S + s0 + s) * C;
      const scalar_t gate = ms[b * S + s0 + s];
      const storage_t* __restrict g_row = grad + row;
      const storage_t* __restrict x_row = x + row;
      scalar_t sum = 0;
#pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) {
        scalar_t g = widen(g_row[c]);
        if constexpr (kRectified) {
          g = widen(rectified[row + c]) <= 0 ? scalar_t(0) : g;
          through[row + c] = narrow<storage_t>(g);
        }
        const scalar_t v = widen(x_row[c]);
        const scalar_t t = g * norm[c](v);
        sum += t * m[c];
        dot[c] += t * gate;
        if constexpr (kCentred) {
          const scalar_t u = g * gate;
          gated[c] += u;
          centred[c] += u * (v - centre[c]);
        }
      }
      acc[s] = sum;
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t at = channel_index[b * C + c] - s0;  // the channel's maximum, if in this task's positions
      if (at >= 0 && at < n) peaks[b * C + c] = norm[c](widen(x[(b * S + s0 + at) * C + c]));
    }
  }
};

// stats_grad for one sample: x (C, S), its d_mean w, d_peak and index (S), centre (C) or null; writes
// out (C), its d_mc, and, with centre, centred (2, C).
template <typename scalar_t, typename storage_t, typename Norm>
void stats_grad_sample(const storage_t* x, const scalar_t* w, const scalar_t* d_peak, const int64_t* index,
                       const scalar_t* centre, Norm norm, int64_t C, int64_t S, scalar_t* out, scalar_t* centred) {
  for (int64_t c = 0; c < C; ++c) {
    const storage_t* row = x + c * S;
    const auto row_norm = norm[c];
    scalar_t dot = 0, weighted = 0, offsets = 0;
    if (centre) {
      const scalar_t mu = centre[c];
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t v = widen(row[s]);
        dot += w[s] * row_norm(v);
        weighted += w[s] * (v - mu);
        offsets += v - mu;
      }
      centred[c] = weighted;
      centred[C + c] = offsets;
    } else {
      for (int64_t s = 0; s < S; ++s) dot += w[s] * row_norm(widen(row[s]));
    }
    out[c] = dot / C;
  }
  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = index[s];
    out[c] += d_peak[s] * norm[c](widen(x[c * S + s]));
  }
}

// stats_grad_sample for one channels-last sample: x (S rows of C), the channels' sums in arrays along the
// channels while the rows stream by.
template <typename scalar_t, typename storage_t, typename Norm>
void stats_grad_rows(const storage_t* x, const scalar_t* w, const scalar_t* d_peak, const int64_t* index,
                     const scalar_t* centre, Norm norm, int64_t C, int64_t S, scalar_t* out, scalar_t* centred) {
  scalar_t* __restrict dot = out;
  std::fill(dot, dot + C, scalar_t(0));
  if (centre) std::fill(centred, centred + 2 * C, scalar_t(0));
  for (int64_t s = 0; s < S; ++s) {
    const storage_t* __restrict row = x + s * C;
    const scalar_t ws = w[s];
    if (centre) {
      scalar_t* __restrict weighted = centred;
      scalar_t* __restrict offsets = centred + C;
#pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t v = widen(row[c]);
        dot[c] += ws * norm[c](v);
        weighted[c] += ws * (v - centre[c]);
        offsets[c] += v - centre[c];
      }
    } else {
#pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) dot[c] += ws * norm[c](widen(row[c]));
    }
  }
  for (int64_t c = 0; c < C; ++c) dot[c] /= C;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t c = index[s];
    out[c] += d_peak[s] * norm[c](widen(x[s * C + c]));
  }
}

// Items 0 .. n - 1 of each of B samples grouped by their key (key: (B, n), each in [0, K)), in order within a
// group: the items of sample b with key k are items[start[b * K + k] .. start[b * K + k + 1]). Sample b's
// items fill items[b * n .. (b + 1) * n), so the samples are sorted in parallel, each by counting.
struct Buckets {
  std::vector<int64_t> start;
  std::vector<int32_t> items;

  Buckets(const int64_t* key, int64_t B, int64_t n, int64_t K) : start(B * K + 1), items(B * n) {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> next(K);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t* keys = key + b * n;
        int64_t* first = start.data() + b * K;
        std::fill(next.begin(), next.end(), 0);
        for (int64_t i = 0; i < n; ++i) ++next[keys[i]];
        for (int64_t k = 0, at = b * n; k < K; ++k) {
          first[k] = at;
          at += next[k];
          next[k] = first[k];
        }
        for (int64_t i = 0; i < n; ++i) items[next[keys[i]]++] = static_cast<int32_t>(i);
      }
    });
    start[B * K] = B * n;
  }

  template <typename Visit>
  void each(int64_t group, Visit visit) const {
    for (int64_t j = start[group]; j < start[group + 1]; ++j) visit(items[j]);
  }
};

// CBAM's input gradient, the pieces it is made of: per element grad (B, C, S) through the gates mc
// (B, C) and ms (B, S), per row mc d_mean / C (d_mean (B, S)) and d_avg / S (d_avg (B, C)), and the
// maxima's shares: d_max (B, C) at each row's channel_index, d_peak (B, S) mc at each position's
// index (the channel of its gated maximum). Each element is summed in one order — its terms, then its
// row's d_max share, then its position's d_peak share — in a row of scalar_t and written once (narrowed
// once, where storage_t is Bf16).
template <typename scalar_t, typename storage_t>
struct InputGradient {
  static constexpr bool kStoredAsComputed = std::is_same_v<scalar_t, storage_t>;
  int64_t B, C, S;
  bool rows_last;  // grad, x and the output channels-last rather than contiguous
  const storage_t* grad;
  const scalar_t *mc, *ms, *d_mean, *d_peak, *d_avg, *d_max;
  const int64_t *index, *channel_index;

  InputGradient(const at::Tensor& grad_, const at::Tensor& mc_, const at::Tensor& ms_, const at::Tensor& d_mean_,
                const at::Tensor& d_peak_, const at::Tensor& index_, const at::Tensor& d_avg_,
                const at::Tensor& d_max_, const at::Tensor& channel_index_)
      : B(grad_.size(0)), C(grad_.size(1)), S(grad_.size(2)), rows_last(channels_last(grad_)),
        grad(data_as<const storage_t>(grad_)),
        mc(mc_.data_ptr<scalar_t>()), ms(ms_.data_ptr<scalar_t>()), d_mean(d_mean_.data_ptr<scalar_t>()),
        d_peak(d_peak_.data_ptr<scalar_t>()), d_avg(d_avg_.data_ptr<scalar_t>()), d_max(d_max_.data_ptr<scalar_t>()),
        index(index_.data_ptr<int64_t>()), channel_index(channel_index_.data_ptr<int64_t>()) {}

  // The offset of element (b, c, s) in grad, x and the output.
  int64_t offset(int64_t b, int64_t c, int64_t s) const {
    return rows_last ? (b * S + s) * C + c : (b * C + c) * S + s;
  }

  // Where n values of the output at out are summed: there themselves, or (Bf16) in row, narrowed by store.
  static scalar_t* summed_at(storage_t* out, std::vector<scalar_t>& row) {
    if constexpr (kStoredAsComputed) return out;
    return row.data();
  }
  static void store(const scalar_t* values, int64_t n, storage_t* out) {
    if constexpr (!kStoredAsComputed)
      for (int64_t i = 0; i < n; ++i) out[i] = narrow<storage_t>(values[i]);
  }

  // Writes out (B, C, S) = a[c] dy + shift[c] + slope[c] (x - centre[c]) for CBAM's input gradient dy,
  // a BatchNorm's backward (kNormed), or dy itself.
  template <bool kNormed>
  void write(storage_t* out, const storage_t* x = nullptr, const scalar_t* a = nullptr,
             const scalar_t* shift = nullptr, const scalar_t* slope = nullptr,
             const scalar_t* centre = nullptr) const {
    if (rows_last) {
      write_rows<kNormed>(out, x, a, shift, slope, centre);
      return;
    }
    const Buckets by_channel(index, B, S, C);  // each row's positions whose gated maximum it holds
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> row(kStoredAsComputed ? 0 : S);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / C, c = r % C;
        const scalar_t m = mc[r], m_over_c = mc[r] / C, avg_share = d_avg[r] / S;
        const scalar_t* gate = ms + b * S;
        const scalar_t* w = d_mean + b * S;
        const scalar_t* dp = d_peak + b * S;
        const storage_t* g = grad + r * S;
        scalar_t* o = summed_at(out + r * S, row);
        if constexpr (kNormed) {
          const storage_t* xr = x + r * S;
          const scalar_t ac = a[c], t = shift[c], k = slope[c], mu = centre[c];
          for (int64_t s = 0; s < S; ++s)
            o[s] = ac * (widen(g[s]) * m * gate[s] + m_over_c * w[s] + avg_share) + t + k * (widen(xr[s]) - mu);
          o[channel_index[r]] += ac * d_max[r];
          by_channel.each(r, [&](int64_t s) { o[s] += ac * (dp[s] * m); });
        } else {
          for (int64_t s = 0; s < S; ++s) o[s] = widen(g[s]) * m * gate[s] + m_over_c * w[s] + avg_share;
          o[channel_index[r]] += d_max[r];
          by_channel.each(r, [&](int64_t s) { o[s] += dp[s] * m; });
        }
        store(o, S, out + r * S);
      }
    });
  }

  // write() for channels-last tensors: position by position, a row of C channels each.
  template <bool kNormed>
  void write_rows(storage_t* out, const storage_t* x, const scalar_t* a, const scalar_t* shift, const scalar_t* slope,
                  const scalar_t* centre) const {
    std::vector<scalar_t> m_over_c(B * C), avg_shares(B * C);
    for (int64_t r = 0; r < B * C; ++r) {
      m_over_c[r] = mc[r] / C;
      avg_shares[r] = d_avg[r] / S;
    }
    const Buckets by_position(channel_index, B, C, S);  // each position's channels whose maximum lies there
    const int64_t K = chunks(S);
    at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> values(kStoredAsComputed ? 0 : C);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / K, s0 = (task % K) * kChunk, s1 = std::min(S, s0 + kChunk);
        const scalar_t* __restrict m = mc + b * C;
        const scalar_t* __restrict m_c = m_over_c.data() + b * C;
        const scalar_t* __restrict avg_share = avg_shares.data() + b * C;
        const scalar_t* dm = d_max + b * C;
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t row = (b * S + s) * C;
          const scalar_t gate = ms[b * S + s], w = d_mean[b * S + s];
          const storage_t* __restrict g = grad + row;
          scalar_t* __restrict o = summed_at(out + row, values);
          if constexpr (kNormed) {
            const storage_t* __restrict xr = x + row;
#pragma GCC ivdep
            for (int64_t c = 0; c < C; ++c)
              o[c] = a[c] * (widen(g[c]) * m[c] * gate + m_c[c] * w + avg_share[c]) + shift[c] +
                     slope[c] * (widen(xr[c]) - centre[c]);
          } else {
#pragma GCC ivdep
            for (int64_t c = 0; c < C; ++c) o[c] = widen(g[c]) * m[c] * gate + m_c[c] * w + avg_share[c];
          }
          by_position.each(b * S + s, [&](int64_t c) { o[c] += kNormed ? a[c] * dm[c] : dm[c]; });
          const int64_t c = index[b * S + s];
          const scalar_t share = d_peak[b * S + s] * m[c];
          o[c] += kNormed ? a[c] * share : share;
          store(o, C, out + row);
        }
      }
    });
  }
};

// batch_norm_input_grad's sums per row (b, c), in double: plain = sum_s dy and moment = sum_s dy (x - mean),
// dy = g mc ms + mc d_mean / C + d_avg / S and the maxima's shares, from gated and centred (B, 2, C).
template <typename scalar_t, typename storage_t>
void batch_norm_row_sums(const InputGradient<scalar_t, storage_t>& pieces, const storage_t* xp, const scalar_t* gs,
                         const scalar_t* cs, const scalar_t* mu, double* plain, double* moment) {
  const int64_t B = pieces.B, C = pieces.C, S = pieces.S;
  const scalar_t* mp = pieces.mc;
  const scalar_t* dm = pieces.d_mean;
  const scalar_t* dp = pieces.d_peak;
  const int64_t* ip = pieces.index;
  const scalar_t* da = pieces.d_avg;
  const scalar_t* dx_max = pieces.d_max;
  const int64_t* cp = pieces.channel_index;
  for (int64_t b = 0; b < B; ++b) {
    double d_mean_sum = 0;
    for (int64_t s = 0; s < S; ++s) d_mean_sum += dm[b * S + s];
    for (int64_t c = 0; c < C; ++c) {
      const int64_t r = b * C + c;
      const double m = mp[r], m_over_c = m / C;
      const scalar_t* g_sums = gs + b * 2 * C;
      const scalar_t* x_sums = cs + b * 2 * C;
      plain[r] = m * g_sums[c] + m_over_c * d_mean_sum + da[r] + dx_max[r];
      moment[r] = m * g_sums[C + c] + m_over_c * x_sums[c] + double(da[r]) / S * x_sums[C + c] +
                  double(dx_max[r]) * (widen(xp[pieces.offset(b, c, cp[r])]) - mu[c]);
    }
    for (int64_t s = 0; s < S; ++s) {  // the gated maxima's shares
      const int64_t c = ip[b * S + s], r = b * C + c;
      const double share = double(dp[b * S + s]) * mp[r];
      plain[r] += share;
      moment[r] += share * (widen(xp[pieces.offset(b, c, s)]) - mu[c]);
    }
  }
}

// Per channel, from the row sums over B samples of S positions: the weight and bias gradients d_weight,
// d_bias (C) and the map of dx = a dy + shift + slope (x - mean); invstd (C), weight (C) or null.
template <typename scalar_t>
void batch_norm_channel_maps(const double* plain, const double* moment, const scalar_t* is, const scalar_t* w,
                             int64_t B, int64_t C, int64_t S, scalar_t* d_weight, scalar_t* d_bias, scalar_t* a,
                             scalar_t* shift, scalar_t* slope) {
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0, moment_sum = 0;
    for (int64_t b = 0; b < B; ++b) {
      sum += plain[b * C + c];
      moment_sum += moment[b * C + c];
    }
    const double count = static_cast<double>(B * S), inverse = is[c];
    const double scale = inverse * (w ? w[c] : scalar_t(1));
    d_weight[c] = static_cast<scalar_t>(moment_sum * inverse);
    d_bias[c] = static_cast<scalar_t>(sum);
    a[c] = static_cast<scalar_t>(scale);
    shift[c] = static_cast<scalar_t>(-scale * sum / count);
    slope[c] = static_cast<scalar_t>(-scale * inverse * inverse * moment_sum / count);
  }
}

}  // namespace

// d/d ms (B, S) and d/d mc (B, C) of sum(grad * y * mc * ms), y = x or, with input_affine (2, C), the
// BatchNorm map of x, in one read of grad and x: row by row within a sample (streaming reads);
// threads split samples, or a sample's positions when there are fewer samples than threads. With the
// output of a residual tail (rectified = relu(... + residual), shaped like x) grad first goes through
// the ReLU: grad where rectified > 0, else 0. While each row streams by it also reads y at the row's
// channel_index (B, C): the maxima pool found, again (gathered later they would be one cache miss
// each). With centre (C), the mean of a BatchNorm on batch statistics, it also sums what that
// BatchNorm's backward needs (batch_norm_input_grad): gated (B, 2, C), each row's sum of g ms and of
// g ms (x - centre), g the gradient used.
// Returns d_ms, d_mc, the gradient used (written where rectified, else grad itself), the maxima and
// gated (undefined without centre).
std::vector<at::Tensor> gate_grads(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mc,
                                   const at::Tensor& ms, const std::optional<at::Tensor>& rectified,
                                   const at::Tensor& channel_index, const std::optional<at::Tensor>& input_affine,
                                   const std::optional<at::Tensor>& centre) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  const bool rows_last = channels_last(x);
  TORCH_CHECK(channels_last(grad) == rows_last && (!rectified || channels_last(*rectified) == rows_last),
              "cbam: gate_grads reads grad and rectified laid out as x");
  check_stored_as(x, grad, "gate_grads", "grad");
  if (rectified) check_stored_as(x, *rectified, "gate_grads", "rectified");
  const bool by_sample = B >= at::get_num_threads();
  const int64_t K = by_sample ? 1 : chunks(S), span = by_sample ? S : kChunk, sums = centre ? 3 : 1;
  const auto compute = compute_options(x);
  auto d_ms = at::empty({B, S}, compute);
  auto partial = at::empty({B, K, sums, C}, compute);
  auto through = rectified ? output_cache::empty_like(grad) : grad;
  auto peaks = at::empty({B, C}, compute);
  with_storage(x, [&](auto compute_value, auto storage_value) {
    using scalar_t = decltype(compute_value);
    using storage_t = decltype(storage_value);
    const GateGrads<scalar_t, storage_t> work{
        data_as<const storage_t>(grad), data_as<const storage_t>(x), data_or_null<storage_t>(rectified),
        mc.data_ptr<scalar_t>(), ms.data_ptr<scalar_t>(), data_or_null<scalar_t>(centre),
        channel_index.data_ptr<int64_t>(), data_as<storage_t>(through), peaks.data_ptr<scalar_t>(), C, S, rows_last};
    with_input_norm<scalar_t>(input_affine, C, [&](auto norm) {
      at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / K, k = task % K, s0 = k * span, n = std::min(span, S - s0);
          work.task(norm, b, s0, n, d_ms.data_ptr<scalar_t>() + b * S + s0,
                    partial.data_ptr<scalar_t>() + (b * K + k) * sums * C);
        }
      });
    });
  });
  const auto summed = partial.sum(1);  // (B, sums, C)
  return {d_ms, summed.select(1, 0), through, peaks, centre ? summed.narrow(1, 1, 2).contiguous() : at::Tensor()};
}

// d/d mc (B, C) through gated_stats: mean term sum_s d_mean * y / C, max term at each position's arg-max;
// y = x or, with input_affine (2, C), the BatchNorm map of x. With centre (C), the mean of a BatchNorm
// on batch statistics, also centred (B, 2, C): each row's sum of d_mean (x - centre) and of x - centre,
// for batch_norm_input_grad (undefined without centre).
std::vector<at::Tensor> stats_grad(const at::Tensor& x, const at::Tensor& d_mean, const at::Tensor& d_peak,
                                   const at::Tensor& index, const std::optional<at::Tensor>& input_affine,
                                   const std::optional<at::Tensor>& centre) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  const auto compute = compute_options(x);
  auto d_mc = at::empty({B, C}, compute);
  auto centred = centre ? at::empty({B, 2, C}, compute) : at::Tensor();
  const bool rows_last = channels_last(x);
  with_storage(x, [&](auto compute_value, auto storage_value) {
    using scalar_t = decltype(compute_value);
    const auto* xp = data_as<const decltype(storage_value)>(x);
    const scalar_t* dm = d_mean.data_ptr<scalar_t>();
    const scalar_t* dp = d_peak.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    const scalar_t* cp = data_or_null<scalar_t>(centre);
    scalar_t* out = d_mc.data_ptr<scalar_t>();
    with_input_norm<scalar_t>(input_affine, C, [&](auto norm) {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          scalar_t* centred_b = cp ? centred.data_ptr<scalar_t>() + b * 2 * C : nullptr;
          if (rows_last)
            stats_grad_rows(xp + b * C * S, dm + b * S, dp + b * S, ip + b * S, cp, norm, C, S, out + b * C, centred_b);
          else
            stats_grad_sample(xp + b * C * S, dm + b * S, dp + b * S, ip + b * S, cp, norm, C, S, out + b * C,
                              centred_b);
        }
      });
    });
  });
  return {d_mc, centred};
}

// d/d x (B, C, S), laid out as x and grad: through the output, the gated statistics and the pooling, in
// one write of dx.
at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mc, const at::Tensor& ms,
                      const at::Tensor& d_mean, const at::Tensor& d_peak, const at::Tensor& index,
                      const at::Tensor& d_avg, const at::Tensor& d_max, const at::Tensor& channel_index) {
  TORCH_CHECK(channels_last(grad) == channels_last(x), "cbam: input_grad reads grad laid out as x");
  check_stored_as(x, grad, "input_grad", "grad");
  auto dx = output_cache::empty_like(x);
  with_storage(x, [&](auto compute_value, auto storage_value) {
    using storage_t = decltype(storage_value);
    InputGradient<decltype(compute_value), storage_t>(grad, mc, ms, d_mean, d_peak, index, d_avg, d_max,
                                                      channel_index)
        .template write<false>(data_as<storage_t>(dx));
  });
  return dx;
}

// d/d x (B, C, S) where CBAM's input is a BatchNorm on batch statistics of x — mean, invstd (C), weight
// (C) or none, so y = a (x - mean) + bias, a = invstd * weight — and the BatchNorm's weight and bias
// gradients, in one read of grad and x and one write: torch's BatchNorm backward of input_grad's dy,
// dx = a (dy - sum(dy) / N - (x - mean) invstd^2 sum(dy (x - mean)) / N), sums over (B, S) per
// channel (N values), with those sums built from what the earlier passes summed while reading x:
// gated (gate_grads) and centred (stats_grad), each (B, 2, C). dy is never written.
// Returns dx, d_weight (sum dy (x - mean) invstd) and d_bias (sum dy), both (C).
std::vector<at::Tensor> batch_norm_input_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mc,
                                              const at::Tensor& ms, const at::Tensor& d_mean,
                                              const at::Tensor& d_peak, const at::Tensor& index,
                                              const at::Tensor& d_avg, const at::Tensor& d_max,
                                              const at::Tensor& channel_index, const at::Tensor& gated,
                                              const at::Tensor& centred, const at::Tensor& mean,
                                              const at::Tensor& invstd, const std::optional<at::Tensor>& weight) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  TORCH_CHECK(channels_last(grad) == channels_last(x), "cbam: batch_norm_input_grad reads grad laid out as x");
  check_stored_as(x, grad, "batch_norm_input_grad", "grad");
  auto dx = output_cache::empty_like(x);
  auto d_weight = at::empty({C}, compute_options(x)), d_bias = at::empty({C}, compute_options(x));
  with_storage(x, [&](auto compute_value, auto storage_value) {
    using scalar_t = decltype(compute_value);
    using storage_t = decltype(storage_value);
    const InputGradient<scalar_t, storage_t> pieces(grad, mc, ms, d_mean, d_peak, index, d_avg, d_max, channel_index);
    const storage_t* xp = data_as<const storage_t>(x);
    const scalar_t* mu = mean.data_ptr<scalar_t>();
    std::vector<double> plain(B * C), moment(B * C);
    batch_norm_row_sums(pieces, xp, gated.data_ptr<scalar_t>(), centred.data_ptr<scalar_t>(), mu, plain.data(),
                        moment.data());
    std::vector<scalar_t> a(C), shift(C), slope(C);
    batch_norm_channel_maps(plain.data(), moment.data(), invstd.data_ptr<scalar_t>(), data_or_null<scalar_t>(weight),
                            B, C, S, d_weight.data_ptr<scalar_t>(), d_bias.data_ptr<scalar_t>(), a.data(),
                            shift.data(), slope.data());
    pieces.template write<true>(data_as<storage_t>(dx), xp, a.data(), shift.data(), slope.data(), mu);
  });
  return {dx, d_weight, d_bias};
}

}  // namespace cbam_cpu
