// The forward passes over x (pool, gated_stats, apply) and the whole forward in one call (forward),
// sample by sample so that a sample's x stays in cache from its pooling to its output where it can.
// torch_ops.py is the definition.
#include "input_norm.h"
#include "passes.h"
#include "small_steps.h"
#include "vector.h"

#include <functional>
#include <tuple>
#include <utility>

namespace cbam_cpu {
namespace {

// The first NaN among n values value(i), if any, as the maximum and its index, as torch's max takes it: the
// scans compare with > (a NaN never is above), so where a sum came out NaN (a NaN, or +inf and -inf) they
// look again. Off the hot loops: one test of the sum per row or position.
template <typename scalar_t, typename Value>
__attribute__((noinline, cold)) void first_nan(int64_t n, Value value, scalar_t& peak, int64_t& index) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t v = value(i);
    if (v != v) {
      peak = v;
      index = i;
      return;
    }
  }
}

// Mean, max and (with kIndex) first arg-max of one row of S values norm(row[s]), in one read.
template <bool kIndex, typename scalar_t, bool kNormed, typename storage_t>
void pool_row(const storage_t* row, int64_t S, Affine<scalar_t, kNormed> norm, scalar_t& mean, scalar_t& peak,
              int64_t* index) {
  using Values = typename Lanes<scalar_t>::Values;
  Values sums = {};
  LaneMaximum<scalar_t, kIndex> highest(norm(widen(row[0])));
  scan_row<scalar_t>(row, S, [&](Values v, auto positions, auto fresh) {
    v = norm(v);
    highest.take(v, positions);
    sums += fresh ? v : Values{};
  });
  mean = fold_lanes(sums, [](auto a, auto b) { return a + b; }) / S;
  auto [found, at] = highest.result();
  if (mean != mean) first_nan(S, [&](int64_t s) { return norm(widen(row[s])); }, found, at);
  peak = found;
  if constexpr (kIndex) *index = at;
}

// Channel-wise mean, max and (with kIndex) first arg-max of mc[c] * norm[c](x[c, s]) for one block of kBlock
// vectors of positions of one sample (x points at its first position of channel 0, rows are S apart): sums,
// maxima and arg-maxima stay in registers while the channels stream by, summed over channels in order.
template <int kBlock, bool kIndex, typename scalar_t, bool kNormed, typename storage_t>
void gated_block(const storage_t* x, const scalar_t* mc, InputNorm<scalar_t, kNormed> norm, int64_t C, int64_t S,
                 scalar_t* mean, scalar_t* peak, int64_t* index) {
  using Values = typename Lanes<scalar_t>::Values;
  using Positions = typename Lanes<scalar_t>::Positions;
  constexpr int kWidth = kLanes<scalar_t>;
  auto load = [](const storage_t* at) { return load_values<scalar_t>(at); };
  Values sum[kBlock], best[kBlock];
  Positions arg[kBlock];
  for (int j = 0; j < kBlock; ++j) {
    sum[j] = best[j] = mc[0] * norm[0](load(x + j * kWidth));
    arg[j] = Positions{};
  }
  for (int64_t c = 1; c < C; ++c) {
    const storage_t* row = x + c * S;
    const auto row_norm = norm[c];
    const Positions channel = static_cast<typename std::remove_reference<decltype(arg[0][0])>::type>(c) +
                              Positions{};
    for (int j = 0; j < kBlock; ++j) {
      const Values v = mc[c] * row_norm(load(row + j * kWidth));
      const Positions above = v > best[j];
      sum[j] += v;
      best[j] = above ? v : best[j];
      if constexpr (kIndex) arg[j] = above ? channel : arg[j];
    }
  }
  Positions nan = {};
  for (int j = 0; j < kBlock; ++j) {
    nan |= sum[j] != sum[j];
    for (int l = 0; l < kWidth; ++l) {
      mean[j * kWidth + l] = sum[j][l] / C;
      peak[j * kWidth + l] = best[j][l];
      if constexpr (kIndex) index[j * kWidth + l] = arg[j][l];
    }
  }
  if (fold_lanes(nan, [](auto a, auto b) { return a | b; }) == 0) return;
  for (int64_t s = 0; s < kBlock * kWidth; ++s) {  // rare: a NaN sum in the block
    if (mean[s] == mean[s]) continue;
    int64_t at = 0;
    first_nan(C, [&](int64_t c) { return mc[c] * norm[c](widen(x[c * S + s])); }, peak[s], at);
    if constexpr (kIndex) index[s] = peak[s] != peak[s] ? at : index[s];
  }
}

