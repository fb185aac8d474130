// Tests for the clock concept, the steady adapter, saturating time arithmetic and manual_clock.
#include <sluice/clock.hpp>
#include <sluice/testing/manual_clock.hpp>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

using namespace std::chrono_literals;
using sluice::detail::block_on_clock;
using sluice::event_count;
using sluice::saturating_add;
using sluice::detail::wait_outcome;
using sluice::testing::manual_clock;

TEST_CASE("clock: steady_clock and manual_clock model clock_source") {
  STATIC_REQUIRE(sluice::clock_source<sluice::steady_clock>);
  STATIC_REQUIRE(sluice::clock_source<manual_clock>);
  STATIC_REQUIRE_FALSE(sluice::clock_source<int>);
}

TEST_CASE("clock: saturating_add never overflows") {
  using tp = std::chrono::steady_clock::time_point;
  const tp t0{std::chrono::seconds(5)};
  CHECK(saturating_add(t0, 1s) == t0 + 1s);
  CHECK(saturating_add(t0, std::chrono::hours::max()) == tp::max());
  CHECK(saturating_add(t0, std::chrono::hours::min()) == tp::min());
  CHECK(saturating_add(tp::min() + 1h, std::chrono::duration<double>(1e300)) == tp::max());
  CHECK(saturating_add(tp::min() + 1h, std::chrono::hours(-2)) == tp::min());
  CHECK(saturating_add(tp::max() - 1ns, 5ns) == tp::max());
  CHECK(saturating_add(t0, std::chrono::duration<double>(1e300)) == tp::max());
  CHECK(saturating_add(t0, std::chrono::duration<double>(1.5e-9)) == t0 + 2ns);  // rounds up
  CHECK(saturating_add(t0, -2s) == t0 - 2s);
  // NaN is "no time at all" (a NaN timeout is already expired); infinities saturate.
  CHECK(saturating_add(t0, std::chrono::duration<double>(std::numeric_limits<double>::quiet_NaN())) == t0);
  CHECK(saturating_add(t0, std::chrono::duration<double>(std::numeric_limits<double>::infinity())) == tp::max());
  CHECK(saturating_add(t0, std::chrono::duration<double>(-std::numeric_limits<double>::infinity())) == tp::min());
  // Exact at the ends, in integers, for the clock's own duration.
  CHECK(saturating_add(tp::max() - 5ns, 5ns) == tp::max());
  CHECK(saturating_add(tp::max() - 6ns, 5ns) == tp::max() - 1ns);
  CHECK(saturating_add(tp::min() + 5ns, -5ns) == tp::min());
  CHECK(saturating_add(tp::min(), std::chrono::nanoseconds::max()) == tp(std::chrono::nanoseconds(-1)));
  // d alone is out of range, the sum is not.
  const std::chrono::hours two_centuries(24 * 365 * 200);  // 6.3e18 ns: fits; twice that does not
  CHECK(saturating_add(tp::min() + 2h, 2 * two_centuries) == tp::min() + 2h + two_centuries + two_centuries);
}

TEST_CASE("clock: the public parking handle and saturating helper are the ones detail/ uses") {
  STATIC_REQUIRE(std::is_same_v<sluice::detail::event_count, sluice::event_count>);
  // The opaque key: made only by prepare_wait(), copyable.
  STATIC_REQUIRE_FALSE(std::is_default_constructible_v<sluice::event_count::key_type>);
  STATIC_REQUIRE_FALSE(std::is_convertible_v<std::uint32_t, sluice::event_count::key_type>);
  STATIC_REQUIRE(std::is_trivially_copyable_v<sluice::event_count::key_type>);
  using tp = std::chrono::steady_clock::time_point;
  CHECK(sluice::detail::saturating_add(tp{}, 1s) == sluice::saturating_add(tp{}, 1s));
}

TEST_CASE("clock: steady_clock wait_until with a past deadline returns false at once") {
  event_count ec;
  sluice::steady_clock clock;
  const auto key = ec.prepare_wait();
  CHECK_FALSE(clock.wait_until(ec, key, clock.now() - 1s));
  CHECK_FALSE(ec.has_waiters());
}

