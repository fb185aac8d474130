// Tests for sluice::backoff: exponential sequences, cap, jitter, retry budget, forgetting, bounds.
#include <sluice/backoff.hpp>

#include "test_support.hpp"

#include <atomic>
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
  for (int threads : {1, 2, 4, 8}) {
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
