// The large-tensor passes of the fused CBAM for contiguous CPU tensors x: (B, C, S), float or double.
// Same functions and semantics as torch_passes.py (the definition), each one read of x (and of the
// incoming gradient) instead of several: loops run over contiguous rows so the compiler vectorises
// them; at::parallel_for splits batches, rows or position chunks across threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <utility>
#include <optional>
#include <tuple>
#include <vector>

namespace output_cache {  // output_cache.cpp
at::Tensor empty_like(const at::Tensor& x);
void set_limit(size_t bytes);
size_t cached();
}  // namespace output_cache

namespace {

constexpr int64_t kChunk = 512;  // positions per task in the position-major passes

int64_t chunks(int64_t positions) { return (positions + kChunk - 1) / kChunk; }

// 64-byte vectors of values and of same-width integer positions (GCC/Clang vector extensions).
template <typename scalar_t>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float Values __attribute__((vector_size(64)));
  typedef int32_t Positions __attribute__((vector_size(64)));
};
template <>
struct Lanes<double> {
  typedef double Values __attribute__((vector_size(64)));
  typedef int64_t Positions __attribute__((vector_size(64)));
};

// An eval-mode BatchNorm's per-channel affine map a * x + b, applied to CBAM's input as the passes
// read it (so that its output is never written), or nothing (kNormed = false). The compiler
// contracts it into one fused multiply-add where the CPU has one, as in torch's own kernel.
template <typename scalar_t, bool kNormed>
struct Affine {
  static constexpr bool kIsNormed = kNormed;
  scalar_t a, b;
  template <typename V>
  V operator()(V v) const {
    if constexpr (kNormed) return v * a + b;
    return v;
  }
};

// Per-channel maps (scale, shift: (C) each) where kNormed; identities otherwise (null pointers).
template <typename scalar_t, bool kNormed>
struct InputNorm {
  const scalar_t* scale = nullptr;
  const scalar_t* shift = nullptr;
  Affine<scalar_t, kNormed> operator[](int64_t c) const {
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

// Lanes kOffset + I... of v, as a vector of that many lanes.
template <size_t kOffset, typename Vector, size_t... I>
auto lanes_at(Vector v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (kOffset + I)...);
}

// The lanes of v folded into one by combine (on vectors and on lanes), halves onto halves: log2(width)
// dependent steps instead of width - 1 (the row-wise reductions of short rows, such as ResNet's 7x7
// maps, are latency-bound).
template <typename Vector, typename Combine>
auto fold_lanes(Vector v, Combine combine) {
  constexpr size_t kWidth = sizeof(Vector) / sizeof(v[0]);
  if constexpr (kWidth == 2) {
    return combine(v[0], v[1]);
  } else {
    constexpr auto half = std::make_index_sequence<kWidth / 2>{};
    return fold_lanes(combine(lanes_at<0>(v, half), lanes_at<kWidth / 2>(v, half)), combine);
  }
}

// Calls visit(v, positions, fresh) on one row of S values (S < 2^31), a vector v at a time: whole
// vectors, then, where S is no multiple of the width, the row's last vector's worth of values, which
// overlaps the ones before; a row shorter than a vector comes padded with its first value (at position
// 0). positions holds each lane's position in the row, fresh marks the lanes not visited before.
template <typename scalar_t, typename Visit>
void scan_row(const scalar_t* row, int64_t S, Visit visit) {
  using Values = typename Lanes<scalar_t>::Values;
  using Positions = typename Lanes<scalar_t>::Positions;
  using Position = typename std::remove_reference<decltype(Positions{}[0])>::type;
  constexpr int kWidth = sizeof(Values) / sizeof(scalar_t);
  const Positions every = Positions{} - 1;  // a mask of all lanes
  Positions positions;
  for (int l = 0; l < kWidth; ++l) positions[l] = l;
  int64_t s = 0;
  for (; s + kWidth <= S; s += kWidth) {
    Values v;
    std::memcpy(&v, row + s, sizeof(Values));
    visit(v, positions, every);
    positions += kWidth;
  }
  if (s == S) return;
  Values v = row[0] + Values{};
  if (S >= kWidth) {
    std::memcpy(&v, row + S - kWidth, sizeof(Values));
    positions -= static_cast<Position>(s - (S - kWidth));
    visit(v, positions, positions >= static_cast<Position>(s) + Positions{});
  } else {
    std::memcpy(&v, row, S * sizeof(scalar_t));
    const Positions inside = positions < static_cast<Position>(S) + Positions{};
    visit(v, inside ? positions : Positions{}, inside);
  }
}

// Each lane's maximum over the vectors taken, with the first position where it was reached, from a
// first value at position 0.
template <typename scalar_t>
struct LaneMaximum {
  using Values = typename Lanes<scalar_t>::Values;
  using Positions = typename Lanes<scalar_t>::Positions;
  Values best;
  Positions at = {};

  explicit LaneMaximum(scalar_t first) : best(first + Values{}) {}

  void take(Values v, Positions positions) {
    const Positions above = v > best;
    best = above ? v : best;
    at = above ? positions : at;
  }

