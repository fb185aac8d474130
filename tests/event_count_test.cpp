// Tests for the parking primitive every blocking call in sluice is built on.
// event_count_portable_test.cpp compiles this same file with SLUICE_PORTABLE_PARKING, so the
// mutex + condition variable fallback is tested too.
#include <sluice/detail/wait.hpp>
#include <sluice/event_count.hpp>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <limits>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using sluice::detail::block_until;
using sluice::event_count;
using sluice::detail::wait_outcome;

TEST_CASE("event_count: a parked waiter is woken by notify_one after the condition is set") {
  event_count ec;
  std::atomic<bool> flag{false};
  std::atomic<bool> woke{false};
  std::jthread waiter([&] {
    const auto outcome = block_until(ec, [&] { return flag.load(); }, std::nullopt, nullptr);
    woke = outcome == wait_outcome::ready;
  });
  // Wait until the waiter is parked (registered), without sleeping on a deadline. If it never
  // registers, the check fails and the test goes on (the waiter then sees the flag by itself).
  CHECK(sluice_test::eventually([&] { return ec.has_waiters(); }));
  flag = true;
  ec.notify_one();
  waiter.join();
  CHECK(woke);
  CHECK_FALSE(ec.has_waiters());
}

TEST_CASE("event_count: notify_all wakes every waiter") {
  for (int threads : sluice_test::thread_counts<>) {
    event_count ec;
    std::atomic<bool> flag{false};
    std::atomic<int> woke{0};
    std::vector<std::jthread> waiters;
    for (int i = 0; i < threads; ++i) {
      waiters.emplace_back([&] {
        if (block_until(ec, [&] { return flag.load(); }, std::nullopt, nullptr) == wait_outcome::ready) ++woke;
      });
    }
    flag = true;
    ec.notify_all();
    waiters.clear();
    CHECK(woke == threads);
  }
}

TEST_CASE("event_count: a deadline that passes returns timeout, a past deadline returns at once") {
  event_count ec;
  const auto start = std::chrono::steady_clock::now();
  CHECK(block_until(ec, [] { return false; }, start + 20ms, nullptr) == wait_outcome::timeout);
  CHECK(std::chrono::steady_clock::now() - start >= 20ms);
  CHECK(block_until(ec, [] { return false; }, start - 1h, nullptr) == wait_outcome::timeout);
  CHECK(block_until(ec, [] { return true; }, start - 1h, nullptr) == wait_outcome::ready);
  CHECK_FALSE(ec.has_waiters());
}

TEST_CASE("event_count: a stop request wakes a parked waiter with cancelled") {
  event_count ec;
  std::stop_source source;
  std::atomic<int> outcome{-1};
  std::jthread waiter([&] {
    const auto token = source.get_token();
    outcome = static_cast<int>(block_until(ec, [] { return false; }, std::nullopt, &token));
  });
  CHECK(sluice_test::eventually([&] { return ec.has_waiters(); }));  // parked (else: stopped before parking)
  source.request_stop();
  waiter.join();
  CHECK(outcome == static_cast<int>(wait_outcome::cancelled));
  // Already stopped: returns without parking.
  const auto token = source.get_token();
  CHECK(block_until(ec, [] { return false; }, std::nullopt, &token) == wait_outcome::cancelled);
}

TEST_CASE("event_count: deadline helpers saturate instead of overflowing") {
  using sluice::detail::deadline_after;
  using sluice::detail::steady_time;
  using sluice::detail::to_steady;
  CHECK(deadline_after(std::chrono::hours::max()) == steady_time::max());
  CHECK(deadline_after(std::chrono::nanoseconds::max()) == steady_time::max());
  const auto past = deadline_after(-1h);
  CHECK(past <= std::chrono::steady_clock::now());
  // Far in the future (and not wrapped around into the past).
  const auto far = to_steady(std::chrono::system_clock::time_point::max());
  CHECK(far > std::chrono::steady_clock::now() + std::chrono::hours(24 * 365 * 100));
  CHECK(to_steady(std::chrono::time_point<std::chrono::steady_clock, std::chrono::hours>::max()) ==
        steady_time::max());
  const auto soon = std::chrono::system_clock::now() + 1s;
  const auto converted = to_steady(soon);
  const auto now = std::chrono::steady_clock::now();
  CHECK(converted > now + 900ms);
  CHECK(converted < now + 1100ms);
}

TEST_CASE("event_count: a NaN timeout or time point is already expired, infinities saturate") {
  // Issue 7: deadline_after(NaN) used to reach std::chrono::ceil (undefined behaviour) and came
  // out ~292 years in the past.
  using sluice::detail::deadline_after;
  using sluice::detail::steady_time;
  using sluice::detail::to_steady;
  using dsec = std::chrono::duration<double>;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const auto before = std::chrono::steady_clock::now();
  const auto d = deadline_after(dsec(nan));
  const auto after = std::chrono::steady_clock::now();
  CHECK(d >= before);
  CHECK(d <= after);
  CHECK(deadline_after(dsec(inf)) == steady_time::max());
  const auto long_ago = deadline_after(dsec(-inf));
  CHECK(long_ago <= std::chrono::steady_clock::now());
  CHECK(long_ago >= before);  // "now", not the distant past
  const auto from_nan_tp = to_steady(std::chrono::time_point<std::chrono::system_clock, dsec>(dsec(nan)));
  CHECK(from_nan_tp >= before);
  CHECK(from_nan_tp <= std::chrono::steady_clock::now());
  CHECK(to_steady(std::chrono::time_point<std::chrono::system_clock, dsec>(dsec(inf))) == steady_time::max());
  // And a wait on it returns at once with timeout.
  event_count ec;
  CHECK(block_until(ec, [] { return false; }, deadline_after(dsec(nan)), nullptr) == wait_outcome::timeout);
}

TEST_CASE("event_count: ping-pong conserves every hand-off (no lost wake-up)") {
  const int rounds = static_cast<int>(sluice_test::scaled(20000));
  event_count ec;
  std::atomic<int> turn{0};
  std::jthread other([&] {
    for (int i = 0; i < rounds; ++i) {
      REQUIRE(block_until(ec, [&] { return turn.load() == 2 * i + 1; }, std::nullopt, nullptr) ==
              wait_outcome::ready);
      turn.store(2 * i + 2);
      ec.notify_all();
    }
  });
  for (int i = 0; i < rounds; ++i) {
    turn.store(2 * i + 1);
    ec.notify_all();
    REQUIRE(block_until(ec, [&] { return turn.load() == 2 * i + 2; }, std::nullopt, nullptr) ==
            wait_outcome::ready);
  }
  other.join();
  CHECK(turn == 2 * rounds);
}

TEST_CASE("event_count: a parked waiter uses no CPU") {
  event_count ec;
  std::atomic<bool> flag{false};
  std::atomic<long long> cpu_us{-1};
  std::jthread waiter([&] {
    const auto before = sluice_test::thread_cpu_time();
    (void)block_until(ec, [&] { return flag.load(); }, std::nullopt, nullptr);
    cpu_us = (sluice_test::thread_cpu_time() - before).count();
  });
  // Real time passes here on purpose: this measures idle CPU, it does not wait for a deadline.
  std::this_thread::sleep_for(300ms);
  flag = true;
  ec.notify_one();
  waiter.join();
  INFO("cpu used while parked for 300 ms: " << cpu_us << " us");
  CHECK(cpu_us < 10000);
}
