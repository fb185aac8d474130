// Tests for sluice::backoff: exponential sequences, cap, jitter, retry budget, forgetting, bounds.
#include <sluice/backoff.hpp>

#include "test_support.hpp"

#include <atomic>
#include <cmath>
#include <chrono>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using sluice::backoff;
using sluice::backoff_options;
using sluice::jitter_mode;

namespace {
std::vector<std::chrono::nanoseconds> delays(backoff<std::string>& b, const std::string& key, int n) {
  std::vector<std::chrono::nanoseconds> out;
  for (int i = 0; i < n; ++i) {
    const auto d = b.failure(key);
    REQUIRE(d);
    out.push_back(d.delay);
  }
  return out;
}
}  // namespace

TEST_CASE("backoff: delays double from base and stop at the cap") {
  backoff<std::string> b({.base = 10ms, .max = 100ms});
  CHECK(delays(b, "k", 7) == std::vector<std::chrono::nanoseconds>{10ms, 20ms, 40ms, 80ms, 100ms, 100ms, 100ms});
  CHECK(b.failures("k") == 7);
  CHECK(b.size() == 1);
}

TEST_CASE("backoff: multiplier 1 is constant and a fractional multiplier is exact enough") {
  backoff<std::string> flat({.base = 7ms, .max = 7ms, .multiplier = 1.0});
  CHECK(delays(flat, "k", 3) == std::vector<std::chrono::nanoseconds>{7ms, 7ms, 7ms});
  backoff<std::string> slow({.base = 100ms, .max = 1s, .multiplier = 1.5});
  CHECK(delays(slow, "k", 4) == std::vector<std::chrono::nanoseconds>{100ms, 150ms, 225ms, 337500us});
}

TEST_CASE("backoff: keys are independent and forget resets a key") {
  backoff<std::string> b({.base = 1ms, .max = 1s});
  (void)b.failure("a");
  (void)b.failure("a");
  CHECK(b.failure("b").delay == 1ms);
  CHECK(b.failure("a").delay == 4ms);
  CHECK(b.forget("a"));
  CHECK_FALSE(b.forget("a"));
  CHECK(b.failures("a") == 0);
  CHECK(b.size() == 1);
  CHECK(b.failure("a").delay == 1ms);  // starts over
}

TEST_CASE("backoff: max_retries gives up after the budget and forgets the key") {
  backoff<int> b({.base = 1ms, .max = 1s, .max_retries = 3});
  for (std::uint32_t i = 1; i <= 3; ++i) {
    const auto d = b.failure(42);
    CHECK(d);
    CHECK(d.failures == i);
  }
  const auto last = b.failure(42);
  CHECK_FALSE(last);
  CHECK(last.give_up);
  CHECK(last.failures == 4);
  CHECK(last.delay == 0ns);
  CHECK(b.size() == 0);  // a given-up key holds no state
  CHECK(b.failure(42).delay == 1ms);

  backoff<int> none({.base = 1ms, .max = 1s, .max_retries = 0});
  CHECK(none.failure(1).give_up);
  CHECK(none.size() == 0);
}

TEST_CASE("backoff: full and equal jitter use the injected random source") {
  double u = 0.0;
  auto source = [&u] { return u; };
  backoff<int> full({.base = 100ms, .max = 1s, .jitter = jitter_mode::full}, source);
  backoff<int> equal({.base = 100ms, .max = 1s, .jitter = jitter_mode::equal}, source);
  u = 0.0;
  CHECK(full.failure(1).delay == 0ms);
  CHECK(equal.failure(1).delay == 50ms);
  u = 0.5;
  CHECK(full.failure(1).delay == 100ms);   // second failure: 200 ms * 0.5
  CHECK(equal.failure(1).delay == 150ms);  // 100 ms + 0.5 * 100 ms
  u = 0.999;
  CHECK(full.failure(1).delay <= 400ms);
  CHECK(full.failure(1).delay >= 700ms);   // fourth: 800 ms * 0.999
  u = 7.0;                                 // a bad source is clamped into [0, 1]
  CHECK(equal.failure(1).delay == 400ms);  // third: 400 ms, capped at the full value
}