  // The maximum over all lanes and its first position (0 where none equals it: a NaN first value).
  std::pair<scalar_t, int64_t> result() const {
    const scalar_t peak = fold_lanes(best, [](auto a, auto b) { return b > a ? b : a; });
    const auto none = std::numeric_limits<typename std::remove_reference<decltype(at[0])>::type>::max();
    const Positions candidates = best == peak + Values{} ? at : none + Positions{};
    const int64_t first = fold_lanes(candidates, [](auto a, auto b) { return b < a ? b : a; });
    return {peak, first == none ? 0 : first};
  }
};

// Mean, max and first arg-max of one row of S values norm(row[s]), in one read.
template <typename scalar_t, bool kNormed>
void pool_row(const scalar_t* row, int64_t S, Affine<scalar_t, kNormed> norm, scalar_t& mean, scalar_t& peak,
              int64_t& index) {
  using Values = typename Lanes<scalar_t>::Values;
  Values sums = {};
  LaneMaximum<scalar_t> highest(norm(row[0]));
  scan_row(row, S, [&](Values v, auto positions, auto fresh) {
    v = norm(v);
    highest.take(v, positions);
    sums += fresh ? v : Values{};
  });
  mean = fold_lanes(sums, [](auto a, auto b) { return a + b; }) / S;
  std::tie(peak, index) = highest.result();
}

typedef double Doubles __attribute__((vector_size(64)));

// Adds lanes 8 kPart .. 8 kPart + 7 of v, as doubles minus centre, to sums[kPart], and their squares
// to squares[kPart].
template <int kPart, typename Vector>
void add_part(Vector v, double centre, Doubles* sums, Doubles* squares) {
  const Doubles d = __builtin_convertvector(lanes_at<8 * kPart>(v, std::make_index_sequence<8>{}), Doubles) - centre;
  sums[kPart] += d;
  squares[kPart] += d * d;
}

// What a BatchNorm on the batch's statistics needs of one row of S values, in one read: the sums of
// row[s] - centre and of its square, in double (centre, a value of the channel, keeps them exact
// enough), and the row's first minimum and maximum with their positions.
template <typename scalar_t>
void moments_row(const scalar_t* row, int64_t S, scalar_t centre, double& sum, double& squares,
                 std::pair<scalar_t, int64_t>& low, std::pair<scalar_t, int64_t>& high) {
  using Values = typename Lanes<scalar_t>::Values;
  constexpr int kParts = sizeof(Values) / sizeof(scalar_t) / 8;  // vectors of 8 doubles per vector of values
  Doubles sums[2] = {}, square_sums[2] = {};
  LaneMaximum<scalar_t> highest(row[0]), lowest(-row[0]);  // the minimum: the maximum of -row
  scan_row(row, S, [&](Values v, auto positions, auto fresh) {
    highest.take(v, positions);
    lowest.take(-v, positions);
    const Values kept = fresh ? v : centre + Values{};  // lanes seen before add 0
    add_part<0>(kept, centre, sums, square_sums);
    if constexpr (kParts == 2) add_part<1>(kept, centre, sums, square_sums);
  });
  auto add = [](auto a, auto b) { return a + b; };
  sum = fold_lanes(sums[0] + sums[1], add);
  squares = fold_lanes(square_sums[0] + square_sums[1], add);
  high = highest.result();
  low = lowest.result();
  low.first = -low.first;
}

// Channel-wise mean, max and first arg-max of mc[c] * norm[c](x[c, s]) for n positions of one sample;
// x points at the chunk's first position of channel 0, rows are S apart. Blocks of kBlock vectors of
// positions keep their sums, maxima and arg-maxima in registers while the channels stream by; the
// positions left over keep them in arrays. Sums run over channels in order either way.
template <typename scalar_t, bool kNormed>
void gated_chunk(const scalar_t* x, const scalar_t* mc, InputNorm<scalar_t, kNormed> norm, int64_t C, int64_t S,
                 int64_t n, scalar_t* mean, scalar_t* peak, int64_t* index) {
  using Values = typename Lanes<scalar_t>::Values;
  using Positions = typename Lanes<scalar_t>::Positions;
  constexpr int kWidth = sizeof(Values) / sizeof(scalar_t), kBlock = 4;
  auto load = [](const scalar_t* at) {
    Values v;
    std::memcpy(&v, at, sizeof(Values));
    return v;
  };
  int64_t s = 0;
  for (; s + kBlock * kWidth <= n; s += kBlock * kWidth) {
    Values sum[kBlock], best[kBlock];
    Positions arg[kBlock];
    for (int j = 0; j < kBlock; ++j) {
      sum[j] = best[j] = mc[0] * norm[0](load(x + s + j * kWidth));
      arg[j] = Positions{};
    }
    for (int64_t c = 1; c < C; ++c) {
      const scalar_t* row = x + c * S + s;
      const auto row_norm = norm[c];
      const Positions channel = static_cast<typename std::remove_reference<decltype(arg[0][0])>::type>(c) +
                                Positions{};
      for (int j = 0; j < kBlock; ++j) {
        const Values v = mc[c] * row_norm(load(row + j * kWidth));
        const Positions above = v > best[j];
        sum[j] += v;
        best[j] = above ? v : best[j];
        arg[j] = above ? channel : arg[j];
      }
    }
    for (int j = 0; j < kBlock; ++j)
      for (int l = 0; l < kWidth; ++l) {
        mean[s + j * kWidth + l] = sum[j][l] / C;
        peak[s + j * kWidth + l] = best[j][l];
        index[s + j * kWidth + l] = arg[j][l];
      }
  }
  const int64_t rest = n - s;  // fewer than a block: per-position arrays, still vectorised across positions
  x += s;
  scalar_t sum[kBlock * kWidth], best[kBlock * kWidth];
  int32_t arg[kBlock * kWidth];
  for (int64_t t = 0; t < rest; ++t) {
    sum[t] = best[t] = mc[0] * norm[0](x[t]);
    arg[t] = 0;
  }
  for (int64_t c = 1; c < C; ++c) {
    const scalar_t m = mc[c];
    const scalar_t* row = x + c * S;
    const auto row_norm = norm[c];
    for (int64_t t = 0; t < rest; ++t) {
      const scalar_t v = m * row_norm(row[t]);
      const bool above = v > best[t];
      sum[t] += v;
      best[t] = above ? v : best[t];
      arg[t] = above ? static_cast<int32_t>(c) : arg[t];
    }
  }
  for (int64_t t = 0; t < rest; ++t) {
    mean[s + t] = sum[t] / C;
    peak[s + t] = best[t];
    index[s + t] = arg[t];
  }
}

// Spatial mean, max and first arg-max of every row (b, c) of norm(x), x: (B, C, S): avg, peak, index (B, C).
template <typename scalar_t, bool kNormed>
void pool_rows(const scalar_t* x, InputNorm<scalar_t, kNormed> norm, int64_t B, int64_t C, int64_t S, scalar_t* avg,
               scalar_t* peak, int64_t* index) {
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) pool_row(x + r * S, S, norm[r % C], avg[r], peak[r], index[r]);
  });
}

