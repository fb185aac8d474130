// sluice/backoff.hpp — per-key exponential failure backoff with an optional retry budget.
//
// What it is for: a reconcile loop that fails on a key asks `failure(key)` how long to wait before
// retrying (typically feeding requeue_queue::schedule), and calls `forget(key)` the moment the key
// succeeds. The n-th consecutive failure of a key waits
//     min(max, base * multiplier^(n-1)), then jittered:
//       none:  that value;   full: uniform in [0, value];   equal: value/2 + uniform in [0, value/2]
// With `max_retries` set, the failure after max_retries retries says give up instead of a delay.
//
// Requirements: Key satisfies sluice::hashable_key<Key, Hash, KeyEqual> (key.hpp: copyable,
// hashable, equality-comparable; a key without std::hash is reported in one readable line). The random source, if
// given, returns doubles in [0, 1] (values outside are clamped, NaN counts as 0); it is called
// under the backoff's lock, so it needs no locking of its own but must not call back into this
// backoff.
//
// Guarantees:
// - State exists only for keys failing now: forget() erases the key, and a give-up erases it too
//   (the caller is dropping the key; if it fails again later it starts a fresh budget). So the
//   state never outgrows the set of currently failing keys (client-go's failure map leaked when
//   Forget was not called, kubernetes#138743), and its memory shrinks when that set does.
// - Every delay lies in [0, max]: the exponent is evaluated in floating point and capped before
//   converting; jitter is applied in integer arithmetic (a 32-bit fraction of the delay), so even
//   max = nanoseconds::max() ("no cap") is exact at both ends.
// - Configuration is validated: std::invalid_argument naming the parameter and value.
// - Thread-safe (one internal mutex; each call is a hash lookup, O(1)).
// Never: sleeps, owns a timer, or remembers a key that succeeded.
//
// Example:
//   sluice::backoff<std::string> retry({.base = 10ms, .max = 5min, .max_retries = 8});
//   if (auto d = retry.failure(key)) (void)queue.schedule(key, item, d.delay);
//   else report_given_up(key, d.failures);
//   retry.forget(key);                              // once the key succeeds
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>

#include "key.hpp"

namespace sluice {

enum class jitter_mode {
  none,   ///< exactly the exponential delay
  full,   ///< uniform in [0, delay]
  equal,  ///< delay/2 + uniform in [0, delay/2]
};

/// Configuration of a backoff. Defaults follow client-go's per-item limiter (5 ms .. 1000 s, x2).
struct backoff_options {
  std::chrono::nanoseconds base = std::chrono::milliseconds(5);  ///< first delay, > 0
  std::chrono::nanoseconds max = std::chrono::seconds(1000);     ///< largest delay, >= base
  double multiplier = 2.0;                                       ///< growth per failure, >= 1
  jitter_mode jitter = jitter_mode::none;
  std::optional<std::uint32_t> max_retries = std::nullopt;  ///< give up on the failure after this many retries
};

/// What failure() decided. Converts to true when the caller should retry after `delay`.
struct [[nodiscard]] backoff_decision {
  std::chrono::nanoseconds delay{};  ///< wait this long before retrying (zero when giving up)
  std::uint32_t failures = 0;        ///< consecutive failures of the key, this one included
  bool give_up = false;              ///< the retry budget is spent; the key's state was erased
  explicit operator bool() const noexcept { return !give_up; }
};

template <class Key, class Hash = std::hash<Key>, class KeyEqual = std::equal_to<Key>>
class backoff {
  static_assert(hashable_key<Key, Hash, KeyEqual>,
                "sluice::backoff<Key>: Key must be copyable, hashable and equality-comparable: "
                "give it a std::hash<Key> specialisation and operator==, or pass Hash / KeyEqual "
                "(see sluice::hashable_key in <sluice/key.hpp>)");
  // The map's hash and equality: Hash / KeyEqual, or stand-ins when the assertion above fails (so
  // that it is the only error).
  using map_type = std::unordered_map<Key, std::uint32_t, detail::checked_hash<Key, Hash, KeyEqual>,
                                      detail::checked_key_equal<Key, Hash, KeyEqual>>;

 public:
  using random_source = std::function<double()>;

  /// Validates `options` (std::invalid_argument naming the parameter and value). `random` is
  /// required only for jitter; by default a std::mt19937_64 seeded from std::random_device.
  explicit backoff(backoff_options options = {}, random_source random = {})
      : options_(options), random_(std::move(random)) {
    using namespace std::string_literals;
    if (options_.base <= options_.base.zero()) {
      throw std::invalid_argument("sluice::backoff: base must be > 0, got "s + ns(options_.base));
    }
    if (options_.max < options_.base) {
      throw std::invalid_argument("sluice::backoff: max must be >= base ("s + ns(options_.base) + "), got " +
                                  ns(options_.max));
    }
    if (!(options_.multiplier >= 1.0) || !std::isfinite(options_.multiplier)) {
      throw std::invalid_argument("sluice::backoff: multiplier must be finite and >= 1, got " +
                                  std::to_string(options_.multiplier));
    }
    if (!random_) {
      random_ = [engine = std::mt19937_64(std::random_device{}())]() mutable {
        return std::uniform_real_distribution<double>(0.0, 1.0)(engine);
      };
    }
  }

  backoff(const backoff&) = delete;
  backoff& operator=(const backoff&) = delete;