// The same for the rest positions (fewer than a block) in per-position arrays, still vectorised
// across positions. No reassociation: the channel sums would otherwise be regrouped, differently for
// each storage type (a bfloat16 input then gave other float32 sums than its float32 copy).
template <int kBlock, bool kIndex, typename scalar_t, bool kNormed, typename storage_t>
__attribute__((optimize("no-associative-math")))
void gated_rest(const storage_t* x, const scalar_t* mc, InputNorm<scalar_t, kNormed> norm, int64_t C, int64_t S,
                int64_t rest, scalar_t* mean, scalar_t* peak, int64_t* index) {
  constexpr int kWidth = kLanes<scalar_t>;
  scalar_t sum[kBlock * kWidth], best[kBlock * kWidth];
  int32_t arg[kBlock * kWidth];
  for (int64_t t = 0; t < rest; ++t) {
    sum[t] = best[t] = mc[0] * norm[0](widen(x[t]));
    arg[t] = 0;
  }
  for (int64_t c = 1; c < C; ++c) {
    const scalar_t m = mc[c];
    const storage_t* row = x + c * S;
    const auto row_norm = norm[c];
    for (int64_t t = 0; t < rest; ++t) {
      const scalar_t v = m * row_norm(widen(row[t]));
      const bool above = v > best[t];
      sum[t] += v;
      best[t] = above ? v : best[t];
      if constexpr (kIndex) arg[t] = above ? static_cast<int32_t>(c) : arg[t];
    }
  }
  for (int64_t t = 0; t < rest; ++t) {
    int64_t at = arg[t];
    if (sum[t] != sum[t]) first_nan(C, [&](int64_t c) { return mc[c] * norm[c](widen(x[c * S + t])); }, best[t], at);
    mean[t] = sum[t] / C;
    peak[t] = best[t];
    if constexpr (kIndex) index[t] = at;
  }
}

// Channel-wise mean, max and first arg-max of mc[c] * norm[c](x[c, s]) for n positions of one sample;
// x points at the chunk's first position of channel 0, rows are S apart. Blocks of kBlock vectors of
// positions keep their sums, maxima and arg-maxima in registers while the channels stream by; the
// positions left over keep them in arrays. Sums run over channels in order either way. Without kIndex
// (an inference, whose backward never comes) the arg-maxima are not tracked and index is not written:
// 14-32% of the pass on AVX2, where each select costs a blend, up to 20% on AVX-512.
template <bool kIndex, typename scalar_t, bool kNormed, typename storage_t>
void gated_chunk(const storage_t* x, const scalar_t* mc, InputNorm<scalar_t, kNormed> norm, int64_t C, int64_t S,
                 int64_t n, scalar_t* mean, scalar_t* peak, int64_t* index) {
  constexpr int kWidth = kLanes<scalar_t>, kBlock = 4;
  int64_t s = 0;
  for (; s + kBlock * kWidth <= n; s += kBlock * kWidth)
    gated_block<kBlock, kIndex>(x + s, mc, norm, C, S, mean + s, peak + s, kIndex ? index + s : nullptr);
  gated_rest<kBlock, kIndex>(x + s, mc, norm, C, S, n - s, mean + s, peak + s, kIndex ? index + s : nullptr);
}

// Spatial mean, max and first arg-max of every row (b, c) of norm(x), x: (B, C, S): avg, peak, index (B, C);
// the arg-maxima only where index is not null.
template <typename scalar_t, bool kNormed, typename storage_t>
void pool_rows(const storage_t* x, InputNorm<scalar_t, kNormed> norm, int64_t B, int64_t C, int64_t S, scalar_t* avg,
               scalar_t* peak, int64_t* index) {
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (index)
        pool_row<true>(x + r * S, S, norm[r % C], avg[r], peak[r], index + r);
      else
        pool_row<false>(x + r * S, S, norm[r % C], avg[r], peak[r], nullptr);
    }
  });
}