// Spatial mean, max and first arg-max of every row (b, c).
std::vector<at::Tensor> pool(const at::Tensor& x) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  TORCH_CHECK(S < std::numeric_limits<int32_t>::max(), "cbam: at most 2^31 - 1 positions per sample, got ", S);
  auto avg = at::empty({B, C}, x.options());
  auto peak = at::empty({B, C}, x.options());
  auto index = at::empty({B, C}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_pool", [&] {
    pool_rows(x.data_ptr<scalar_t>(), InputNorm<scalar_t, false>{}, B, C, S, avg.data_ptr<scalar_t>(),
              peak.data_ptr<scalar_t>(), index.data_ptr<int64_t>());
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
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / K, s0 = (task % K) * kChunk, offset = b * S + s0;
        gated_chunk(xp + b * C * S + s0, mp + b * C, InputNorm<scalar_t, false>{}, C, S, std::min(kChunk, S - s0),
                    mean.data_ptr<scalar_t>() + offset, peak.data_ptr<scalar_t>() + offset,
                    index.data_ptr<int64_t>() + offset);
      }
    });
  });
  return {mean, peak, index};
}

// One output row of S positions: out = y * m * ms, or relu(y * m * ms + residual) with a residual row
// (the residual block's tail; NaN stays NaN as in torch.relu), y = norm(x). Rounded as torch's
// separate ops round, (y * m) * ms then + residual: no reassociation, no other fused multiply-add
// than norm's (written as a builtin: under these options no function call would be inlined).
template <typename scalar_t, bool kNormed>
__attribute__((optimize("no-associative-math", "fp-contract=off")))
void output_row(const scalar_t* x, Affine<scalar_t, kNormed> norm, scalar_t m, const scalar_t* ms,
                const scalar_t* residual, int64_t S, scalar_t* out) {
  const auto y = [&](int64_t s) -> scalar_t {
    if constexpr (!kNormed) return x[s];
    if constexpr (std::is_same_v<scalar_t, float>) return __builtin_fmaf(x[s], norm.a, norm.b);
    return __builtin_fma(x[s], norm.a, norm.b);
  };
  if (residual == nullptr) {
    for (int64_t s = 0; s < S; ++s) out[s] = y(s) * m * ms[s];
    return;
  }
  for (int64_t s = 0; s < S; ++s) {
    const scalar_t v = y(s) * m * ms[s] + residual[s];
    out[s] = v < 0 ? scalar_t(0) : v;
  }
}

// The residual's data, or null without one.
template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<scalar_t>() : nullptr;
}

// out = y * mc * ms (relu(... + residual) with a residual shaped like x), y = x or, with input_affine
// (2, C), the BatchNorm map of x; out has x's shape (the caller passes x unflattened but contiguous).
at::Tensor apply(const at::Tensor& x, const at::Tensor& mc, const at::Tensor& ms,
                 const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& input_affine) {
  const int64_t B = x.size(0), C = x.size(1), S = x.numel() / std::max<int64_t>(B * C, 1);
  auto out = output_cache::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_apply", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = mc.data_ptr<scalar_t>();
    const scalar_t* sp = ms.data_ptr<scalar_t>();
    const scalar_t* rp = data_or_null<scalar_t>(residual);
    scalar_t* op = out.data_ptr<scalar_t>();
    with_input_norm<scalar_t>(input_affine, C, [&](auto norm) {
      at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r)
          output_row(xp + r * S, norm[r % C], mp[r], sp + (r / C) * S, rp ? rp + r * S : nullptr, S, op + r * S);
      });
    });
  });
  return out;
}

// What one row of gate_grads sums over its positions: sum_s g[s] y[s] gate[s] and, for a BatchNorm's
// backward (kCentred), sum_s g[s] gate[s] and sum_s g[s] gate[s] (x[s] - centre).
template <typename scalar_t>
struct GateSums {
  scalar_t dot = 0, gated = 0, centred = 0;
};