  /// Records a failure of `key` and returns the delay before its next attempt, or give-up once
  /// the budget is spent (which also forgets the key). Thread-safe. May allocate (the key's entry
  /// on its first failure). If the random source throws, nothing is recorded.
  backoff_decision failure(const Key& key) {
    std::lock_guard lock(mutex_);
    auto it = failures_.find(key);
    const std::uint32_t previous = it == failures_.end() ? 0 : it->second;
    const std::uint32_t n = previous == UINT32_MAX ? previous : previous + 1;
    if (options_.max_retries && n > *options_.max_retries) {
      if (it != failures_.end()) erase_locked(it);
      return backoff_decision{std::chrono::nanoseconds::zero(), n, true};
    }
    const auto delay = jittered_locked(exponential(n));  // may throw (random source): not yet recorded
    if (it == failures_.end()) {
      failures_.emplace(key, n);
    } else {
      it->second = n;
    }
    return backoff_decision{delay, n, false};
  }

  /// The delay the n-th consecutive failure gets before jitter (n >= 1). Thread-safe. Never
  /// allocates.
  [[nodiscard]] std::chrono::nanoseconds exponential(std::uint32_t n) const noexcept {
    const double base = static_cast<double>(options_.base.count());
    const double cap = static_cast<double>(options_.max.count());
    const double value = base * std::pow(options_.multiplier, static_cast<double>(n == 0 ? 0 : n - 1));
    // double(max) is the double nearest to max, so every double below it is <= max and converts
    // to int64 without overflow; the std::min guards the argument anyway.
    if (!(value < cap)) return options_.max;  // also inf / NaN
    return std::min(options_.max, std::chrono::nanoseconds(static_cast<std::int64_t>(value)));
  }

  /// Erases `key`'s failure state (call on success); returns whether it had any. Thread-safe.
  /// Never allocates (may release memory).
  bool forget(const Key& key) {
    std::lock_guard lock(mutex_);
    auto it = failures_.find(key);
    if (it == failures_.end()) return false;
    erase_locked(it);
    return true;
  }

  /// Consecutive failures recorded for `key` (0 if none). Thread-safe. Never allocates.
  [[nodiscard]] std::uint32_t failures(const Key& key) const {
    std::lock_guard lock(mutex_);
    auto it = failures_.find(key);
    return it == failures_.end() ? 0 : it->second;
  }

  /// Number of keys currently failing. Thread-safe. Never allocates.
  [[nodiscard]] std::size_t size() const noexcept {
    std::lock_guard lock(mutex_);
    return failures_.size();
  }

  /// Buckets in the failure map (a diagnostic for the shrink guarantee). Thread-safe.
  [[nodiscard]] std::size_t bucket_count() const noexcept {
    std::lock_guard lock(mutex_);
    return failures_.bucket_count();
  }

  [[nodiscard]] const backoff_options& options() const noexcept { return options_; }

 private:
  static std::string ns(std::chrono::nanoseconds d) { return std::to_string(d.count()) + "ns"; }

  // Jitter in integers, so the result provably lies in [0, d] (and d <= max): the random value
  // becomes a 32-bit fraction q / 2^32 with q in [0, 2^32], and floor(d * q / 2^32) is computed
  // exactly without a 128-bit type. (Going through double rounded d = nanoseconds::max() up to
  // 2^63, whose conversion back to int64 is undefined; issue 7.)
  std::chrono::nanoseconds jittered_locked(std::chrono::nanoseconds d) {
    if (options_.jitter == jitter_mode::none) return d;
    const std::uint64_t q = fraction_of(random_());
    const auto x = static_cast<std::uint64_t>(d.count());  // 0 < d <= max <= INT64_MAX
    const std::uint64_t out = options_.jitter == jitter_mode::full ? scale(x, q) : x / 2 + scale(x - x / 2, q);
    return std::chrono::nanoseconds(static_cast<std::int64_t>(out));  // out <= x: in range
  }

  static constexpr std::uint64_t one = std::uint64_t{1} << 32;  // the fraction 1.0

  // u clamped into [0, 1] (NaN counts as 0), as a fraction of `one`, rounded down.
  static std::uint64_t fraction_of(double u) noexcept {
    if (!(u > 0.0)) return 0;  // also NaN
    if (!(u < 1.0)) return one;
    return static_cast<std::uint64_t>(u * static_cast<double>(one));  // in [0, 2^32): exact scaling
  }

  // floor(x * q / 2^32) for x < 2^63, q <= 2^32, never above x. With x = hi * 2^32 + lo:
  // hi * q < 2^63 and lo * q < 2^64, and the hi part divides exactly.
  static constexpr std::uint64_t scale(std::uint64_t x, std::uint64_t q) noexcept {
    const std::uint64_t hi = x >> 32;
    const std::uint64_t lo = x & (one - 1);
    return hi * q + ((lo * q) >> 32);
  }

  void erase_locked(typename map_type::iterator it) noexcept {
    failures_.erase(it);
    // unordered_map never shrinks its bucket array on erase; give memory back when the failing
    // set has shrunk to an eighth of it (amortised O(1): the rehash follows many erasures).
    if (failures_.empty()) {
      if (failures_.bucket_count() > 64) {
        try {
          map_type fresh(0, failures_.hash_function(), failures_.key_eq());
          failures_.swap(fresh);
        } catch (...) {
        }
      }
    } else if (failures_.bucket_count() > 64 && failures_.size() * 8 < failures_.bucket_count()) {
      try {
        failures_.rehash(0);  // libstdc++/libc++ shrink to fit size()/max_load_factor()
      } catch (...) {
      }
    }
  }

  const backoff_options options_;
  mutable std::mutex mutex_;
  random_source random_;
  map_type failures_;
};

}  // namespace sluice