// Channels-last: a sample's x is S rows of C channels, x[s * C + c].

constexpr int64_t kChannelBlock = 128;  // channels per task in the channels-last pooling

inline int64_t channel_blocks(int64_t C) { return (C + kChannelBlock - 1) / kChannelBlock; }

// Spatial mean, max and (with kIndex) first arg-max of channels c0 .. c0 + n - 1 (n <= kChannelBlock) of
// one channels-last sample x, y = norm(x): sums, maxima and arg-maxima in arrays along the channels while
// the rows stream by (the compiler vectorises the channel loop), each channel summed over positions in order.
// No reassociation (the lanes are channels, no sum needs it): it would fold norm's rounding into the sums.
template <bool kIndex, typename scalar_t, bool kNormed, typename storage_t>
__attribute__((optimize("no-associative-math")))
void pool_columns(const storage_t* x, InputNorm<scalar_t, kNormed> norm, int64_t C, int64_t S, int64_t c0, int64_t n,
                  scalar_t* avg, scalar_t* peak, int64_t* index) {
  alignas(64) scalar_t sum[kChannelBlock], best[kChannelBlock];
  alignas(64) int32_t arg[kChannelBlock];
  const scalar_t* scale = kNormed ? norm.scale + c0 : nullptr;
  const scalar_t* shift = kNormed ? norm.shift + c0 : nullptr;
  const auto y = [&](int64_t j, scalar_t v) -> scalar_t {  // rounded as torch's kernel rounds it; a builtin, as
    if constexpr (!kNormed) return v;                       // std::fma would not be inlined under these options
    if constexpr (std::is_same_v<scalar_t, float>) return __builtin_fmaf(v, scale[j], shift[j]);
    return __builtin_fma(v, scale[j], shift[j]);
  };
  for (int64_t j = 0; j < n; ++j) {
    sum[j] = best[j] = y(j, widen(x[c0 + j]));
    arg[j] = 0;
  }
  for (int64_t s = 1; s < S; ++s) {
    const storage_t* __restrict row = x + s * C + c0;
    const int32_t at = static_cast<int32_t>(s);
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t v = y(j, widen(row[j]));
      const bool above = v > best[j];
      sum[j] += v;
      best[j] = above ? v : best[j];
      if constexpr (kIndex) arg[j] = above ? at : arg[j];
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c = c0 + j;
    scalar_t found = best[j];
    int64_t at = arg[j];
    avg[c] = sum[j] / S;
    if (avg[c] != avg[c]) first_nan(S, [&](int64_t s) { return norm[c](widen(x[s * C + c])); }, found, at);
    peak[c] = found;
    if constexpr (kIndex) index[c] = at;
  }
}

// pool_columns of every sample of a channels-last x (B, S rows of C): avg, peak, index (B, C), the
// arg-maxima only where index is not null; tasks of a sample's channel block.
template <typename scalar_t, bool kNormed, typename storage_t>
void pool_columns_all(const storage_t* x, InputNorm<scalar_t, kNormed> norm, int64_t B, int64_t C, int64_t S,
                      scalar_t* avg, scalar_t* peak, int64_t* index) {
  const int64_t K = channel_blocks(C);
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / K, c0 = (task % K) * kChannelBlock, n = std::min(kChannelBlock, C - c0);
      if (index)
        pool_columns<true>(x + b * S * C, norm, C, S, c0, n, avg + b * C, peak + b * C, index + b * C);
      else
        pool_columns<false>(x + b * S * C, norm, C, S, c0, n, avg + b * C, peak + b * C, nullptr);
    }
  });
}