// One row of gate_grads over n positions, y = norm(x): acc[s] += g[s] y[s] m, and the row's GateSums.
// With rectified, g is first zeroed where rectified <= 0 (torch's threshold_backward at 0) and written
// to through.
template <typename scalar_t, bool kRectified, bool kNormed, bool kCentred>
GateSums<scalar_t> gate_grads_row(const scalar_t* __restrict grad, const scalar_t* __restrict x,
                                  Affine<scalar_t, kNormed> norm, scalar_t centre, const scalar_t* __restrict gate,
                                  scalar_t m, int64_t n, scalar_t* __restrict acc,
                                  const scalar_t* __restrict rectified, scalar_t* __restrict through) {
  scalar_t dot = 0, gated = 0, centred = 0;
  for (int64_t s = 0; s < n; ++s) {
    scalar_t g = grad[s];
    if (kRectified) {
      g = rectified[s] <= 0 ? scalar_t(0) : g;
      through[s] = g;
    }
    const scalar_t t = g * norm(x[s]);
    acc[s] += t * m;
    dot += t * gate[s];
    if (kCentred) {
      const scalar_t u = g * gate[s];
      gated += u;
      centred += u * (x[s] - centre);
    }
  }
  return {dot, gated, centred};
}

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
  const bool by_sample = B >= at::get_num_threads();
  const int64_t K = by_sample ? 1 : chunks(S), span = by_sample ? S : kChunk, sums = centre ? 3 : 1;
  auto d_ms = at::empty({B, S}, x.options());
  auto partial = at::empty({B, K, sums, C}, x.options());
  auto through = rectified ? output_cache::empty_like(grad) : grad;
  auto peaks = at::empty({B, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_gate_grads", [&] {
    const int64_t* ip = channel_index.data_ptr<int64_t>();
    scalar_t* pk = peaks.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = mc.data_ptr<scalar_t>();
    const scalar_t* sp = ms.data_ptr<scalar_t>();
    const scalar_t* rp = data_or_null<scalar_t>(rectified);
    const scalar_t* cp = data_or_null<scalar_t>(centre);
    scalar_t* tp = through.data_ptr<scalar_t>();
    with_input_norm<scalar_t>(input_affine, C, [&](auto norm) {
      auto row_sums = [&](auto rectify, auto centred, int64_t row, int64_t c, const scalar_t* gate, scalar_t* acc,
                          int64_t n) {
        return gate_grads_row<scalar_t, decltype(rectify)::value, decltype(norm[0])::kIsNormed,
                              decltype(centred)::value>(gp + row, xp + row, norm[c], cp ? cp[c] : scalar_t(0), gate,
                                                        mp[row / S], n, acc, rp ? rp + row : nullptr,
                                                        rp ? tp + row : nullptr);
      };
      at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / K, k = task % K, s0 = k * span, n = std::min(span, S - s0);
          const scalar_t* gate = sp + b * S + s0;
          scalar_t* acc = d_ms.data_ptr<scalar_t>() + b * S + s0;
          scalar_t* found = partial.data_ptr<scalar_t>() + (b * K + k) * sums * C;
          std::fill(acc, acc + n, scalar_t(0));
          for (int64_t c = 0; c < C; ++c) {
            const int64_t row = (b * C + c) * S + s0;
            using Yes = std::true_type;
            using No = std::false_type;
            const GateSums<scalar_t> got =
                rp ? (cp ? row_sums(Yes{}, Yes{}, row, c, gate, acc, n) : row_sums(Yes{}, No{}, row, c, gate, acc, n))
                   : (cp ? row_sums(No{}, Yes{}, row, c, gate, acc, n) : row_sums(No{}, No{}, row, c, gate, acc, n));
            found[c] = got.dot;
            if (cp) {
              found[C + c] = got.gated;
              found[2 * C + c] = got.centred;
            }
            const int64_t at = ip[b * C + c] - s0;  // the row's maximum, if in this task's positions
            if (at >= 0 && at < n) pk[b * C + c] = norm[c](xp[row + at]);
          }
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
  auto d_mc = at::empty({B, C}, x.options());
  auto centred = centre ? at::empty({B, 2, C}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_stats_grad", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dm = d_mean.data_ptr<scalar_t>();
    const scalar_t* dp = d_peak.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    const scalar_t* cp = data_or_null<scalar_t>(centre);
    scalar_t* out = d_mc.data_ptr<scalar_t>();
    with_input_norm<scalar_t>(input_affine, C, [&](auto norm) {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* w = dm + b * S;
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* row = xp + (b * C + c) * S;
            const auto row_norm = norm[c];
            scalar_t dot = 0, weighted = 0, offsets = 0;
            if (cp) {
              const scalar_t mu = cp[c];
              for (int64_t s = 0; s < S; ++s) {
                dot += w[s] * row_norm(row[s]);
                weighted += w[s] * (row[s] - mu);
                offsets += row[s] - mu;
              }
              scalar_t* found = centred.data_ptr<scalar_t>() + b * 2 * C;
              found[c] = weighted;
              found[C + c] = offsets;
            } else {
              for (int64_t s = 0; s < S; ++s) dot += w[s] * row_norm(row[s]);
            }
            out[b * C + c] = dot / C;
          }
          for (int64_t s = 0; s < S; ++s) {
            const int64_t c = ip[b * S + s];
            out[b * C + c] += dp[b * S + s] * norm[c](xp[(b * C + c) * S + s]);
          }
        }
      });
    });
  });
  return {d_mc, centred};
}

// CBAM's input gradient, the pieces it is made of: per element grad (B, C, S) through the gates mc
// (B, C) and ms (B, S), per row mc d_mean / C (d_mean (B, S)) and d_avg / S (d_avg (B, C)), and the
// maxima's shares: d_max (B, C) at each row's channel_index, d_peak (B, S) mc at each position's
// index (the channel of its gated maximum).
template <typename scalar_t>
struct InputGradient {
  int64_t B, C, S;
  const scalar_t *grad, *mc, *ms, *d_mean, *d_peak, *d_avg, *d_max;
  const int64_t *index, *channel_index;

  InputGradient(const at::Tensor& grad_, const at::Tensor& mc_, const at::Tensor& ms_, const at::Tensor& d_mean_,
                const at::Tensor& d_peak_, const at::Tensor& index_, const at::Tensor& d_avg_,
                const at::Tensor& d_max_, const at::Tensor& channel_index_)
      : B(grad_.size(0)), C(grad_.size(1)), S(grad_.size(2)), grad(grad_.data_ptr<scalar_t>()),
        mc(mc_.data_ptr<scalar_t>()), ms(ms_.data_ptr<scalar_t>()), d_mean(d_mean_.data_ptr<scalar_t>()),
        d_peak(d_peak_.data_ptr<scalar_t>()), d_avg(d_avg_.data_ptr<scalar_t>()), d_max(d_max_.data_ptr<scalar_t>()),
        index(index_.data_ptr<int64_t>()), channel_index(channel_index_.data_ptr<int64_t>()) {}

