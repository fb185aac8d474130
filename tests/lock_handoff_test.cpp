// Direct tests of detail/lock_handoff.hpp, the bounded-unfairness mechanism limiter and
// key_lock_table share: the bypass clock arithmetic of handoff_fifo (each waiter's bypass count is
// "clock now - its arrival", the owner keeps only the head's), grant/wake signals, and
// await_turn's outcomes (granted, woken then taken, timeout, cancellation).
#include <sluice/detail/lock_handoff.hpp>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <mutex>
#include <optional>
#include <stop_token>
#include <thread>

using sluice::detail::handoff_fifo;
using sluice::detail::handoff_waiter;

TEST_CASE("handoff_fifo: arrivals on the bypass clock and the head's count after it leaves") {
  handoff_fifo q;
  handoff_waiter a, b, c;
  CHECK(q.empty());
  CHECK(q.head_gap() == 0);
  q.push_back(&a, 0);  // first waiter: the clock starts at its arrival
  CHECK(a.arrival == 0);
  std::uint64_t head_count = 5;  // five barging takes while a waited
  q.push_back(&b, static_cast<std::uint32_t>(head_count));
  CHECK(b.arrival == 5);
  head_count = 9;  // four more
  q.push_back(&c, static_cast<std::uint32_t>(head_count));
  CHECK(c.arrival == 9);
  CHECK(q.front() == &a);
  // a leaves: b becomes the head, bypassed 9 - 5 = 4 times since it arrived.
  CHECK(q.head_gap() == 5);
  head_count -= q.head_gap();
  q.remove(&a);
  CHECK(head_count == 4);
  CHECK(q.front() == &b);
  // A waiter in the middle or at the tail leaves: the head's count is unchanged.
  q.remove(&c);
  CHECK(q.front() == &b);
  CHECK(q.head_gap() == 0);
  q.remove(&b);
  CHECK(q.empty());
  // Every waiter's own count (clock - arrival) is at most the head's, whatever the order.
  handoff_waiter d, e;
  q.push_back(&d, 0);
  q.push_back(&e, 3);
  const std::uint64_t clock = d.arrival + 7;
  CHECK(clock - e.arrival <= clock - d.arrival);
  q.remove(&e);
  q.remove(&d);
  CHECK(q.empty());
}

TEST_CASE("handoff: grant and wake set the waiter's signal; wake never downgrades a grant") {
  handoff_waiter w;
  sluice::detail::wake(&w);
  CHECK(w.signal.load() == handoff_waiter::woken);
  sluice::detail::grant(&w);
  CHECK(w.signal.load() == handoff_waiter::granted);
  sluice::detail::wake(&w);
  CHECK(w.signal.load() == handoff_waiter::granted);
}

TEST_CASE("await_turn: granted, woken-then-taken, timeout and cancellation") {
  std::mutex m;
  SECTION("a grant from another thread") {
    handoff_waiter w;
    std::unique_lock lock(m);
    std::jthread granter([&] {
      std::lock_guard g(m);
      sluice::detail::grant(&w);
    });
    const bool ok = sluice::detail::await_turn(
        w, lock, std::nullopt, nullptr, [] { return false; }, [] { FAIL("abandoned"); });
    CHECK(ok);
    CHECK(lock.owns_lock());
  }
  SECTION("woken: attempt() decides; a failed attempt waits again") {
    handoff_waiter w;
    int attempts = 0;
    std::unique_lock lock(m);
    std::jthread waker([&] {
      for (int i = 0; i < 2; ++i) {
        // Wake only once the previous signal was consumed (attempt resets it under the mutex).
        for (;;) {
          std::lock_guard g(m);
          if (w.signal.load() == handoff_waiter::none) {
            sluice::detail::wake(&w);
            break;
          }
        }
      }
    });
    const bool ok = sluice::detail::await_turn(
        w, lock, std::nullopt, nullptr, [&] { return ++attempts == 2; }, [] { FAIL("abandoned"); });
    CHECK(ok);
    CHECK(attempts == 2);
  }
  SECTION("a deadline in the past abandons, holding the mutex") {
    handoff_waiter w;
    bool abandoned = false;
    std::unique_lock lock(m);
    const bool ok = sluice::detail::await_turn(
        w, lock, std::chrono::steady_clock::now() - std::chrono::seconds(1), nullptr, [] { return false; },
        [&] { abandoned = true; });
    CHECK_FALSE(ok);
    CHECK(abandoned);
    CHECK(lock.owns_lock());
  }
  SECTION("a requested stop abandons") {
    handoff_waiter w;
    std::stop_source source;
    bool abandoned = false;
    std::unique_lock lock(m);
    std::jthread stopper([&] { source.request_stop(); });
    const std::stop_token token = source.get_token();
    const bool ok = sluice::detail::await_turn(
        w, lock, std::nullopt, &token, [] { return false; }, [&] { abandoned = true; });
    CHECK_FALSE(ok);
    CHECK(abandoned);
  }
  SECTION("a grant that races with the deadline wins") {
    handoff_waiter w;
    sluice::detail::grant(&w);  // granted before the waiter even looks
    std::unique_lock lock(m);
    const bool ok = sluice::detail::await_turn(
        w, lock, std::chrono::steady_clock::now() - std::chrono::seconds(1), nullptr, [] { return false; },
        [] { FAIL("abandoned"); });
    CHECK(ok);
  }
}