// Channel-wise mean, max and (with kIndex) first arg-max of mc[c] * norm[c](row[c]) over one channels-last
// row of C values: a vector of channels at a time (lane sums folded at the end), the channels beyond the
// last whole vector one by one.
template <bool kIndex, typename scalar_t, bool kNormed, typename storage_t>
void gated_row(const storage_t* row, const scalar_t* mc, InputNorm<scalar_t, kNormed> norm, int64_t C, scalar_t& mean,
               scalar_t& peak, int64_t* index) {
  using Values = typename Lanes<scalar_t>::Values;
  using Positions = typename Lanes<scalar_t>::Positions;
  using Position = typename std::remove_reference<decltype(Positions{}[0])>::type;
  constexpr int kWidth = kLanes<scalar_t>;
  const auto value = [&](int64_t c) { return mc[c] * norm[c](widen(row[c])); };
  const auto load = [](const scalar_t* at) { return load_values<scalar_t>(at); };
  const auto values = [&](int64_t c) {
    Values v = load_values<scalar_t>(row + c);
    if constexpr (kNormed) v = v * load(norm.scale + c) + load(norm.shift + c);
    return load(mc + c) * v;
  };
  scalar_t total, found;
  int64_t at = 0, c;
  if (C < kWidth) {
    total = found = value(0);
    c = 1;
  } else {
    // Two sets of lane sums, maxima and arg-maxima, even and odd vectors: two dependency chains, not one.
    // Set 1 starts as a copy of set 0's first vector, which adds nothing to the sum and ties with itself.
    Positions iota;
    for (int l = 0; l < kWidth; ++l) iota[l] = l;
    Values sum[2] = {values(0), Values{}}, best[2] = {sum[0], sum[0]};
    Positions arg[2] = {iota, iota};
    const auto take = [&](int k, int64_t from) {
      const Values v = values(from);
      const Positions above = v > best[k];
      sum[k] += v;
      best[k] = above ? v : best[k];
      if constexpr (kIndex) arg[k] = above ? iota + static_cast<Position>(from) : arg[k];
    };
    for (c = kWidth; c + 2 * kWidth <= C; c += 2 * kWidth) {
      take(0, c);
      take(1, c + kWidth);
    }
    if (c + kWidth <= C) {
      take(0, c);
      c += kWidth;
    }
    const Positions above = best[1] > best[0];  // the sets merged into set 0; a tie keeps the first position
    if constexpr (kIndex) arg[0] = above ? arg[1] : best[1] == best[0] && arg[1] < arg[0] ? arg[1] : arg[0];
    best[0] = above ? best[1] : best[0];
    total = fold_lanes(sum[0] + sum[1], [](auto a, auto b) { return a + b; });
    found = fold_lanes(best[0], [](auto a, auto b) { return b > a ? b : a; });
    if constexpr (kIndex) {
      const Position none = std::numeric_limits<Position>::max();
      at = fold_lanes(best[0] == found + Values{} ? arg[0] : none + Positions{},
                      [](auto a, auto b) { return b < a ? b : a; });
      at = at == none ? 0 : at;
    }
  }
  for (; c < C; ++c) {
    const scalar_t v = value(c);
    total += v;
    if (v > found) {
      found = v;
      at = c;
    }
  }
  mean = total / C;
  if (mean != mean) first_nan(C, value, found, at);
  peak = found;
  if constexpr (kIndex) *index = at;
}

// gated_row of n positions of one channels-last sample (x at the first position's row): mean, peak and
// index (n); the arg-maxima only where index is not null.
template <typename scalar_t, bool kNormed, typename storage_t>
void gated_rows(const storage_t* x, const scalar_t* mc, InputNorm<scalar_t, kNormed> norm, int64_t C, int64_t n,
                scalar_t* mean, scalar_t* peak, int64_t* index) {
  for (int64_t s = 0; s < n; ++s) {
    if (index)
      gated_row<true>(x + s * C, mc, norm, C, mean[s], peak[s], index + s);
    else
      gated_row<false>(x + s * C, mc, norm, C, mean[s], peak[s], nullptr);
  }
}