  // Writes out (B, C, S) = a[c] dy + shift[c] + slope[c] (x - centre[c]) for CBAM's input gradient dy,
  // a BatchNorm's backward (kNormed), or dy itself.
  template <bool kNormed>
  void write(scalar_t* out, const scalar_t* x = nullptr, const scalar_t* a = nullptr, const scalar_t* shift = nullptr,
             const scalar_t* slope = nullptr, const scalar_t* centre = nullptr) const {
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / C, c = r % C;
        const scalar_t m = mc[r], m_over_c = mc[r] / C, avg_share = d_avg[r] / S;
        const scalar_t* gate = ms + b * S;
        const scalar_t* w = d_mean + b * S;
        const scalar_t* g = grad + r * S;
        scalar_t* o = out + r * S;
        if constexpr (kNormed) {
          const scalar_t* xr = x + r * S;
          const scalar_t ac = a[c], t = shift[c], k = slope[c], mu = centre[c];
          for (int64_t s = 0; s < S; ++s)
            o[s] = ac * (g[s] * m * gate[s] + m_over_c * w[s] + avg_share) + t + k * (xr[s] - mu);
          o[channel_index[r]] += ac * d_max[r];
        } else {
          for (int64_t s = 0; s < S; ++s) o[s] = g[s] * m * gate[s] + m_over_c * w[s] + avg_share;
          o[channel_index[r]] += d_max[r];
        }
      }
    });
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t c = index[b * S + s];
          const scalar_t share = d_peak[b * S + s] * mc[b * C + c];
          out[(b * C + c) * S + s] += kNormed ? a[c] * share : share;
        }
      }
    });
  }
};

// d/d x (B, C, S): through the output, the gated statistics and the pooling, in one write of dx.
at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mc, const at::Tensor& ms,
                      const at::Tensor& d_mean, const at::Tensor& d_peak, const at::Tensor& index,
                      const at::Tensor& d_avg, const at::Tensor& d_max, const at::Tensor& channel_index) {
  auto dx = output_cache::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_input_grad", [&] {
    InputGradient<scalar_t>(grad, mc, ms, d_mean, d_peak, index, d_avg, d_max, channel_index)
        .template write<false>(dx.data_ptr<scalar_t>());
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
  auto dx = output_cache::empty_like(x);
  auto d_weight = at::empty({C}, x.options()), d_bias = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_batch_norm_input_grad", [&] {
    const InputGradient<scalar_t> pieces(grad, mc, ms, d_mean, d_peak, index, d_avg, d_max, channel_index);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = pieces.mc;
    const scalar_t* dm = pieces.d_mean;
    const scalar_t* dp = pieces.d_peak;
    const int64_t* ip = pieces.index;
    const scalar_t* da = pieces.d_avg;
    const scalar_t* dx_max = pieces.d_max;
    const int64_t* cp = pieces.channel_index;
    const scalar_t* gs = gated.data_ptr<scalar_t>();
    const scalar_t* cs = centred.data_ptr<scalar_t>();
    const scalar_t* mu = mean.data_ptr<scalar_t>();
    const scalar_t* is = invstd.data_ptr<scalar_t>();
    const scalar_t* w = weight ? weight->data_ptr<scalar_t>() : nullptr;
    // Per row (b, c): sum_s dy and sum_s dy (x - mean), dy = g mc ms + mc d_mean / C + d_avg / S and the
    // maxima's shares; in double.
    std::vector<double> plain(B * C), moment(B * C);
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
                    double(dx_max[r]) * (xp[r * S + cp[r]] - mu[c]);
      }
      for (int64_t s = 0; s < S; ++s) {  // the gated maxima's shares
        const int64_t c = ip[b * S + s], r = b * C + c;
        const double share = double(dp[b * S + s]) * mp[r];
        plain[r] += share;
        moment[r] += share * (xp[r * S + s] - mu[c]);
      }
    }
    // Per channel: the weight and bias gradients and dx = a dy + shift + slope (x - mean).
    std::vector<scalar_t> a(C), shift(C), slope(C);
    for (int64_t c = 0; c < C; ++c) {
      double sum = 0, moment_sum = 0;
      for (int64_t b = 0; b < B; ++b) {
        sum += plain[b * C + c];
        moment_sum += moment[b * C + c];
      }
      const double count = static_cast<double>(B * S), inverse = is[c];
      const double scale = inverse * (w ? w[c] : scalar_t(1));
      d_weight.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(moment_sum * inverse);
      d_bias.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sum);
      a[c] = static_cast<scalar_t>(scale);
      shift[c] = static_cast<scalar_t>(-scale * sum / count);
      slope[c] = static_cast<scalar_t>(-scale * inverse * inverse * moment_sum / count);
    }
    pieces.template write<true>(dx.data_ptr<scalar_t>(), xp, a.data(), shift.data(), slope.data(), mu);
  });
  return {dx, d_weight, d_bias};
}



template <typename scalar_t>
scalar_t squash(scalar_t z, bool hard) {
  if (hard) return std::min(std::max(z + scalar_t(3), scalar_t(0)), scalar_t(6)) / scalar_t(6);
  return scalar_t(1) / (scalar_t(1) + std::exp(-z));
}

