// sluice/detail/reconcile_histogram.hpp — sluice::reconcile_histogram, the fixed-size log-linear
// histogram reconcile_pipeline's metrics() returns (the type is public; the file is an internal
// part of reconcile_pipeline.hpp).
//
// 252 buckets cover every value from 0 ns to 2^64 ns: values below 4 ns get one bucket each, then
// every power of two is split into 4 equal sub-buckets, so a bucket is at most 25% wide and a
// percentile read from it is within 25% of the true value (interpolated linearly inside the
// bucket, clamped to the largest value recorded). 2 KiB, no allocation, no locking of its own: the
// owner records under its own lock and hands out copies.
#pragma once

#include <array>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace sluice {

class reconcile_histogram {
 public:
  static constexpr std::size_t bucket_count = 252;

  /// Adds one observation (negative durations count as 0). Never allocates.
  void record(std::chrono::nanoseconds d) noexcept {
    const std::uint64_t v = d.count() <= 0 ? 0 : static_cast<std::uint64_t>(d.count());
    ++counts_[index_of(v)];
    ++count_;
    sum_ += v;
    if (v > max_) max_ = v;
  }

  /// Adds every observation of `other`. Never allocates.
  void merge(const reconcile_histogram& other) noexcept {
    for (std::size_t i = 0; i < bucket_count; ++i) counts_[i] += other.counts_[i];
    count_ += other.count_;
    sum_ += other.sum_;
    if (other.max_ > max_) max_ = other.max_;
  }

  [[nodiscard]] std::uint64_t count() const noexcept { return count_; }
  [[nodiscard]] std::chrono::nanoseconds sum() const noexcept { return ns(sum_); }
  [[nodiscard]] std::chrono::nanoseconds max() const noexcept { return ns(max_); }
  [[nodiscard]] std::chrono::nanoseconds mean() const noexcept {
    return count_ == 0 ? std::chrono::nanoseconds::zero() : ns(sum_ / count_);
  }

  /// The q-quantile (0 <= q <= 1; 0.5 = median, 0.99 = p99): the ceil(q * count())-th smallest
  /// observation, interpolated linearly inside its bucket, clamped to max(). Zero when empty.
  [[nodiscard]] std::chrono::nanoseconds percentile(double q) const noexcept {
    if (count_ == 0) return std::chrono::nanoseconds::zero();
    if (!(q > 0.0)) q = 0.0;
    if (q > 1.0) q = 1.0;
    auto rank = static_cast<std::uint64_t>(std::ceil(q * static_cast<double>(count_)));
    if (rank == 0) rank = 1;
    std::uint64_t seen = 0;
    for (std::size_t i = 0; i < bucket_count; ++i) {
      if (seen + counts_[i] >= rank) {
        const double lower = static_cast<double>(lower_bound(i));
        const double upper = i + 1 < bucket_count ? static_cast<double>(lower_bound(i + 1)) : static_cast<double>(max_);
        const double within = static_cast<double>(rank - seen) / static_cast<double>(counts_[i]);
        const double v = lower + (upper - lower) * within;
        const double top = static_cast<double>(max_);
        return ns(static_cast<std::uint64_t>(v < top ? v : top));
      }
      seen += counts_[i];
    }
    return ns(max_);
  }

  /// Observations in bucket i, which holds values in [lower_bound(i), lower_bound(i + 1)).
  [[nodiscard]] std::uint64_t bucket(std::size_t i) const noexcept { return counts_[i]; }

  /// Smallest value (ns) bucket i holds.
  [[nodiscard]] static constexpr std::uint64_t lower_bound(std::size_t i) noexcept {
    if (i < 4) return i;
    const std::size_t msb = i / 4 + 1;
    const std::uint64_t sub = i % 4;
    return (4 + sub) << (msb - 2);
  }

  /// Bucket holding value v (ns).
  [[nodiscard]] static constexpr std::size_t index_of(std::uint64_t v) noexcept {
    if (v < 4) return static_cast<std::size_t>(v);
    const auto msb = static_cast<std::size_t>(std::bit_width(v) - 1);  // >= 2
    const auto sub = static_cast<std::size_t>((v >> (msb - 2)) & 3);
    return (msb - 1) * 4 + sub;
  }

 private:
  static std::chrono::nanoseconds ns(std::uint64_t v) noexcept {
    constexpr auto top = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    return std::chrono::nanoseconds(static_cast<std::int64_t>(v > top ? top : v));
  }

  std::array<std::uint64_t, bucket_count> counts_{};
  std::uint64_t count_ = 0;
  std::uint64_t sum_ = 0;
  std::uint64_t max_ = 0;
};

static_assert(reconcile_histogram::index_of(3) == 3 && reconcile_histogram::index_of(4) == 4 &&
              reconcile_histogram::index_of(8) == 8 && reconcile_histogram::lower_bound(8) == 8 &&
              reconcile_histogram::index_of(~std::uint64_t{0}) == reconcile_histogram::bucket_count - 1);

}  // namespace sluice