// The output of n positions of one channels-last sample (rows of C, x at the first position's row):
// out = y * mc * ms, or relu(y * mc * ms + residual) with residual rows (null without), y = norm(x);
// rounded as output_row rounds.
template <typename scalar_t, bool kNormed, typename storage_t>
__attribute__((optimize("no-associative-math", "fp-contract=off")))
void output_rows(const storage_t* x, InputNorm<scalar_t, kNormed> norm, const scalar_t* mc, const scalar_t* ms,
                 const storage_t* residual, int64_t C, int64_t n, storage_t* out) {
  for (int64_t s = 0; s < n; ++s) {
    const storage_t* __restrict xs = x + s * C;
    storage_t* __restrict os = out + s * C;
    const scalar_t gate = ms[s];
    const auto y = [&](int64_t c) -> scalar_t {
      const scalar_t v = widen(xs[c]);
      if constexpr (!kNormed) return v;
      if constexpr (std::is_same_v<scalar_t, float>) return __builtin_fmaf(v, norm.scale[c], norm.shift[c]);
      return __builtin_fma(v, norm.scale[c], norm.shift[c]);
    };
    if (residual == nullptr) {
#pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) os[c] = narrow<storage_t>(y(c) * mc[c] * gate);
      continue;
    }
    const storage_t* __restrict rs = residual + s * C;
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t v = y(c) * mc[c] * gate + widen(rs[c]);
      os[c] = narrow<storage_t>(v < 0 ? scalar_t(0) : v);
    }
  }
}

// One output row of S positions: out = y * m * ms, or relu(y * m * ms + residual) with a residual row
// (the residual block's tail; NaN stays NaN as in torch.relu), y = norm(x). Rounded as torch's
// separate ops round, (y * m) * ms then + residual: no reassociation, no other fused multiply-add
// than norm's (written as a builtin: under these options no function call would be inlined).
template <typename scalar_t, bool kNormed, typename storage_t>
__attribute__((optimize("no-associative-math", "fp-contract=off")))
void output_row(const storage_t* x, Affine<scalar_t, kNormed> norm, scalar_t m, const scalar_t* ms,
                const storage_t* residual, int64_t S, storage_t* out) {
  const auto y = [&](int64_t s) -> scalar_t {
    const scalar_t v = widen(x[s]);
    if constexpr (!kNormed) return v;
    if constexpr (std::is_same_v<scalar_t, float>) return __builtin_fmaf(v, norm.a, norm.b);
    return __builtin_fma(v, norm.a, norm.b);
  };
  if (residual == nullptr) {
    for (int64_t s = 0; s < S; ++s) out[s] = narrow<storage_t>(y(s) * m * ms[s]);
    return;
  }
  for (int64_t s = 0; s < S; ++s) {
    const scalar_t v = y(s) * m * ms[s] + widen(residual[s]);
    out[s] = narrow<storage_t>(v < 0 ? scalar_t(0) : v);
  }
}

// The one-call forward's work on the tensors forward() made: x, out (B, C, S), contiguous or (rows_last)
// channels-last, residual laid out like x or null, mc, avg, peak, channel_index (B, C), mean, speak, spatial_index, logits, ms (B, S); the index
// pointers null where the arg-maxima are not tracked. x, residual and out hold storage_t (scalar_t, or Bf16).
template <typename scalar_t, typename storage_t, typename Norm>
struct OneCall {
  const storage_t* x;
  const scalar_t* conv_w;
  const storage_t* residual;
  const ChannelMLP<scalar_t>& mlp;
  Norm norm;
  int64_t B, C, S, I;
  const int64_t *size, *kernel;
  bool hard, finish, rows_last;
  double scale, shift;  // the fixed norm of the spatial logits: scale * z + shift
  storage_t* out;
  scalar_t *ms, *mc, *avg, *peak, *mean, *speak, *logits;
  int64_t *channel_index, *spatial_index;

  // Every sample's pooling, then every sample's MLP in plain loops.
  void pool_all() const {
    if (rows_last)
      pool_columns_all(x, norm, B, C, S, avg, peak, channel_index);
    else
      pool_rows(x, norm, B, C, S, avg, peak, channel_index);
  }
  void gate_all() const {
    for (int64_t b = 0; b < B; ++b) mlp.gate(avg + b * C, peak + b * C, mc + b * C);
  }