// The gate's derivative from its output y: sigmoid y (1 - y), hard-sigmoid 1/6 inside (0, 1).
template <typename scalar_t>
scalar_t gate_slope(scalar_t y, bool hard) {
  if (hard) return (y > 0 && y < 1) ? scalar_t(1) / 6 : scalar_t(0);
  return y * (1 - y);
}

// a . b over n values, in four independent vector accumulators.
template <typename scalar_t>
scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  using Values = typename Lanes<scalar_t>::Values;
  constexpr int kWidth = sizeof(Values) / sizeof(scalar_t);
  Values sums[4] = {};
  int64_t i = 0;
  for (; i + 4 * kWidth <= n; i += 4 * kWidth) {
    for (int k = 0; k < 4; ++k) {
      Values u, v;
      std::memcpy(&u, a + i + k * kWidth, sizeof(Values));
      std::memcpy(&v, b + i + k * kWidth, sizeof(Values));
      sums[k] += u * v;
    }
  }
  for (; i + kWidth <= n; i += kWidth) {
    Values u, v;
    std::memcpy(&u, a + i, sizeof(Values));
    std::memcpy(&v, b + i, sizeof(Values));
    sums[0] += u * v;
  }
  scalar_t sum = fold_lanes((sums[0] + sums[1]) + (sums[2] + sums[3]), [](auto u, auto v) { return u + v; });
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

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
  const auto slope = hard ? ((mc > 0) & (mc < 1)).to(mc.scalar_type()) / 6 : mc * (1 - mc);
  const auto d_z = d_mc * slope;                                      // (B, C)
  const auto d_pre = (d_z.mm(fc2_w).unsqueeze(0) * (pre > 0).view({P, B, H})).view({P * B, H});  // (P * B, H)
  const auto d_descriptors = d_pre.mm(fc1_w).view({P, B, avg.size(1)});  // (P, B, C)
  auto d_avg = at::zeros_like(avg), d_peak = at::zeros_like(peak);
  for (int64_t k = 0; k < P; ++k) {
    d_avg.add_(d_descriptors[k], avg_coef[k]);
    d_peak.add_(d_descriptors[k], max_coef[k]);
  }
  return {d_avg, d_peak, d_pre.t().mm(stacked), d_pre.sum(0), d_z.t().mm(hidden_sum), d_z.sum(0) * P};
}

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

  // The hidden layer of one sample: its P descriptors (P, C), their pre-activations (P, H) and
  // hidden_sum (H) = sum_k relu(pre_k).
  void hidden(const scalar_t* avg, const scalar_t* peak, scalar_t* descriptors, scalar_t* pre,
              scalar_t* hidden_sum) const {
    std::fill(hidden_sum, hidden_sum + H, scalar_t(0));
    for (size_t k = 0; k < avg_coef.size(); ++k) {
      scalar_t* d = descriptors + k * C;
      for (int64_t c = 0; c < C; ++c) d[c] = scalar_t(avg_coef[k]) * avg[c] + scalar_t(max_coef[k]) * peak[c];
      for (int64_t j = 0; j < H; ++j) {
        pre[k * H + j] = dot(w1 + j * C, d, C) + (b1 ? b1[j] : scalar_t(0));
        hidden_sum[j] += pre[k * H + j] > 0 ? pre[k * H + j] : scalar_t(0);
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
      const scalar_t d_z = d_mc[c] * gate_slope(mc[c], hard);
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
        const scalar_t d_pre = pre[k * H + j] > 0 ? d_hidden[j] : scalar_t(0);
        d_b1[j] += d_pre;
        const scalar_t* row = w1 + j * C;
        scalar_t* d_row = d_w1 + j * C;
        const scalar_t to_avg = scalar_t(avg_coef[k]) * d_pre, to_peak = scalar_t(max_coef[k]) * d_pre;
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
      dz[i] = dg[i] * gate_slope(g[i], hard);
    if (norm) {
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
      d_norm.data_ptr<scalar_t>()[0] = sum_centred;
      d_norm.data_ptr<scalar_t>()[1] = sum;
    }
    scalar_t* maps_p = maps.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)
      statistic_maps(mean.data_ptr<scalar_t>() + b * S, speak.data_ptr<scalar_t>() + b * S, I, S, maps_p + b * I * S);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        spatial_conv_backward(maps_p + b * I * S, dz + b * S, conv_w.data_ptr<scalar_t>(), I, size.data(),
                              kernel.data(), d_maps.data_ptr<scalar_t>() + b * I * S,
                              partial.data_ptr<scalar_t>() + b * taps);
    });
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

// The per-channel affine map (2, C) — scale, then shift — of an eval-mode BatchNorm: scale = weight /
// sqrt(running_var + eps), shift = bias - running_mean * scale (weight and bias optional), rounded as
// torch's CPU kernel rounds them.
at::Tensor batch_norm_affine(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var, double eps) {
  const int64_t C = running_mean.numel();
  auto affine = at::empty({2, C}, running_mean.options());
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "cbam_batch_norm_affine", [&] {
    const scalar_t* mean = running_mean.data_ptr<scalar_t>();
    const scalar_t* var = running_var.data_ptr<scalar_t>();
    const scalar_t* w = weight ? weight->data_ptr<scalar_t>() : nullptr;
    const scalar_t* b = bias ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* scale = affine.data_ptr<scalar_t>();
    scalar_t* shift = scale + C;
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = scalar_t(1) / std::sqrt(var[c] + static_cast<scalar_t>(eps)) * (w ? w[c] : scalar_t(1));
      shift[c] = (b ? b[c] : scalar_t(0)) - mean[c] * scale[c];
    }
  });
  return affine;
}