TEST_CASE("backoff: default jitter stays within its bounds") {
  backoff<int> b({.base = 10ms, .max = 80ms, .jitter = jitter_mode::equal});
  for (int key = 0; key < 200; ++key) {
    for (int i = 1; i <= 5; ++i) {
      const auto expected = b.exponential(static_cast<std::uint32_t>(i));
      const auto d = b.failure(key).delay;
      CHECK(d >= expected / 2);
      CHECK(d <= expected);
    }
  }
}

TEST_CASE("backoff: huge exponents are capped, never overflow") {
  backoff<int> b({.base = 1s, .max = std::chrono::hours(24 * 365), .multiplier = 1000.0});
  for (int i = 0; i < 100; ++i) (void)b.failure(1);
  CHECK(b.failure(1).delay == std::chrono::hours(24 * 365));
  CHECK(b.exponential(std::numeric_limits<std::uint32_t>::max()) == std::chrono::hours(24 * 365));
}

TEST_CASE("backoff: bad configuration throws naming the parameter and value") {
  CHECK_THROWS_WITH(backoff<int>({.base = 0ns}), "sluice::backoff: base must be > 0, got 0ns");
  CHECK_THROWS_WITH(backoff<int>({.base = 10ns, .max = 5ns}), "sluice::backoff: max must be >= base (10ns), got 5ns");
  CHECK_THROWS_WITH(backoff<int>({.multiplier = 0.5}), "sluice::backoff: multiplier must be finite and >= 1, got 0.500000");
  CHECK_THROWS_AS(backoff<int>({.multiplier = std::numeric_limits<double>::infinity()}), std::invalid_argument);
  CHECK_THROWS_AS(backoff<int>({.multiplier = std::numeric_limits<double>::quiet_NaN()}), std::invalid_argument);
}

TEST_CASE("backoff: a throwing random source records nothing") {
  bool fail = true;
  backoff<int> b({.jitter = jitter_mode::full}, [&fail]() -> double {
    if (fail) throw std::runtime_error("entropy");
    return 0.5;
  });
  CHECK_THROWS_AS(b.failure(1), std::runtime_error);
  CHECK(b.size() == 0);
  fail = false;
  CHECK(b.failure(1).failures == 1);
}

TEST_CASE("backoff: 1M distinct failing keys forgotten leave no state and give memory back") {
  backoff<std::uint64_t> b({.base = 1ms, .max = 1s});
  const std::uint64_t n = sluice_test::scaled(1'000'000);
  for (std::uint64_t k = 0; k < n; ++k) (void)b.failure(k);
  CHECK(b.size() == n);
  const auto peak_buckets = b.bucket_count();
  std::size_t bad = 0;  // one CHECK per phase, not per key: Catch2 assertions are slow in Debug
  for (std::uint64_t k = 0; k < n; ++k) {
    if (k % 100 != 0) bad += !b.forget(k);
  }
  CHECK(bad == 0);
  CHECK(b.size() == n / 100);
  CHECK(b.bucket_count() < peak_buckets / 4);  // shrank with the failing set
  for (std::uint64_t k = 0; k < n; k += 100) bad += !b.forget(k);
  CHECK(bad == 0);
  CHECK(b.size() == 0);
  CHECK(b.bucket_count() <= 64);
}

TEST_CASE("backoff: concurrent failures and forgets balance") {
  for (int threads : sluice_test::thread_counts<>) {
    INFO("threads " << threads);
    backoff<int> b({.base = 1ms, .max = 1s, .max_retries = 1000});
    const int per = static_cast<int>(sluice_test::scaled(20'000));
    std::atomic<int> gave_up{0};  // Catch2 assertions are not thread-safe: count, check after
    std::vector<std::jthread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        for (int i = 0; i < per; ++i) {
          const int key = t * 1'000'000 + i % 97;
          if (!b.failure(key)) ++gave_up;
          if (i % 3 == 0) (void)b.forget(key);
        }
        for (int i = 0; i < 97; ++i) (void)b.forget(t * 1'000'000 + i);
      });
    }
    ts.clear();
    CHECK(gave_up == 0);
    CHECK(b.size() == 0);
  }
}

