// Vector helpers of the pass files: vectors as wide as the target's registers (GCC/Clang vector extensions), reductions over
// their lanes, a row scanned a vector at a time, lane-wise maxima with their positions, a dot product.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

namespace cbam_cpu {
namespace {

// The vectors' size: the target's widest registers. Wider vectors than the registers are no gain: on
// AVX2, 64-byte vectors made the passes with maxima 7-16x slower than 32-byte ones (their selects and
// compares came out as scalar code).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

// Vectors of values and of same-width integer positions (GCC/Clang vector extensions).
template <typename scalar_t>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float Values __attribute__((vector_size(kVectorBytes)));
  typedef int32_t Positions __attribute__((vector_size(kVectorBytes)));
};
template <>
struct Lanes<double> {
  typedef double Values __attribute__((vector_size(kVectorBytes)));
  typedef int64_t Positions __attribute__((vector_size(kVectorBytes)));
};

// bfloat16 as the large tensors may hold it (CPU autocast's convs return it): a float's top 16 bits. The
// passes compute in float; each value is widened exactly as it is read and narrowed, rounded to nearest
// even (NaN: a quiet NaN) as torch rounds, as it is written. Other storage types are the compute type.
// Always inlined: the passes with their own optimize attributes (no reassociation) would call them.
struct Bf16 {
  uint16_t bits;
};

__attribute__((always_inline)) inline float widen(Bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
template <typename scalar_t>
__attribute__((always_inline)) inline scalar_t widen(scalar_t v) {
  return v;
}

template <typename storage_t, typename scalar_t>
__attribute__((always_inline)) inline storage_t narrow(scalar_t v) {
  if constexpr (std::is_same_v<storage_t, Bf16>) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return Bf16{static_cast<uint16_t>(v != v ? 0x7FC0u : rounded)};
  } else {
    return v;
  }
}

// The width of a vector of scalar_t, and one read from storage (storage_t: scalar_t, or Bf16 widened).
template <typename scalar_t>
constexpr int kLanes = sizeof(typename Lanes<scalar_t>::Values) / sizeof(scalar_t);

template <typename scalar_t, typename storage_t>
__attribute__((always_inline)) inline typename Lanes<scalar_t>::Values load_values(const storage_t* at) {
  typename Lanes<scalar_t>::Values v;
  if constexpr (std::is_same_v<storage_t, Bf16>) {
    typedef uint16_t Halves __attribute__((vector_size(kVectorBytes / 2)));
    typedef uint32_t Bits __attribute__((vector_size(kVectorBytes)));
    Halves halves;
    std::memcpy(&halves, at, sizeof(halves));
    const Bits bits = __builtin_convertvector(halves, Bits) << 16;
    std::memcpy(&v, &bits, sizeof(v));
  } else {
    std::memcpy(&v, at, sizeof(v));
  }
  return v;
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
// The row's values are scalar_t, stored as storage_t (scalar_t, or Bf16 widened as read).
template <typename scalar_t, typename storage_t = scalar_t, typename Visit>
void scan_row(const storage_t* row, int64_t S, Visit visit) {
  using Values = typename Lanes<scalar_t>::Values;
  using Positions = typename Lanes<scalar_t>::Positions;
  using Position = typename std::remove_reference<decltype(Positions{}[0])>::type;
  constexpr int kWidth = kLanes<scalar_t>;
  const Positions every = Positions{} - 1;  // a mask of all lanes
  Positions positions;
  for (int l = 0; l < kWidth; ++l) positions[l] = l;
  int64_t s = 0;
  for (; s + kWidth <= S; s += kWidth) {
    visit(load_values<scalar_t>(row + s), positions, every);
    positions += kWidth;
  }
  if (s == S) return;
  Values v = widen(row[0]) + Values{};
  if (S >= kWidth) {
    v = load_values<scalar_t>(row + S - kWidth);
    positions -= static_cast<Position>(s - (S - kWidth));
    visit(v, positions, positions >= static_cast<Position>(s) + Positions{});
  } else {
    if constexpr (std::is_same_v<storage_t, scalar_t>)
      std::memcpy(&v, row, S * sizeof(scalar_t));
    else
      for (int64_t l = 0; l < S; ++l) v[l] = widen(row[l]);
    const Positions inside = positions < static_cast<Position>(S) + Positions{};
    visit(v, inside ? positions : Positions{}, inside);
  }
}

// Each lane's maximum over the vectors taken, with (kTrack) the first position where it was reached,
// from a first value at position 0.
template <typename scalar_t, bool kTrack = true>
struct LaneMaximum {
  using Values = typename Lanes<scalar_t>::Values;
  using Positions = typename Lanes<scalar_t>::Positions;
  Values best;
  Positions at = {};

  explicit LaneMaximum(scalar_t first) : best(first + Values{}) {}

  void take(Values v, Positions positions) {
    const Positions above = v > best;
    best = above ? v : best;
    if constexpr (kTrack) at = above ? positions : at;
  }

  // The maximum over all lanes and its first position (0 where none equals it: a NaN first value; 0
  // without kTrack).
  std::pair<scalar_t, int64_t> result() const {
    const scalar_t peak = fold_lanes(best, [](auto a, auto b) { return b > a ? b : a; });
    if constexpr (!kTrack) return {peak, 0};
    const auto none = std::numeric_limits<typename std::remove_reference<decltype(at[0])>::type>::max();
    const Positions candidates = best == peak + Values{} ? at : none + Positions{};
    const int64_t first = fold_lanes(candidates, [](auto a, auto b) { return b < a ? b : a; });
    return {peak, first == none ? 0 : first};
  }
};

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

}  // namespace
}  // namespace cbam_cpu