// A training-mode BatchNorm folded into CBAM's pooling, in one read of x (B, C, S): its statistics over
// (B, S) — mean, biased var, and invstd = 1 / sqrt(var + eps) in double, as torch computes them — its
// map (2, C) (scale = invstd * weight, shift = bias - mean * scale) and CBAM's pooling of the map's
// output: each row's mean, and its max and first arg-max from the row's maximum or minimum (the map
// is monotone). Returns avg, peak, channel_index (B, C), mean, var, invstd (C) and the map.
std::vector<at::Tensor> batch_norm_pool(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, double eps) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  TORCH_CHECK(S < std::numeric_limits<int32_t>::max(), "cbam: at most 2^31 - 1 positions per sample, got ", S);
  const auto wide = x.options().dtype(at::kDouble), positions = x.options().dtype(at::kLong);
  auto sums = at::empty({B, C}, wide), squares = at::empty({B, C}, wide);
  auto avg = at::empty({B, C}, x.options()), peak = at::empty({B, C}, x.options());
  auto index = at::empty({B, C}, positions);
  auto mean = at::empty({C}, x.options()), var = at::empty({C}, x.options()), invstd = at::empty({C}, x.options());
  auto affine = at::empty({2, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_batch_norm_pool", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    double* sp = sums.data_ptr<double>();
    double* qp = squares.data_ptr<double>();
    scalar_t* pk = peak.data_ptr<scalar_t>();  // the rows' maxima (and positions), then the pooled ones
    int64_t* ip = index.data_ptr<int64_t>();
    std::vector<std::pair<scalar_t, int64_t>> minima(B * C);
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        std::pair<scalar_t, int64_t> high;
        moments_row(xp + r * S, S, xp[(r % C) * S], sp[r], qp[r], minima[r], high);
        std::tie(pk[r], ip[r]) = high;
      }
    });
    const scalar_t* w = weight ? weight->data_ptr<scalar_t>() : nullptr;
    const scalar_t* b = bias ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* scale = affine.data_ptr<scalar_t>();
    scalar_t* shift = scale + C;
    scalar_t* ap = avg.data_ptr<scalar_t>();
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double sum = 0, square_sum = 0;
        for (int64_t k = 0; k < B; ++k) {
          sum += sp[k * C + c];
          square_sum += qp[k * C + c];
        }
        const double count = static_cast<double>(B * S), offset = sum / count;
        const double variance = std::max(square_sum / count - offset * offset, 0.0);
        const scalar_t centre = xp[c * S], channel_mean = static_cast<scalar_t>(centre + offset);
        mean.data_ptr<scalar_t>()[c] = channel_mean;
        var.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(variance);
        invstd.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(1 / std::sqrt(variance + eps));
        const scalar_t a = invstd.data_ptr<scalar_t>()[c] * (w ? w[c] : scalar_t(1));
        const scalar_t t = (b ? b[c] : scalar_t(0)) - channel_mean * a;
        scale[c] = a;
        shift[c] = t;
        for (int64_t k = 0; k < B; ++k) {  // the pooling of the map's output, row (k, c)
          const int64_t r = k * C + c;
          ap[r] = static_cast<scalar_t>(a * (centre + sp[r] / S) + t);
          if (a < 0) std::tie(pk[r], ip[r]) = minima[r];
          pk[r] = std::fma(a, pk[r], t);
          if (a == 0) ip[r] = 0;  // every value maps to t: the first is the maximum
        }
      }
    });
  });
  return {avg, peak, index, mean, var, invstd, affine};
}