  // Sample b's pooling, then its MLP.
  void pool_and_mlp(int64_t b) const {
    int64_t* index = channel_index ? channel_index + b * C : nullptr;
    if (rows_last)
      pool_columns_all(x + b * C * S, norm, 1, C, S, avg + b * C, peak + b * C, index);
    else
      pool_rows(x + b * C * S, norm, 1, C, S, avg + b * C, peak + b * C, index);
    mlp.gate(avg + b * C, peak + b * C, mc + b * C);
  }

  // The rest for sample b: gated statistics, spatial conv, gate and output.
  void rest(int64_t b) const {
    const storage_t* xb = x + b * C * S;
    const scalar_t* mc_b = mc + b * C;
    scalar_t *mean_b = mean + b * S, *speak_b = speak + b * S;
    at::parallel_for(0, chunks(S), 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t s0 = k * kChunk;
        const int64_t n = std::min(kChunk, S - s0);
        if (rows_last)
          gated_rows(xb + s0 * C, mc_b, norm, C, n, mean_b + s0, speak_b + s0,
                     spatial_index ? spatial_index + b * S + s0 : nullptr);
        else if (spatial_index)
          gated_chunk<true>(xb + s0, mc_b, norm, C, S, n, mean_b + s0, speak_b + s0, spatial_index + b * S + s0);
        else
          gated_chunk<false>(xb + s0, mc_b, norm, C, S, n, mean_b + s0, speak_b + s0, nullptr);
      }
    });
    std::vector<scalar_t> maps(I * S);
    statistic_maps(mean_b, speak_b, I, S, maps.data());
    scalar_t* logits_b = logits + b * S;
    spatial_conv(maps.data(), conv_w, I, size, kernel, logits_b);
    if (finish) output(b);
  }

  // Sample b's spatial gate from its logits, and its output.
  void output(int64_t b) const {
    const scalar_t* logits_b = logits + b * S;
    scalar_t* ms_b = ms + b * S;
    for (int64_t s = 0; s < S; ++s) ms_b[s] = squash(scalar_t(scale) * logits_b[s] + scalar_t(shift), hard);
    const storage_t* xb = x + b * C * S;
    const scalar_t* mc_b = mc + b * C;
    storage_t* ob = out + b * C * S;
    const storage_t* rb = residual ? residual + b * C * S : nullptr;
    if (rows_last) {
      at::parallel_for(0, chunks(S), 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t s0 = k * kChunk, offset = s0 * C;
          output_rows(xb + offset, norm, mc_b, ms_b + s0, rb ? rb + offset : nullptr, C, std::min(kChunk, S - s0),
                      ob + offset);
        }
      });
      return;
    }
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        output_row(xb + c * S, norm[c], mc_b[c], ms_b, rb ? rb + c * S : nullptr, S, ob + c * S);
    });
  }

  // work(b) for every sample: samples split among threads where there are enough (the passes inside
  // then run serially), else one after the other.
  void each_sample(const std::function<void(int64_t)>& work) const {
    if (B >= at::get_num_threads()) {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) work(b);
      });
    } else {
      for (int64_t b = 0; b < B; ++b) work(b);
    }
  }
};


// The spatial logits' eval-mode BatchNorm (weight, bias optional) as scale * z + shift; (1, 0) without one.
std::pair<double, double> fixed_norm(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& running_mean,
                                     const std::optional<at::Tensor>& running_var, double eps) {
  double scale = 1, shift = 0;
  if (running_var) {
    scale = (weight ? weight->item<double>() : 1.0) / std::sqrt(running_var->item<double>() + eps);
    shift = (bias ? bias->item<double>() : 0.0) - running_mean->item<double>() * scale;
  }
  return {scale, shift};
}

}  // namespace

