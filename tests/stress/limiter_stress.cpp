// Seeded stress for sluice::limiter: every acquisition mode at once, waiters cancelled by other
// threads and timing out while permits are being handed over, wait_idle racing with releases.
// Checks the bound (high-water mark) and conservation (every permit comes back, none is duplicated).
#include <sluice/limiter.hpp>

#include "test_support.hpp"

#include <atomic>
#include <cstdint>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <utility>
#include <vector>

using sluice::limiter;

TEST_CASE("limiter stress: bound and conservation with cancellation and timeouts racing barging and handoff") {
  const auto seed = sluice_test::seed();
  INFO("seed " << seed);
  for (std::size_t threads : {1u, 2u, 4u, 8u}) {
    for (std::size_t max : {1u, 2u, 5u}) {
     // A bypass bound of 2 makes starvation mode (hand-off to the oldest waiter) and its exits
     // race with barging, timeouts and cancellation all the time; the real bound rarely triggers.
     for (std::uint32_t bound : {2u, limiter::max_bypasses}) {
      INFO("threads " << threads << " max " << max << " bypass bound " << bound);
      limiter l(max, sluice::detail::bypass_bound_for_testing{bound});
      std::atomic<std::size_t> holders{0};
      std::atomic<std::size_t> high{0};
      std::atomic<std::size_t> granted{0};
      std::atomic<std::size_t> refused{0};
      std::atomic<bool> done{false};
      const std::size_t rounds = sluice_test::scaled(4000, 4);  // x2 bypass bounds: keep the sanitizer run near its old length
      // Each worker has a stop source that a canceller thread keeps firing and renewing.
      std::mutex sources_mutex;
      std::vector<std::stop_source> sources(threads);

      std::vector<std::jthread> pool;
      for (std::size_t t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          std::mt19937_64 rng(seed ^ (t * 0x9E3779B97F4A7C15ULL));
          for (std::size_t r = 0; r < rounds; ++r) {
            std::optional<limiter::permit> p;
            switch (rng() % 6) {
              case 0: p = l.acquire(); break;
              case 1: p = l.try_acquire(); break;
              case 2: p = l.try_acquire_for(std::chrono::microseconds(rng() % 20)); break;
              case 3: p = l.try_acquire_until(std::chrono::steady_clock::now() - std::chrono::seconds(1)); break;
              case 4: {
                std::stop_source fresh;
                p = l.acquire(fresh.get_token());
                break;
              }
              default: {
                std::stop_token token;
                {
                  std::lock_guard lock(sources_mutex);
                  token = sources[t].get_token();
                }
                p = l.acquire(token);
                break;
              }
            }
            if (!p) {
              ++refused;
              continue;
            }
            const std::size_t now = holders.fetch_add(1) + 1;
            std::size_t h = high.load();
            while (now > h && !high.compare_exchange_weak(h, now)) {
            }
            if (rng() % 4 == 0) std::this_thread::yield();
            holders.fetch_sub(1);
            ++granted;
            if (rng() % 3 == 0) {
              limiter::permit moved = std::move(*p);  // moving never duplicates a permit
              (void)moved;
            }
          }
        });
      }
      std::jthread canceller([&] {
        std::mt19937_64 rng(seed + 99);
        while (!done) {
          const std::size_t t = rng() % threads;
          std::stop_source old;
          {
            std::lock_guard lock(sources_mutex);
            old = std::exchange(sources[t], std::stop_source());
          }
          old.request_stop();  // fires while the worker may be parked on it
          std::this_thread::yield();
        }
      });
      std::jthread idler([&] {
        while (!done) (void)l.wait_idle_for(std::chrono::microseconds(100));
      });
      pool.clear();
      done = true;
      canceller.join();
      idler.join();
      CHECK(high <= max);
      CHECK(granted + refused == threads * rounds);
      CHECK(l.in_use() == 0);
      CHECK(l.waiting() == 0);
      CHECK(l.wait_idle_for(std::chrono::seconds(0)));
      std::vector<limiter::permit> all;
      for (std::size_t i = 0; i < max; ++i) {
        auto p = l.try_acquire();
        REQUIRE(p);
        all.push_back(std::move(*p));
      }
      CHECK_FALSE(l.try_acquire());
     }
    }
  }
}

TEST_CASE("limiter stress: destroyed right after wait_idle() while the last release may still be returning") {
  // The releasing thread is not joined before the limiter is destroyed: once wait_idle() has
  // seen every permit back, nothing the release does afterwards may touch the limiter (ASan
  // reports it if it does). A waiter that times out meanwhile makes the release take its
  // wake-the-head path.
  const auto seed = sluice_test::seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const std::size_t rounds = sluice_test::scaled(2000);
  for (std::size_t r = 0; r < rounds; ++r) {
    auto l = std::make_unique<limiter>(1);
    std::optional<limiter::permit> held = l->acquire();
    const auto patience = std::chrono::microseconds(rng() % 30);
    std::jthread waiter([&l, patience] { (void)l->try_acquire_for(patience); });
    std::jthread releaser([&held] { held.reset(); });
    waiter.join();
    l->wait_idle();
    l.reset();
  }
  SUCCEED();
}