// The whole CBAM forward: pooling, channel MLP, gated statistics, spatial conv, gate and output.
// Descriptor k of the channel MLP is avg_coef[k] * mean + max_coef[k] * max over positions. The
// spatial conv's weight is (1, I, *kernel) as the module holds it. With running_mean/running_var the
// spatial logits go through that eval-mode BatchNorm (norm_weight/norm_bias optional) before the
// gate. With finish = false it stops at the spatial logits (a BatchNorm on batch statistics comes
// next, in Python); out and ms are then empty. With a residual (shaped like x) the output is
// relu(x * mc * ms + residual). With input_affine (2, C) (batch_norm_affine) CBAM's input is
// scale[c] * x + shift[c], computed as the passes read x: the BatchNorm before CBAM, never written.
// With overwrite the output is written over x (each sample's output pass is its last read of it).
// pooled, where not empty, is (avg, peak, channel_index) computed already (batch_norm_pool).
// x is (B, C, *spatial), contiguous. Returns out (shaped like x), mc, ms, avg, peak, channel_index,
// mean, speak, spatial_index, logits.
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
                                const std::vector<at::Tensor>& pooled) {
  const int64_t B = x.size(0), C = x.size(1), S = size[0] * size[1] * size[2];
  const int64_t I = conv_w.numel() / (kernel[0] * kernel[1] * kernel[2]);
  double scale = 1, shift = 0;  // the fixed norm: scale * z + shift
  if (finish && running_var) {
    scale = (norm_weight ? norm_weight->item<double>() : 1.0) / std::sqrt(running_var->item<double>() + eps);
    shift = (norm_bias ? norm_bias->item<double>() : 0.0) - running_mean->item<double>() * scale;
  }
  TORCH_CHECK(S < std::numeric_limits<int32_t>::max(), "cbam: at most 2^31 - 1 positions per sample, got ", S);
  const int64_t K = chunks(S);
  auto vec = [&](int64_t n) { return at::empty({B, n}, x.options()); };
  auto idx = [&](int64_t n) { return at::empty({B, n}, x.options().dtype(at::kLong)); };
  at::Tensor out = !finish ? at::empty({0}, x.options()) : overwrite ? x : output_cache::empty_like(x);
  at::Tensor ms = finish ? vec(S) : at::empty({0}, x.options());
  const bool pool_here = pooled.empty();
  at::Tensor mc = vec(C), avg = pool_here ? vec(C) : pooled[0], peak = pool_here ? vec(C) : pooled[1];
  at::Tensor channel_index = pool_here ? idx(C) : pooled[2];
  at::Tensor mean = vec(S), speak = vec(S), spatial_index = idx(S), logits = vec(S);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cw = conv_w.data_ptr<scalar_t>();
    const scalar_t* rp = data_or_null<scalar_t>(residual);
    const auto mlp = channel_mlp<scalar_t>(avg_coef, max_coef, fc1_w, fc1_b, fc2_w, fc2_b, hard);
    with_input_norm<scalar_t>(input_affine, C, [&](auto norm) {
      // Sample b's pooling, then its MLP.
      auto pool_and_mlp = [&](int64_t b) {
        scalar_t* avg_b = avg.data_ptr<scalar_t>() + b * C;
        scalar_t* peak_b = peak.data_ptr<scalar_t>() + b * C;
        pool_rows(xp + b * C * S, norm, 1, C, S, avg_b, peak_b, channel_index.data_ptr<int64_t>() + b * C);
        mlp.gate(avg_b, peak_b, mc.data_ptr<scalar_t>() + b * C);
      };
      // The rest for sample b: gated statistics, spatial conv, gate and output.
      auto sample = [&](int64_t b) {
        const scalar_t* xb = xp + b * C * S;
        const scalar_t* mc_b = mc.data_ptr<scalar_t>() + b * C;
        scalar_t* mean_b = mean.data_ptr<scalar_t>() + b * S;
        scalar_t* speak_b = speak.data_ptr<scalar_t>() + b * S;
        int64_t* spatial_b = spatial_index.data_ptr<int64_t>() + b * S;
        at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
          for (int64_t k = begin; k < end; ++k) {
            const int64_t s0 = k * kChunk;
            gated_chunk(xb + s0, mc_b, norm, C, S, std::min(kChunk, S - s0), mean_b + s0, speak_b + s0,
                        spatial_b + s0);
          }
        });
        std::vector<scalar_t> maps(I * S);
        statistic_maps(mean_b, speak_b, I, S, maps.data());
        scalar_t* logits_b = logits.data_ptr<scalar_t>() + b * S;
        spatial_conv(maps.data(), cw, I, size.data(), kernel.data(), logits_b);
        if (!finish) return;
        scalar_t* ms_b = ms.data_ptr<scalar_t>() + b * S;
        for (int64_t s = 0; s < S; ++s) ms_b[s] = squash(scalar_t(scale) * logits_b[s] + scalar_t(shift), hard);
        scalar_t* ob = out.data_ptr<scalar_t>() + b * C * S;
        const scalar_t* rb = rp ? rp + b * C * S : nullptr;
        at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c)
            output_row(xb + c * S, norm[c], mc_b[c], ms_b, rb ? rb + c * S : nullptr, S, ob + c * S);
        });
      };
      auto each_sample = [&](const std::function<void(int64_t)>& work) {
        if (B >= at::get_num_threads()) {  // samples split among threads; the passes inside run serially
          at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
            for (int64_t b = begin; b < end; ++b) work(b);
          });
        } else {
          for (int64_t b = 0; b < B; ++b) work(b);
        }
      };
      const bool blas_mlp = (fc1_w.numel() + fc2_w.numel()) > C * S;  // MLP weights outweigh a sample's x
      if (blas_mlp || !pool_here) {  // every sample pooled first, then the MLP, then the rest sample by sample
        if (pool_here)
          pool_rows(xp, norm, B, C, S, avg.data_ptr<scalar_t>(), peak.data_ptr<scalar_t>(),
                    channel_index.data_ptr<int64_t>());
        if (blas_mlp) {
          mc = channel_gate(avg, peak, avg_coef, max_coef, fc1_w, fc1_b, fc2_w, fc2_b, hard);
        } else {
          for (int64_t b = 0; b < B; ++b)
            mlp.gate(avg.data_ptr<scalar_t>() + b * C, peak.data_ptr<scalar_t>() + b * C,
                     mc.data_ptr<scalar_t>() + b * C);
        }
        each_sample(sample);
      } else {  // sample by sample: its x stays in cache from the pooling to the output
        each_sample([&](int64_t b) {
          pool_and_mlp(b);
          sample(b);
        });
      }
    });
  });
  return {out, mc, ms, avg, peak, channel_index, mean, speak, spatial_index, logits};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pool", &pool);
  m.def("gated_stats", &gated_stats);
  m.def("apply", &apply);
  m.def("gate_grads", &gate_grads);
  m.def("stats_grad", &stats_grad);
  m.def("input_grad", &input_grad);
  m.def("batch_norm_input_grad", &batch_norm_input_grad);
  m.def("forward", &forward, py::arg("x"), py::arg("size"), py::arg("avg_coef"), py::arg("max_coef"), py::arg("fc1_w"), py::arg("fc1_b"), py::arg("fc2_w"), py::arg("fc2_b"), py::arg("conv_w"), py::arg("kernel"), py::arg("hard"), py::arg("finish"), py::arg("norm_w"), py::arg("norm_b"), py::arg("running_mean"), py::arg("running_var"), py::arg("eps"), py::arg("residual"), py::arg("input_affine"), py::arg("overwrite"), py::arg("pooled"));
  m.def("batch_norm_affine", &batch_norm_affine);
  m.def("batch_norm_pool", &batch_norm_pool);
  m.def("conv_backward", &conv_backward);
  m.def("spatial_backward", &spatial_backward);
  m.def("channel_gate", &channel_gate);
  m.def("channel_backward", &channel_backward);
  m.def("set_output_cache_limit", &output_cache::set_limit);
  m.def("output_cache_bytes", &output_cache::cached);
}