// Spatial mean, max and first arg-max of every row (b, c).
std::vector<at::Tensor> pool(const at::Tensor& x) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  check_positions(S);
  auto avg = at::empty({B, C}, x.options());
  auto peak = at::empty({B, C}, x.options());
  auto index = at::empty({B, C}, x.options().dtype(at::kLong));
  const bool rows_last = channels_last(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_pool", [&] {
    const InputNorm<scalar_t, false> none;
    if (rows_last)
      pool_columns_all(x.data_ptr<scalar_t>(), none, B, C, S, avg.data_ptr<scalar_t>(), peak.data_ptr<scalar_t>(),
                       index.data_ptr<int64_t>());
    else
      pool_rows(x.data_ptr<scalar_t>(), none, B, C, S, avg.data_ptr<scalar_t>(), peak.data_ptr<scalar_t>(),
                index.data_ptr<int64_t>());
  });
  return {avg, peak, index};
}

// Channel-wise mean, max and first arg-max of y = x * mc at every position, without writing y.
std::vector<at::Tensor> gated_stats(const at::Tensor& x, const at::Tensor& mc) {
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2), K = chunks(S);
  auto mean = at::empty({B, S}, x.options());
  auto peak = at::empty({B, S}, x.options());
  auto index = at::empty({B, S}, x.options().dtype(at::kLong));
  const bool rows_last = channels_last(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_gated_stats", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = mc.data_ptr<scalar_t>();
    at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / K, s0 = (task % K) * kChunk, offset = b * S + s0;
        if (rows_last) {
          gated_rows(xp + offset * C, mp + b * C, InputNorm<scalar_t, false>{}, C, std::min(kChunk, S - s0),
                     mean.data_ptr<scalar_t>() + offset, peak.data_ptr<scalar_t>() + offset,
                     index.data_ptr<int64_t>() + offset);
          continue;
        }
        gated_chunk<true>(xp + b * C * S + s0, mp + b * C, InputNorm<scalar_t, false>{}, C, S, std::min(kChunk, S - s0),
                    mean.data_ptr<scalar_t>() + offset, peak.data_ptr<scalar_t>() + offset,
                    index.data_ptr<int64_t>() + offset);
      }
    });
  });
  return {mean, peak, index};
}

