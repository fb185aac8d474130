// Seeded stress for sluice::key_lock_table: few and many keys, 1-8 threads, every acquisition
// mode, waiters cancelled by another thread, exceptions thrown inside critical sections, guards
// moved between owners. Checks: never two holders of one key, every critical section counted
// once, and the table returns to empty (size() == 0, no waiter) afterwards.
#include <sluice/key_lock_table.hpp>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using sluice::key_lock_table;

namespace {
struct checker {
  std::vector<std::atomic<int>> holders;
  std::atomic<bool> violated{false};
  explicit checker(std::size_t keys) : holders(keys) {}
  void enter(std::size_t k) {
    if (holders[k].fetch_add(1) != 0) violated = true;
  }
  void leave(std::size_t k) { holders[k].fetch_sub(1); }
};
}  // namespace

TEST_CASE("key_lock_table stress: one holder per key with cancellation, timeouts and exceptions") {
  const auto seed = sluice_test::seed();
  INFO("seed " << seed);
  for (std::size_t threads : {1u, 2u, 4u, 8u}) {
    for (std::size_t keys : {1u, 3u, 64u, 5000u}) {
      for (std::size_t shards : {1u, 16u}) {
        // With one shard, a bypass bound of 2: starvation mode (hand-off to the oldest waiter)
        // and its exits then race with barging, timeouts and cancellation all the time.
        const std::uint32_t bound = shards == 1 ? 2 : key_lock_table<std::string>::max_bypasses;
        INFO("threads " << threads << " keys " << keys << " shards " << shards << " bypass bound " << bound);
        key_lock_table<std::string> table(shards, 2, sluice::detail::bypass_bound_for_testing{bound});
        checker check(keys);
        std::atomic<std::size_t> sections{0};
        std::atomic<std::size_t> refused{0};
        std::atomic<std::size_t> thrown{0};
        std::atomic<bool> done{false};
        std::mutex sources_mutex;
        std::vector<std::stop_source> sources(threads);
        const std::size_t rounds = sluice_test::scaled(1500, 2);
        std::vector<std::jthread> pool;
        for (std::size_t t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            std::mt19937_64 rng(seed ^ (t * 0x9E3779B97F4A7C15ULL) ^ (keys << 20));
            for (std::size_t r = 0; r < rounds; ++r) {
              const std::size_t k = rng() % keys;
              const std::string key = "entity-" + std::to_string(k);
              std::optional<key_lock_table<std::string>::guard> g;
              switch (rng() % 5) {
                case 0: g = table.lock(key); break;
                case 1: g = table.try_lock(key); break;
                case 2: g = table.try_lock_for(key, std::chrono::microseconds(rng() % 30)); break;
                case 3: g = table.try_lock_until(key, std::chrono::system_clock::now()); break;
                default: {
                  std::stop_token token;
                  {
                    std::lock_guard lock(sources_mutex);
                    token = sources[t].get_token();
                  }
                  g = table.lock(key, token);
                  break;
                }
              }
              if (!g) {
                ++refused;
                continue;
              }
              try {
                check.enter(k);
                if (g->key() != key) check.violated = true;
                if (rng() % 4 == 0) std::this_thread::yield();
                ++sections;
                check.leave(k);
                if (rng() % 3 == 0) throw std::runtime_error("reconcile failed");
                if (rng() % 3 == 0) {
                  auto moved = std::move(*g);  // ownership moves; still one unlock
                  moved.unlock();
                }
              } catch (const std::runtime_error&) {
                ++thrown;
              }
            }
          });
        }
        std::jthread canceller([&] {
          std::mt19937_64 rng(seed + 17);
          while (!done) {
            std::stop_source old;
            {
              std::lock_guard lock(sources_mutex);
              old = std::exchange(sources[rng() % threads], std::stop_source());
            }
            old.request_stop();
            std::this_thread::yield();
          }
        });
        pool.clear();
        done = true;
        canceller.join();
        CHECK_FALSE(check.violated);
        CHECK(sections + refused == threads * rounds);
        CHECK(table.size() == 0);
        CHECK(table.waiting() == 0);
        CHECK(table.pooled() <= shards * 2);
      }
    }
  }
}

TEST_CASE("key_lock_table stress: 1M distinct keys through 2 threads return the table to empty") {
  const auto seed = sluice_test::seed();
  INFO("seed " << seed);
  key_lock_table<std::uint64_t> table;
  const std::uint64_t per_thread = sluice_test::scaled(500'000, 5);
  std::atomic<std::uint64_t> thrown{0};
  std::vector<std::jthread> pool;
  for (std::uint64_t t = 0; t < 2; ++t) {
    pool.emplace_back([&, t] {
      std::mt19937_64 rng(seed + t);
      for (std::uint64_t i = 0; i < per_thread; ++i) {
        try {
          auto g = table.lock(t * per_thread + i);  // every key distinct
          if (rng() % 2 == 0) throw std::runtime_error("fail");
        } catch (const std::runtime_error&) {
          ++thrown;
        }
      }
    });
  }
  pool.clear();
  CHECK(thrown > 0);
  CHECK(table.size() == 0);
  CHECK(table.pooled() <= table.shard_count() * key_lock_table<std::uint64_t>::default_pooled_entries_per_shard);
}