TEST_CASE("clock: manual_clock copies share one timeline and time never goes backwards") {
  manual_clock a;
  manual_clock b = a;
  CHECK(a.now() == manual_clock::time_point{});
  a.advance(5s);
  CHECK(b.now() == manual_clock::time_point{5s});
  b.set(manual_clock::time_point{7s});
  CHECK(a.now() == manual_clock::time_point{7s});
  CHECK_THROWS_WITH(a.advance(-1s), "sluice::manual_clock: advance duration must be >= 0, got -1000000000ns");
  CHECK_THROWS_AS(a.set(manual_clock::time_point{1s}), std::invalid_argument);
  a.advance(std::chrono::hours::max());  // saturates
  CHECK(a.now() == manual_clock::time_point::max());
}

TEST_CASE("clock: manual_clock wait_until returns false at once when the deadline has passed") {
  manual_clock clock(manual_clock::time_point{10s});
  event_count ec;
  const auto key = ec.prepare_wait();
  CHECK_FALSE(clock.wait_until(ec, key, manual_clock::time_point{10s}));
  CHECK(clock.waiters() == 0);
  CHECK_FALSE(ec.has_waiters());
}

TEST_CASE("clock: advance wakes a component parked until a deadline, and only then") {
  manual_clock clock;
  event_count ec;
  std::atomic<int> outcome{-1};
  std::jthread worker([&] {
    const auto r = block_on_clock(clock, ec, [] { return false; }, manual_clock::time_point{10s}, nullptr);
    outcome = static_cast<int>(r);
  });
  clock.wait_for_waiters(1);
  clock.advance(9s);            // not yet: the worker wakes, re-checks, parks again
  clock.wait_for_waiters(1);
  CHECK(outcome == -1);
  clock.advance(1s);
  worker.join();
  CHECK(outcome == static_cast<int>(wait_outcome::timeout));
  CHECK(clock.waiters() == 0);
}

TEST_CASE("clock: a notify wakes a clock waiter without any time passing") {
  manual_clock clock;
  event_count ec;
  std::atomic<bool> flag{false};
  std::atomic<int> outcome{-1};
  std::jthread worker([&] {
    outcome = static_cast<int>(block_on_clock(clock, ec, [&] { return flag.load(); }, std::nullopt, nullptr));
  });
  clock.wait_for_waiters(1);
  flag = true;
  ec.notify_all();
  worker.join();
  CHECK(outcome == static_cast<int>(wait_outcome::ready));
  CHECK(clock.waiters() == 0);  // left the registry on its own
}

TEST_CASE("clock: stop_token interrupts block_on_clock on either clock") {
  event_count ec;
  {
    manual_clock clock;
    std::stop_source src;
    std::atomic<int> outcome{-1};
    std::jthread worker([&] {
      const auto token = src.get_token();
      outcome = static_cast<int>(block_on_clock(clock, ec, [] { return false; }, std::nullopt, &token));
    });
    clock.wait_for_waiters(1);
    src.request_stop();
    worker.join();
    CHECK(outcome == static_cast<int>(wait_outcome::cancelled));
  }
  {
    sluice::steady_clock clock;
    std::stop_source src;
    src.request_stop();
    const auto token = src.get_token();
    CHECK(block_on_clock(clock, ec, [] { return false; }, std::nullopt, &token) == wait_outcome::cancelled);
  }
}

TEST_CASE("clock: waiters() counts parked threads and advance empties it until they come back") {
  for (int threads : sluice_test::thread_counts<>) {
    manual_clock clock;
    event_count ec;
    std::atomic<int> rounds{0};
    std::atomic<bool> done{false};
    std::vector<std::jthread> workers;
    for (int i = 0; i < threads; ++i) {
      workers.emplace_back([&] {
        // Each round parks until the next whole second; counts a round per deadline reached.
        while (!done) {
          const auto next = manual_clock::time_point{std::chrono::duration_cast<std::chrono::seconds>(
                                clock.now().time_since_epoch()) + 1s};
          if (block_on_clock(clock, ec, [&] { return done.load(); }, next, nullptr) == wait_outcome::timeout) ++rounds;
        }
      });
    }
    for (int step = 1; step <= 5; ++step) {
      REQUIRE(clock.wait_for_waiters_for(static_cast<std::size_t>(threads), 60s));
      CHECK(clock.waiters() == static_cast<std::size_t>(threads));
      clock.advance(1s);
    }
    REQUIRE(clock.wait_for_waiters_for(static_cast<std::size_t>(threads), 60s));
    CHECK(rounds == 5 * threads);  // every advance was seen by every worker before it parked again
    done = true;
    ec.notify_all();
    workers.clear();
    CHECK(clock.waiters() == 0);
  }
}