// Issue 7, bug 1: the jitter used to go through double and back; with `max` at or near
// nanoseconds::max() the product rounded up to 2^63 (undefined conversion, INT64_MIN on x86) and
// with max = 2^60-1 it came out 1 ns above the cap. Every delay must lie in [0, max], exactly at
// the ends for u = 0 and u = 1.
TEST_CASE("backoff: jittered delays stay in [0, max] even at nanoseconds::max()") {
  using ns = std::chrono::nanoseconds;
  const double below_one = std::nextafter(1.0, 0.0);
  const std::vector<ns> maxima{ns::max(), ns::max() - 1ns, ns((std::int64_t{1} << 60) - 1), ns(std::int64_t{1} << 53),
                               ns((std::int64_t{1} << 53) + 1), 1000s, 3ns, 1ns};
  const std::vector<double> randoms{0.0, 1e-300, 0.5, 0.999, below_one, 1.0};
  for (const ns max : maxima) {
    for (const double u : randoms) {
      INFO("max " << max.count() << "ns, random " << u);
      // base = max: the very first failure is already capped, so the jitter sees the largest value.
      backoff<int> full({.base = max, .max = max, .jitter = jitter_mode::full}, [u] { return u; });
      backoff<int> equal({.base = max, .max = max, .jitter = jitter_mode::equal}, [u] { return u; });
      backoff<int> none({.base = max, .max = max, .jitter = jitter_mode::none}, [u] { return u; });
      const ns f = full.failure(1).delay;
      const ns e = equal.failure(1).delay;
      CHECK(none.failure(1).delay == max);
      CHECK(f >= 0ns);
      CHECK(f <= max);
      CHECK(e >= max / 2);
      CHECK(e <= max);
      if (u == 0.0) {
        CHECK(f == 0ns);
        CHECK(e == max / 2);
      }
      if (u == 1.0) {
        CHECK(f == max);
        CHECK(e == max);
      }
      // Later failures stay capped (the exponent keeps growing).
      CHECK(full.failure(1).delay <= max);
      CHECK(equal.failure(1).delay <= max);
    }
  }
}

TEST_CASE("backoff: jitter is monotone in the random value and close to delay * u") {
  const std::chrono::nanoseconds d = 800ms;
  std::chrono::nanoseconds previous{-1};
  for (int i = 0; i <= 1000; ++i) {
    const double u = i / 1000.0;
    backoff<int> full({.base = d, .max = d, .jitter = jitter_mode::full}, [u] { return u; });
    const auto got = full.failure(1).delay;
    CHECK(got >= previous);
    previous = got;
    const double expected = static_cast<double>(d.count()) * u;
    CHECK(std::abs(static_cast<double>(got.count()) - expected) <= 1.0 + static_cast<double>(d.count()) * 0x1p-32);
  }
}

TEST_CASE("backoff: a random source outside [0, 1] (NaN, inf, negative) is clamped") {
  const std::chrono::nanoseconds max = std::chrono::nanoseconds::max();
  for (const double u : {std::numeric_limits<double>::quiet_NaN(), -std::numeric_limits<double>::infinity(), -0.5,
                         std::numeric_limits<double>::infinity(), 7.0}) {
    INFO("random " << u);
    backoff<int> full({.base = max, .max = max, .jitter = jitter_mode::full}, [u] { return u; });
    backoff<int> equal({.base = max, .max = max, .jitter = jitter_mode::equal}, [u] { return u; });
    const auto f = full.failure(1).delay;
    const auto e = equal.failure(1).delay;
    CHECK(f >= std::chrono::nanoseconds::zero());
    CHECK(f <= max);
    CHECK(e >= max / 2);
    CHECK(e <= max);
    if (u > 1.0) CHECK(f == max);
    if (!(u > 0.0)) CHECK(f == std::chrono::nanoseconds::zero());  // NaN and negatives count as 0
  }
}

TEST_CASE("backoff: exponential() never exceeds max, for any max") {
  using ns = std::chrono::nanoseconds;
  for (const ns max : {ns::max(), ns((std::int64_t{1} << 60) - 1), ns((std::int64_t{1} << 53) + 1), ns(1000s)}) {
    INFO("max " << max.count());
    backoff<int> b({.base = 1ns, .max = max, .multiplier = 1.9999});
    ns previous{0};
    for (std::uint32_t n = 1; n < 200; ++n) {
      const ns d = b.exponential(n);
      CHECK(d >= previous);
      CHECK(d <= max);
      previous = d;
    }
    CHECK(previous == max);
  }
}
