// The BatchNorm before CBAM, folded into CBAM's passes: its eval-mode affine map, and a training-mode
// BatchNorm's statistics taken in CBAM's pooling pass (its backward is batch_norm_input_grad, in
// backward.cpp).
#include "passes.h"
#include "vector.h"

#include <cmath>
#include <tuple>
#include <utility>

namespace cbam_cpu {
namespace {

typedef double Doubles __attribute__((vector_size(kVectorBytes)));
constexpr int kDoubles = kVectorBytes / sizeof(double);

// Adds lanes kDoubles kPart .. kDoubles (kPart + 1) - 1 of v, as doubles minus centre (a double, or Doubles
// lane by lane), to sums[kPart], and their squares to squares[kPart].
template <int kPart, typename Vector, typename Centre>
void add_part(Vector v, Centre centre, Doubles* sums, Doubles* squares) {
  const auto part = lanes_at<kDoubles * kPart>(v, std::make_index_sequence<kDoubles>{});
  const Doubles d = __builtin_convertvector(part, Doubles) - centre;
  sums[kPart] += d;
  squares[kPart] += d * d;
}

// What a BatchNorm on the batch's statistics needs of one row of S values, in one read: the sums of
// row[s] - centre and of its square, in double (centre, a value of the channel, keeps them exact
// enough), and the row's first minimum and maximum with their positions.
template <typename scalar_t, typename storage_t>
void moments_row(const storage_t* row, int64_t S, scalar_t centre, double& sum, double& squares,
                 std::pair<scalar_t, int64_t>& low, std::pair<scalar_t, int64_t>& high) {
  using Values = typename Lanes<scalar_t>::Values;
  constexpr int kParts = sizeof(Values) / sizeof(scalar_t) / kDoubles;  // vectors of doubles per vector of values
  Doubles sums[2] = {}, square_sums[2] = {};
  LaneMaximum<scalar_t> highest(widen(row[0])), lowest(-widen(row[0]));  // the minimum: the maximum of -row
  scan_row<scalar_t>(row, S, [&](Values v, auto positions, auto fresh) {
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

// moments_row for the channels of one vector of one channels-last sample, x at its first row (rows C apart),
// centres (one per lane): sums and squares in vectors of doubles, maxima and minima with their first
// positions, all in registers while the rows stream by.
template <typename scalar_t, typename storage_t>
void moments_vector(const storage_t* x, int64_t C, int64_t S, const scalar_t* centres, double* sums, double* squares,
                    std::pair<scalar_t, int64_t>* low, std::pair<scalar_t, int64_t>* high) {
  using Values = typename Lanes<scalar_t>::Values;
  using Positions = typename Lanes<scalar_t>::Positions;
  using Position = typename std::remove_reference<decltype(Positions{}[0])>::type;
  constexpr int kWidth = sizeof(Values) / sizeof(scalar_t), kParts = kWidth / kDoubles;
  const auto load = [](const auto* at) { return load_values<scalar_t>(at); };
  const Values centre_values = load(centres);
  const auto half = std::make_index_sequence<kDoubles>{};
  const Doubles centre[2] = {__builtin_convertvector(lanes_at<0>(centre_values, half), Doubles),
                             __builtin_convertvector(lanes_at<kDoubles * (kParts - 1)>(centre_values, half), Doubles)};
  Doubles sum[2] = {}, square[2] = {};
  LaneMaximum<scalar_t> highest(scalar_t(0)), lowest(scalar_t(0));  // the minimum: the maximum of -x
  highest.best = load(x);
  lowest.best = -highest.best;
  for (int64_t s = 0; s < S; ++s) {
    const Values v = load(x + s * C);
    const Positions at = static_cast<Position>(s) + Positions{};
    highest.take(v, at);
    lowest.take(-v, at);
    add_part<0>(v, centre[0], sum, square);
    if constexpr (kParts == 2) add_part<1>(v, centre[1], sum, square);
  }
  for (int l = 0; l < kWidth; ++l) {
    sums[l] = sum[l / kDoubles][l % kDoubles];
    squares[l] = square[l / kDoubles][l % kDoubles];
    high[l] = {highest.best[l], highest.at[l]};
    low[l] = {-lowest.best[l], lowest.at[l]};
  }
}

// moments_row for channels c0 .. c0 + n - 1 (n <= kBlock) of one channels-last sample x (S rows of C),
// centres (n) the channels' centres: sums, squares (n), minima and maxima with their positions (n), in
// arrays along the channels while the rows stream by (the channels beyond moments_vector's whole vectors).
template <int64_t kBlock, typename scalar_t, typename storage_t>
void moments_columns(const storage_t* x, int64_t C, int64_t S, int64_t c0, int64_t n, const scalar_t* centres,
                     double* sums, double* squares, std::pair<scalar_t, int64_t>* low,
                     std::pair<scalar_t, int64_t>* high) {
  alignas(64) double sum[kBlock], square[kBlock], centre[kBlock];
  alignas(64) scalar_t lowest[kBlock], highest[kBlock];
  alignas(64) int32_t low_at[kBlock], high_at[kBlock];
  for (int64_t j = 0; j < n; ++j) {
    centre[j] = centres[j];
    sum[j] = square[j] = 0;
    lowest[j] = highest[j] = widen(x[c0 + j]);
    low_at[j] = high_at[j] = 0;
  }
  for (int64_t s = 0; s < S; ++s) {
    const storage_t* __restrict row = x + s * C + c0;
    const int32_t at = static_cast<int32_t>(s);
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) {  // two loops over the row's block (in L1): each vectorises, one would not
      const double d = static_cast<double>(widen(row[j])) - centre[j];
      sum[j] += d;
      square[j] += d * d;
    }
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t v = widen(row[j]);
      const bool above = v > highest[j], below = v < lowest[j];
      highest[j] = above ? v : highest[j];
      high_at[j] = above ? at : high_at[j];
      lowest[j] = below ? v : lowest[j];
      low_at[j] = below ? at : low_at[j];
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    sums[j] = sum[j];
    squares[j] = square[j];
    low[j] = {lowest[j], low_at[j]};
    high[j] = {highest[j], high_at[j]};
  }
}

// batch_norm_pool's work, by row and by channel: x (B, C, S), contiguous or (rows_last) channels-last; per row (b, c) the sums and squares of
// moments_row, the maximum and its position (peak, index: then the pooled ones) and the minimum;
// per channel the statistics (mean, var, invstd) and the map (scale, shift); avg (B, C) the pooling. x holds
// storage_t (scalar_t, or Bf16 widened as read).
template <typename scalar_t, typename storage_t>
struct FoldedPool {
  const storage_t* x;
  int64_t B, C, S;
  bool rows_last;
  double eps;
  const scalar_t* weight;  // (C) or null
  const scalar_t* bias;    // (C) or null
  double* sums;
  double* squares;
  std::pair<scalar_t, int64_t>* minima;
  scalar_t *avg, *peak, *mean, *var, *invstd, *scale, *shift;
  int64_t* index;

  // The value channel c's moments are taken about: its first, or 0 where that is infinite (x - inf would
  // make every sum NaN, where torch's mean is the channel's sum over the count: inf).
  scalar_t centre(int64_t c) const {
    const scalar_t first = widen(x[rows_last ? c : c * S]);
    return std::isinf(first) ? scalar_t(0) : first;
  }

  // Row r = (b, c): its moments about the channel's centre, its maximum and its minimum.
  void row(int64_t r) const {
    std::pair<scalar_t, int64_t> high;
    moments_row(x + r * S, S, centre(r % C), sums[r], squares[r], minima[r], high);
    std::tie(peak[r], index[r]) = high;
  }

  static constexpr int64_t kColumns = 64;  // channels per task, channels-last

  // Channels c0 .. c0 + n - 1 (n <= kColumns) of sample b, channels-last: what row() finds for each of their rows.
  void columns(int64_t b, int64_t c0, int64_t n) const {
    scalar_t centres[kColumns];
    std::pair<scalar_t, int64_t> high[kColumns];
    for (int64_t j = 0; j < n; ++j) centres[j] = centre(c0 + j);
    const int64_t r = b * C + c0;
    const storage_t* sample = x + b * S * C;
    constexpr int64_t kWidth = sizeof(typename Lanes<scalar_t>::Values) / sizeof(scalar_t);
    int64_t j = 0;
    for (; j + kWidth <= n; j += kWidth)
      moments_vector(sample + c0 + j, C, S, centres + j, sums + r + j, squares + r + j, minima + r + j, high + j);
    if (j < n)
      moments_columns<kColumns>(sample, C, S, c0 + j, n - j, centres + j, sums + r + j, squares + r + j,
                                minima + r + j, high + j);
    for (j = 0; j < n; ++j) std::tie(peak[r + j], index[r + j]) = high[j];
  }

  // Channel c: its statistics over (B, S), its map, and the pooling of the map's output on its rows.
  void channel(int64_t c) const {
    double sum = 0, square_sum = 0;
    for (int64_t k = 0; k < B; ++k) {
      sum += sums[k * C + c];
      square_sum += squares[k * C + c];
    }
    const double count = static_cast<double>(B * S), offset = sum / count;
    const double variance = std::max(square_sum / count - offset * offset, 0.0);
    const scalar_t centre = this->centre(c), channel_mean = static_cast<scalar_t>(centre + offset);
    mean[c] = channel_mean;
    var[c] = static_cast<scalar_t>(variance);
    invstd[c] = static_cast<scalar_t>(1 / std::sqrt(variance + eps));
    const scalar_t a = invstd[c] * (weight ? weight[c] : scalar_t(1));
    const scalar_t t = (bias ? bias[c] : scalar_t(0)) - channel_mean * a;
    scale[c] = a;
    shift[c] = t;
    for (int64_t k = 0; k < B; ++k) {  // the pooling of the map's output, row (k, c)
      const int64_t r = k * C + c;
      avg[r] = static_cast<scalar_t>(a * (centre + sums[r] / S) + t);
      if (a < 0) std::tie(peak[r], index[r]) = minima[r];
      peak[r] = std::fma(a, peak[r], t);
      if (a == 0) index[r] = 0;  // every value maps to t: the first is the maximum
    }
  }
};

}  // namespace

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

// A training-mode BatchNorm folded into CBAM's pooling, in one read of x (B, C, S), contiguous or
// channels-last, float32, float64 or bfloat16 (read as stored; the results float32): its statistics over
// (B, S) — mean, biased var, and invstd = 1 / sqrt(var + eps) in double, as torch computes them — its
// map (2, C) (scale = invstd * weight, shift = bias - mean * scale) and CBAM's pooling of the map's
// output: each row's mean, and its max and first arg-max from the row's maximum or minimum (the map
// is monotone). Returns avg, peak, channel_index (B, C), mean, var, invstd (C) and the map.
std::vector<at::Tensor> batch_norm_pool(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, double eps) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  check_positions(S);
  const bool rows_last = channels_last(x);
  const auto wide = x.options().dtype(at::kDouble), positions = x.options().dtype(at::kLong);
  auto sums = at::empty({B, C}, wide), squares = at::empty({B, C}, wide);
  const auto compute = compute_options(x);
  auto avg = at::empty({B, C}, compute), peak = at::empty({B, C}, compute);
  auto index = at::empty({B, C}, positions);
  auto mean = at::empty({C}, compute), var = at::empty({C}, compute), invstd = at::empty({C}, compute);
  auto affine = at::empty({2, C}, compute);
  with_storage(x, [&](auto compute_value, auto storage_value) {
    using scalar_t = decltype(compute_value);
    using storage_t = decltype(storage_value);
    std::vector<std::pair<scalar_t, int64_t>> minima(B * C);
    scalar_t* scale = affine.data_ptr<scalar_t>();
    const FoldedPool<scalar_t, storage_t> fold{
        data_as<const storage_t>(x), B, C, S, rows_last, eps, data_or_null<scalar_t>(weight),
        data_or_null<scalar_t>(bias), sums.data_ptr<double>(), squares.data_ptr<double>(), minima.data(),
        avg.data_ptr<scalar_t>(), peak.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(),
        invstd.data_ptr<scalar_t>(), scale, scale + C, index.data_ptr<int64_t>()};
    if (rows_last) {
      constexpr int64_t kColumns = FoldedPool<scalar_t, storage_t>::kColumns;
      const int64_t K = (C + kColumns - 1) / kColumns;
      at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t c0 = (task % K) * kColumns;
          fold.columns(task / K, c0, std::min(kColumns, C - c0));
        }
      });
    } else {
      at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) fold.row(r);
      });
    }
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) fold.channel(c);
    });
  });
  return {avg, peak, index, mean, var, invstd, affine};
}

}  // namespace cbam_cpu