// out = y * mc * ms (relu(... + residual) with a residual shaped like x), y = x or, with input_affine
// (2, C), the BatchNorm map of x; out has x's shape and layout (the caller passes x unflattened).
at::Tensor apply(const at::Tensor& x, const at::Tensor& mc, const at::Tensor& ms,
                 const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& input_affine) {
  const int64_t B = x.size(0), C = x.size(1), S = x.numel() / std::max<int64_t>(B * C, 1);
  const bool rows_last = channels_last(x);
  const std::optional<at::Tensor> laid_residual =
      residual ? std::optional<at::Tensor>(laid_out_as(*residual, x)) : std::nullopt;
  if (residual) check_stored_as(x, *residual, "apply", "residual");
  auto out = output_cache::empty_like(x);
  with_storage(x, [&](auto compute_value, auto storage_value) {
    using scalar_t = decltype(compute_value);
    using storage_t = decltype(storage_value);
    const storage_t* xp = data_as<const storage_t>(x);
    const scalar_t* mp = mc.data_ptr<scalar_t>();
    const scalar_t* sp = ms.data_ptr<scalar_t>();
    const storage_t* rp = data_or_null<storage_t>(laid_residual);
    storage_t* op = data_as<storage_t>(out);
    with_input_norm<scalar_t>(input_affine, C, [&](auto norm) {
      if (rows_last) {
        const int64_t K = chunks(S);
        at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
          for (int64_t task = begin; task < end; ++task) {
            const int64_t b = task / K, s0 = (task % K) * kChunk, offset = (b * S + s0) * C;
            output_rows(xp + offset, norm, mp + b * C, sp + b * S + s0, rp ? rp + offset : nullptr, C,
                        std::min(kChunk, S - s0), op + offset);
          }
        });
        return;
      }
      at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r)
          output_row(xp + r * S, norm[r % C], mp[r], sp + (r / C) * S, rp ? rp + r * S : nullptr, S, op + r * S);
      });
    });
  });
  return out;
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
// Without indices (an inference) channel_index (unless pooled) and spatial_index come back empty, not computed.
// x is (B, C, *spatial), contiguous or channels-last; float32 or float64, or bfloat16 (with a bfloat16 residual;
// the weights and the vectors float32), read and written as stored and computed in float32. Returns out (shaped,
// laid out and typed like x), mc, ms, avg, peak, channel_index, mean, speak, spatial_index, logits.
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
                                const std::vector<at::Tensor>& pooled, bool indices) {
  const int64_t B = x.size(0), C = x.size(1), S = size[0] * size[1] * size[2];
  const int64_t I = conv_w.numel() / (kernel[0] * kernel[1] * kernel[2]);
  const bool rows_last = channels_last(x);
  const std::optional<at::Tensor> laid_residual =
      residual ? std::optional<at::Tensor>(laid_out_as(*residual, x)) : std::nullopt;
  const std::pair<double, double> spatial_norm =
      finish ? fixed_norm(norm_weight, norm_bias, running_mean, running_var, eps) : std::pair<double, double>(1, 0);
  check_positions(S);
  if (residual) check_stored_as(x, *residual, "forward", "residual");
  const auto compute = compute_options(x);
  auto vec = [&](int64_t n) { return at::empty({B, n}, compute); };
  auto idx = [&](int64_t n) { return at::empty({B, n}, x.options().dtype(at::kLong)); };
  at::Tensor out = !finish ? at::empty({0}, x.options()) : overwrite ? x : output_cache::empty_like(x);
  at::Tensor ms = finish ? vec(S) : at::empty({0}, compute);
  const bool pool_here = pooled.empty();
  at::Tensor mc = vec(C), avg = pool_here ? vec(C) : pooled[0], peak = pool_here ? vec(C) : pooled[1];
  at::Tensor channel_index = !pool_here ? pooled[2] : indices ? idx(C) : at::empty({0}, x.options().dtype(at::kLong));
  at::Tensor mean = vec(S), speak = vec(S), logits = vec(S);
  at::Tensor spatial_index = indices ? idx(S) : at::empty({0}, x.options().dtype(at::kLong));
  const bool blas_mlp = (fc1_w.numel() + fc2_w.numel()) > C * S;  // MLP weights outweigh a sample's x
  const auto run = [&](auto compute_value, auto storage_value) {
    using scalar_t = decltype(compute_value);
    using storage_t = decltype(storage_value);
    const auto mlp = channel_mlp<scalar_t>(avg_coef, max_coef, fc1_w, fc1_b, fc2_w, fc2_b, hard);
    with_input_norm<scalar_t>(input_affine, C, [&](auto norm) {
      OneCall<scalar_t, storage_t, decltype(norm)> call{
          data_as<const storage_t>(x), conv_w.data_ptr<scalar_t>(), data_or_null<storage_t>(laid_residual), mlp,
          norm, B, C, S, I, size.data(), kernel.data(), hard, finish, rows_last, spatial_norm.first,
          spatial_norm.second,
          finish ? data_as<storage_t>(out) : nullptr, finish ? ms.data_ptr<scalar_t>() : nullptr,
          mc.data_ptr<scalar_t>(), avg.data_ptr<scalar_t>(),
          peak.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), speak.data_ptr<scalar_t>(),
          logits.data_ptr<scalar_t>(), channel_index.numel() ? channel_index.data_ptr<int64_t>() : nullptr,
          indices ? spatial_index.data_ptr<int64_t>() : nullptr};
      if (!blas_mlp && pool_here) {  // sample by sample: its x stays in cache from the pooling to the output
        call.each_sample([&](int64_t b) {
          call.pool_and_mlp(b);
          call.rest(b);
        });
        return;
      }
      if (pool_here) call.pool_all();  // every sample pooled first, then the MLP, then the rest sample by sample
      if (blas_mlp) {
        mc = channel_gate(avg, peak, avg_coef, max_coef, fc1_w, fc1_b, fc2_w, fc2_b, hard);
        call.mc = mc.data_ptr<scalar_t>();
      } else {
        call.gate_all();
      }
      call.each_sample([&](int64_t b) { call.rest(b); });
    });
  };
  with_storage(x, run);
  return {out, mc, ms, avg, peak, channel_index, mean, speak, spatial_index, logits};
}

}  // namespace cbam_cpu
